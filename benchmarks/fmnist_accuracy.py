"""Accuracy of compressed Fashion-MNIST models per method, on the 10k test set.

    python benchmarks/fmnist_accuracy.py [--models DIR] [--names vgg_bn,resnet20_bn,...]
        [--prune 0,0.3] [--bits 32,6] [--methods none,mean,merge,udfc] [--out benchmarks/results]

Models come from `python models/build_fashion_mnist.py` (default folder ~/.cache/onnx-udfc/models).
For every model x prune x bits x method: top-1 on the labels, top-1 agreement with the original, mean KL
(original || compressed) of the softmax outputs, MACs and bytes ratios, and compression seconds.
Writes `fmnist_accuracy.md` and `.json` into --out.
"""
from __future__ import annotations

import os

# one BLAS thread: the math is on small matrices and threaded BLAS on busy cores is many times slower
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "models"))
sys.path.insert(0, os.path.join(HERE, ".."))

from fashion_mnist import load_fashion_mnist, predict_onnx  # noqa: E402
from common import kl, option_value  # noqa: E402

import onnx_udfc  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.expanduser("~/.cache/onnx-udfc/models"))
    ap.add_argument("--names", default="vgg_bn,resnet20_bn,vgg_folded,resnet20_folded")
    ap.add_argument("--prune", default="0.3")
    ap.add_argument("--bits", default="6")
    ap.add_argument("--methods", default="none,mean,merge,udfc")
    ap.add_argument("--select", default="expected-error")
    ap.add_argument("--statistics", default="auto")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra compress() option, e.g. ridge=0.1 (repeatable)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="fmnist_accuracy")
    args = ap.parse_args(argv)

    extra = {k: option_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    images, labels = load_fashion_mnist("test")
    rows = []
    for name in args.names.split(","):
        path = os.path.join(args.models, name + ".onnx")
        if not os.path.exists(path):
            print(f"skip {name}: {path} missing (run models/build_fashion_mnist.py)", file=sys.stderr)
            continue
        model = onnx.load(path)
        ref = predict_onnx(model, images)
        base_top1 = float(np.mean(ref.argmax(1) == labels))
        rows.append(dict(model=name, prune=0.0, bits=32, method="original", select="", top1=base_top1,
                         agreement=1.0, kl=0.0, macs_ratio=1.0, bytes_ratio=1.0, seconds=0.0))
        print(f"{name}: original top-1 {base_top1:.4f}", file=sys.stderr)
        for prune, bits, method in itertools.product([float(p) for p in args.prune.split(",")],
                                                     [int(b) for b in args.bits.split(",")],
                                                     args.methods.split(",")):
            if prune == 0 and bits == 32:
                continue
            t0 = time.perf_counter()
            out, report = onnx_udfc.compress(model, prune=prune, bits=bits, method=method, select=args.select,
                                             statistics=args.statistics, validate=False, **extra)
            seconds = time.perf_counter() - t0
            logits = predict_onnx(out, images)
            row = dict(model=name, prune=prune, bits=bits, method=method, select=args.select,
                       top1=float(np.mean(logits.argmax(1) == labels)),
                       agreement=float(np.mean(logits.argmax(1) == ref.argmax(1))), kl=kl(ref, logits),
                       macs_ratio=report.after.macs / report.before.macs,
                       bytes_ratio=report.after.bytes / report.before.bytes, seconds=round(seconds, 3))
            rows.append(row)
            print(f"{name} prune {prune} bits {bits} {method:6}: top-1 {row['top1']:.4f} "
                  f"(delta {row['top1'] - base_top1:+.4f}) agreement {row['agreement']:.4f} KL {row['kl']:.4f} "
                  f"MACs x{row['macs_ratio']:.3f} {seconds:.2f}s", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, args.tag + ".md"), "w") as f:
        f.write("| model | prune | bits | method | top-1 | agreement | KL | MACs ratio | bytes ratio | seconds |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['model']} | {r['prune']} | {r['bits']} | {r['method']} | {r['top1']:.4f} | "
                    f"{r['agreement']:.4f} | {r['kl']:.4f} | {r['macs_ratio']:.3f} | {r['bytes_ratio']:.3f} | "
                    f"{r['seconds']} |\n")


if __name__ == "__main__":
    main()

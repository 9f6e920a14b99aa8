"""Accuracy of compressed ImageNet models per method, on the 500-image ImageNet sample.

    python benchmarks/imagenet_accuracy.py [--models DIR] [--names mobilenetv2_bn,efficientnet_lite0_bn]
        [--prune 0,0.1] [--bits 32,8,6] [--methods none,mean,udfc] [--limit N] [--option KEY=VALUE ...]
        [--out benchmarks/results] [--tag imagenet_accuracy]

Models come from `python benchmarks/imagenet_models.py` (default folder ~/.cache/onnx-udfc/models); images
from `imagenet_sample.load_imagenet_sample` with the mean/std each model needs (`PREPROCESSING`: ImageNet
mean/std for MobileNetV2, 127/128 scaling for EfficientNet-Lite0). For every model x prune x bits x method
(prune 0 / bits 32 is the "original" row): top-1 on the labels, top-1 agreement with the original, mean KL
(original || compressed) of the softmax outputs, MACs and bytes ratios, and compression seconds. A cell whose
compress() raises is recorded with its error message and the run goes on. Writes `<tag>.md` and `.json`
into --out. onnxruntime runs on the CPU with one thread, batch 50.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

# one BLAS thread: the math is on small matrices and threaded BLAS on busy cores is many times slower
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from imagenet_sample import load_imagenet_sample, preprocessing_for  # noqa: E402
from common import kl, option_value  # noqa: E402

import onnx_udfc  # noqa: E402


def predict_onnx(model, images, batch=50, num_threads=1):
    """First output of `model` (ModelProto or path) on `images`, onnxruntime CPU, batches of `batch`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(num_threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0].name
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch
    outs = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - n,) + chunk.shape[1:], dtype=np.float32)])
        outs.append(sess.run([out], {inp.name: chunk})[0][:n])
    return np.concatenate(outs)


PEER = "ort-int8"


def ort_int8_dynamic(model):
    """The peer a user would otherwise run: onnxruntime's `quantize_dynamic`, int8 weights per channel.

    Returns (model, report-like object with before/after macs and bytes) so the caller treats it as a cell.
    """
    import tempfile
    from types import SimpleNamespace

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        out = onnx.load(dst)
        size = SimpleNamespace(before=os.path.getsize(src), after=os.path.getsize(dst))
    sizes = SimpleNamespace(before=SimpleNamespace(macs=0, bytes=size.before),
                            after=SimpleNamespace(macs=0, bytes=size.after))
    return out, sizes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.expanduser("~/.cache/onnx-udfc/models"))
    ap.add_argument("--names", default="mobilenetv2_bn,efficientnet_lite0_bn")
    ap.add_argument("--prune", default="0,0.1")
    ap.add_argument("--bits", default="32,8,6")
    ap.add_argument("--methods", default="none,mean,udfc",
                    help=f"compensation methods; '{PEER}' adds onnxruntime quantize_dynamic for the prune 0 / bits 8 cell")
    ap.add_argument("--limit", type=int, default=None, help="first N images only (default all 500)")
    ap.add_argument("--images", default="../shared/data/imagenet-sample",
                    help="image folder, relative to the repository root")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra compress() option, e.g. ridge=0.1 or select=norm (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="imagenet_accuracy")
    args = ap.parse_args(argv)

    extra = {k: option_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    grid = list(itertools.product([float(p) for p in args.prune.split(",")], [int(b) for b in args.bits.split(",")],
                                  args.methods.split(",")))
    rows = []

    def fmt(v, spec):  # None (not measured: error, or MACs the library could not count) -> "-"
        return "-" if v is None else format(v, spec)

    for name in args.names.split(","):
        path = os.path.join(args.models, name + ".onnx")
        if not os.path.exists(path):
            print(f"skip {name}: {path} missing (run benchmarks/imagenet_models.py)", file=sys.stderr)
            continue
        pre = preprocessing_for(name)
        images, labels, _ = load_imagenet_sample(args.images, limit=args.limit, **pre)
        model = onnx.load(path)
        ref = predict_onnx(model, images, args.batch, args.threads)
        base_top1 = float(np.mean(ref.argmax(1) == labels))
        rows.append(dict(model=name, prune=0.0, bits=32, method="original", top1=base_top1, agreement=1.0,
                         kl=0.0, macs_ratio=1.0, bytes_ratio=1.0, seconds=0.0, images=len(labels), error=""))
        print(f"{name}: original top-1 {base_top1:.4f} on {len(labels)} images "
              f"(mean {tuple(round(m, 4) for m in pre['mean'])}, std {tuple(round(s, 4) for s in pre['std'])})",
              file=sys.stderr, flush=True)
        for prune, bits, method in grid:
            if prune == 0 and bits == 32:
                continue
            if method == PEER and (prune != 0 or bits != 8):
                continue  # the peer only quantizes weights to int8
            t0 = time.perf_counter()
            try:
                if method == PEER:
                    out, report = ort_int8_dynamic(model)
                else:
                    out, report = onnx_udfc.compress(model, prune=prune, bits=bits, method=method, validate=False,
                                                     **extra)
            except Exception as exc:  # record and go on: one failing cell must not lose the others
                seconds = time.perf_counter() - t0
                msg = f"{type(exc).__name__}: {exc}"
                rows.append(dict(model=name, prune=prune, bits=bits, method=method, top1=None, agreement=None,
                                 kl=None, macs_ratio=None, bytes_ratio=None, seconds=round(seconds, 3),
                                 images=len(labels), error=msg))
                print(f"{name} prune {prune} bits {bits} {method:6}: ERROR after {seconds:.2f}s: {msg}",
                      file=sys.stderr, flush=True)
                continue
            seconds = time.perf_counter() - t0
            logits = predict_onnx(out, images, args.batch, args.threads)
            row = dict(model=name, prune=prune, bits=bits, method=method,
                       top1=float(np.mean(logits.argmax(1) == labels)),
                       agreement=float(np.mean(logits.argmax(1) == ref.argmax(1))), kl=kl(ref, logits),
                       macs_ratio=report.after.macs / report.before.macs if report.before.macs else None,
                       bytes_ratio=report.after.bytes / report.before.bytes, seconds=round(seconds, 3),
                       images=len(labels), error="")
            rows.append(row)
            print(f"{name} prune {prune} bits {bits} {method:6}: top-1 {row['top1']:.4f} "
                  f"(delta {row['top1'] - base_top1:+.4f}) agreement {row['agreement']:.4f} KL {row['kl']:.4f} "
                  f"MACs x{fmt(row['macs_ratio'], '.3f')} {seconds:.2f}s", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.tag + ".json"), "w") as f:
        json.dump([dict(r, options=extra) for r in rows], f, indent=1)

    with open(os.path.join(args.out, args.tag + ".md"), "w") as f:
        n = rows[0]["images"] if rows else 0
        f.write(f"ImageNet sample ({n} images), options {extra or 'defaults'}\n\n")
        f.write("| model | prune | bits | method | top-1 | agreement | KL | MACs ratio | bytes ratio | seconds |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['model']} | {r['prune']} | {r['bits']} | {r['method']} | {fmt(r['top1'], '.4f')} | "
                    f"{fmt(r['agreement'], '.4f')} | {fmt(r['kl'], '.4f')} | {fmt(r['macs_ratio'], '.3f')} | "
                    f"{fmt(r['bytes_ratio'], '.3f')} | {r['seconds']} |\n")
        if any(r["macs_ratio"] is None and not r["error"] for r in rows):
            f.write("\nMACs ratio '-': report.before.macs was 0 (the library could not count this model's MACs).\n")
        errors = [r for r in rows if r["error"]]
        if errors:
            f.write("\nErrors:\n\n")
            for r in errors:
                f.write(f"- {r['model']} prune {r['prune']} bits {r['bits']} {r['method']}: `{r['error']}`\n")


if __name__ == "__main__":
    main()

"""What the validation can tell: output agreement of compressed ImageNet models on synthetic inputs against
the same on the real images.

    python benchmarks/validation_proxy.py [--names mobilenetv2_folded,mobilenetv2_bn] [--cells 0.1:8,0.3:8,0.5:8,0:4]
        [--images ../shared/data/imagenet-sample] [--out benchmarks/results] [--tag validation_proxy]

`onnx-udfc` validates its output on seeded synthetic inputs (8 pink-noise images, `validate.compare`); a user
without data has nothing else. For each model and `prune:bits` cell (default options, `compress(...,
validate=False)`) this compares original and compressed outputs on five input sets: the validation's own 8
pink images, 64 pink images, 64 image-prior images, 64 diverse images (chosen by the model's answers as the
probe does, `stats.sampled.resolve_synthetic_inputs`), all from seed 1000 (held out: the probe uses the
option's seed, 0), and the real ImageNet sample (500 images). Per set: top-1 agreement, cosine and relative L2
error of the first output. Writes `<tag>.md` and `.json` into --out.
"""
from __future__ import annotations

import argparse
import os
import sys

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from common import machine_settings, write_json_and_table  # noqa: E402
from imagenet_accuracy import predict_onnx  # noqa: E402
from imagenet_sample import load_imagenet_sample, preprocessing_for  # noqa: E402

import onnx_udfc  # noqa: E402
from onnx_udfc.stats import sampled  # noqa: E402

HELD_OUT_SEED = 1000
SETS = ("pink 8", "pink 64", "prior 64", "diverse 64", "real")


def input_sets(model: onnx.ModelProto, real: np.ndarray) -> dict:
    """The five input sets (float32 NCHW) for `model`'s first input."""
    shape = (64,) + tuple(real.shape[1:])
    pink = np.concatenate(list(sampled.pink_noise_batches(shape, seed=HELD_OUT_SEED, batch=8)))
    prior = np.concatenate(list(sampled.image_prior_batches(shape, seed=HELD_OUT_SEED, batch=8)))
    _, _, runs = sampled.resolve_synthetic_inputs(model, model.graph.input[0].name, (1,) + shape[1:], "diverse",
                                                  64, 8, HELD_OUT_SEED)
    diverse = np.concatenate(runs) if runs is not None else prior
    sets = {"pink 8": pink[:8], "pink 64": pink, "prior 64": prior, "diverse 64": diverse, "real": real}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sets.items()}


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    a, b = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    return dict(agreement=float(np.mean(reference.argmax(1) == other.argmax(1))),
                cosine=float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                rel_l2=float(np.linalg.norm(b - a) / np.linalg.norm(a)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.expanduser("~/.cache/onnx-udfc/models"))
    ap.add_argument("--names", default="mobilenetv2_folded,mobilenetv2_bn")
    ap.add_argument("--cells", default="0.1:8,0.3:8,0.5:8,0:4", help="prune:bits pairs")
    ap.add_argument("--images", default="../shared/data/imagenet-sample",
                    help="image folder, relative to the repository root")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="validation_proxy")
    args = ap.parse_args(argv)
    cells = [(float(p), int(b)) for p, b in (c.split(":") for c in args.cells.split(","))]
    rows = []
    for name in args.names.split(","):
        model = onnx.load(os.path.join(args.models, name + ".onnx"))
        real, _, _ = load_imagenet_sample(args.images, **preprocessing_for(name))
        sets = input_sets(model, real)
        reference = {k: predict_onnx(model, v) for k, v in sets.items()}
        for prune, bits in cells:
            out, _ = onnx_udfc.compress(model, prune=prune, bits=bits, validate=False)
            row = dict(model=name, prune=prune, bits=bits,
                       **{k: agreement(reference[k], predict_onnx(out, v)) for k, v in sets.items()})
            rows.append(row)
            print(name, f"prune {prune} W{bits}:",
                  " | ".join(f"{k} {row[k]['agreement']:.3f} / {row[k]['cosine']:.3f}" for k in SETS), flush=True)
    preamble = ("Original against compressed (default options) on synthetic input sets (seed %d, held out from the "
                "probe's seed 0) and on the real ImageNet sample (500 images): top-1 agreement / cosine of the "
                "logits. 'pink 8' is what the validation runs." % HELD_OUT_SEED)
    header = "| model | prune | bits | " + " | ".join(SETS) + " |"

    def fmt(r):
        return (f"| {r['model']} | {r['prune']} | {r['bits']} | "
                + " | ".join(f"{r[k]['agreement']:.3f} / {r[k]['cosine']:.3f}" for k in SETS) + " |")

    write_json_and_table(args.out, args.tag, dict(cells=args.cells, **machine_settings()), rows, preamble, header,
                         fmt)


if __name__ == "__main__":
    main()

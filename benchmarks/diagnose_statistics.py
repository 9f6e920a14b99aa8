"""How good is the data-free statistics model? Compare it with real activations, chain by chain.

    python benchmarks/diagnose_statistics.py MODEL.onnx [--fmnist N | --imagenet DIR N]

For every prunable chain, the consumer's input channels are measured on real images (Fashion-MNIST
test set or the ImageNet sample) and compared with what `AnalyticStatistics` predicts without data:
correlation and relative error of the per-channel means and standard deviations, and the agreement of
the off-diagonal channel correlations (Pearson r). Real data is used here only to judge the model;
the tool itself never sees any.
"""
from __future__ import annotations

import os

# one BLAS thread: the math is on small matrices and threaded BLAS on busy cores is many times slower
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "models"))

from onnx_udfc.config import Options  # noqa: E402
from onnx_udfc.ir.graph import Graph  # noqa: E402
from onnx_udfc.ir.shapes import resolve_input_shapes  # noqa: E402
from onnx_udfc.numerics.covariance import cov_to_corr  # noqa: E402
from onnx_udfc.passes.base import PassContext  # noqa: E402
from onnx_udfc.passes.compress import StatisticsPass  # noqa: E402
from onnx_udfc.passes.fold_bn import FoldBatchNormPass  # noqa: E402
from onnx_udfc.passes.normalize import NormalizeGraphPass  # noqa: E402
from onnx_udfc.patterns.chains import ChainFinder  # noqa: E402


def real_images(args):
    if args.imagenet:
        from imagenet_sample import load_imagenet_sample

        return load_imagenet_sample(args.imagenet, limit=args.n)[0]
    from fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("test")[0][: args.n]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--imagenet", default=None, help="folder of the ImageNet sample")
    ap.add_argument("--statistics", default="analytic", choices=["analytic", "synthetic"])
    args = ap.parse_args(argv)
    model = onnx.load(args.model)
    graph = Graph(model)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = PassContext(graph=graph, options=Options(prune=0.5, statistics=args.statistics),
                      input_shapes=resolve_input_shapes(model), original=original)
    for p in (NormalizeGraphPass(), FoldBatchNormPass(), StatisticsPass()):
        p.run(ctx)
    chains = ctx.chains
    names = [c.last_stage.output for c in chains]
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    import onnxruntime as ort

    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = real_images(args)
    outs = [np.concatenate(parts) for parts in zip(*(sess.run(None, {sess.get_inputs()[0].name: x[i:i + 200]})
                                                     for i in range(0, len(x), 200)))]
    print(f"statistics: {ctx.stats.source}")
    print(f"{'chain':28} {'N':>4} {'mean r':>7} {'mean relerr':>11} {'std r':>6} {'std ratio':>9} {'corr r':>7}")
    for chain, act in zip(chains, outs):
        a = act.transpose(1, 0, *range(2, act.ndim)).reshape(act.shape[1], -1).astype(np.float64)
        real_mean, real_cov = a.mean(1), np.cov(a)
        pred = ctx.stats.chain_statistics(chain)
        if pred is None:
            print(f"{chain.name[:28]:28} no prediction")
            continue
        pm, pc = pred
        real_corr, real_sd = cov_to_corr(real_cov)
        pred_corr, pred_sd = cov_to_corr(pc)
        iu = np.triu_indices(len(pm), 1)
        print(f"{chain.name[:28]:28} {len(pm):>4} {np.corrcoef(pm, real_mean)[0, 1]:7.3f} "
              f"{np.linalg.norm(pm - real_mean) / np.linalg.norm(real_mean):11.3f} "
              f"{np.corrcoef(pred_sd, real_sd)[0, 1]:6.3f} {np.median(pred_sd / np.maximum(real_sd, 1e-9)):9.3f} "
              f"{np.corrcoef(pred_corr[iu], real_corr[iu])[0, 1]:7.3f}")


if __name__ == "__main__":
    main()

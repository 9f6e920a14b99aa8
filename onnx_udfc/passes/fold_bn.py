"""Fold `Conv -> BatchNormalization` and `Gemm -> BatchNormalization` into the producer.

    w' = w * gamma / sigma,  b' = (b - mean) * gamma / sigma + beta,  sigma = sqrt(var + eps)

(w: (N, C/g, kh, kw) Conv weight or the (N, K) Gemm weight rows.) The folded producer takes over the BN's
output name, and the BN prior `z ~ N(beta, |gamma|^2)` of that tensor is recorded in `ctx.priors`:
it is what the statistics model and the quantizer use, and it is the only thing taken from the BN.
A BN is left alone (and stays a statistics source) when its producer's output has other readers,
when the producer weight is not constant, or when the BN runs in training mode.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..ir.graph import Graph, attr, set_attr
from ..numerics.bn import bn_prior, fold_batchnorm
from .base import Pass, PassContext, PassResult


def batchnorm_params(graph: Graph, bn: onnx.NodeProto):
    """(gamma, beta, mean, var, eps) of an inference BN with constant parameters, else None."""
    if attr(bn, "training_mode", 0):
        return None
    if len(bn.output) > 1 and any(o for o in bn.output[1:]):
        return None
    arrays = [graph.constant(name) for name in bn.input[1:5]]
    if any(a is None for a in arrays):
        return None
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in arrays)
    return gamma, beta, mean, var, float(attr(bn, "epsilon", 1e-5))


class FoldBatchNormPass(Pass):
    name = "fold-batchnorm"

    def run(self, ctx: PassContext) -> PassResult:
        graph = ctx.graph
        folded = 0
        for bn in [n for n in graph.topological_nodes() if n.op_type == "BatchNormalization"]:
            producer = graph.producer_of(bn.input[0])
            if producer is None or producer.op_type not in ("Conv", "Gemm"):
                continue
            if graph.use_count(bn.input[0]) != 1:
                continue
            params = batchnorm_params(graph, bn)
            if params is None:
                continue
            fold = self._fold_conv if producer.op_type == "Conv" else self._fold_gemm
            if not fold(graph, producer, params):
                continue
            gamma, beta = params[0], params[1]
            out = bn.output[0]
            producer.output[0] = out
            graph.remove_nodes([bn])
            ctx.priors[out] = bn_prior(gamma, beta)
            ctx.layer(producer)["bn_folded"] = bn.name or out
            folded += 1
        return PassResult(folded > 0, {"folded": folded})

    @staticmethod
    def _fold_conv(graph: Graph, conv: onnx.NodeProto, params) -> bool:
        w = graph.constant(conv.input[1])
        if w is None or w.dtype != np.float32:
            return False
        b = graph.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if len(conv.input) > 2 and conv.input[2] and b is None:
            return False
        w2, b2 = fold_batchnorm(w, b, *params)
        graph.set_weight(conv, 1, w2.astype(np.float32))
        graph.set_weight(conv, 2, np.asarray(b2, dtype=np.float32))
        return True

    @staticmethod
    def _fold_gemm(graph: Graph, gemm: onnx.NodeProto, params) -> bool:
        w = graph.constant(gemm.input[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2 or attr(gemm, "transA", 0):
            return False
        trans_b = attr(gemm, "transB", 0)
        alpha = float(attr(gemm, "alpha", 1.0))
        beta_attr = float(attr(gemm, "beta", 1.0))
        rows = w if trans_b else w.T  # (N, K)
        c = graph.constant(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if len(gemm.input) > 2 and gemm.input[2] and c is None:
            return False
        n = rows.shape[0]
        if c is not None:
            if c.size not in (1, n):
                return False
            c = np.broadcast_to(c.reshape(-1), (n,)) * beta_attr
        # Y = alpha * A @ rows.T + c  ->  (A @ (alpha * s * rows).T) + (c - mean) * s + beta, alpha = 1
        gamma, beta, mean, var, eps = params
        s = gamma / np.sqrt(var + eps)
        w2 = rows * (alpha * s)[:, None]
        base = np.zeros(n) if c is None else np.asarray(c, dtype=np.float64)
        b2 = (base - mean) * s + beta
        graph.set_weight(gemm, 1, (w2 if trans_b else w2.T).astype(np.float32))
        while len(gemm.input) < 3:
            gemm.input.append("")
        graph.set_weight(gemm, 2, b2.astype(np.float32))
        set_attr(gemm, "alpha", 1.0)
        set_attr(gemm, "beta", 1.0)
        return True

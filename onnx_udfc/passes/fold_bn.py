"""Fold `Conv | ConvTranspose | Gemm -> BatchNormalization` into the producer.

    w' = w * gamma / sigma,  b' = (b - mean) * gamma / sigma + beta,  sigma = sqrt(var + eps)

(w: (N, C/g, kh, kw) Conv weight, the (N, K) Gemm weight rows or a ConvTranspose's rows (Cout, Cin/g, *k),
see `ir.layers`.) The folded producer takes over the BN's
output name, and the BN prior `z ~ N(beta, |gamma|^2)` of that tensor is recorded in `ctx.priors`:
it is what the statistics model and the quantizer use, and it is the only thing taken from the BN.
A BN is left alone (and stays a statistics source) when its producer's output has other readers,
when the producer weight is not constant, or when the BN runs in training mode.

Exporters also spell a BN, a bias or a learnable affine as elementwise ops right after the layer:
`Conv -> Mul(s) -> Add(t)` (paddle2onnx's learnable affine blocks, BN exported as Mul/Add), `Conv -> Add(b)`
with the bias as a separate (1, N, 1, 1) constant. With s, t scalars or per output channel (constant
along every other axis) these fold the same way, `w' = w * s`, `b' = b * s + t`; a BN prior already on
the tensor follows it (`N(s mu + t, (s sigma)^2)`).
"""
from __future__ import annotations

import numpy as np
import onnx

from typing import Optional, Tuple

from ..ir.graph import Graph, attr, set_attr
from ..ir.layers import read_layer, write_layer
from ..numerics.bn import bn_prior, fold_batchnorm
from .base import Pass, PassContext, PassResult

#: layers a BatchNormalization or a per-channel Mul/Add after them folds into
FOLD_TARGETS = ("Conv", "ConvTranspose", "Gemm")


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
        folded = affine = 0
        while True:  # a BN after a folded Mul/Add becomes foldable, and the other way round
            step_bn = self._fold_batchnorms(ctx)
            step_affine = self._fold_affine_ops(ctx)
            folded, affine = folded + step_bn, affine + step_affine
            if not step_affine and not step_bn:
                break
        return PassResult(folded > 0 or affine > 0, {"folded": folded, "affine_ops_folded": affine})

    def _fold_batchnorms(self, ctx: PassContext) -> int:
        graph = ctx.graph
        folded = []
        for bn in [n for n in graph.topological_nodes() if n.op_type == "BatchNormalization"]:
            producer = graph.producer_of(bn.input[0])
            if producer is None or producer.op_type not in FOLD_TARGETS:
                continue
            if graph.use_count(bn.input[0]) != 1:
                continue
            params = batchnorm_params(graph, bn)
            if params is None:
                continue
            fold = {"Conv": self._fold_conv, "Gemm": self._fold_gemm}.get(producer.op_type, self._fold_rows)
            if not fold(graph, producer, params):
                continue
            gamma, beta = params[0], params[1]
            out = bn.output[0]
            producer.output[0] = out
            ctx.priors[out] = bn_prior(gamma, beta)
            ctx.layer(producer)["bn_folded"] = bn.name or out
            folded.append(bn)
        # removed together at the end: one index rebuild instead of one per BN (the index is stale for the
        # folded outputs meanwhile, which only a BN reading another BN's output would see: it folds next round)
        graph.remove_nodes(folded)
        return len(folded)

    def _fold_affine_ops(self, ctx: PassContext) -> int:
        """Fold `Mul/Add/Sub/Div` by per-channel constants that directly follow a Conv/Gemm (see module doc)."""
        graph = ctx.graph
        folded = 0
        for node in [n for n in graph.topological_nodes() if n.op_type in ("Mul", "Add", "Sub", "Div")]:
            match = affine_after_linear(graph, node)
            if match is None:
                continue
            producer, scale, shift = match
            if not self._scale_shift(graph, producer, scale, shift):
                continue
            out = node.output[0]
            prior = ctx.priors.pop(producer.output[0], None)
            if prior is not None:
                ctx.priors[out] = (np.asarray(prior[0]) * scale + shift, np.abs(np.asarray(prior[1]) * scale))
            producer.output[0] = out
            graph.remove_nodes([node])
            ctx.layer(producer).setdefault("affine_folded", []).append(node.name or out)
            folded += 1
        return folded

    @staticmethod
    def _scale_shift(graph: Graph, producer: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> bool:
        """Make `producer` compute `scale * y + shift` per output channel (scale, shift: (N,))."""
        layer = read_layer(graph, producer)
        if layer is None or producer.op_type not in FOLD_TARGETS:
            return False
        rows = layer.rows.astype(np.float64) * scale.reshape((-1,) + (1,) * (layer.rows.ndim - 1))
        bias = (np.zeros(layer.out_channels) if layer.bias is None else layer.bias) * scale + shift
        write_layer(graph, layer, rows, bias)
        return True

    @staticmethod
    def _fold_conv(graph: Graph, conv: onnx.NodeProto, params) -> bool:
        w = graph.constant(conv.input[1])
        if w is None or w.dtype != np.float32:
            return False
        b = graph.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if len(conv.input) > 2 and conv.input[2] and b is None:
            return False
        w2, b2 = fold_batchnorm(w, b, *params)
        graph.set_weight(conv, 1, w2)
        graph.set_weight(conv, 2, np.asarray(b2, dtype=np.float32))
        return True

    @staticmethod
    def _fold_rows(graph: Graph, node: onnx.NodeProto, params) -> bool:
        """Fold into any layer `read_layer` reads (here: ConvTranspose) through its rows (N, C/g, *taps)."""
        layer = read_layer(graph, node)
        if layer is None or layer.out_channels != np.size(params[0]):
            return False
        gamma, beta, mean, var, eps = params
        s = gamma / np.sqrt(var + eps)
        rows = layer.rows.astype(np.float64) * s.reshape((-1,) + (1,) * (layer.rows.ndim - 1))
        bias = ((np.zeros(layer.out_channels) if layer.bias is None else layer.bias) - mean) * s + beta
        write_layer(graph, layer, rows, bias)
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


def affine_after_linear(graph: Graph, node: onnx.NodeProto) -> Optional[Tuple[onnx.NodeProto, np.ndarray, np.ndarray]]:
    """(producer, scale (N,), shift (N,)) when `node` is `y * c`, `c * y`, `y + c`, `c + y`, `y - c` or `y / c`
    with y the only-read output of a float32 Conv/ConvTranspose/Gemm with N outputs and c a scalar or
    per-channel constant."""
    if len(node.input) != 2:
        return None
    for pos in (0, 1):
        y, c_name = node.input[pos], node.input[1 - pos]
        producer = graph.producer_of(y)
        if producer is None or producer.op_type not in FOLD_TARGETS or graph.use_count(y) != 1:
            continue
        if pos == 1 and node.op_type in ("Sub", "Div"):
            return None
        layer = read_layer(graph, producer)
        const = graph.constant(c_name)
        if layer is None or const is None or const.dtype.kind != "f" or y in graph.graph_outputs:
            return None
        per_channel = _per_channel(const, layer.out_channels, 2 if producer.op_type == "Gemm" else layer.rows.ndim)
        if per_channel is None:
            return None
        ones, zeros = np.ones(layer.out_channels), np.zeros(layer.out_channels)
        if node.op_type == "Mul":
            return producer, per_channel, zeros
        if node.op_type == "Add":
            return producer, ones, per_channel
        if node.op_type == "Sub":
            return producer, ones, -per_channel
        if np.all(per_channel != 0):
            return producer, 1.0 / per_channel, zeros
        return None
    return None


def _per_channel(const: np.ndarray, channels: int, rank: int) -> Optional[np.ndarray]:
    """`const` as (channels,) when it broadcasts against a rank-`rank` (B, channels, ...) tensor without
    changing its shape and varies along axis 1 only; None otherwise."""
    arr = np.asarray(const, np.float64)
    if arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(arr.reshape(-1), (channels,)).copy() if arr.size == 1 else arr.reshape(-1)

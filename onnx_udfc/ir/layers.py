"""Uniform access to the weights of linear layers (Conv, ConvTranspose, Gemm, MatMul).

Every linear layer is seen as `rows` of shape (N, C, *taps): N outputs, C inputs (C/g for grouped convs),
taps the kernel positions (none for Gemm/MatMul), plus a bias (N,). `read_layer` converts from the ONNX
layout and `write_layer` back, so passes never handle transB, MatMul's (K, N) layout or ConvTranspose's
(Cin, Cout/g, *taps) layout themselves.

ConvTranspose: ONNX stores W (Cin, Cout/g, *k), input channel c of group `c // (Cin/g)` feeding outputs
`(c // (Cin/g)) * Cout/g + o'`. As rows: `rows[gi * Cout/g + o', c', t] = W[gi * Cin/g + c', o', t]`, i.e.
(Cout, Cin/g, *k), the same grouping convention as Conv. Unlike Conv, an output pixel does not see every
tap: `tap_coverage` gives, per tap, the fraction of output pixels it reaches (about 1/prod(strides)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, attr, set_attr

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LinearLayer:
    node: onnx.NodeProto
    rows: np.ndarray  # (N, C, *taps), float32, read-only view of the model's weight
    bias: Optional[np.ndarray]  # (N,) float64 effective bias, None when the layer has none
    group: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.rows.shape[0])


def read_layer(graph: Graph, node: onnx.NodeProto) -> Optional[LinearLayer]:
    """The layer's weight as (N, C, *taps) and its bias, or None when it is not a constant float32 layer.

    ConvTranspose rows are a transposed copy (Cout, Cin/g, *taps) of the (Cin, Cout/g, *taps) weight."""
    if node.op_type not in LINEAR_OPS or len(node.input) < 2:
        return None
    w = graph.constant(node.input[1])
    if w is None or w.dtype != np.float32:
        return None
    bias_name = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 else ""
    b = graph.constant(bias_name) if bias_name else None
    if bias_name and b is None:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        if w.ndim < 3:
            return None
        group = int(attr(node, "group", 1))
        if node.op_type == "ConvTranspose":
            if w.shape[0] % group:
                return None
            w = transpose_rows(w, group)
        if b is not None and b.size != w.shape[0]:
            return None
        return LinearLayer(node, w, None if b is None else b.astype(np.float64).reshape(-1), group)
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None
        alpha = float(attr(node, "alpha", 1.0))
        rows = w if attr(node, "transB", 0) else w.T
        if alpha != 1.0:
            rows = (rows * alpha).astype(np.float32)
        if b is not None:
            if b.size not in (1, rows.shape[0]):
                return None
            b = np.broadcast_to(b.astype(np.float64).reshape(-1) * float(attr(node, "beta", 1.0)),
                                (rows.shape[0],))
        return LinearLayer(node, rows, b)
    return LinearLayer(node, w.T, None)


def write_layer(graph: Graph, layer: LinearLayer, rows: np.ndarray, bias: Optional[np.ndarray]) -> None:
    """Store new weights `rows` (N', C', *taps) and bias (N',) (None: leave the bias absent) into the node."""
    node = layer.node
    rows = np.asarray(rows, dtype=np.float32)
    if node.op_type in ("Conv", "ConvTranspose"):
        graph.set_weight(node, 1, rows if node.op_type == "Conv" else untranspose_rows(rows, layer.group))
        if bias is not None:
            while len(node.input) < 3:
                node.input.append("")
            graph.set_weight(node, 2, np.asarray(bias, dtype=np.float32))
        return
    if node.op_type == "Gemm":
        set_attr(node, "alpha", 1.0)
        graph.set_weight(node, 1, rows if attr(node, "transB", 0) else np.ascontiguousarray(rows.T))
        if bias is not None:
            set_attr(node, "beta", 1.0)
            while len(node.input) < 3:
                node.input.append("")
            graph.set_weight(node, 2, np.asarray(bias, dtype=np.float32))
        return
    graph.set_weight(node, 1, np.ascontiguousarray(rows.T))
    if bias is not None:
        _matmul_bias(graph, node, np.asarray(bias, dtype=np.float32))


def transpose_rows(w: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight (Cin, Cout/g, *k) as rows (Cout, Cin/g, *k) (see the module docstring)."""
    cin, cog = w.shape[0], w.shape[1]
    k = w.shape[2:]
    blocks = w.reshape((group, cin // group, cog) + k)  # (g, Cin/g, Cout/g, *k)
    return np.ascontiguousarray(np.swapaxes(blocks, 1, 2)).reshape((group * cog, cin // group) + k)


def untranspose_rows(rows: np.ndarray, group: int) -> np.ndarray:
    """Inverse of `transpose_rows`: rows (Cout, Cin/g, *k) back to the ONNX layout (Cin, Cout/g, *k)."""
    cout, cig = rows.shape[0], rows.shape[1]
    k = rows.shape[2:]
    blocks = rows.reshape((group, cout // group, cig) + k)  # (g, Cout/g, Cin/g, *k)
    return np.ascontiguousarray(np.swapaxes(blocks, 1, 2)).reshape((group * cig, cout // group) + k)


def tap_coverage(node: onnx.NodeProto, kernel: Sequence[int], in_shape=None, out_shape=None) -> np.ndarray:
    """Per tap of a ConvTranspose kernel, the fraction of output pixels the tap writes to.

    Along one spatial axis (input length H, output length H', stride s, dilation d, leading pad p), input
    pixel i and tap k write to output position `i s + k d - p`; the tap reaches
    `n_k = #{i in [0, H): 0 <= i s + k d - p < H'}` of the H' outputs. The fraction `n_k / H'` is about
    `1/s` (every output sees about K/s of the K taps) and smaller near the borders; pads and output_padding
    enter through p and H'. Axes are independent: the coverage is the outer product of the per-axis ones.
    With the spatial shapes unknown it is `1/prod(strides)` for every tap.

    Args:
        node: the ConvTranspose node (strides, dilations, pads, auto_pad, output_padding attributes).
        kernel: the kernel shape (k_1, ..., k_r).
        in_shape, out_shape: (B, C, H_1..H_r) input / output shapes, or None.

    Returns:
        coverage: float64 array of shape `kernel`; `sum(coverage * w)` is the average over output pixels of
        what a per-tap weight `w` contributes to one output pixel.
    """
    r = len(kernel)
    strides = list(attr(node, "strides", None) or [1] * r)
    dilations = list(attr(node, "dilations", None) or [1] * r)
    known = (in_shape is not None and out_shape is not None and len(in_shape) == r + 2
             and len(out_shape) == r + 2 and all(isinstance(v, (int, np.integer)) and v > 0
                                                 for v in list(in_shape[2:]) + list(out_shape[2:])))
    if not known:
        return np.full(tuple(kernel), 1.0 / float(np.prod(strides)))
    begins = _transpose_pad_begins(node, kernel, strides, dilations, in_shape[2:], out_shape[2:])
    out = np.ones(())
    for k, s, d, p, h, ho in zip(kernel, strides, dilations, begins, in_shape[2:], out_shape[2:]):
        pos = np.arange(h)[:, None] * s + np.arange(k)[None, :] * d - p  # (H, K) output positions
        frac = ((pos >= 0) & (pos < ho)).sum(axis=0) / float(ho)
        out = np.multiply.outer(out, frac)
    return out


def _transpose_pad_begins(node, kernel, strides, dilations, h_in, h_out) -> List[int]:
    """Leading pads of a ConvTranspose per spatial axis, from `pads` or `auto_pad` and the output size."""
    r = len(kernel)
    pads = attr(node, "pads", None)
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out_pad = list(attr(node, "output_padding", None) or [0] * r)
        begins = []
        for k, s, d, h, ho, op in zip(kernel, strides, dilations, h_in, h_out, out_pad):
            total = max(s * (h - 1) + op + (k - 1) * d + 1 - ho, 0)
            begins.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
        return begins
    return list(pads[:r]) if pads else [0] * r


def _matmul_bias(graph: Graph, node: onnx.NodeProto, bias: np.ndarray) -> None:
    """MatMul has no bias input: add (or update) an `Add` right after it."""
    out = node.output[0]
    readers = graph.uses(out)
    marker = "udfc_bias"
    if len(readers) == 1 and readers[0].op_type == "Add" and readers[0].name.endswith(marker):
        add = readers[0]
        graph.set_weight(add, 1, bias)
        return
    new_out = graph.unique_name(out + "_nobias")
    bias_name = graph.unique_name((node.name or out) + "_bias")
    graph.graph.initializer.append(onnx.numpy_helper.from_array(bias, bias_name))
    add = helper.make_node("Add", [new_out, bias_name], [out], name=graph.unique_name((node.name or out) + "_" + marker))
    node.output[0] = new_out
    graph.insert_after(node, add)
    graph.refresh()

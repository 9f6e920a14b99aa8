"""Uniform access to the weights of linear layers (Conv, Gemm, MatMul).

Every linear layer is seen as `rows` of shape (N, C, *taps): N outputs, C inputs (C/g for grouped convs),
taps the kernel positions (none for Gemm/MatMul), plus a bias (N,). `read_layer` converts from the ONNX
layout and `write_layer` back, so passes never handle transB or MatMul's (K, N) layout themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from .graph import Graph, attr, set_attr

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


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
    """The layer's weight as (N, C, *taps) and its bias, or None when it is not a constant float32 layer."""
    if node.op_type not in LINEAR_OPS or len(node.input) < 2:
        return None
    w = graph.constant(node.input[1])
    if w is None or w.dtype != np.float32:
        return None
    bias_name = node.input[2] if node.op_type != "MatMul" and len(node.input) > 2 else ""
    b = graph.constant(bias_name) if bias_name else None
    if bias_name and b is None:
        return None
    if node.op_type == "Conv":
        if w.ndim < 3:
            return None
        return LinearLayer(node, w, None if b is None else b.astype(np.float64).reshape(-1),
                           int(attr(node, "group", 1)))
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
    if node.op_type == "Conv":
        graph.set_weight(node, 1, rows)
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

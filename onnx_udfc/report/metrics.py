"""Model size and cost: parameters, bytes, multiply-accumulates (per sample)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx

from ..ir.shapes import infer_static_shapes


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight values: elements of all initializers and Constant tensors."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims))
    return total


def count_macs(model: onnx.ModelProto, input_shapes: Dict[str, tuple], shapes: Dict[str, tuple] = None) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one sample (inputs at batch 1).

    Per node: (output positions) x (weight elements), see `node_macs`. `shapes`: tensor shapes at batch 1
    when the caller has them; the weights' shapes are always read from `model`'s initializers, so the shapes
    of the model before pruning still give the pruned model's MACs (pruning changes channels, never
    positions). Missing shapes are inferred (a model whose node outputs are all absent from `shapes`).
    """
    one = at_batch_one(input_shapes)
    weights = _weight_shapes(model)
    if shapes is None or any(n.output[0] not in shapes for n in model.graph.node if n.op_type in _LINEAR):
        shapes = infer_static_shapes(model, one, known=shapes)
    return sum(node_macs(node, shapes, weights) for node in model.graph.node)


_LINEAR = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def at_batch_one(input_shapes: Dict[str, tuple]) -> Dict[str, tuple]:
    """`input_shapes` with every leading (batch) dimension set to 1."""
    return {k: (1,) + tuple(v[1:]) if len(v) > 1 else tuple(v) for k, v in input_shapes.items()}


def _weight_shapes(model: onnx.ModelProto) -> Dict[str, tuple]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    return shapes


def node_macs(node: onnx.NodeProto, shapes: Dict[str, tuple], weights: Dict[str, tuple] = None) -> int:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul node (0 for other ops or unknown shapes).

    Conv: (B * prod(spatial out)) * prod(w) (= prod(out) * (C/g) * kh * kw); ConvTranspose: (B *
    prod(spatial in)) * prod(w); Gemm: B * prod(w); MatMul: prod(out[:-1]) * K * N. `weights`: shapes of
    the weights when they differ from `shapes` (a pruned model read with its unpruned activation shapes).
    """
    if node.op_type not in _LINEAR:
        return 0
    weights = shapes if weights is None else weights
    w = (weights.get(node.input[1]) or shapes.get(node.input[1])) if len(node.input) > 1 else None
    out = shapes.get(node.output[0])
    if out is None or w is None:
        return 0
    if node.op_type == "Conv":
        return int(out[0]) * int(np.prod(out[2:])) * int(np.prod(w))
    if node.op_type == "ConvTranspose":
        inp = shapes.get(node.input[0])
        return int(inp[0]) * int(np.prod(inp[2:])) * int(np.prod(w)) if inp is not None else 0
    if node.op_type == "Gemm":
        return int(out[0]) * int(np.prod(w))
    k = shapes.get(node.input[0])
    if node.input[1] in weights and len(w) == 2:  # a constant (K, N) weight
        return int(np.prod(out[:-1])) * int(np.prod(w))
    return int(np.prod(out)) * int(k[-1]) if k is not None else 0

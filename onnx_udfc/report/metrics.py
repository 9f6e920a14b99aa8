"""Model size and cost: parameters, bytes, multiply-accumulates (per sample)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import onnx

from ..ir.graph import attr
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
    """Multiply-accumulates of Conv, Gemm and MatMul for one sample (inputs at batch 1).

    Conv: prod(output dims) * (C/g) * kh * kw; Gemm/MatMul: prod(output dims) * K.
    """
    one = {k: (1,) + tuple(v[1:]) if len(v) > 1 else tuple(v) for k, v in input_shapes.items()}
    if shapes is None:
        shapes = infer_static_shapes(model, one)
    return sum(node_macs(node, shapes) for node in model.graph.node)


def node_macs(node: onnx.NodeProto, shapes: Dict[str, tuple]) -> int:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul node (0 for other ops or unknown shapes)."""
    if node.op_type not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
        return 0
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if out is None or w is None:
        return 0
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(shapes.get(node.input[0], (0,)))) * int(np.prod(w[1:]))
    if node.op_type == "Gemm":
        k = w[1] if attr(node, "transB", 0) else w[0]
        return int(np.prod(out)) * int(k)
    a = shapes.get(node.input[0])
    return int(np.prod(out)) * int(a[-1]) if a is not None else 0

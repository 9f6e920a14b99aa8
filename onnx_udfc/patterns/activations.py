"""Recognise pointwise activation nodes and read their parameters (Clip bounds from attributes,
initializers or `Constant` nodes)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import onnx

from ..ir.graph import Graph, attr
from ..numerics.activations import Activation

#: ops that never mix channels and keep shape: transparent for channel bookkeeping
PASSTHROUGH_OPS = ("Identity", "Dropout")


def activation_of(graph: Graph, node: onnx.NodeProto) -> Tuple[Optional[Activation], str]:
    """The `Activation` computed by `node`, or (None, reason) when it is not a supported one.

    Supported: Relu, Clip (bounds constant), LeakyRelu, Sigmoid, HardSigmoid, HardSwish, Identity/Dropout
    (identity).
    """
    op = node.op_type
    if op == "Relu":
        return Activation("relu"), ""
    if op in PASSTHROUGH_OPS:
        return Activation("identity"), ""
    if op == "LeakyRelu":
        return Activation("leakyrelu", alpha=float(attr(node, "alpha", 0.01))), ""
    if op == "Sigmoid":
        return Activation("sigmoid"), ""
    if op == "HardSigmoid":
        return Activation("hardsigmoid", alpha=float(attr(node, "alpha", 0.2)),
                          beta=float(attr(node, "beta", 0.5))), ""
    if op == "HardSwish":
        return Activation("hardswish", alpha=1.0 / 6.0, beta=0.5), ""
    if op == "Clip":
        bounds = clip_bounds(graph, node)
        if bounds is None:
            return None, "Clip bounds are not constant"
        lo, hi = bounds
        return Activation("clip", lo=lo, hi=hi), ""
    return None, f"unsupported op {op}"


def clip_bounds(graph: Graph, node: onnx.NodeProto) -> Optional[Tuple[float, float]]:
    """(lo, hi) of a Clip node; attribute form (opset < 11) or constant inputs (opset >= 11)."""
    lo = attr(node, "min", None)
    hi = attr(node, "max", None)
    inputs = list(node.input)
    for pos, default in ((1, -np.inf), (2, np.inf)):
        if len(inputs) > pos and inputs[pos]:
            value = graph.constant(inputs[pos])
            if value is None or value.size != 1:
                return None
            if pos == 1:
                lo = float(value.reshape(()))
            else:
                hi = float(value.reshape(()))
    lo = -np.inf if lo is None else float(lo)
    hi = np.inf if hi is None else float(hi)
    return lo, hi


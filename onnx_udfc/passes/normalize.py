"""Put the graph in the shape the other passes expect, without changing what it computes.

- every node gets a name (`<op>_<index>` when it had none) so report records and edits can refer to it;
- initializers that are also listed as graph inputs (old exporters) stop being inputs: they are weights,
  and a pruned weight must not keep a stale input declaration;
- shape-only ops on constants (`Reshape`, `Unsqueeze`, `Squeeze`, `Cast`, `Identity` of a constant, as
  paddle2onnx spells a conv bias `Add(conv, Reshape(Constant(N,), [1, N, 1, 1]))`) are evaluated and
  replaced by an initializer of the same name, so the later passes see a constant.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..ir.graph import Graph, attr
from .base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

#: ops evaluated when all their inputs are constant
FOLDABLE_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity")
#: larger constants are left as they are (the fold is for biases and scales)
MAX_FOLDED_ELEMENTS = 1 << 20


class NormalizeGraphPass(Pass):
    name = "normalize"

    def run(self, ctx: PassContext) -> PassResult:
        graph = ctx.graph
        named = 0
        for index, node in enumerate(graph.topological_nodes()):
            if not node.name:
                node.name = graph.unique_name(f"{node.op_type}_{index}")
                named += 1
        inits = set(graph.initializers)
        listed = [i for i in graph.graph.input if i.name in inits]
        if listed and graph.model.ir_version >= 4:
            for i in reversed(range(len(graph.graph.input))):
                if graph.graph.input[i].name in inits:
                    del graph.graph.input[i]
        graph.invalidate()
        folded = fold_shape_ops_on_constants(graph)
        return PassResult(bool(named or listed or folded),
                          {"nodes_named": named, "initializer_inputs_removed": len(listed),
                           "constant_ops_folded": folded})


def fold_shape_ops_on_constants(graph: Graph) -> int:
    """Replace every foldable op whose inputs are all constant by an initializer holding its output.

    Returns the number of nodes replaced. Graph outputs are never replaced.
    """
    folded = 0
    for node in graph.topological_nodes():
        if node.op_type not in FOLDABLE_OPS or len(node.output) != 1 or node.output[0] in graph.graph_outputs:
            continue
        if node.op_type == "Identity" and node.input[0] in graph.initializers:
            continue  # Graph.constant already follows these; keep the exporter's sharing
        inputs = [graph.constant(i) if i else None for i in node.input]
        if not node.input or inputs[0] is None or any(i and v is None for i, v in zip(node.input, inputs)):
            continue
        value = _evaluate(node, inputs)
        if value is None or value.size > MAX_FOLDED_ELEMENTS:
            continue
        graph.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), node.output[0]))
        graph.remove_nodes([node])
        graph.refresh()
        folded += 1
    if folded:
        log.debug("folded %d shape ops on constants", folded)
    return folded


def _evaluate(node: onnx.NodeProto, inputs) -> Optional[np.ndarray]:
    """numpy value of a foldable `node` given its constant inputs (None when an attribute is unsupported)."""
    x = np.asarray(inputs[0])
    op = node.op_type
    if op == "Identity":
        return x.copy()
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(int(attr(node, "to"))))
    if op == "Reshape":
        if len(inputs) < 2 or inputs[1] is None:
            return None
        target = [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
        if not attr(node, "allowzero", 0):
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)
    axes = attr(node, "axes", None)
    if axes is None and len(inputs) > 1 and inputs[1] is not None:
        axes = [int(a) for a in np.asarray(inputs[1]).reshape(-1)]
    if op == "Squeeze":
        return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    if axes is None:
        return None
    rank = x.ndim + len(axes)
    out = x
    for axis in sorted(a % rank for a in axes):
        out = np.expand_dims(out, axis)
    return out

"""Coupled channel groups (the DepGraph idea), read-only.

Layers whose outputs are summed by a residual `Add`/`Sum` must keep the same channel indices: pruning
channel m means pruning it in every member at once. A group is found by tracing each input of an Add back
through channel-wise ops (BatchNormalization, activations and their exporter spellings such as
`x * Clip(x + 3, 0, 6) / 6`, scalar Mul/Add, pools, Pad, Resize, Identity) to the linear layer that produced it; an input that comes from another Add joins that Add's group (a residual stream).
These groups are reported; they are left unpruned and only quantized for now.
"""
from __future__ import annotations

from typing import Dict, List

from ..ir.graph import Graph
from .activations import pointwise_source

_CHANNELWISE = ("BatchNormalization", "MaxPool", "AveragePool", "Pad", "Identity", "Dropout", "Resize", "Upsample")
_SUMS = ("Add", "Sum")


def coupled_groups(graph: Graph) -> List[List[str]]:
    """Names of the linear layers in each coupled group, groups in graph order, members sorted by order."""
    order = {id(n): i for i, n in enumerate(graph.topological_nodes())}
    parent: Dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    members: Dict[int, object] = {}
    for node in graph.topological_nodes():
        if node.op_type not in _SUMS or len([i for i in node.input if i and not graph.is_constant(i)]) < 2:
            continue
        here = order[id(node)]
        find(here)
        for tensor in node.input:
            source = _trace_back(graph, tensor)
            if source is None:
                continue
            union(here, order[id(source)])
            if source.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                members[order[id(source)]] = source
    groups: Dict[int, List] = {}
    for key, node in members.items():
        groups.setdefault(find(key), []).append((key, node.name or node.output[0]))
    return [[name for _, name in sorted(g)] for _, g in sorted(groups.items()) if len(g) > 1]


def _trace_back(graph: Graph, tensor: str):
    """The linear layer or sum node that `tensor` comes from through channel-wise ops, else None."""
    while True:
        node = graph.producer_of(tensor)
        if node is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.op_type in _SUMS:
            return node
        if node.op_type in _CHANNELWISE:
            tensor = node.input[0]
            continue
        source = pointwise_source(graph, node)
        if source is None:
            return None
        tensor = source

"""Put the graph in the shape the other passes expect, without changing what it computes.

- every node gets a name (`<op>_<index>` when it had none) so report records and edits can refer to it;
- initializers that are also listed as graph inputs (old exporters) stop being inputs: they are weights,
  and a pruned weight must not keep a stale input declaration.
"""
from __future__ import annotations

from .base import Pass, PassContext, PassResult


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
        return PassResult(bool(named or listed), {"nodes_named": named, "initializer_inputs_removed": len(listed)})

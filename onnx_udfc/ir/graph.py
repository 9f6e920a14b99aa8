"""The graph layer every pass goes through.

`Graph` wraps an `onnx.ModelProto` and keeps a use-def index (producer and consumers of every tensor),
constant lookup (initializers and `Constant` nodes), unique-name generation and clone-on-write edits of
shared initializers. Passes read weights with `constant()` and write them with `set_weight()`; they never
touch `model.graph.initializer` directly.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


def attr(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute `name` of `node` (ints/floats/strings/lists decoded), or `default`."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Replace (or add) attribute `name` of `node`."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


#: constants up to this size are kept as numpy arrays between reads
CACHED_BYTES = 1 << 22

class Graph:
    """Use-def view of `model.graph` with constant access and safe weight edits.

    The index is rebuilt lazily after structural edits (`invalidate()`); weight edits keep it valid.
    """

    def __init__(self, model: onnx.ModelProto):
        self._model = model
        self.graph = model.graph
        self._arrays: Dict[str, np.ndarray] = {}
        self._pending: Dict[str, np.ndarray] = {}  # weights written since the last flush, by initializer name
        self._names: set = set()
        self._counter = 0
        self._index_valid = False
        self._build_index()

    @property
    def model(self) -> onnx.ModelProto:
        """The ModelProto, with every weight written so far serialised into it (see `flush`)."""
        self.flush()
        return self._model

    @property
    def model_unflushed(self) -> onnx.ModelProto:
        """The ModelProto without the weights written since the last flush (`pending_weights`)."""
        return self._model

    @property
    def pending_weights(self) -> Dict[str, np.ndarray]:
        """Weights written since the last flush, by initializer name (read-only view)."""
        return dict(self._pending)

    def flush(self) -> None:
        """Serialise the pending weights into their initializers, once each.

        `set_weight` keeps arrays in memory until the ModelProto is needed: a weight is often written several
        times (BN folding, pruning, compensation, quantization) and every serialisation leaves its bytes in
        the protobuf arena until the model is freed, so writing each weight once keeps memory near the size
        of the input plus the output model.
        """
        if not self._pending:
            return
        self.refresh()
        for name in list(self._pending):
            array = self._pending.pop(name)  # freed as it is written: the model's size is not held twice
            self.initializers[name].CopyFrom(numpy_helper.from_array(array, name))

    # ------------------------------------------------------------------ index
    def _build_index(self) -> None:
        g = self.graph
        self.initializers: Dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = {}
        self.constant_nodes: Dict[str, onnx.NodeProto] = {}
        names = set(self.initializers)
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
                    names.add(out)
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
                    names.add(inp)
            if node.op_type == "Constant" and node.output:
                self.constant_nodes[node.output[0]] = node
            if node.name:
                names.add(node.name)
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        self._names = names
        self.graph_outputs = [o.name for o in g.output]
        init_names = set(self.initializers)
        self.graph_inputs = [i.name for i in g.input if i.name not in init_names]
        self._index_valid = True

    def invalidate(self) -> None:
        """Call after adding or removing nodes; the index is rebuilt on next use."""
        self._index_valid = False

    def refresh(self) -> "Graph":
        if not self._index_valid:
            self._build_index()
        return self

    # -------------------------------------------------------------- queries
    def uses(self, tensor: str) -> List[onnx.NodeProto]:
        """Snapshot list of nodes reading `tensor`."""
        self.refresh()
        return list(self.consumers.get(tensor, ()))

    def use_count(self, tensor: str) -> int:
        """Number of node inputs reading `tensor`, plus one if it is a graph output."""
        self.refresh()
        n = sum(list(node.input).count(tensor) for node in self.consumers.get(tensor, ()))
        return n + (1 if tensor in self.graph_outputs else 0)

    def producer_of(self, tensor: str) -> Optional[onnx.NodeProto]:
        self.refresh()
        return self.producer.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        """True for initializers, `Constant` outputs and `Identity` copies of them."""
        self.refresh()
        if tensor in self.initializers or tensor in self.constant_nodes:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Identity" and self.is_constant(node.input[0])

    def constant(self, tensor: str) -> Optional[np.ndarray]:
        """Array value of an initializer or `Constant` node output, or None if `tensor` is not constant.

        Arrays up to `CACHED_BYTES` are cached; all are read-only; write with `set_weight`.
        """
        if not tensor:
            return None
        self.refresh()
        cached = self._pending.get(tensor)
        if cached is None:
            cached = self._arrays.get(tensor)
        if cached is not None:
            return cached
        if tensor in self.initializers:
            arr = numpy_helper.to_array(self.initializers[tensor])
        elif tensor in self.constant_nodes:
            node = self.constant_nodes[tensor]
            value = None
            for a in node.attribute:
                if a.name == "value":
                    value = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int"):
                    value = np.array(helper.get_attribute_value(a))
                elif a.name in ("value_floats", "value_ints"):
                    value = np.array(helper.get_attribute_value(a))
            if value is None:
                return None
            arr = value
        else:
            node = self.producer.get(tensor)
            # exporters link duplicate initializers with Identity nodes: follow them
            if node is None or node.op_type != "Identity" or not self.is_constant(node.input[0]):
                return None
            arr = self.constant(node.input[0]).copy()
        arr.setflags(write=False)
        if arr.nbytes <= CACHED_BYTES:  # large weights are re-read when needed: memory stays near the model's size
            self._arrays[tensor] = arr
        return arr

    def reduces_spatial_axes(self, node: onnx.NodeProto) -> bool:
        """True when a Reduce* node of a 4-D tensor reduces exactly axes 2 and 3 (attribute or constant input)."""
        axes = attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            value = self.constant(node.input[1])
            axes = None if value is None else value.tolist()
        return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]

    def unique_name(self, base: str) -> str:
        """A tensor/node name not used anywhere in the graph (deterministic: base, base_1, base_2, ...)."""
        self.refresh()
        name = base
        while name in self._names:
            self._counter += 1
            name = f"{base}_{self._counter}"
        self._names.add(name)
        return name

    def topological_nodes(self) -> List[onnx.NodeProto]:
        """Nodes in graph order (ONNX requires graph order to be topological; the checker enforces it)."""
        return list(self.graph.node)

    # ---------------------------------------------------------------- edits
    def set_weight(self, node: onnx.NodeProto, input_index: int, array: np.ndarray) -> str:
        """Write `array` as input `input_index` of `node`, cloning the initializer if others share it.

        A weight held by a `Constant` node or shared with another reader gets a fresh initializer so no
        other node sees the change. Returns the tensor name now read by `node`.
        """
        self.refresh()
        name = node.input[input_index] if input_index < len(node.input) else ""
        shared = (
            not name
            or name not in self.initializers
            or self.use_count(name) > 1
            or name in self.graph_inputs_all()
        )
        if shared:
            base = name or f"{node.name or node.op_type}_input{input_index}"
            new_name = self.unique_name(base + "_udfc" if name else base)
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), new_name)
            self.graph.initializer.append(tensor)
            while len(node.input) <= input_index:
                node.input.append("")
            node.input[input_index] = new_name
            # the index stays valid: one new initializer read by `node`, one read of `name` fewer
            self.initializers[new_name] = self.graph.initializer[len(self.graph.initializer) - 1]
            self.consumers.setdefault(new_name, []).append(node)
            if name and name not in node.input and name in self.consumers:
                self.consumers[name] = [n for n in self.consumers[name] if n is not node]
            self._arrays.pop(new_name, None)
            return new_name
        value = np.array(array, order="C")  # a private copy: the caller may reuse its array
        value.setflags(write=False)
        self._pending[name] = value
        self._arrays.pop(name, None)
        return name

    def graph_inputs_all(self) -> set:
        return {i.name for i in self.graph.input}

    def remove_nodes(self, nodes: Iterable[onnx.NodeProto]) -> None:
        """Delete `nodes` in place (by index, so references to the other nodes stay valid)."""
        drop = {id(n) for n in nodes}
        for i in reversed(range(len(self.graph.node))):
            if id(self.graph.node[i]) in drop:
                del self.graph.node[i]
        self.invalidate()

    def rename_tensor_uses(self, old: str, new: str) -> None:
        """Make every reader of `old` (and the graph outputs) read `new` instead."""
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for out in self.graph.output:
            if out.name == old:
                out.name = new
        self.invalidate()

    def insert_after(self, anchor: onnx.NodeProto, new_node: onnx.NodeProto) -> None:
        """Insert `new_node` right after `anchor` in graph order (keeps the order topological)."""
        nodes = list(self.graph.node)
        pos = next(i for i, n in enumerate(nodes) if n is anchor)
        self.graph.node.insert(pos + 1, new_node)
        self.invalidate()

    def remove_unused_initializers(self) -> int:
        """Drop initializers nobody reads (and their duplicate graph-input entries). Returns how many."""
        self.refresh()
        used = set(self.consumers) | set(self.graph_outputs)
        for node in self.graph.node:  # subgraphs may read outer-scope names
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used.update(_subgraph_reads(a.g))
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        used.update(_subgraph_reads(sg))
        dropped = {t.name for t in self.graph.initializer if t.name not in used}
        removed = len(dropped)
        if removed:
            for field in (self.graph.initializer, self.graph.input):
                for i in reversed(range(len(field))):
                    if field[i].name in dropped:
                        del field[i]
            for name in dropped:
                self._arrays.pop(name, None)
                self._pending.pop(name, None)
            self.invalidate()
        return removed


def _subgraph_reads(g: onnx.GraphProto) -> set:
    names = set()
    for node in g.node:
        names.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names.update(_subgraph_reads(a.g))
    return names

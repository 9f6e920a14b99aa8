"""Read-only matching of prunable channel chains.

A chain is the path along which the N output channels of a producer travel, unmixed, to the one layer
that mixes them again (the consumer):

    producer (Conv | ConvTranspose group 1 | Gemm) -> [act] -> [MaxPool | AveragePool | Pad | Resize]*
        -> [depthwise Conv -> [act] -> [pools]*]            (MobileNet style; pruned together)
        -> consumer (Conv | ConvTranspose group 1 | Gemm | MatMul), possibly after
           GlobalAveragePool/ReduceMean -> Flatten/Reshape (channel m = column m) or
           Flatten of an HxW map (channel m = columns [m*H*W, (m+1)*H*W))

`act` is any run of channel-agnostic pointwise steps (`pointwise_run`): a plain activation, or an exporter's
spelling such as `x * Clip(x + 3, 0, 6) / 6` (HardSwish), `x * Sigmoid(x)` (SiLU), `max(LeakyRelu(x), c)`,
or an activation followed by a scalar `Mul`/`Add`; its steps use scalar constants only, so removing
channel m from the producer removes it from every tensor of the run and nothing else.
BatchNormalization (and per-channel `Mul`/`Add` right after a linear layer) must already be folded into
the producer and the depthwise conv (FoldBatchNormPass). Every other tensor on the path must have exactly
one reader and must not be a graph output; weights must be constant and not shared. Producers that do not
form a chain get a `Rejection` with the reason (a squeeze-excitation gate, a residual Add, a Concat, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import onnx

from ..ir.graph import Graph, attr
from ..numerics.activations import Activation
from .activations import PASSTHROUGH_OPS, activation_of, pointwise_run

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
#: layers whose output channels can be pruned (a chain's producer)
PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm")
#: layers that read the chain's channels as inputs and absorb the compensation (a chain's consumer)
CONSUMER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool")
#: ops that rescale the spatial axes only (channel-preserving when their scales/sizes keep axis 1)
RESIZE_OPS = ("Resize", "Upsample")
COUPLING_OPS = ("Add", "Sum", "Sub", "Concat", "Mul", "Split")
FLATTEN_OPS = ("Flatten", "Reshape", "Squeeze")


@dataclass
class Stage:
    """What happens to the channels after a linear layer: activation then channel-preserving pools."""

    activation: Activation = field(default_factory=lambda: Activation("identity"))
    pools: List[onnx.NodeProto] = field(default_factory=list)
    output: str = ""  # tensor at the end of the stage


@dataclass
class Chain:
    producer: onnx.NodeProto
    channels: int
    first: Stage
    consumer: onnx.NodeProto
    depthwise: Optional[onnx.NodeProto] = None
    second: Optional[Stage] = None
    #: consumer columns per channel: 1 for Conv / GAP -> Gemm, H*W for Flatten of an HxW map
    block: int = 1
    #: every tensor carrying the N channels, producer output to consumer input, with its columns per channel
    path: List[Tuple[str, int]] = field(default_factory=list)

    @property
    def last_stage(self) -> Stage:
        return self.second if self.depthwise is not None else self.first

    @property
    def name(self) -> str:
        return self.producer.name or self.producer.output[0]


@dataclass
class Rejection:
    node: onnx.NodeProto
    reason: str


def producer_weight_rows(graph: Graph, node: onnx.NodeProto) -> Optional[int]:
    """Number of output channels of a Conv/ConvTranspose/Gemm/MatMul with a constant weight, else None.

    (ConvTranspose stores W as (Cin, Cout/g, *k): Cout = W.shape[1] * group.)"""
    w = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return None
    if node.op_type == "Conv":
        return int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * int(attr(node, "group", 1)) if w.ndim >= 3 else None
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        return int(w.shape[0] if attr(node, "transB", 0) else w.shape[1])
    return int(w.shape[1])


def is_depthwise(graph: Graph, node: onnx.NodeProto, channels: int) -> bool:
    if node.op_type != "Conv":
        return False
    w = graph.constant(node.input[1])
    return (w is not None and w.ndim == 4 and int(attr(node, "group", 1)) == channels
            and w.shape[0] == channels and w.shape[1] == 1)


class ChainFinder:
    """Finds chains and rejection reasons; never edits the graph."""

    def __init__(self, graph: Graph, shapes: Dict[str, tuple]):
        self.graph = graph
        self.shapes = shapes

    def find(self) -> Tuple[List[Chain], List[Rejection]]:
        chains: List[Chain] = []
        rejections: List[Rejection] = []
        in_chain_dw = set()
        for node in self.graph.topological_nodes():
            if node.op_type not in PRODUCER_OPS:
                continue
            result = self._match(node)
            if isinstance(result, Chain):
                chains.append(result)
                if result.depthwise is not None:
                    in_chain_dw.add(id(result.depthwise))
            else:
                rejections.append(Rejection(node, result))
        rejections = [r for r in rejections if id(r.node) not in in_chain_dw]
        return chains, rejections

    # ------------------------------------------------------------- matching
    def _match(self, producer: onnx.NodeProto):
        g = self.graph
        n = producer_weight_rows(g, producer)
        if n is None:
            return "weight is not a constant 2-D/4-D tensor"
        if producer.op_type == "Conv":
            group = int(attr(producer, "group", 1))
            if group != 1:
                return ("depthwise conv: pruned together with the layer before it when that one forms a chain"
                        if is_depthwise(g, producer, n) else f"grouped conv (group={group})")
        elif producer.op_type == "ConvTranspose":
            group = int(attr(producer, "group", 1))
            if group != 1:
                return f"grouped ConvTranspose (group={group})"
        elif attr(producer, "transA", 0):
            return "Gemm with transA=1"
        if n < 2:
            return "only one output channel"
        if g.use_count(producer.input[1]) > 1:
            return "shared weight (initializer read by several nodes)"
        if len(producer.input) > 2 and producer.input[2] and not g.is_constant(producer.input[2]):
            return "bias is not a constant"
        first = Stage()
        tensor = producer.output[0]
        stage = first
        depthwise = None
        second = None
        stage_has_act = False
        self._path = [(tensor, 1)]
        while True:
            run = pointwise_run(g, tensor, self.shapes)
            if run is not None and not all(n.op_type in PASSTHROUGH_OPS for n in run.nodes):
                if stage_has_act or stage.pools:
                    return f"{run.nodes[0].op_type} after another activation or pool on the path (unsupported)"
                stage.activation = run.activation
                stage_has_act = True
                self._path.extend((t, 1) for t in run.tensors)
                tensor = run.output
                continue
            reader, reason = self._single_reader(tensor)
            if reader is None:
                return reason
            op = reader.op_type
            if op == "BatchNormalization":
                return "BatchNormalization that could not be folded on the path"
            if op in PASSTHROUGH_OPS:
                pass
            elif op in POOL_OPS:
                stage.pools.append(reader)
            elif op == "Pad":
                if not self._pad_keeps_channels(reader, n):
                    return "Pad on the channel axis"
                stage.pools.append(reader)
            elif op in RESIZE_OPS:
                if not self._resize_keeps_channels(reader):
                    return f"{op} with sizes or a channel scale (would break after pruning)"
                stage.pools.append(reader)
            elif op == "Conv" and depthwise is None and is_depthwise(g, reader, n) and reader.input[0] == tensor:
                if g.use_count(reader.input[1]) > 1:
                    return "depthwise weight is shared"
                stage.output = tensor
                depthwise = reader
                second = Stage()
                stage = second
                stage_has_act = False
            elif op in CONSUMER_OPS:
                stage.output = tensor
                return self._consumer(producer, n, first, depthwise, second, reader, tensor, block=1)
            elif op in ("GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Squeeze"):
                stage.output = tensor
                return self._through_flatten(producer, n, first, depthwise, second, reader, tensor)
            elif op in COUPLING_OPS:
                return self._coupling_reason(reader, tensor)
            else:
                _, why = activation_of(g, reader)
                return why if op == "PRelu" else f"unsupported op {op} between producer and consumer"
            tensor = reader.output[0]
            self._path.append((tensor, 1))

    def _coupling_reason(self, reader: onnx.NodeProto, tensor: str) -> str:
        """Why a Mul/Add/Concat/... reading the chain's channels stops it."""
        name = reader.name or reader.output[0]
        if reader.op_type == "Mul":
            other = next((i for i in reader.input if i != tensor), "")
            if self.graph.is_constant(other):
                return f"output reaches Mul ({name}) by a per-channel constant (pruning would have to slice it)"
            mine, shape = self.shapes.get(tensor), self.shapes.get(other)
            if mine is not None and shape is not None and len(mine) == 4 and mine[2:] == (1, 1) and shape[2:] != (1, 1):
                return (f"squeeze-excitation gate: its channels scale the block's channels in Mul ({name}); "
                        "pruning it would have to prune the block too")
            if shape is not None and len(shape) == 4 and shape[2:] == (1, 1):
                return (f"output reaches Mul ({name}) by a per-channel gate (squeeze-excitation): "
                        "channels coupled with the gate's convs")
        if reader.op_type in ("Add", "Sub") and any(i != tensor and self.graph.is_constant(i) for i in reader.input):
            return f"output reaches {reader.op_type} ({name}) with a per-channel constant (pruning would have to slice it)"
        return f"output reaches {reader.op_type} ({name}): channels coupled with another branch"

    def _single_reader(self, tensor: str):
        g = self.graph
        if tensor in g.graph_outputs:
            return None, "feeds a graph output"
        readers = g.uses(tensor)
        if not readers:
            return None, "output is not used"
        if len(readers) > 1 or g.use_count(tensor) > 1:
            ops = sorted({r.op_type for r in readers})
            if "Mul" in ops and ({"GlobalAveragePool", "ReduceMean"} & set(ops)):
                return None, ("squeeze-excitation block: the channels are scaled by a gate computed from "
                              "themselves (GlobalAveragePool -> ... -> Mul); pruning through the gate is not supported")
            coupled = [o for o in ops if o in COUPLING_OPS]
            if coupled:
                return None, f"fan-out to {len(readers)} readers including {coupled[0]}: coupled channels (residual)"
            return None, f"fan-out: output read by {len(readers)} nodes ({', '.join(ops)})"
        return readers[0], ""

    def _pad_keeps_channels(self, pad: onnx.NodeProto, channels: int) -> bool:
        pads = attr(pad, "pads", None)
        if pads is None and len(pad.input) > 1:
            value = self.graph.constant(pad.input[1])
            pads = None if value is None else value.tolist()
        if pads is None:  # pads computed at run time (TF-style "same" padding): compare the shapes instead
            shape_out = self.shapes.get(pad.output[0])
            batch_in = self.shapes.get(self.graph.graph_inputs[0], (None,))[0] if self.graph.graph_inputs else None
            return shape_out is not None and len(shape_out) >= 3 and shape_out[1] == channels and shape_out[0] == batch_in
        if len(pad.input) > 3 and pad.input[3]:  # axes input: be conservative
            return False
        rank = len(pads) // 2
        return rank >= 2 and pads[0] == pads[1] == pads[rank] == pads[rank + 1] == 0

    def _resize_keeps_channels(self, node: onnx.NodeProto) -> bool:
        """True when a Resize/Upsample has constant scales with scale 1 on axes 0 and 1 and no sizes input."""
        inputs = list(node.input)
        scales_name = inputs[1] if node.op_type == "Upsample" else (inputs[2] if len(inputs) > 2 else "")
        if node.op_type == "Resize" and len(inputs) > 3 and inputs[3]:
            return False
        scales = attr(node, "scales", None) if not scales_name else self.graph.constant(scales_name)
        if scales is None or len(scales) < 2:
            return False
        return float(scales[0]) == 1.0 and float(scales[1]) == 1.0

    def _through_flatten(self, producer, n, first, depthwise, second, reader, tensor):
        """GAP/ReduceMean -> Flatten/Reshape -> Gemm, or Flatten of a map -> Gemm."""
        shape = self.shapes.get(tensor)
        block = 1
        node = reader
        if node.op_type in ("GlobalAveragePool", "ReduceMean"):
            if node.op_type == "ReduceMean" and not self.graph.reduces_spatial_axes(node):
                return "ReduceMean over non-spatial axes"
            nxt, reason = self._single_reader(node.output[0])
            if nxt is None:
                return reason
            if nxt.op_type in ("Gemm", "MatMul"):
                return "GlobalAveragePool straight into Gemm without Flatten (4-D input)"
            self._path.append((node.output[0], 1))
            node = nxt
        elif shape is not None and len(shape) == 4:
            block = int(shape[2] * shape[3])
        elif shape is None:
            return "unknown shape before Flatten"
        if node.op_type not in FLATTEN_OPS:
            return f"unsupported op {node.op_type} between producer and consumer"
        if node.op_type == "Reshape" and len(node.input) > 1:
            target = self.graph.constant(node.input[1])
            if target is not None and (target.size != 2 or int(target.reshape(-1)[1]) != -1):
                return "Reshape to a fixed channel count (would break after pruning)"
        out_shape = self.shapes.get(node.output[0])
        after_gap = node is not reader
        if out_shape is None and after_gap:
            pass  # (B, N, 1, 1) reshaped at run time (x.view(B, -1)): the consumer's input size is checked below
        elif out_shape is None or len(out_shape) != 2 or out_shape[1] != n * block:
            return f"{node.op_type} does not map channels to 2-D columns"
        consumer, reason = self._single_reader(node.output[0])
        if consumer is None:
            return reason
        self._path.append((node.output[0], block))
        if consumer.op_type not in ("Gemm", "MatMul"):
            return f"unsupported op {consumer.op_type} after {node.op_type}"
        return self._consumer(producer, n, first, depthwise, second, consumer, node.output[0], block)

    def _consumer(self, producer, n, first, depthwise, second, consumer, tensor, block):
        g = self.graph
        if consumer.input[0] != tensor:
            return f"consumer {consumer.op_type} reads the channels as its weight input"
        w = g.constant(consumer.input[1])
        if w is None:
            return "consumer weight is not a constant"
        if g.use_count(consumer.input[1]) > 1:
            return "consumer weight is shared"
        if consumer.op_type in ("Conv", "ConvTranspose"):
            if int(attr(consumer, "group", 1)) != 1:
                return f"grouped consumer {consumer.op_type} (group={attr(consumer, 'group', 1)})"
            if w.shape[1 if consumer.op_type == "Conv" else 0] != n:
                return "consumer weight does not match the channel count"
        elif consumer.op_type == "Gemm":
            if attr(consumer, "transA", 0) or w.ndim != 2:
                return "consumer Gemm with transA=1"
            cols = w.shape[1] if attr(consumer, "transB", 0) else w.shape[0]
            if cols != n * block:
                return "consumer Gemm input size does not match the channels"
        else:
            if w.ndim != 2 or w.shape[0] != n * block:
                return "consumer MatMul weight does not match the channels"
            shape = self.shapes.get(tensor)
            if shape is None or len(shape) != 2:
                return "MatMul consumer on a tensor that is not 2-D"
        if depthwise is not None and second is not None and not second.output:
            second.output = tensor
        return Chain(producer=producer, channels=n, first=first, consumer=consumer,
                     depthwise=depthwise, second=second, block=block, path=list(self._path))

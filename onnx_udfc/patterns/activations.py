"""Recognise pointwise activations and read their parameters.

Two levels:

- `activation_of(graph, node)`: one node that is a supported activation (Relu, Clip with constant bounds,
  LeakyRelu, PRelu with one slope or one per channel, Sigmoid, HardSigmoid, HardSwish, Identity/Dropout).
- `pointwise_run(graph, tensor)`: the longest run of channel-agnostic pointwise steps applied to a
  tensor, as exporters spell them, composed into one function:
    * single-input steps: the activations above, `Add/Sub/Mul/Div` by a scalar constant, `Max/Min` with a
      scalar constant (TF's `maximum(x, c)`), `Neg`;
    * gated products `x * h(x)` where `h` is a run of single-input steps read only by the `Mul`:
      HardSwish spelled `x * Clip(x + 3, 0, 6) / 6` (paddle2onnx), `x * HardSigmoid(x)`, SiLU spelled
      `x * Sigmoid(x)` (PyTorch < 1.x exports of Swish/SiLU).
  The composed function is a standard `Activation` when it is one (hardswish, silu, relu, clip, ...),
  else a `ComposedActivation`, whose piecewise-polynomial form is computed exactly when every step is
  piecewise polynomial and the degree stays <= 2 (e.g. `a * hardswish(x) + b`, `max(leakyrelu(x), c)`).

Every step uses scalar constants only, but a PRelu's per-channel slopes: removing a channel from the tensor
removes it from the result and nothing else (and its slope, which the pruning slices), which is what makes
a run transparent for channel pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx
from numpy.polynomial import polynomial as P

from ..ir.graph import Graph, attr
from ..numerics.activations import Activation

#: ops that never mix channels and keep shape: transparent for channel bookkeeping
PASSTHROUGH_OPS = ("Identity", "Dropout")
#: tolerance when comparing a composed function with the standard activations
_MATCH_TOL = 1e-6


def activation_of(graph: Graph, node: onnx.NodeProto, shapes=None) -> Tuple[Optional[Activation], str]:
    """The `Activation` computed by `node`, or (None, reason) when it is not a supported one.

    Supported: Relu, Clip (bounds constant), LeakyRelu, PRelu (one slope, or one per channel: see
    `per_channel_slopes`; `shapes` gives the input's rank), Sigmoid, HardSigmoid, HardSwish,
    Identity/Dropout (identity).
    """
    op = node.op_type
    if op == "Relu":
        return Activation("relu"), ""
    if op in PASSTHROUGH_OPS:
        return Activation("identity"), ""
    if op == "LeakyRelu":
        return Activation("leakyrelu", alpha=float(attr(node, "alpha", 0.01))), ""
    if op == "PRelu":
        slope = graph.constant(node.input[1]) if len(node.input) > 1 else None
        if slope is None:
            return None, "PRelu slope is not constant"
        if slope.size == 1:
            return Activation("leakyrelu", alpha=float(slope.reshape(()))), ""
        shape = shapes.get(node.input[0]) if shapes is not None else None
        slopes = per_channel_slopes(slope, None if shape is None else len(shape))
        if slopes is None:
            return None, f"PRelu slope of shape {tuple(slope.shape)} is not one per channel"
        return Activation("prelu", slopes=tuple(float(a) for a in slopes)), ""
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


def per_channel_slopes(slope: np.ndarray, rank: Optional[int]) -> Optional[np.ndarray]:
    """(C,) slopes when a PRelu `slope` broadcasts (right-aligned, as ONNX does) along the channel axis 1
    of its input of rank `rank` only, else None. Unknown rank: a slope of 3 or 4 dims is read as one for an
    NCHW input ((C, 1, 1) or (1, C, 1, 1)); a 1-D slope then stays unsupported (it would be read per W)."""
    if rank is None:
        if slope.ndim < 3:
            return None
        rank = max(slope.ndim, 4)
    if rank < 2 or slope.ndim > rank:
        return None
    padded = (1,) * (rank - slope.ndim) + tuple(slope.shape)
    if any(d != 1 for axis, d in enumerate(padded) if axis != 1):
        return None
    return slope.reshape(-1).astype(np.float64)


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


# ------------------------------------------------------------------ piecewise polynomials
@dataclass(frozen=True, eq=False)
class Piecewise:
    """A continuous piecewise polynomial: `polys[p]` (coefficients, lowest degree first) on the interval
    `(breaks[p-1], breaks[p])`, with `breaks[-1] = -inf` and `breaks[P-1] = +inf`; breaks (P-1,) sorted."""

    breaks: np.ndarray
    polys: Tuple[np.ndarray, ...]

    @staticmethod
    def affine(scale: float, shift: float) -> "Piecewise":
        return Piecewise(np.zeros(0), (np.array([shift, scale], np.float64),))

    @staticmethod
    def of(act) -> Optional["Piecewise"]:
        """Piecewise form of an activation-like object, None when it is not piecewise polynomial."""
        if not act.is_piecewise:
            return None
        breaks, coefs = act.pieces()
        return Piecewise(np.asarray(breaks, np.float64), tuple(np.asarray(c, np.float64) for c in coefs))

    @property
    def degree(self) -> int:
        return max(len(np.trim_zeros(p, "b")) - 1 for p in self.polys) if self.polys else 0

    def times_identity(self) -> "Piecewise":
        """x * f(x)."""
        return Piecewise(self.breaks, tuple(np.concatenate([[0.0], p]) for p in self.polys))

    def after(self, inner: "Piecewise") -> "Piecewise":
        """self(inner(x)): split every piece of `inner` where it crosses a break of `self`."""
        edges = np.concatenate([[-np.inf], inner.breaks, [np.inf]])
        breaks: List[float] = []
        polys: List[np.ndarray] = []
        for p, poly in enumerate(inner.polys):
            lo, hi = edges[p], edges[p + 1]
            cuts = sorted({float(r) for b in self.breaks for r in _real_roots(poly, b) if lo < r < hi})
            points = [lo] + cuts + [hi]
            for a, b in zip(points[:-1], points[1:]):
                y = float(P.polyval(_sample_point(a, b), poly))
                outer = self.polys[int(np.searchsorted(self.breaks, y))]
                composed = P.Polynomial(outer)(P.Polynomial(poly)).coef
                if polys:
                    breaks.append(a)
                polys.append(np.asarray(composed, np.float64))
        return Piecewise(np.asarray(breaks, np.float64), tuple(polys)).merged()

    def merged(self) -> "Piecewise":
        """Same function with adjacent equal pieces joined."""
        breaks: List[float] = []
        polys = [self.polys[0]]
        for b, poly in zip(self.breaks, self.polys[1:]):
            if _same_poly(polys[-1], poly):
                continue
            breaks.append(float(b))
            polys.append(poly)
        return Piecewise(np.asarray(breaks, np.float64), tuple(polys))

    def coefficient_rows(self, width: int = 3) -> np.ndarray:
        """(P, width) coefficient rows, zero-padded (the degree must be < width)."""
        rows = np.zeros((len(self.polys), width))
        for i, p in enumerate(self.polys):
            p = np.trim_zeros(p, "b")
            rows[i, :len(p)] = p
        return rows


def _real_roots(poly: np.ndarray, level: float) -> np.ndarray:
    """Real x with poly(x) = level (none when the polynomial is constant)."""
    shifted = np.array(poly, np.float64)
    shifted[0] -= level
    shifted = np.trim_zeros(shifted, "b")
    if len(shifted) < 2:
        return np.zeros(0)
    roots = P.polyroots(shifted)
    return roots.real[np.abs(roots.imag) < 1e-9]


def _sample_point(a: float, b: float) -> float:
    if np.isfinite(a) and np.isfinite(b):
        return 0.5 * (a + b)
    if np.isfinite(a):
        return a + 1.0
    if np.isfinite(b):
        return b - 1.0
    return 0.0


def _same_poly(p: np.ndarray, q: np.ndarray) -> bool:
    n = max(len(p), len(q))
    return bool(np.allclose(np.pad(p, (0, n - len(p))), np.pad(q, (0, n - len(q))), atol=1e-12, rtol=1e-12))


# ------------------------------------------------------------------ steps
class AffineStep:
    """`scale * x + shift` (scalar Mul/Add/Sub/Div/Neg)."""

    is_piecewise = True

    def __init__(self, scale: float, shift: float):
        self.scale, self.shift = float(scale), float(shift)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return (x * x.dtype.type(self.scale) + x.dtype.type(self.shift)) if x.dtype.kind == "f" else x * self.scale + self.shift

    def pieces(self):
        return np.zeros(0), np.array([[self.shift, self.scale, 0.0]])

    def __repr__(self) -> str:
        return f"affine({self.scale:.4g}, {self.shift:.4g})"


class GatedStep:
    """`x * h(x)`, h a composition of single-input steps."""

    def __init__(self, gate: Sequence):
        self.gate = tuple(gate)
        inner = _compose_piecewise(self.gate)
        self._piecewise = None if inner is None else inner.times_identity()

    @property
    def is_piecewise(self) -> bool:
        return self._piecewise is not None

    def apply(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x)
        for step in self.gate:
            h = step.apply(h)
        return x * h

    def __repr__(self) -> str:
        return f"x*({' -> '.join(map(repr, self.gate))})"


def _compose_piecewise(steps: Sequence) -> Optional[Piecewise]:
    """Piecewise form of steps[-1](...steps[0](x)), or None when a step is not piecewise polynomial.

    A gated step `g(x) = x * h(x)` composes like any other: `g(inner(x)) = inner(x) * h(inner(x))`.
    """
    total = Piecewise.affine(1.0, 0.0)
    for step in steps:
        piece = step._piecewise if isinstance(step, GatedStep) else Piecewise.of(step)
        if piece is None:
            return None
        total = piece.after(total)
    return total


@dataclass(frozen=True, eq=False)
class ComposedActivation(Activation):
    """A pointwise function made of several steps (see the module docstring); behaves as an `Activation`
    for the moment code: `apply` evaluates the steps in order, `pieces` is the exact composed form."""

    kind: str = "composed"
    steps: Tuple = ()
    label: str = ""
    _piecewise: Optional[Piecewise] = field(default=None, repr=False)

    def __post_init__(self) -> None:  # `kind` is informative only: apply/pieces below define the function
        pass

    @staticmethod
    def build(steps: Sequence, label: str) -> "ComposedActivation":
        piece = _compose_piecewise(steps)
        if piece is not None and piece.degree > 2:
            piece = None
        return ComposedActivation(steps=tuple(steps), label=label, _piecewise=piece)

    @property
    def is_piecewise(self) -> bool:
        return self._piecewise is not None

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        for step in self.steps:
            x = step.apply(x)
        return x

    def pieces(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._piecewise is None:
            raise ValueError(f"activation {self.label!r} is not piecewise polynomial of degree <= 2")
        return self._piecewise.breaks.copy(), self._piecewise.coefficient_rows()


def canonical_activation(steps: Sequence, label: str) -> Activation:
    """The standard `Activation` equal to the composition of `steps` when there is one, else a
    `ComposedActivation`."""
    if len(steps) == 1 and isinstance(steps[0], Activation) and not isinstance(steps[0], ComposedActivation):
        return steps[0]
    if (len(steps) == 1 and isinstance(steps[0], GatedStep) and len(steps[0].gate) == 1
            and getattr(steps[0].gate[0], "kind", "") == "sigmoid"):
        return Activation("silu")
    composed = ComposedActivation.build(steps, label)
    if composed._piecewise is None:
        return composed
    for candidate in _standard_candidates(composed._piecewise):
        if _equal_pieces(composed._piecewise, Piecewise.of(candidate)):
            return candidate
    return composed


def _standard_candidates(piece: Piecewise) -> List[Activation]:
    """Standard activations that `piece` could be, guessed from its breaks and pieces."""
    out = [Activation("identity"), Activation("relu"), Activation("hardswish", alpha=1.0 / 6.0, beta=0.5)]
    rows = piece.coefficient_rows()
    if len(piece.polys) == 2 and abs(piece.breaks[0]) < _MATCH_TOL and np.allclose(rows[:, 0], 0) and rows[1, 1] == 1.0:
        out.append(Activation("leakyrelu", alpha=float(rows[0, 1])))
    if len(piece.polys) == 3 and np.allclose(rows[:, 2], 0):
        alpha, beta = float(rows[1, 1]), float(rows[1, 0])
        if np.allclose(rows[[0, 2], 1], 0) and alpha != 0:
            out.append(Activation("hardsigmoid", alpha=alpha, beta=beta))
        out.append(Activation("clip", lo=float(piece.breaks[0]), hi=float(piece.breaks[1])))
    if len(piece.polys) == 2 and np.allclose(rows[:, 2], 0):
        out.append(Activation("clip", lo=float(piece.breaks[0]), hi=np.inf))
        out.append(Activation("clip", lo=-np.inf, hi=float(piece.breaks[0])))
    return out


def _equal_pieces(a: Piecewise, b: Piecewise) -> bool:
    if a.breaks.shape != b.breaks.shape or not np.allclose(a.breaks, b.breaks, atol=_MATCH_TOL):
        return False
    return bool(np.allclose(a.coefficient_rows(), b.coefficient_rows(), atol=_MATCH_TOL))


# ------------------------------------------------------------------ matching runs in a graph
@dataclass
class PointwiseRun:
    """Pointwise steps applied to `source`, ending at `output`."""

    source: str
    activation: Activation
    nodes: List[onnx.NodeProto]
    #: output tensor of every node of the run (all carry the source's channels), in graph order
    tensors: List[str]

    @property
    def output(self) -> str:
        return self.tensors[-1]


def _scalar(graph: Graph, name: str) -> Optional[float]:
    value = graph.constant(name) if name else None
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    return float(value.reshape(()))


def single_input_step(graph: Graph, node: onnx.NodeProto, tensor: str, shapes=None):
    """The step `node` applies to `tensor` when it is a channel-agnostic single-input op, else None.

    Binary ops qualify with a scalar constant as the other operand (the result keeps the tensor's shape:
    checked with `shapes` when known, else the constant must have rank <= 1).
    """
    op = node.op_type
    if not node.input:
        return None
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
        if len(node.input) != 2 or list(node.input).count(tensor) != 1:
            return None
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        c = _scalar(graph, other)
        if c is None or not _keeps_shape(graph, other, tensor, node.output[0], shapes):
            return None
        first = node.input[0] == tensor
        if op == "Add":
            return AffineStep(1.0, c)
        if op == "Mul":
            return AffineStep(c, 0.0)
        if op == "Sub":
            return AffineStep(1.0, -c) if first else AffineStep(-1.0, c)
        if op == "Div":
            return AffineStep(1.0 / c, 0.0) if first and c != 0 else None
        return Activation("clip", lo=c, hi=np.inf) if op == "Max" else Activation("clip", lo=-np.inf, hi=c)
    if node.input[0] != tensor:
        return None
    if op == "Neg":
        return AffineStep(-1.0, 0.0)
    if op in ("Clip", "PRelu") and any(i and not graph.is_constant(i) for i in node.input[1:]):
        return None
    if len([i for i in node.input if i]) > 1 and op not in ("Clip", "PRelu"):
        return None
    act, _ = activation_of(graph, node, shapes)
    return act


def _keeps_shape(graph: Graph, const: str, tensor: str, output: str, shapes) -> bool:
    value = graph.constant(const)
    if shapes is not None and tensor in shapes and output in shapes:
        return tuple(shapes[tensor]) == tuple(shapes[output])
    return value.ndim <= 1


def pointwise_run(graph: Graph, tensor: str, shapes=None) -> Optional[PointwiseRun]:
    """The longest run of channel-agnostic pointwise steps applied to `tensor` (see the module docstring).

    Every intermediate tensor is read only inside the run and is not a graph output; the run's output may
    have any readers. Returns None when `tensor` is not followed by such a step.
    """
    steps: list = []
    nodes: List[onnx.NodeProto] = []
    tensors: List[str] = []
    current = tensor
    while current not in graph.graph_outputs:
        readers = graph.uses(current)
        if graph.use_count(current) == 1:
            step = single_input_step(graph, readers[0], current, shapes)
            if step is None:
                break
            steps.append(step)
            nodes.append(readers[0])
            tensors.append(readers[0].output[0])
            current = readers[0].output[0]
            continue
        gated = _gated_product(graph, current, readers, shapes)
        if gated is None:
            break
        step, gate_nodes = gated
        steps.append(step)
        nodes.extend(gate_nodes)
        tensors.extend(n.output[0] for n in gate_nodes)
        current = gate_nodes[-1].output[0]
    if not steps:
        return None
    label = " -> ".join(n.op_type for n in nodes)
    return PointwiseRun(tensor, canonical_activation(steps, label), nodes, tensors)


def _gated_product(graph: Graph, tensor: str, readers: List[onnx.NodeProto], shapes):
    """`Mul(tensor, h(tensor))` where h is a run of single-input steps read only by that Mul.

    Returns (GatedStep, nodes in graph order ending with the Mul) or None.
    """
    if len(readers) != 2 or graph.use_count(tensor) != 2:
        return None
    muls = [r for r in readers if r.op_type == "Mul" and tensor in r.input and len(r.input) == 2
            and r.input[0] != r.input[1]]
    for mul in muls:
        start = readers[1] if readers[0] is mul else readers[0]
        gate_tensor = mul.input[1] if mul.input[0] == tensor else mul.input[0]
        steps, nodes = [], []
        node, current = start, tensor
        while True:
            step = single_input_step(graph, node, current, shapes)
            if step is None or node.output[0] in graph.graph_outputs:
                break
            steps.append(step)
            nodes.append(node)
            current = node.output[0]
            if current == gate_tensor:
                if graph.use_count(current) != 1:
                    break
                if shapes is not None and shapes.get(mul.output[0], shapes.get(tensor)) != shapes.get(tensor):
                    break
                return GatedStep(steps), nodes + [mul]
            nxt = graph.uses(current)
            if graph.use_count(current) != 1:
                break
            node = nxt[0]
    return None


def pointwise_source(graph: Graph, node: onnx.NodeProto) -> Optional[str]:
    """The tensor a pointwise run ending at `node` is applied to: `node.input[0]` for a single-input step,
    the gated tensor `x` when `node` is the `Mul` of `x * h(x)`; None when `node` is neither."""
    if node.op_type in ("Add", "Mul", "Max", "Min", "Sub", "Div"):
        data = [i for i in node.input if i and _scalar(graph, i) is None]
        if len(data) == 1 and single_input_step(graph, node, data[0]) is not None:
            return data[0]
        if node.op_type == "Mul" and len(data) == 2:
            for x in data:
                gated = _gated_product(graph, x, graph.uses(x), None)
                if gated is not None and gated[1][-1] is node:
                    return x
        return None
    if node.input and single_input_step(graph, node, node.input[0]) is not None:
        return node.input[0]
    return None


#: public name of `_gated_product`, for code that follows runs tensor by tensor (moment propagation)
gated_product = _gated_product

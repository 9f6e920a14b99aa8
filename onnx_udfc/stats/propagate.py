"""Per-channel moment propagation: mean and variance of every tensor, without data.

Starting from the network input (`N(0, 1)` per channel: inputs are assumed normalised), each op maps
per-channel (mean, var) of its inputs to its outputs under an independence model:

- Conv / Gemm / MatMul (weight W (N, C/g, kh, kw) or (N, K)):
  `E[z_o] = b_o + sum_{c,t} W[o,c,t] E[x_c]`, `Var[z_o] = sum_c v_c * sum_{t,t'} W[o,c,t] W[o,c,t'] rho^|t-t'|`
  (channels independent, spatially AR(1) with `rho` per pixel of lag).
- A pre-activation tensor whose BatchNormalization was folded, or the output of a BN left in place,
  takes the BN prior `N(beta, gamma^2)` instead: the running statistics are real data statistics.
- ConvTranspose (weight as rows (N, C/g, kh, kw), strides (sy, sx)): an output pixel of phase
  `p = (y mod sy, x mod sx)` sees the taps `t` with `(d ky_t mod sy, d kx_t mod sx) = p`, at input lag
  `(d ky_t div sy, d kx_t div sx)`; averaged over the `S = sy sx` phases (a mixture):
  `E[z_o] = b_o + sum_{c,t} cov_t W[o,c,t] E[x_c]` (`cov_t` the tap's output coverage, ~1/S),
  `Var[z_o] = 1/S sum_c v_c sum_{t,t' same phase} W[o,c,t] W[o,c,t'] rho^lag + Var_p(E[z_o | p])`.
- Pointwise activations: Gaussian moments of the activation (closed form or quadrature).
- Runs of pointwise steps as exporters spell activations (`pointwise_run`: HardSwish as
  `x * Clip(x + 3, 0, 6) / 6`, `Max(LeakyRelu(x), c)`, scalar Add/Mul/..., SiLU as `x * Sigmoid(x)`): every
  tensor of the run is a function `f_k` of the run's source `x`, and gets the Gaussian moments of `f_k`
  at the source's moments (exact; not an independent product for the `Mul` of `x * h(x)`). `Max`/`Min`
  with a scalar outside a run are a one-sided Clip of their input.
- MaxPool over n taps: the max of n equicorrelated Gaussians (correlation `rho`), moments matched.
- AveragePool / GlobalAveragePool / ReduceMean: mean kept, variance times the mean spatial correlation.
- Add/Sub/Mul of two tensors: independent sum/difference/product; with a constant: affine.
- Concat on the channel axis, Flatten/Reshape to 2-D (each channel repeated H*W times), shape-only ops.

Unknown ops give unknown statistics downstream; users of the model fall back and say so.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import numpy as np
import onnx

from ..ir.graph import Graph, attr
from ..ir.layers import tap_coverage, transpose_rows
from ..numerics._gauss import ndtr, phi
from ..numerics.moments import gaussian_activation_moments
from ..patterns.activations import activation_of, canonical_activation, gated_product, single_input_step

log = logging.getLogger(__name__)

Moments = Tuple[np.ndarray, np.ndarray]
SPATIAL_RHO = 0.5
#: correlation of the pre-activations inside a MaxPool window. Neighbouring pixels of a feature map are more
#: alike than the 0.5 used for conv windows: with 0.5 the pooled means of a Fashion-MNIST VGG came out about
#: twice the measured ones and mean compensation after the pool hurt; 0.85 was best of {0.5, 0.7, 0.85}.
POOL_RHO = 0.85
# E[max] and Var[max] of n iid standard normals, n = 1..9 (window sizes of common pools)
_MAX_MEAN = [0.0, 0.0, 0.5642, 0.8463, 1.0294, 1.1630, 1.2672, 1.3522, 1.4236, 1.4850]
_MAX_VAR = [1.0, 1.0, 0.6817, 0.5595, 0.4917, 0.4475, 0.4159, 0.3919, 0.3728, 0.3574]


def spatial_correlation(kh: int, kw: int, rho: float = SPATIAL_RHO) -> np.ndarray:
    """(T, T) correlation of the T = kh*kw taps of a window under a separable AR(1) field."""
    ys, xs = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    lag = np.abs(ys[:, None] - ys[None, :]) + np.abs(xs[:, None] - xs[None, :])
    return rho ** lag


def linear_moments(w: np.ndarray, b: Optional[np.ndarray], mean_in: np.ndarray, var_in: np.ndarray,
                   group: int = 1, rho: float = SPATIAL_RHO) -> Moments:
    """Moments of `z = W * x + b` for a Conv weight (N, C/g, kh, kw) or a dense weight (N, K).

    mean_in, var_in: (C,) per input channel. Returns (mean (N,), var (N,)).
    """
    w = np.asarray(w)
    n = w.shape[0]
    if w.ndim == 2:
        w = w[:, :, None, None]
    cg = w.shape[1]
    kh, kw = w.shape[2], w.shape[3]
    if kh * kw == 1:  # float32 weights: their float64 squares are exact, no float64 copy of the weight first
        sums = w.reshape(n, cg).astype(np.float64)  # (N, C/g)
        quad = np.square(sums)
    else:  # quad[n, c] = taps[n, c] . R taps[n, c]
        taps = w.reshape(n, cg, kh * kw).astype(np.float64)
        quad = np.einsum("nct,nct->nc", taps @ spatial_correlation(kh, kw, rho), taps)
        sums = taps.sum(axis=2)  # (N, C/g)
    if group == 1:
        mean, var = sums @ mean_in, quad @ var_in
    else:
        in_index = (np.arange(n) // (n // group))[:, None] * cg + np.arange(cg)[None, :]  # (N, C/g)
        mean = np.einsum("nc,nc->n", sums, mean_in[in_index])
        var = np.einsum("nc,nc->n", quad, var_in[in_index])
    if b is not None:
        mean = mean + np.asarray(b, dtype=np.float64).reshape(-1)
    return mean, var


def transposed_linear_moments(rows: np.ndarray, b: Optional[np.ndarray], mean_in: np.ndarray,
                               var_in: np.ndarray, group: int = 1, strides=(1, 1), dilations=(1, 1),
                               coverage: Optional[np.ndarray] = None, rho: float = SPATIAL_RHO) -> Moments:
    """Moments of a 2-D ConvTranspose output, averaged over its output pixels (see the module docstring).

    Args:
        rows: (N, C/g, kh, kw) weight as rows (`ir.layers.transpose_rows` of the ONNX weight).
        b: (N,) bias or None. mean_in, var_in: (C,) input moments.
        group, strides (sy, sx), dilations (dy, dx): the node's attributes.
        coverage: (kh, kw) fraction of output pixels each tap reaches (`ir.layers.tap_coverage`);
            default 1/(sy sx) for every tap.

    Returns:
        mean (N,), var (N,): `E[z_o] = b_o + sum_{c,t} cov_t W[o,c,t] mu_c`;
        `Var[z_o] = 1/S sum_c v_c w_oc^T (R o M) w_oc + 1/S sum_p (m_op - mean_p m_op)^2` with
        `R[t,t'] = rho^(|iy_t - iy_t'| + |ix_t - ix_t'|)` on input lags, `M[t,t'] = [phase_t == phase_t']`
        and `m_op = sum_{c, t in p} W[o,c,t] mu_c` the mean of phase p (the bias cancels in its spread).
    """
    w = np.asarray(rows, dtype=np.float64)
    n, cg, kh, kw = w.shape
    sy, sx = (int(v) for v in strides)
    dy, dx = (int(v) for v in dilations)
    n_phases = sy * sx
    ky, kx = np.meshgrid(np.arange(kh) * dy, np.arange(kw) * dx, indexing="ij")
    ky, kx = ky.ravel(), kx.ravel()
    phase = (ky % sy) * sx + (kx % sx)  # (T,)
    lag = np.abs((ky // sy)[:, None] - (ky // sy)[None, :]) + np.abs((kx // sx)[:, None] - (kx // sx)[None, :])
    corr = np.where(phase[:, None] == phase[None, :], rho ** lag, 0.0)  # (T, T)
    taps = w.reshape(n, cg, kh * kw)
    in_index = (np.arange(n) // (n // group))[:, None] * cg + np.arange(cg)[None, :]  # (N, C/g)
    mu, v = mean_in[in_index], var_in[in_index]
    cov = np.full(kh * kw, 1.0 / n_phases) if coverage is None else np.asarray(coverage, np.float64).reshape(-1)
    mean = np.einsum("nct,t,nc->n", taps, cov, mu)
    quad = np.einsum("nct,ts,ncs->nc", taps, corr, taps, optimize=True)
    one_hot = (phase[:, None] == np.arange(n_phases)[None, :]).astype(np.float64)  # (T, S)
    phase_means = np.einsum("nct,tp,nc->np", taps, one_hot, mu)  # (N, S)
    var = (quad * v).sum(axis=1) / n_phases + phase_means.var(axis=1)
    if b is not None:
        mean = mean + np.asarray(b, dtype=np.float64).reshape(-1)
    return mean, var


def max_of_gaussians(mean: np.ndarray, var: np.ndarray, n: int, rho: float = POOL_RHO) -> Moments:
    """Moment-matched max of n equicorrelated N(mean, var) draws (pairwise correlation rho)."""
    if n <= 1:
        return mean, var
    e_n, v_n = (_MAX_MEAN[n], _MAX_VAR[n]) if n < len(_MAX_MEAN) else _iid_max_moments(n)
    sd = np.sqrt(var)
    return mean + sd * np.sqrt(1 - rho) * e_n, var * (rho + (1 - rho) * v_n)


def _iid_max_moments(n: int) -> Tuple[float, float]:
    """E and Var of the max of n iid N(0,1) by quadrature on a fine grid."""
    x = np.linspace(-8, 8, 4001)
    pdf = n * phi(x) * ndtr(x) ** (n - 1)
    dx = x[1] - x[0]
    m = float((x * pdf).sum() * dx)
    return m, float(((x - m) ** 2 * pdf).sum() * dx)


def mean_spatial_correlation(kh: int, kw: int, rho: float = SPATIAL_RHO) -> float:
    """Variance factor of the average of a kh x kw window: mean of its (T,T) correlation matrix."""
    if kh * kw > 4096:  # large global pools: closed-form limit of the AR(1) sum
        return float(min(1.0, ((1 + rho) / (1 - rho)) ** 2 / (kh * kw)))
    return float(spatial_correlation(kh, kw, rho).mean())


class MomentPropagator:
    """Computes `moments[tensor] = (mean (C,), var (C,))` for every tensor it can."""

    def __init__(self, graph: Graph, shapes: Dict[str, tuple], priors: Dict[str, tuple]):
        self.graph = graph
        self.shapes = shapes
        self.priors = priors
        self.moments: Dict[str, Moments] = {}
        self.unknown_ops: Dict[str, int] = {}
        #: tensor -> (source, steps): the tensor is steps[-1](...steps[0](source)) (pointwise runs)
        self.run_functions: Dict[str, Tuple[str, tuple]] = {}

    def channels(self, tensor: str) -> Optional[int]:
        shape = self.shapes.get(tensor)
        if shape is None or len(shape) < 2:
            return None
        return int(shape[1])

    def run(self) -> Dict[str, Moments]:
        self.run_functions = pointwise_functions(self.graph, self.shapes, barriers=set(self.priors))
        for name in self.graph.graph_inputs:
            c = self.channels(name)
            if c is not None:
                self.moments[name] = (np.zeros(c), np.ones(c))
        for node in self.graph.topological_nodes():
            try:
                out = self._node(node)
            except (ValueError, IndexError, KeyError) as exc:  # shape mismatch in an odd graph
                log.debug("moments of %s (%s) unknown: %s", node.name, node.op_type, exc)
                out = None
            if out is None and node.op_type != "Constant":  # a Constant has no channels to lose
                self.unknown_ops[node.op_type] = self.unknown_ops.get(node.op_type, 0) + 1
            for name in node.output:
                if name in self.priors:
                    mu, sigma = self.priors[name]
                    self.moments[name] = (np.asarray(mu, float), np.asarray(sigma, float) ** 2)
                elif out is not None and name == node.output[0]:
                    self.moments[name] = out
        return self.moments

    # ------------------------------------------------------------------ ops
    def _node(self, node: onnx.NodeProto) -> Optional[Moments]:
        g = self.graph
        op = node.op_type
        ins = [self.moments.get(i) for i in node.input]
        x = ins[0] if ins else None
        if op == "Constant":
            return None
        if node.output and node.output[0] in self.run_functions:
            return self._pointwise(node.output[0])
        if op in ("Conv", "Gemm", "MatMul"):
            return self._linear(node, x)
        if op == "ConvTranspose":
            return self._conv_transpose(node, x)
        if op == "BatchNormalization":
            gamma, beta = g.constant(node.input[1]), g.constant(node.input[2])
            if gamma is None or beta is None:
                return None
            return np.asarray(beta, float), np.asarray(gamma, float) ** 2
        if x is None:
            return None
        act, _ = activation_of(g, node, self.shapes)
        if act is not None:
            mean, var = gaussian_activation_moments(x[0], np.sqrt(np.maximum(x[1], 0)), act)
            return np.asarray(mean, float), np.asarray(var, float)
        if op == "MaxPool":
            k = attr(node, "kernel_shape", [1, 1])
            return max_of_gaussians(x[0], x[1], int(np.prod(k)))
        if op == "AveragePool":
            k = attr(node, "kernel_shape", [1, 1])
            return x[0], x[1] * mean_spatial_correlation(*(list(k) + [1])[:2])
        if op in ("GlobalAveragePool", "ReduceMean"):
            shape = self.shapes.get(node.input[0])
            if shape is None or len(shape) != 4:
                return None
            if op == "ReduceMean" and not self.graph.reduces_spatial_axes(node):
                return None
            return x[0], x[1] * mean_spatial_correlation(shape[2], shape[3])
        if op == "GlobalMaxPool":
            shape = self.shapes.get(node.input[0])
            return None if shape is None or len(shape) != 4 else max_of_gaussians(x[0], x[1], min(9, shape[2] * shape[3]))
        if op in ("Flatten", "Reshape"):
            return self._flatten(node, x)
        if op in ("Identity", "Dropout", "Pad", "Cast", "Squeeze", "Unsqueeze", "Resize", "Upsample"):
            return x
        if op == "Concat":
            if attr(node, "axis", 1) not in (1, -3) or any(i is None for i in ins):
                return None
            return np.concatenate([i[0] for i in ins]), np.concatenate([i[1] for i in ins])
        if op in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
            return self._binary(node, ins)
        if op in ("Max", "Min") and len(node.input) == 2:
            return self._scalar_bound(node)
        return None

    def _pointwise(self, tensor: str) -> Optional[Moments]:
        """Gaussian moments of a run tensor `f(source)` at the source's (mean, var) (`run_functions`)."""
        source, steps = self.run_functions[tensor]
        x = self.moments.get(source)
        if x is None:
            return None
        act = canonical_activation(steps, " -> ".join(map(repr, steps)))
        mean, var = gaussian_activation_moments(x[0], np.sqrt(np.maximum(x[1], 0)), act)
        return np.asarray(mean, float), np.maximum(np.asarray(var, float), 0.0)

    def _scalar_bound(self, node: onnx.NodeProto) -> Optional[Moments]:
        """`Max(x, c)` / `Min(x, c)`, c a scalar constant, outside a pointwise run: a one-sided Clip of x,
        with x taken as Gaussian with its moments (as for any activation of a non-run tensor)."""
        for tensor in node.input:
            x = self.moments.get(tensor)
            step = single_input_step(self.graph, node, tensor, self.shapes) if x is not None else None
            if step is not None:
                mean, var = gaussian_activation_moments(x[0], np.sqrt(np.maximum(x[1], 0)), step)
                return np.asarray(mean, float), np.asarray(var, float)
        return None

    def _conv_transpose(self, node: onnx.NodeProto, x: Optional[Moments]) -> Optional[Moments]:
        g = self.graph
        w = g.constant(node.input[1])
        group = int(attr(node, "group", 1))
        if w is None or x is None or w.ndim != 4 or w.shape[0] % group or w.shape[0] != x[0].shape[0]:
            return None
        b = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        kernel = w.shape[2:]
        coverage = tap_coverage(node, kernel, self.shapes.get(node.input[0]), self.shapes.get(node.output[0]))
        return transposed_linear_moments(transpose_rows(w, group), b, x[0], x[1], group=group,
                                         strides=attr(node, "strides", None) or (1, 1),
                                         dilations=attr(node, "dilations", None) or (1, 1), coverage=coverage)

    def _linear(self, node: onnx.NodeProto, x: Optional[Moments]) -> Optional[Moments]:
        g = self.graph
        w = g.constant(node.input[1])
        if w is None or x is None:
            return None
        if node.op_type == "Conv":
            b = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            return linear_moments(w, b, x[0], x[1], group=int(attr(node, "group", 1)))
        if w.ndim != 2:
            return None
        if node.op_type == "Gemm":
            if attr(node, "transA", 0):
                return None
            rows = (w if attr(node, "transB", 0) else w.T) * float(attr(node, "alpha", 1.0))
            c = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            b = None if c is None else np.broadcast_to(c.reshape(-1) * float(attr(node, "beta", 1.0)),
                                                       (rows.shape[0],))
        else:
            rows, b = w.T, None
        if rows.shape[1] != x[0].shape[0]:
            return None
        return linear_moments(rows, b, x[0], x[1])

    def _flatten(self, node: onnx.NodeProto, x: Moments) -> Optional[Moments]:
        shape_in = self.shapes.get(node.input[0])
        shape_out = self.shapes.get(node.output[0])
        if shape_in is None or shape_out is None or len(shape_out) != 2:
            return None
        if len(shape_in) == 2:
            return x
        block = int(np.prod(shape_in[2:]))
        if shape_out[1] != shape_in[1] * block:
            return None
        return np.repeat(x[0], block), np.repeat(x[1], block)

    def _binary(self, node: onnx.NodeProto, ins) -> Optional[Moments]:
        op = node.op_type
        a, b = ins
        ca, cb = (self.graph.constant(n) for n in node.input)
        if a is not None and b is not None:
            if a[0].shape != b[0].shape:
                return None
            if op in ("Add", "Sub"):
                return (a[0] + b[0] if op == "Add" else a[0] - b[0]), a[1] + b[1]
            if op == "Mul":
                ea2, eb2 = a[1] + a[0] ** 2, b[1] + b[0] ** 2
                return a[0] * b[0], np.maximum(ea2 * eb2 - (a[0] * b[0]) ** 2, 0)
            return None
        x, const = (a, cb) if a is not None else (b, ca)
        if x is None or const is None:
            return None
        shape = self.shapes.get(node.output[0])
        k = self._per_channel(const, x[0].shape[0], len(shape) if shape else 0)
        if k is None:
            return None
        if op == "Add":
            return x[0] + k, x[1]
        if op == "Sub":
            return (x[0] - k, x[1]) if a is not None else (k - x[0], x[1])
        if op == "Mul":
            return x[0] * k, x[1] * k ** 2
        if op == "Div" and a is not None and np.all(k != 0):
            return x[0] / k, x[1] / k ** 2
        return None

    @staticmethod
    def _per_channel(const: np.ndarray, c: int, rank: int) -> Optional[np.ndarray]:
        """Constant that is uniform within each channel of a rank-`rank` tensor, as (C,); else None.

        Accepted: scalars, (C,) on a 2-D tensor, (C,1,1) or (1,C,1,1) on a 4-D tensor.
        """
        arr = np.asarray(const, dtype=np.float64)
        if arr.size == 1:
            return np.full(c, float(arr.reshape(())))
        if arr.size != c or rank < 2:
            return None
        # right-align the constant's shape against the tensor's and require it to vary on axis 1 only
        shape = (1,) * (rank - arr.ndim) + arr.shape
        if len(shape) != rank or shape[1] != c:
            return None
        return arr.reshape(-1)


def pointwise_functions(graph: Graph, shapes: Dict[str, tuple], barriers=frozenset()) -> Dict[str, Tuple[str, tuple]]:
    """For every tensor inside a run of pointwise steps (`patterns.activations.pointwise_run`), the run's
    source and the steps that compute the tensor from it: `tensor = steps[-1](...steps[0](source))`.

    The walk follows `pointwise_run`: a single reader that is a single-input step extends the run; two
    readers forming `x * h(x)` add a `GatedStep`, whose gate tensors are `h`'s prefixes applied to x.
    Sources are taken in topological order, so a tensor inside a run is never the source of another,
    except a tensor of `barriers` (one with a BN prior, which replaces what the run would give): the run
    stops there and a new one starts from it.
    """
    out: Dict[str, Tuple[str, tuple]] = {}
    starts = list(graph.graph_inputs) + [o for n in graph.topological_nodes() for o in n.output[:1]]
    for source in starts:
        if source and (source not in out or source in barriers):
            out.update({t: (source, steps) for t, steps in _run_from(graph, source, shapes, barriers)})
    return out


def _run_from(graph: Graph, source: str, shapes, barriers=frozenset()):
    """Yields (tensor, steps from `source`) along the longest pointwise run applied to `source`, up to
    the first tensor of `barriers` (included)."""
    current, prefix = source, ()
    while current not in graph.graph_outputs and (current == source or current not in barriers):
        readers = graph.uses(current)
        if graph.use_count(current) == 1:
            step = single_input_step(graph, readers[0], current, shapes)
            if step is None:
                return
            prefix, current = prefix + (step,), readers[0].output[0]
            yield current, prefix
            continue
        gated = gated_product(graph, current, readers, shapes)
        if gated is None:
            return
        step, nodes = gated
        for k, gate_node in enumerate(nodes[:-1]):
            yield gate_node.output[0], prefix + tuple(step.gate[:k + 1])
        prefix, current = prefix + (step,), nodes[-1].output[0]
        yield current, prefix

"""Per-layer pruning ratios under one global budget (methods.md section 8.2: "allocation under a global
budget is the next lever").

`--prune R` asks for `floor(R * sum_l N_l)` channels removed over all prunable chains. With
`allocation="global"` each chain l gets its own count k_l (at most `removal_cap`): every chain runs
the backward greedy of the expected-error selection on its error relative to the consumer's output
variance per output channel

    e_l(k) = (1 / M) sum_m err_m(D_k) / Var[y_m],   y = V a (consumer output, M channels),

i.e. the noise-to-signal ratio the next BatchNorm sees, and the budget goes one channel at a time to
the chain whose next removal raises its e_l least. Chains without statistics keep the uniform count.

Where the consumer's output is only read by a residual `Add` (MobileNetV2's and EfficientNet's project
convs, ResNet blocks), its error lands in the sum ``s = y + skip``, whose signal is larger: there
``Var[y_m]`` is replaced by ``Var[s_m]`` (`residual_share`), or, where an activation f reads the sum,
by ``Var[f(s_m)] / E[f'(s_m)^2]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import onnx

from ..ir.layers import read_layer
from ..numerics.compensation import tap_variances
from ..numerics.moments import gaussian_activation_moments, gaussian_slope_power
from ..numerics.selection import BackwardGreedy, allocate_greedily, effective_multiple
from ..patterns.activations import activation_of
from ..patterns.chains import Chain
from .base import PassContext
from .prune import consumer_tap_weights, consumer_taps, error_taps

log = logging.getLogger(__name__)


@dataclass
class ChainPlan:
    """Removal order of one chain and how many of it are removed (order[:n_remove])."""

    order: np.ndarray  # (K,) channel indices in removal order
    n_remove: int = 0

    def removed(self) -> np.ndarray:
        return np.sort(self.order[: self.n_remove])


def removal_cap(prune: float) -> float:
    """Largest fraction of one chain's channels the global allocation may remove: between the uniform
    ratio and 0.9, leaving room to move channels from sensitive layers to redundant ones."""
    return min(0.9, max(prune, 2.0 * prune + 0.1))


def floored_variance(var: np.ndarray) -> np.ndarray:
    """(M,) per-channel variances floored at 1e-3 of their mean, so that dead channels do not dominate a
    per-channel relative error."""
    return np.maximum(var, 1e-3 * max(float(np.mean(var)), 1e-30))


def normalised_gram(v_taps: np.ndarray, cov: np.ndarray, share: Optional[np.ndarray] = None) -> np.ndarray:
    """``G = sum_t V_t^T diag(share / (M Var[y])) V_t``, (N, N): consumer Gram with output channels whitened.

    v_taps: (M, N, T) consumer weights; cov: (N, N) its input covariance. ``Var[y_m] = sum_t V_mt cov V_mt^T``
    (taps read independent positions), floored at 1e-3 of the mean so dead outputs do not dominate.
    share: (M,) ``Var[y_m] / Var[s_m]`` where the output is added into a residual sum s (`residual_share`),
    so that the error is relative to the sum's variance; None: 1. Two matrix products over the (M * T, N)
    rows ``V[m, :, t]``.
    """
    m, n, t = v_taps.shape
    var_y = tap_variances(v_taps, cov)
    rows = np.ascontiguousarray(v_taps.transpose(0, 2, 1)).reshape(m * t, n)
    weight = 1.0 / (m * floored_variance(var_y))
    if share is not None:
        weight *= share
    return (rows.T * np.repeat(weight, t)) @ rows


#: smallest residual share used (a branch whose output hardly varies against the skip's still counts a little)
MIN_RESIDUAL_SHARE = 1e-3


def residual_share(ctx: PassContext, consumer: onnx.NodeProto) -> Optional[np.ndarray]:
    """(M,) ``Var[y_m] / Var[s_m]`` in [MIN_RESIDUAL_SHARE, 1] when the consumer's output y is read only by
    one residual `Add`/`Sum` s = y + skip, from the per-channel moments of y and s in the model that prices
    the chains (`selection_moments`: the moment propagation, BN priors through the activations, variances
    of independent branches adding up); None otherwise (no residual, or moments unknown).

    Why: the allocation prices a chain by its consumer's error relative to the consumer output's variance,
    but in a residual block that error is added to a stream that also carries the skip: the next layers
    see it against ``Var[s]``. Without the share the allocation took the residual blocks' branches for as
    sensitive as the blocks without a skip and cut those (and the classifier's input) instead. The shares
    the propagation predicts match the real ones where the stream is linear (MobileNetV2 0.16-0.58 against
    0.18-0.59 measured on 64 ImageNet images, EfficientNet-Lite0 0.11-0.26 against 0.10-0.27); after a
    ReLU on the sum (ResNet-20 on Fashion-MNIST) they are rougher (0.30-0.75 against 0.39-0.82). Where an
    activation reads the sum, the error is counted where it lands, after it (`_through_activation`).
    Measurements: `benchmarks/README.md`, "Residual share".
    """
    if ctx.stats is None or len(consumer.output) != 1:
        return None
    readers = ctx.graph.uses(consumer.output[0])
    if len(readers) != 1 or readers[0].op_type not in ("Add", "Sum"):
        return None
    branch = ctx.stats.selection_moments(consumer.output[0])
    total = ctx.stats.selection_moments(readers[0].output[0])
    if branch is None or total is None:
        return None
    var_y, var_s = (np.asarray(x[1], dtype=np.float64) for x in (branch, total))
    if var_y.ndim != 1 or var_y.shape != var_s.shape or not (np.all(np.isfinite(var_y)) and np.all(np.isfinite(var_s))):
        return None
    gain, var_s = _through_activation(ctx, readers[0].output[0], np.asarray(total[0], dtype=np.float64), var_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(var_s > 0, var_y * gain / var_s, 1.0)
    return np.clip(share, MIN_RESIDUAL_SHARE, 1.0)


def _through_activation(ctx: PassContext, total: str, mean_s: np.ndarray, var_s: np.ndarray):
    """(gain (M,), variance (M,)) of the stream the sum's error reaches: where the sum s is read only by an
    activation f (post-activation ResNets: ``relu(y + skip)``), a small error e in s reaches ``f(s)`` as
    ``f'(s) e``, so it counts ``E[f'(s)^2]`` times against ``Var[f(s)]`` (s Gaussian with the propagated
    moments; a ReLU on a zero-mean sum: gain 1/2 against 0.34 Var[s]); otherwise (1, Var[s]).

    Fashion-MNIST ResNet-20 (ReLU after every sum), udfc + W6, prune 0.1 / 0.3 / 0.5, top-1 with the share
    taken before -> after the ReLU: BN kept 0.9232 / 0.9132 / 0.8331 -> 0.9245 / 0.9178 / 0.8331, BN folded
    0.9113 / 0.7599 / 0.4011 -> 0.9173 / 0.8099 / 0.4130 (`benchmarks/README.md`, "Residual share").
    """
    readers = ctx.graph.uses(total)
    if len(readers) != 1 or mean_s.shape != var_s.shape:
        return np.ones_like(var_s), var_s
    act, _ = activation_of(ctx.graph, readers[0])
    if act is None or act.kind == "identity" or not np.all(np.isfinite(mean_s)):
        return np.ones_like(var_s), var_s
    if act.kind == "prelu" and act.channel_slopes.shape != var_s.shape:
        return np.ones_like(var_s), var_s
    sd = np.sqrt(np.maximum(var_s, 0.0))
    _, var_f = gaussian_activation_moments(mean_s, sd, act)
    # a channel the activation silences (a ReLU on an always-negative sum) passes no error: its variance is
    # floored as in `normalised_gram`, so that its gain, not the ratio of two vanishing numbers, decides
    return gaussian_slope_power(mean_s, sd, act), floored_variance(var_f)


def chain_greedy(ctx: PassContext, chain: Chain, max_remove: int) -> Optional[BackwardGreedy]:
    """The backward greedy of `chain` on its relative consumer error, or None without statistics."""
    statistics = ctx.stats.selection_statistics(chain) if ctx.stats is not None else None
    consumer = read_layer(ctx.graph, chain.consumer)
    if statistics is None or consumer is None or max_remove < 1:
        return None
    v_taps = consumer_taps(consumer.rows, chain.channels, chain.block).astype(np.float64)
    share = residual_share(ctx, chain.consumer) if ctx.options.residual_share else None
    if share is not None and share.shape[0] != v_taps.shape[0]:
        share = None
    if share is not None:  # in the report: the mean share of the residual sum this chain's errors are priced against
        ctx.layer(chain.producer)["residual_share"] = round(float(share.mean()), 3)
    gram = normalised_gram(error_taps(v_taps, consumer_tap_weights(ctx, consumer)), statistics[1], share)
    return BackwardGreedy(statistics[1], gram, max_remove, ridge=ctx.options.selection_ridge)


class AlignedSteps:
    """A chain's greedy seen in steps that keep its width a multiple of `multiple` (the first step removes
    ``N mod multiple`` channels when N is no multiple, then `multiple` at a time), at most `max_remove`.

    `peek()` runs the greedy one step ahead and prices the step per channel (its error increase / size):
    the allocation never rounds after the fact, so small layers are not forced past their share.
    """

    def __init__(self, greedy: BackwardGreedy, multiple: int):
        self.greedy = greedy
        self.multiple = effective_multiple(greedy.n, multiple)
        self.taken = 0

    def _next_size(self) -> int:
        rest = (self.greedy.n - self.taken) % self.multiple
        return rest if rest else self.multiple

    def peek(self):
        size = self._next_size()
        end = self.taken + size
        if end > self.greedy.max_remove or self.greedy.n - end < self.multiple:
            return size, np.inf
        while self.greedy.d < end:
            self.greedy.step()
        before = self.greedy.errors[self.taken - 1] if self.taken else 0.0
        return size, (self.greedy.errors[end - 1] - before) / size

    def step(self) -> None:
        self.taken += self._next_size()

    def plan(self) -> ChainPlan:
        return ChainPlan(order=self.greedy.order[:self.taken].copy(), n_remove=self.taken)


def plan_global_allocation(ctx: PassContext, chains: List[Chain]) -> Dict[int, ChainPlan]:
    """Plans keyed by `id(chain.consumer)`, each with its removal order and count.

    Budget: the channels the uniform ratio would remove, `sum_l floor(prune * N_l)`, spent one channel
    at a time on the chain whose next greedy removal raises its relative error least (a heap over the
    chains' greedy states, `allocate_greedily`), so each chain's greedy runs only as far as its own share.

    A budget counted in MACs (cost of a channel = its share of producer, depthwise and consumer MACs)
    was measured and dropped: with this error measure it moves the cuts to the early high-resolution
    layers and loses to the uniform ratio at equal MACs (MobileNetV2 prune 0.3: 0.26 against 0.31
    top-1 at 0.67x MACs).
    """
    prune = ctx.options.prune
    cap = removal_cap(prune)
    greedies: Dict[int, BackwardGreedy] = {}
    budget = 0
    for chain in chains:
        n = chain.channels
        greedy = chain_greedy(ctx, chain, min(n - 1, int(np.floor(cap * n))))
        if greedy is not None:
            greedies[id(chain.consumer)] = greedy
            budget += int(np.floor(prune * n))
    if not greedies or budget == 0:
        return {}
    steps = {k: AlignedSteps(g, ctx.options.channel_multiple) for k, g in greedies.items()}
    allocate_greedily(list(steps.values()), budget)
    log.info("global allocation: %d channels over %d chains", budget, len(greedies))
    return {k: state.plan() for k, state in steps.items()}

"""Per-layer pruning ratios under one global budget (methods.md section 8.2: "allocation under a global
budget is the next lever").

`--prune R` asks for `floor(R * sum_l N_l)` channels removed over all prunable chains. With
`allocation="global"` each chain l gets its own count k_l (at most `removal_cap`): every chain runs
the backward greedy of the expected-error selection on its error relative to the consumer's output
variance per output channel

    e_l(k) = (1 / M) sum_m err_m(D_k) / Var[y_m],   y = V a (consumer output, M channels),

i.e. the noise-to-signal ratio the next BatchNorm sees, and the budget goes one channel at a time to
the chain whose next removal raises its e_l least. Chains without statistics keep the uniform count.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ..ir.layers import read_layer
from ..numerics.selection import BackwardGreedy, aligned_removal, allocate_greedily
from ..patterns.chains import Chain
from .base import PassContext

log = logging.getLogger(__name__)


@dataclass
class ChainPlan:
    """Removal order and error curve of one chain (order[:k] is the set removed when k are taken)."""

    order: np.ndarray  # (K,) channel indices in removal order
    errors: np.ndarray  # (K,) relative consumer-output error after each removal
    n_remove: int = 0

    def removed(self) -> np.ndarray:
        return np.sort(self.order[: self.n_remove])


def removal_cap(prune: float) -> float:
    """Largest fraction of one chain's channels the global allocation may remove: between the uniform
    ratio and 0.9, leaving room to move channels from sensitive layers to redundant ones."""
    return min(0.9, max(prune, 2.0 * prune + 0.1))


def normalised_gram(v_taps: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``G = sum_t V_t^T diag(1 / (M Var[y])) V_t``, (N, N): consumer Gram with output channels whitened.

    v_taps: (M, N, T) consumer weights; cov: (N, N) its input covariance. ``Var[y_m] = sum_t V_mt cov V_mt^T``
    (taps read independent positions), floored at 1e-3 of the mean so dead outputs do not dominate.
    """
    var_y = np.einsum("mnt,nk,mkt->m", v_taps, cov, v_taps, optimize=True)
    floor = 1e-3 * max(float(np.mean(var_y)), 1e-30)
    weight = 1.0 / (v_taps.shape[0] * np.maximum(var_y, floor))
    return np.einsum("mnt,m,mkt->nk", v_taps, weight, v_taps, optimize=True)


def chain_greedy(ctx: PassContext, chain: Chain, max_remove: int) -> Optional[BackwardGreedy]:
    """The backward greedy of `chain` on its relative consumer error, or None without statistics."""
    statistics = ctx.stats.chain_statistics(chain) if ctx.stats is not None else None
    consumer = read_layer(ctx.graph, chain.consumer)
    if statistics is None or consumer is None or max_remove < 1:
        return None
    v_taps = consumer.rows.reshape(consumer.rows.shape[0], chain.channels, -1).astype(np.float64)
    gram = normalised_gram(v_taps, statistics[1])
    return BackwardGreedy(statistics[1], gram, max_remove, ridge=ctx.options.selection_ridge)


def _aligned_plan(greedy: BackwardGreedy, multiple: int) -> ChainPlan:
    """The chain's plan with its removal rounded to leave a multiple of `multiple` channels
    (`aligned_removal`): more greedy steps when rounding up, a shorter prefix when rounding down."""
    target = aligned_removal(greedy.n, greedy.d, multiple, max_remove=greedy.max_remove)
    while greedy.d < target:
        greedy.step()
    return ChainPlan(order=greedy.order[:target].copy(), errors=greedy.errors[:target].copy(), n_remove=target)


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
    allocate_greedily(list(greedies.values()), budget)
    log.info("global allocation: %d channels over %d chains", budget, len(greedies))
    return {k: _aligned_plan(g, ctx.options.channel_multiple) for k, g in greedies.items()}

"""Per-layer pruning ratios under one global budget (methods.md section 8.2: "allocation under a global
budget is the next lever").

`--prune R` asks for `floor(R * sum_l N_l)` channels removed over all prunable chains. With
`allocation="global"` each chain l gets its own count k_l: for every chain, the backward greedy
(expected-error selection) runs up to a cap and records the error after each removal, measured
relative to the consumer's output variance per output channel

    e_l(k) = (1 / M) sum_m err_m(D_k) / Var[y_m],   y = V a (consumer output, M channels),

i.e. the noise-to-signal ratio the next BatchNorm sees; then the cheapest steps over all chains are
taken (`allocate_removals`). Chains without statistics keep the uniform count.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from ..ir.layers import read_layer
from ..numerics.selection import allocate_removals, greedy_removal_order
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


def plan_chain(ctx: PassContext, chain: Chain, max_remove: int) -> Optional[ChainPlan]:
    """Greedy removal order and relative error curve of `chain`, or None without statistics."""
    statistics = ctx.stats.chain_statistics(chain) if ctx.stats is not None else None
    consumer = read_layer(ctx.graph, chain.consumer)
    if statistics is None or consumer is None or max_remove < 1:
        return None
    n = chain.channels
    v_taps = consumer.rows.reshape(consumer.rows.shape[0], n, -1).astype(np.float64)
    gram = normalised_gram(v_taps, statistics[1])
    order, errors = greedy_removal_order(statistics[1], gram, max_remove, ridge=ctx.options.selection_ridge)
    return ChainPlan(order=order, errors=errors)


def plan_global_allocation(ctx: PassContext, chains: List[Chain]) -> Dict[int, ChainPlan]:
    """Plans keyed by `id(chain.consumer)`, each with its `n_remove` set by the global allocation.

    Budget: the channels the uniform ratio would remove, `sum_l floor(prune * N_l)`. A budget counted in
    MACs instead (cost of a channel = its share of producer, depthwise and consumer MACs) was measured and
    dropped: with this error measure it moves the cuts to the early high-resolution layers and loses to the
    uniform ratio at equal MACs (MobileNetV2 prune 0.3: 0.26 against 0.31 top-1 at 0.67x MACs).
    """
    prune = ctx.options.prune
    cap = removal_cap(prune)
    plans: Dict[int, ChainPlan] = {}
    planned: List[Chain] = []
    budget = 0.0
    for chain in chains:
        n = chain.channels
        plan = plan_chain(ctx, chain, min(n - 1, int(np.floor(cap * n))))
        if plan is None:
            continue
        plans[id(chain.consumer)] = plan
        planned.append(chain)
        budget += int(np.floor(prune * n))
    if not plans or budget == 0:
        return {}
    curves = [plans[id(c.consumer)].errors for c in planned]
    counts = allocate_removals(curves, budget)
    for chain, k in zip(planned, counts):
        plans[id(chain.consumer)].n_remove = int(k)
    log.info("global allocation: %d channels over %d chains", budget, len(planned))
    return plans

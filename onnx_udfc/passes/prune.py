"""Structured pruning of one chain with closed-form compensation in the consumer.

For a chain producer -> [act, pools] -> [depthwise -> act] -> consumer with N channels:

1. choose the removed set P, |P| = floor(prune * N) (expected-error or norm selection);
2. model the consumer's input channels as `a ~ S a~_K + t` (S: (N, |K|), t: (N,)), by method:
   none: S = I on K, t = 0;  mean: pruned rows t_m = E[a_m];  merge: Neuron Merging partner scales;
   udfc: best affine predictor under the statistics model, with the producer's quantization noise on
   the kept channels (the per-channel S' of UDFC for kept rows);
3. consumer absorbs it: `V'[:, k] = sum_j V[:, j] S[j, k]`, `b' = b + sum_j t_j sum_taps V[:, j]`; with
   udfc, each output's deviation from its mean is then scaled back to the original output's variance
   (`variance_restoring_scale`, `Options.restore_variance`);
4. delete rows P of the producer (weight, bias), of the depthwise conv (and set its group to |K|),
   and the consumer's input slices.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np

from ..ir.graph import set_attr
from ..ir.layers import read_layer, write_layer
from ..numerics.compensation import (apply_compensation, blend_with_merge, mean_compensation, neuron_merging,
                                     rescale_about_mean, solve_affine_compensation, unobserved_variance,
                                     variance_restoring_scale)
from ..numerics.selection import aligned_removal, effective_multiple, select_by_expected_error, select_by_norm
from ..patterns.chains import Chain
from .base import PassContext

log = logging.getLogger(__name__)

#: Without a BN prior, the compensation solve counts each kept channel's variance as at least this fraction
#: of the chain's mean kept variance (`unobserved_variance`)
UNOBSERVED_VARIANCE_FLOOR = 0.03


def consumer_taps(rows: np.ndarray, channels: int, block: int) -> np.ndarray:
    """Consumer weight as (M, N, T): Conv (M, N, kh, kw) -> T = kh*kw; dense (M, N*block) -> T = block."""
    m = rows.shape[0]
    return rows.reshape(m, channels, -1)


def consumer_tap_weights(ctx: PassContext, consumer) -> Optional[np.ndarray]:
    """(T,) share of output pixels each consumer tap reaches, None when every tap reaches every pixel.

    Only a ConvTranspose consumer has one (`ir.layers.tap_coverage`, about 1/prod(strides) per tap): an
    output pixel sees one phase of its taps, so error variances and the mean a removed channel carried are
    averaged over pixels with these weights, ``sum_t c_t V_t^T cov V_t`` and ``sum_t c_t V_t t``.
    """
    if consumer.node.op_type != "ConvTranspose":
        return None
    return ctx.tap_coverage(consumer.node, consumer.rows.shape[2:]).reshape(-1)


def error_taps(v_taps: np.ndarray, tap_weights: Optional[np.ndarray]) -> np.ndarray:
    """(M, N, T) consumer taps scaled by sqrt(tap weight), so that ``sum_t V_t^T X V_t`` averages over output
    pixels (`consumer_tap_weights`); `v_taps` itself when there are no weights."""
    return v_taps if tap_weights is None else v_taps * np.sqrt(tap_weights)[None, None, :]


def prune_chain(ctx: PassContext, chain: Chain, plan=None) -> None:
    """Prune `chain` in place per ctx.options and record the decision on the producer's report line.

    plan: a `ChainPlan` from the global allocation (its count and removal order), or None for the
    uniform `floor(prune * N)` with the configured selection.
    """
    graph, options = ctx.graph, ctx.options
    record = ctx.layer(chain.producer)
    n = chain.channels
    if plan is None:
        multiple = effective_multiple(n, options.channel_multiple)
        n_remove = aligned_removal(n, int(np.floor(options.prune * n)), multiple)
    else:
        n_remove = plan.n_remove
    record.update(channels_before=n, channels_after=n, consumer=chain.consumer.name or chain.consumer.output[0])
    if chain.depthwise is not None:
        record["through_depthwise"] = chain.depthwise.name or chain.depthwise.output[0]
    if n_remove < 1:
        reason = (f"the global allocation keeps all {n} channels (removing others costs less)" if plan is not None
                  else f"ratio {options.prune} removes no channel of {n}")
        record["skipped"] = [f"pruning: {reason}"]
        return
    producer = read_layer(graph, chain.producer)
    consumer = read_layer(graph, chain.consumer)
    v_taps = consumer_taps(consumer.rows, n, chain.block).astype(np.float64)
    tap_weights = consumer_tap_weights(ctx, consumer)
    statistics = ctx.stats.chain_statistics(chain) if ctx.stats is not None else None
    method, select = options.method, options.select
    if statistics is None and (method in ("mean", "udfc") or select == "expected-error"):
        record.setdefault("notes", []).append("no statistics for this chain: norm selection and merge compensation")
        method = "merge" if method == "udfc" else method
        select = "norm"
        if method == "mean":
            method = "none"
    flat_producer = producer.rows.reshape(n, -1).astype(np.float64)
    if plan is not None:
        pruned = plan.removed()
    elif select == "expected-error":
        scaled = error_taps(v_taps, tap_weights)
        gram = np.einsum("mnt,mkt->nk", scaled, scaled, optimize=True)
        pruned = select_by_expected_error(ctx.stats.selection_statistics(chain)[1], gram, n_remove,
                                          ridge=options.selection_ridge)
    else:
        pruned = select_by_norm(flat_producer, n_remove)
    kept = np.setdiff1d(np.arange(n), pruned)
    s, t = _compensation(ctx, chain, method, statistics, kept, flat_producer, producer.bias)
    if statistics is not None and options.upstream_noise:
        ctx.residual_noise[chain.consumer.output[0]] = consumer_residual_variance(
            error_taps(v_taps, tap_weights), statistics[1], s, kept)
    v_new, bias_delta = apply_compensation(v_taps, s, t, tap_weights=tap_weights)
    consumer_bias = consumer.bias
    if np.any(bias_delta != 0):
        consumer_bias = (np.zeros(consumer.out_channels) if consumer_bias is None else consumer_bias) + bias_delta
    if method == "udfc" and options.restore_variance and statistics is not None:
        scale = variance_restoring_scale(error_taps(v_taps, tap_weights), statistics[1],
                                         error_taps(v_new, tap_weights), kept)
        if np.any(scale != 1.0):
            v_new, consumer_bias = rescale_about_mean(v_new, consumer_bias, statistics[0][kept], scale, tap_weights)
        record["variance_scale"] = {"mean": round(float(scale.mean()), 4), "max": round(float(scale.max()), 4)}
    write_layer(graph, consumer, v_new.reshape(consumer.rows.shape[0], -1, *consumer.rows.shape[2:]), consumer_bias)
    write_layer(graph, producer, producer.rows[kept], None if producer.bias is None else producer.bias[kept])
    if chain.depthwise is not None:
        dw = read_layer(graph, chain.depthwise)
        write_layer(graph, dw, dw.rows[kept], None if dw.bias is None else dw.bias[kept])
        set_attr(chain.depthwise, "group", int(kept.size))
    _slice_channel_slopes(graph, chain, kept)
    if ctx.stats is not None:
        ctx.stats.restrict(chain.path, kept)
    record.update(channels_after=int(kept.size), pruned=[int(i) for i in pruned], method=method, select=select,
                  allocation="global" if plan is not None else "uniform")


def consumer_residual_variance(v_taps: np.ndarray, cov: np.ndarray, s: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Per-output-channel variance of the consumer's error after compensation, (M,).

    Residual `r = a - S a_K - t` has covariance `R = B cov B^T`, `B = I - S E_K`; the consumer output error
    `sum_taps V_tap r` has variance `sum_taps diag(V_tap R V_tap^T)` (taps read independent residuals).
    """
    b = np.eye(cov.shape[0])
    b[:, kept] -= s
    r = b @ cov @ b.T
    return np.maximum(np.einsum("mit,ij,mjt->m", v_taps, r, v_taps, optimize=True), 0.0)


def _slice_channel_slopes(graph, chain: Chain, kept: np.ndarray) -> None:
    """Keep the slopes of channels `kept` in every per-channel PRelu on the chain (and in its stages)."""
    n = chain.channels
    for tensor, block in chain.path:
        node = graph.producer_of(tensor)
        if block != 1 or node is None or node.op_type != "PRelu":
            continue
        slope = graph.constant(node.input[1])
        if slope is None or slope.size != n:
            continue
        shape = tuple(kept.size if d == n else d for d in slope.shape)
        graph.set_weight(node, 1, slope.reshape(-1)[kept].reshape(shape))
    for stage in (chain.first, chain.second):
        if stage is not None:
            stage.activation = stage.activation.restricted(kept)


def has_bn_prior(ctx: PassContext, chain: Chain) -> bool:
    """Whether `chain`'s producer output has a BN prior (a BN followed it in the input model)."""
    return chain.producer.output[0] in ctx.priors


def _compensation(ctx: PassContext, chain: Chain, method: str, statistics, kept: np.ndarray,
                  flat_producer: np.ndarray, producer_bias) -> Tuple[np.ndarray, np.ndarray]:
    n = chain.channels
    if method == "none":
        s = np.zeros((n, kept.size))
        s[kept, np.arange(kept.size)] = 1.0
        return s, np.zeros(n)
    if method == "mean":
        return mean_compensation(statistics[0], kept)
    if method == "merge":
        return neuron_merging(flat_producer, producer_bias, kept)
    mean, cov = statistics
    noise = _kept_channel_noise(ctx, chain, kept, cov)
    pruned = np.setdiff1d(np.arange(n), kept)
    unobserved = None
    if not has_bn_prior(ctx, chain):  # (then `noise` is None)
        unobserved = unobserved_variance(np.diag(cov)[kept], UNOBSERVED_VARIANCE_FLOOR)
        if unobserved is not None:
            ctx.layer(chain.producer).setdefault("notes", []).append(
                f"no BN prior: {np.count_nonzero(unobserved)} kept channel(s) nearly constant in the statistics "
                f"(variance below {UNOBSERVED_VARIANCE_FLOOR:g} of the mean) trusted less by the compensation")
    # The ridge regularises the prediction of the pruned channels only: a kept channel is observed, so
    # its row stays the identity, or (with noise) the errors-in-variables solve without ridge (S').
    s, t = solve_affine_compensation(mean, cov, kept, ridge=ctx.options.ridge,
                                     extra_noise=noise if unobserved is None else unobserved, rows=pruned)
    if noise is not None:
        s_kept, t_kept = solve_affine_compensation(mean, cov, kept, ridge=0.0, extra_noise=noise, rows=kept)
        s[kept], t[kept] = s_kept[kept], t_kept[kept]
    if ctx.options.merge_blend and chain.depthwise is None and not has_bn_prior(ctx, chain):
        # no BN prior (BN folded at export): the covariance comes from synthetic inputs through an
        # un-normalised network; the weights-only merge is an independent second opinion. Not through a
        # depthwise conv: merge compares producer filters only, and a channel's own depthwise kernel (after
        # an activation) breaks `a_m ~ lambda a_k` (EfficientNet-Lite0 folded, prune 0.1 + W8: 0.738 -> 0.432)
        s, t, blended = blend_with_merge(s, t, flat_producer, producer_bias, kept)
        if blended.size:
            ctx.layer(chain.producer).setdefault("notes", []).append(
                f"no BN prior: {blended.size} of {n - kept.size} removed channels shrunk toward their Neuron "
                "Merging partner (weight = square root of the filter cosine)")
    return s, t


def _kept_channel_noise(ctx: PassContext, chain: Chain, kept: np.ndarray, cov: np.ndarray) -> Optional[np.ndarray]:
    """Noise variance of the kept channels at the consumer's input (None if there is none).

    Noise = what earlier steps already got wrong, each off by default (`Options.quantization_noise`,
    `Options.upstream_noise`): the quantization error of the producer (and of the depthwise conv) and the
    residual of the compensation upstream (the producer's own input was pruned), as pre-activation
    variances; through the depthwise kernel the producer's noise counts `||k_m||^2` times; then times the
    activation's mean slope squared. It shrinks S like errors-in-variables
    regression: a noisy kept channel is trusted less.
    """
    def pre_noise(node):
        out = node.output[0]
        parts = [ctx.quant_noise.get(out) if ctx.options.quantization_noise else None,
                 ctx.residual_noise.get(out) if ctx.options.upstream_noise else None]
        parts = [np.asarray(p, np.float64) for p in parts if p is not None and np.size(p) == chain.channels]
        return sum(parts) if parts else None

    if not has_bn_prior(ctx, chain):
        # Without a BN prior the noise (from propagated moments) and the covariance (from samples) are on
        # different scales; the shrinkage then hurts: MobileNetV2 exported with BN folded, prune 0.1 + W8,
        # 200 images: 0.355 top-1 with it, 0.580 without.
        return None
    last = chain.depthwise if chain.depthwise is not None else chain.producer
    noise = pre_noise(last)
    if chain.depthwise is not None:
        upstream = pre_noise(chain.producer)
        if upstream is not None:
            kernel = ctx.graph.constant(chain.depthwise.input[1]).reshape(chain.channels, -1).astype(np.float64)
            noise = (0 if noise is None else noise) + upstream * (kernel ** 2).sum(axis=1)
    if noise is None:
        return None
    pre = ctx.stats.tensor_moments(last.output[0])
    if pre is None:
        return None
    slope = ctx.stats.activation_slope(pre[0], pre[1], chain.last_stage)
    return (slope ** 2 * noise)[kept]

"""Compensation of removed (or damaged) channels by the consumer layer (methods.md section 3).

Every method returns an affine predictor ``a ~ S a_K + t`` of all N producer activations from the
kept ones (``S`` (N, |K|), ``t`` (N,)); :func:`apply_compensation` folds it into the consumer:
``V'[:, k] = sum_j V[:, j] S[j, k]``, ``b' = b + sum_j t_j sum_taps V[:, j]``.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from .covariance import _spatial_corr

__all__ = [
    "solve_affine_compensation",
    "mean_compensation",
    "neuron_merging",
    "merge_partners",
    "blend_with_merge",
    "unobserved_variance",
    "apply_compensation",
    "MIN_EXPLAINED_SHARE",
    "variance_restoring_scale",
    "tap_variances",
    "rescale_about_mean",
    "compensation_error",
]

log = logging.getLogger(__name__)


def _kept(kept, n: int) -> np.ndarray:
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    if kept.size and (kept.min() < 0 or kept.max() >= n or np.unique(kept).size != kept.size):
        raise ValueError("kept must hold distinct indices in [0, N)")
    return kept


def solve_affine_compensation(mean, cov, kept, ridge: float = 0.0, extra_noise=None,
                              rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Best affine predictor of all channels from the kept ones (least squares, free intercept).

    Formula: ``A = cov[K, K] + ridge * mean(diag(cov[K, K])) I + diag(extra_noise)``,
    ``S = cov[:, K] A^{-1}``, ``t = mean - S mean[K]``. ``extra_noise`` is independent zero-mean noise
    on the observed kept channels (e.g. quantization), which shrinks their own rows below identity
    (UDFC's S' / DF-MPC). With ``ridge == 0`` and no noise the kept rows are set to exactly the
    identity and their ``t`` to 0.

    Args:
        mean: (N,) activation means. cov: (N, N) activation covariance.
        kept: (|K|,) kept channel indices (column order of S).
        ridge: relative ridge. extra_noise: optional (|K|,) noise variances.
        rows: optional channel indices whose predictors are solved for (default all N). The other rows are
            left as no compensation: the identity with t = 0 on kept channels, zero with t = mean elsewhere.
            The triangular solves cost 2 |K|^2 per row against |K|^3 / 3 for the factorisation, so solving
            only the removed rows (or only the kept ones) is most of the saving.

    Returns:
        S: (N, |K|) float64, t: (N,) float64.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = np.asarray(cov, dtype=np.float64)
    n = mean.shape[0]
    if cov.shape != (n, n):
        raise ValueError(f"cov must have shape ({n}, {n}), got {cov.shape}")
    kept = _kept(kept, n)
    nk = kept.size
    if nk == 0:
        return np.zeros((n, 0)), mean.copy()
    a = cov[np.ix_(kept, kept)].copy()
    a = 0.5 * (a + a.T)
    if ridge:
        a[np.diag_indices(nk)] += float(ridge) * float(np.mean(np.diag(a)))
    if extra_noise is not None:
        noise = np.asarray(extra_noise, dtype=np.float64).reshape(-1)
        if noise.shape != (nk,) or np.any(noise < 0):
            raise ValueError(f"extra_noise must be nonnegative with shape ({nk},)")
        a[np.diag_indices(nk)] += noise
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    rhs = cov[np.ix_(kept, rows)]  # (|K|, R) = A S[rows]^T
    import scipy.linalg  # here, not at import: scipy.linalg costs 0.2 s and only pruning needs it

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            st = scipy.linalg.solve(a, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
        log.debug("solve_affine_compensation: ill-conditioned system, using lstsq")
        st = scipy.linalg.lstsq(a, rhs, cond=1e-12)[0]
    if rows.size == n and np.array_equal(rows, np.arange(n)):
        s = st.T
    else:
        s = np.zeros((n, nk))
        s[kept, np.arange(nk)] = 1.0
        s[rows] = st.T
    if not ridge and extra_noise is None:
        s[kept, :] = np.eye(nk)
    t = mean - s @ mean[kept]
    if not ridge and extra_noise is None:
        t[kept] = 0.0
    return s, t


def unobserved_variance(variances: np.ndarray, floor: float) -> np.ndarray | None:
    """Variance to add to each kept channel so that none is below ``floor * mean(variances)``, (|K|,), or
    None when no channel is below it (or all are 0).

    Why: without a BN prior the chain's statistics come from synthetic inputs only, and in a deep folded
    network some channels barely move on them (ReLU6 held at 0 or 6 on every sample) although they vary on
    data. The least-squares predictor of a removed channel then leans on such a channel with a coefficient
    of up to ``sqrt(v_removed / (ridge * mean)) / 2``, harmless on the synthetic inputs and large noise on real
    ones. Counting the shortfall as noise the inputs did not show (errors in variables, on the pruned rows
    only) bounds it by ``sqrt(v_removed / (floor * mean))`` (about 6x smaller at floor 0.03, ridge 0.001).
    EfficientNet-Lite0 exported with BN folded, prune 0.1 + W8, probe seeds 0 / 1 / 2: 0.768 / 0.212 / 0.720
    top-1 without, 0.790 / 0.760 / 0.768 with the floor at 0.03 (the 0.212 came from one 1152-channel chain's
    compensation).
    """
    variances = np.maximum(np.asarray(variances, dtype=np.float64), 0.0)
    target = floor * float(variances.mean()) if variances.size else 0.0
    if target <= 0 or not np.any(variances < target):
        return None
    return np.maximum(target - variances, 0.0)


def mean_compensation(mean, kept) -> tuple[np.ndarray, np.ndarray]:
    """Bias-only compensation (DFQ-style): ``a_m ~ E[a_m]`` for pruned m.

    Returns:
        S: (N, |K|) with ``S[kept[j], j] = 1`` and zero rows for pruned channels;
        t: (N,) equal to ``mean`` on pruned rows and 0 on kept rows.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    n = mean.shape[0]
    kept = _kept(kept, n)
    s = np.zeros((n, kept.size))
    s[kept, np.arange(kept.size)] = 1.0
    t = mean.copy()
    t[kept] = 0.0
    return s, t


def neuron_merging(w_hat, b_hat, kept, threshold: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Neuron Merging (Kim et al. 2020): each pruned channel is replaced by a scaled kept partner.

    For pruned m the partner is ``k* = argmax_k cos([w_m, b_m], [w_k, b_k])`` over kept k (filter and
    bias concatenated; ties: first in ``kept``); if that cosine exceeds ``threshold`` then
    ``S[m, k*] = ||w_m|| / ||w_k*||``. This is exact when ``(w_m, b_m) = lambda (w_k, b_k)`` with
    ``lambda > 0`` and the activation is positively homogeneous (ReLU, LeakyReLU, identity:
    ``f(lambda z) = lambda f(z)``); for bounded activations (Clip, ReLU6) it is only an approximation.
    ``t = 0``. Kept rows are identity.

    Args:
        w_hat: (N, D) BN-folded producer filters, flattened. b_hat: (N,) folded biases, or None (zeros).
        kept: (|K|,) kept indices. threshold: minimum cosine to merge.

    Returns:
        S: (N, |K|), t: (N,) zeros; float64.
    """
    kept = _kept(kept, np.shape(w_hat)[0])
    s, t = mean_compensation(np.zeros(np.shape(w_hat)[0]), kept)
    pruned, partner, cosine, scale = merge_partners(w_hat, b_hat, kept)
    ok = cosine > threshold
    s[pruned[ok], partner[ok]] = scale[ok]
    log.debug("neuron_merging: %d of %d pruned channels merged", int(ok.sum()), pruned.size)
    return s, t


def merge_partners(w_hat, b_hat, kept) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each pruned channel's most similar kept channel (Neuron Merging's partner).

    ``cos[m, k] = cos([w_m, b_m], [w_k, b_k])`` (filter and bias concatenated); the partner is the argmax over
    kept k (ties: first in ``kept``) and the scale ``||w_m|| / ||w_k||``.

    Args:
        w_hat: (N, D) BN-folded producer filters, flattened. b_hat: (N,) folded biases or None.
        kept: (|K|,) kept indices.

    Returns:
        pruned (P,) channel indices, partner (P,) positions in ``kept``, cosine (P,) and scale (P,); the
        cosine is -inf where the partner's filter is zero (no merge possible).
    """
    w_hat = np.asarray(w_hat, dtype=np.float64)
    n = w_hat.shape[0]
    w_hat = w_hat.reshape(n, -1)
    b_hat = np.zeros(n) if b_hat is None else np.asarray(b_hat, dtype=np.float64).reshape(-1)
    kept = _kept(kept, n)
    pruned = np.setdiff1d(np.arange(n), kept)
    if pruned.size == 0 or kept.size == 0:
        empty = np.zeros(pruned.size)
        return pruned, np.zeros(pruned.size, dtype=np.int64), np.full(pruned.size, -np.inf), empty
    full = np.concatenate([w_hat, b_hat[:, None]], axis=1)
    norms = np.linalg.norm(full, axis=1)
    unit = full / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit[pruned] @ unit[kept].T  # (|P|, |K|)
    partner = np.argmax(cos, axis=1)
    cosine = cos[np.arange(pruned.size), partner]
    wn = np.linalg.norm(w_hat, axis=1)
    partner_norm = wn[kept[partner]]
    cosine = np.where(partner_norm > 0, cosine, -np.inf)
    scale = wn[pruned] / np.where(partner_norm > 0, partner_norm, 1.0)
    return pruned, partner, cosine, scale


def blend_with_merge(s, t, w_hat, b_hat, kept, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink a least-squares compensation toward Neuron Merging, more where the merge partner is closer.

    For each pruned channel m with a partner k (cosine ``c_m > threshold``, `merge_partners`), with the
    weight ``a_m = sqrt(c_m)``::

        S[m] <- (1 - a_m) S[m] + a_m e_k lambda_m,   t[m] <- (1 - a_m) t[m]

    (``e_k lambda_m``: merge's row, the partner's scale in column k; merge has no intercept). Rows of kept
    channels and of pruned channels without a partner are unchanged. Used where the covariance behind
    ``S`` is not anchored by a BN prior (models exported with BN folded): there the least-squares fit trusts
    statistics of synthetic inputs through an un-normalised network, and the weights-only merge is the
    independent second opinion; the closer the filters, the more exact the merge (``c = 1``: exact for
    ReLU). Arguments as `solve_affine_compensation`'s results and `merge_partners`'s inputs.

    `threshold` 0: every pruned channel whose best partner has a positive cosine is blended, by that cosine
    (merge's own 0.45, a cut-off for merging at all, made the weight jump from 0 to 0.45). Fashion-MNIST
    exported with BN folded, udfc W6, mean of seeds 0-2, prune 0.1 / 0.3 / 0.5, threshold 0.45 -> 0: VGG
    0.917 / 0.871 / 0.416 -> 0.918 / 0.881 / 0.538, small VGG 0.910 / 0.769 / 0.142 -> 0.913 / 0.823 / 0.173,
    hourglass 0.896 / 0.498 / 0.258 -> 0.897 / 0.498 / 0.318, ResNet-20 0.910 / 0.747 / 0.285 -> 0.911 / 0.741 /
    0.291; folded ImageNet prune 0.1 / 0.3 + W8 (only the head chains are blended) top-1 unchanged, KL to the
    original lower (MobileNetV2 1.30 / 5.67 -> 1.24 / 5.52).

    Weight ``sqrt(c)`` rather than ``c`` (more trust in merge at every cosine), same runs, prune 0.1 / 0.3 / 0.5:
    VGG 0.918 / 0.881 / 0.538 -> 0.920 / 0.887 / 0.647, small VGG 0.913 / 0.823 / 0.173 -> 0.914 / 0.843 / 0.204,
    hourglass 0.897 / 0.498 / 0.318 -> 0.899 / 0.526 / 0.381, ResNet-20 0.911 / 0.741 / 0.291 -> 0.913 / 0.726 /
    0.287 (merge alone: 0.924 / 0.889 / 0.444, 0.911 / 0.735 / 0.271, 0.893 / 0.422 / 0.234, 0.902 / 0.628 /
    0.154). ``c^(1/4)`` and 1 (merge wherever the cosine is positive) fall between or below (VGG prune 0.5
    0.605 / 0.520, ResNet-20 prune 0.3 0.709 / 0.685); ``c^2`` was below ``c``.

    Returns:
        S (N, |K|) and t (N,), new arrays; the pruned channels whose rows were blended (ascending).
    """
    s = np.array(s, dtype=np.float64)
    t = np.array(t, dtype=np.float64)
    pruned, partner, cosine, scale = merge_partners(w_hat, b_hat, kept)
    ok = cosine > threshold
    rows, weight = pruned[ok], np.sqrt(cosine[ok])
    s[rows] *= (1.0 - weight)[:, None]
    s[rows, partner[ok]] += weight * scale[ok]
    t[rows] *= 1.0 - weight
    return s, t, rows


def apply_compensation(V, S, t, tap_weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Fold the predictor ``a ~ S a_K + t`` into the consumer weight.

    Formulas: ``V_new[:, k, ...] = sum_j V[:, j, ...] S[j, k]``,
    ``bias_delta[o] = sum_j t_j sum_taps w_tap V[o, j, ...]`` (w = 1: exact except at zero-padded borders;
    a ConvTranspose passes its tap coverage, and the bias then restores the mean over output pixels).

    Args:
        V: (M, N, *taps) consumer weight (taps empty for Gemm rows (M, N)).
        S: (N, |K|). t: (N,). tap_weights: (prod(taps),) or None (all 1).

    Returns:
        V_new: (M, |K|, *taps) with the dtype of V; bias_delta: (M,) float64.
    """
    V = np.asarray(V)
    S = np.asarray(S, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    m, n = V.shape[:2]
    if S.ndim != 2 or S.shape[0] != n or t.shape != (n,):
        raise ValueError(f"S must be ({n}, K) and t ({n},), got {S.shape} and {t.shape}")
    v64 = V.astype(np.float64)
    v_new = np.moveaxis(np.tensordot(v64, S, axes=([1], [0])), -1, 1)
    bias_delta = _tap_sums(v64, tap_weights) @ t
    dtype = V.dtype if np.issubdtype(V.dtype, np.floating) else np.float64
    return np.ascontiguousarray(v_new).astype(dtype), bias_delta


#: `variance_restoring_scale` scales only outputs whose compensated prediction explains at least this share
#: of their modelled variance (``Var[y'] >= share Var[y]``, k <= 1 / sqrt(share) = 1.29). Below it the
#: prediction is too weak to be scaled up: on EfficientNet-Lite0 at prune 0.5 the outputs past that point
#: (1152-channel chains cut to 144) had, on real images, an error as large as the output itself where the
#: model predicted about half of it, and scaling them lost 8 of 500 images. Outputs with k above a cut left
#: unscaled, cut 1.2 / 1.3 / 1.4 / none (ImageNet sample, prune 0.5 + W8, top-1 / KL): EfficientNet-Lite0
#: 0.466 / 1.577, 0.464 / 1.593, 0.452 / 1.637, 0.450 / 1.661 (nothing scaled: 0.466 / 1.563), MobileNetV2
#: 0.368 / 2.252, 0.378 / 2.219, 0.382 / 2.221, 0.374 / 2.227 (nothing scaled: 0.332 / 2.527).
MIN_EXPLAINED_SHARE = 0.6


def variance_restoring_scale(v_taps, cov, v_new, kept, min_explained: float = MIN_EXPLAINED_SHARE) -> np.ndarray:
    """(M,) scale per consumer output channel that gives the compensated output the original's variance:

        k_m = sqrt(Var[y_m] / Var[y'_m])   where Var[y'_m] >= min_explained * Var[y_m], else 1,
        Var[y_m]  = sum_t V_t[m] cov V_t[m]^T            (y = sum_t V_t a, the original consumer)
        Var[y'_m] = sum_t V'_t[m] cov_KK V'_t[m]^T       (y' = sum_t V'_t a_K + b', compensated)

    (taps read independent positions, as in the selection's error). The least-squares compensation predicts
    y by its conditional mean given the kept channels, whose variance falls short of y's by the expected
    error: ``Var[y'] = Var[y] - err``. Downstream layers keep their BN scales (running statistics, or folded
    weights), so every pruned chain hands a narrower signal on, and the shortfalls compound over depth: the
    same drift that BN re-estimation after pruning corrects with data. Scaling ``y' - E[y']`` by k restores
    the variance the next layers were trained for, at a cost in this layer's own error
    (``E[(y - y'')^2] = err + (k - 1)^2 Var[y']``), which is why a prediction that explains less than
    `min_explained` of the output is left as solved (`MIN_EXPLAINED_SHARE`).

    Args:
        v_taps: (M, N, T) original consumer taps; cov: (N, N) the chain's activation covariance;
        v_new: (M, K, T) compensated consumer taps (`apply_compensation`); kept: (K,) kept channels (columns
        of v_new). Taps weighted by sqrt(coverage) for a ConvTranspose (`passes.prune.error_taps`).

    Returns:
        k: (M,) float64 in [1, 1 / sqrt(min_explained)]; 1 where either variance vanishes.
    """
    v_taps = np.asarray(v_taps, dtype=np.float64)
    v_new = np.asarray(v_new, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    kept = _kept(kept, cov.shape[0])
    m, n, t = v_taps.shape
    if v_new.shape != (m, kept.size, t):
        raise ValueError(f"v_new must be ({m}, {kept.size}, {t}), got {v_new.shape}")
    var_y = tap_variances(v_taps, cov)
    var_kept = tap_variances(v_new, cov[np.ix_(kept, kept)])
    scale = np.ones(m)
    ok = (var_y > 0) & (var_kept >= min_explained * var_y) & (var_kept < var_y)
    scale[ok] = np.sqrt(var_y[ok] / var_kept[ok])
    return scale


def tap_variances(v_taps: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """(M,) ``sum_t V_t[m] cov V_t[m]^T`` for taps (M, C, T), cov (C, C): the variance of each output of a
    layer whose taps read independent positions; one (M*T, C) x (C, C) product."""
    m, c, t = v_taps.shape
    rows = np.ascontiguousarray(v_taps.transpose(0, 2, 1)).reshape(m * t, c)
    return np.einsum("rc,rc->r", rows @ cov, rows).reshape(m, t).sum(axis=1)


def rescale_about_mean(v_new, bias, mean_kept, scale, tap_weights=None) -> tuple[np.ndarray, np.ndarray]:
    """The consumer ``y' = sum_t V'_t a_K + b'`` with its deviation from its mean scaled per output channel:
    ``y'' = E[y'] + k (y' - E[y'])``, i.e. ``V'' = k V'``, ``b'' = k b' + (1 - k) E[y']`` with
    ``E[y'] = sum_t w_t V'_t E[a_K] + b'`` (w: tap coverage, 1 but for a ConvTranspose). The mean the
    compensation chose is kept.

    Args:
        v_new: (M, K, *taps); bias: (M,) or None (0); mean_kept: (K,) E[a_K]; scale: (M,) k.

    Returns:
        (V'' with v_new's dtype and shape, b'' (M,) float64).
    """
    v_new = np.asarray(v_new)
    m, k = v_new.shape[:2]
    scale = np.asarray(scale, dtype=np.float64).reshape(m)
    bias = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64).reshape(m)
    mean_out = _tap_sums(v_new, tap_weights) @ np.asarray(mean_kept, dtype=np.float64).reshape(k) + bias
    shape = (m,) + (1,) * (v_new.ndim - 1)
    return (v_new * scale.reshape(shape)).astype(v_new.dtype, copy=False), scale * bias + (1.0 - scale) * mean_out


def _tap_sums(v: np.ndarray, tap_weights=None) -> np.ndarray:
    """(M, N) float64 ``sum_t w_t V[:, :, t]`` of a weight (M, N, *taps) (w: tap coverage, None = all 1): the
    output's response to a constant on each input channel."""
    per_tap = v.reshape(v.shape[0], v.shape[1], -1).astype(np.float64, copy=False)
    if tap_weights is not None:
        per_tap = per_tap * np.asarray(tap_weights, np.float64).reshape(1, 1, -1)
    return per_tap.sum(axis=2)


def compensation_error(V, mean, cov, S, t, kept=None, spatial_rho: float = 0.0) -> float:
    """Expected squared consumer-output error of a compensation ``a ~ S a_K + t``.

    Model: the residual ``r = a - S a_K - t = B a - t`` (``B = I - S E_K``, ``E_K`` selects the kept
    channels) has mean ``r0 = B mean - t`` and covariance ``R = B cov B^T``. The consumer output error
    at a pixel is ``sum_taps V_tap r(p + tap)``; the residual's mean is the same at every tap and
    its fluctuations are correlated ``spatial_rho ** |tap - tap'|_1`` between taps (default 0:
    white). Then ``err = sum_{tap,tap'} rho^|.| tr(V_tap R V_tap'^T) + r0^T H r0``; at rho = 0 this is
    ``tr(G R) + r0^T H r0`` with ``G = sum_tap V_tap^T V_tap``, ``H = (sum_tap V_tap)^T (sum_tap V_tap)``.

    Args:
        V: (M, N, *taps) or (M, N). mean: (N,). cov: (N, N). S: (N, |K|). t: (N,).
        kept: (|K|,) kept indices (column order of S). Default: inferred as the channels whose rows
            of S are unit vectors, in column order (the kept rows of every method here when
            ridge == 0 and no noise); ValueError if that is ambiguous: pass kept explicitly.
        spatial_rho: correlation of residual fluctuations between neighbouring taps.

    Returns:
        err: float.
    """
    V = np.asarray(V, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = np.asarray(cov, dtype=np.float64)
    S = np.asarray(S, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    m, n = V.shape[:2]
    if kept is None:
        kept = _infer_kept(S)
    kept = _kept(kept, n)
    b = np.eye(n)
    b[:, kept] -= S
    r0 = b @ mean - t
    r = b @ cov @ b.T
    taps = V.shape[2:]
    v3 = V.reshape(m, n, -1)  # (M, N, T)
    r_sp = _spatial_corr(taps, spatial_rho)
    g = np.einsum("mit,tu,mju->ij", v3, r_sp, v3, optimize=True)
    vsum = v3.sum(axis=2)
    err = float(np.sum(g * r) + np.sum((vsum @ r0) ** 2))
    return max(err, 0.0)


def _infer_kept(S: np.ndarray) -> np.ndarray:
    """Row index of the unit row for each column of S (raises if not unique)."""
    unit = np.isclose(S, 1.0, rtol=0, atol=1e-12) & (np.count_nonzero(np.abs(S) > 1e-12, axis=1) == 1)[:, None]
    rows, cols = np.nonzero(unit)
    if np.unique(cols).size != S.shape[1] or cols.size != S.shape[1]:
        raise ValueError("cannot infer kept channels from S; pass kept explicitly")
    out = np.empty(S.shape[1], dtype=np.int64)
    out[cols] = rows
    return out

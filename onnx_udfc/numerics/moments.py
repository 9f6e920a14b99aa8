"""Moments of activations of Gaussian pre-activations (the BN prior, methods.md section 2).

For channel i the pre-activation is ``z_i = mu_i + sigma_i * xi_i`` with ``xi_i ~ N(0, 1)``
and the activation ``a_i = f(z_i)``.

* :func:`gaussian_activation_moments`: ``E[a_i]``, ``Var[a_i]``. Exact closed forms for every
  piecewise-polynomial activation (identity, relu, clip, leakyrelu, hardsigmoid, hardswish), e.g.
  ``E[relu(u)] = mu Phi(t) + s phi(t)``, ``t = mu/s``; quadrature for sigmoid and silu.
* :func:`gaussian_slope_power`: ``E[f'(z_i)^2]``, the gain of a small independent error through f.
* :func:`hermite_coefficients`: ``c_ik = E[f(z_i) He_k(xi_i)]``.
* :func:`activation_covariance`: Mehler expansion. If ``corr(xi_i, xi_j) = r``,
  ``Cov(a_i, a_j) = sum_{k>=1} c_ik c_jk r^k / k!``. The series is truncated at ``order``;
  the diagonal uses the exact variance (which adds the non-negative tail, so the result stays PSD
  whenever ``corr`` is).
* :func:`lagged_activation_covariance`: the same with ``corr`` scaled by lag factors, for the
  spatial correlation of feature maps (the same channel at two pixels is correlated ``< 1``).

Internally the coefficients are used normalised, ``c_ik / sqrt(k!)``, so orders up to a few
hundred do not overflow. The (N, N) series are evaluated by Horner's scheme in the elementwise sense
(``sum_k (c_k c_k^T) o R^k = R o (c_1 c_1^T + R o (c_2 c_2^T + ...))``) on cache-sized blocks of rows of
the lower triangle, mirrored, so results are exactly symmetric.
"""

from __future__ import annotations

import logging
from math import lgamma

import numpy as np

from . import _gauss
from .activations import Activation


def _blas():
    """scipy's BLAS wrappers, imported on first use: scipy.linalg costs 0.2 s to import and only the
    chain statistics of pruning need it."""
    from scipy.linalg import blas

    return blas


__all__ = [
    "gaussian_activation_moments",
    "hermite_coefficients",
    "activation_covariance",
    "lagged_activation_covariance",
]

log = logging.getLogger(__name__)


def _prepare(mu, sigma) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma must both have shape (N,), got {mu.shape} and {sigma.shape}")
    if np.any(sigma < 0) or not np.all(np.isfinite(sigma)) or not np.all(np.isfinite(mu)):
        raise ValueError("sigma must be finite and >= 0, mu finite")
    degenerate = sigma == 0.0
    s_safe = np.where(degenerate, 1.0, sigma)
    return mu, sigma, s_safe, degenerate


def gaussian_activation_moments(mu, sigma, act: Activation) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of ``f(u)``, ``u ~ N(mu, sigma^2)``, per channel.

    Args:
        mu: (N,) means.
        sigma: (N,) standard deviations, >= 0 (sigma == 0 gives ``f(mu)`` and variance 0).
        act: the activation f.

    Returns:
        mean (N,), var (N,), float64. Relu, for instance (``t = mu/s``):
        ``E = mu Phi(t) + s phi(t)``, ``E[relu^2] = (mu^2 + s^2) Phi(t) + mu s phi(t)``; clip, leakyrelu,
        hardsigmoid and hardswish are sums of such truncated-Gaussian moments (exact); sigmoid and
        silu use a composite Gauss-Legendre rule (relative error ~1e-8).
    """
    if act.kind == "prelu":
        return _prelu_moments(mu, sigma, act)
    mu, sigma, s, degenerate = _prepare(mu, sigma)
    fmu = act.apply(mu)
    if act.is_piecewise:
        breaks, coefs = act.pieces()
        mean, var = _gauss.piecewise_mean_var(mu, s, fmu, breaks, coefs)
    else:
        nodes, weights = _gauss.quadrature_rule(mu, s)
        vals = act.apply(mu[:, None] + s[:, None] * nodes)
        mean = np.sum(weights * vals, axis=1)
        var = np.sum(weights * (vals - mean[:, None]) ** 2, axis=1)
    mean = np.where(degenerate, fmu, mean)
    var = np.where(degenerate, 0.0, var)
    return mean, var


_RELU = Activation("relu")
_IDENTITY = Activation("identity")


def gaussian_slope_power(mu, sigma, act: Activation) -> np.ndarray:
    """``E[f'(u)^2]``, ``u ~ N(mu, sigma^2)``, per channel: (N,) float64.

    The gain of a small error ``e`` independent of ``u`` through the activation:
    ``E[(f(u + e) - f(u))^2] ~= E[f'(u)^2] E[e^2]``. Piecewise-linear activations (identity, relu, clip,
    leakyrelu, prelu, hardsigmoid, hardswish) exactly, piece by piece from the truncated normal's moments
    (``sum_p slope_p^2 P(u in piece p)`` where the pieces are linear); sigmoid and silu by the quadrature rule
    with a central difference. sigma == 0 gives ``f'(mu)^2``.
    """
    mu, sigma, s, degenerate = _prepare(mu, sigma)
    h = 1e-5 * (1.0 + np.abs(mu))
    at_mu = ((act.apply(mu + h) - act.apply(mu - h)) / (2.0 * h)) ** 2
    if act.kind == "prelu":
        a = act.channel_slopes
        power = a * a * _gauss.ndtr(-mu / s) + _gauss.ndtr(mu / s)
    elif act.is_piecewise:
        # on piece p, f'(mu + s xi) = A + B xi with A = e1 + 2 e2 mu, B = 2 e2 s; over xi in [a, b]:
        # E[(A + B xi)^2 1] = A^2 M0 + 2 A B M1 + B^2 M2, M0 = Phi(b) - Phi(a), M1 = phi(a) - phi(b),
        # M2 = M0 + a phi(a) - b phi(b)
        breaks, coefs = act.pieces()
        edges = _gauss._edges(mu, s, breaks)  # (N, P + 1), clamped where phi vanishes
        lo, hi = edges[:, :-1], edges[:, 1:]
        m0 = _gauss._mass(lo, hi)
        phi_lo, phi_hi = _gauss.phi(lo), _gauss.phi(hi)
        m1 = phi_lo - phi_hi
        m2 = m0 + lo * phi_lo - hi * phi_hi
        a_ = coefs[None, :, 1] + 2.0 * coefs[None, :, 2] * mu[:, None]
        b_ = 2.0 * coefs[None, :, 2] * s[:, None]
        power = np.sum(a_ * a_ * m0 + 2.0 * a_ * b_ * m1 + b_ * b_ * m2, axis=1)
    else:
        nodes, weights = _gauss.quadrature_rule(mu, s)
        u = mu[:, None] + s[:, None] * nodes
        step = 1e-5 * (1.0 + np.abs(u))
        slope = (act.apply(u + step) - act.apply(u - step)) / (2.0 * step)
        power = np.sum(weights * slope * slope, axis=1)
    return np.where(degenerate, at_mu, power)


def _prelu_moments(mu, sigma, act: Activation) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of PRelu ``f = a x + (1 - a) r``, ``r = relu(x)``, a per channel, from ReLU's:

        E[f] = a mu + (1 - a) E[r]
        Var[f] = a^2 sigma^2 + (1 - a)^2 Var[r] + 2 a (1 - a) Cov[x, r],   Cov[x, r] = Var[r] + E[r] (E[r] - mu)

    (``x r = r^2``, so ``E[x r] = E[r^2]``; every term stays accurate where ``mu >> sigma``, where
    ``E[r] - mu = E[relu(-x)]`` is small and positive).
    """
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    a = act.channel_slopes
    mean_r, var_r = gaussian_activation_moments(mu, sigma, _RELU)
    mean = a * mu + (1.0 - a) * mean_r
    cov_xr = var_r + mean_r * (mean_r - mu)
    var = a * a * sigma * sigma + (1.0 - a) ** 2 * var_r + 2.0 * a * (1.0 - a) * cov_xr
    return mean, np.maximum(var, 0.0)


def _normalized_coefficients(mu, sigma, act: Activation, order: int, mean=None) -> np.ndarray:
    """``E[f(mu + s xi) he_k(xi)]`` with ``he_k = He_k / sqrt(k!)``; shape (N, order+1).

    ``mean``: optional (N,) ``E[f(z)]`` already computed by :func:`gaussian_activation_moments` (column 0).
    PRelu: the coefficients are linear in f, ``a c(identity) + (1 - a) c(relu)`` per channel.
    """
    if order < 0:
        raise ValueError("order must be >= 0")
    if act.kind == "prelu":
        a = act.channel_slopes[:, None]
        out = a * _normalized_coefficients(mu, sigma, _IDENTITY, order) + (1.0 - a) * _normalized_coefficients(
            mu, sigma, _RELU, order)
        if mean is not None:
            out[:, 0] = mean
        return out
    mu, sigma, s, degenerate = _prepare(mu, sigma)
    out = np.empty((mu.shape[0], order + 1))
    out[:, 0] = gaussian_activation_moments(mu, sigma, act)[0] if mean is None else mean
    if order == 0:
        return out
    if act.is_piecewise:
        breaks, coefs = act.pieces()
        out[:, 1:] = _gauss.piecewise_hermite(mu, s, breaks, coefs, order)
    else:
        nodes, weights = _gauss.quadrature_rule(mu, s, order)
        vals = weights * act.apply(mu[:, None] + s[:, None] * nodes)
        he = _gauss.normalized_hermite(nodes, order)  # (order+1, N, Q)
        out[:, 1:] = np.einsum("nq,knq->nk", vals, he[1:])
    out[degenerate, 1:] = 0.0
    return out


def hermite_coefficients(mu, sigma, act: Activation, order: int) -> np.ndarray:
    """Hermite coefficients ``c[:, k] = E[f(mu + sigma xi) He_k(xi)]``, xi ~ N(0, 1), k = 0..order.

    ``He_k`` are the probabilists' Hermite polynomials (``He_0 = 1, He_1 = x, He_2 = x^2 - 1``);
    ``c[:, 0]`` is the mean. Piecewise-polynomial f (continuous): exact, by Stein's lemma
    ``E[f(u) He_k(xi)] = sigma E[f'(u) He_{k-1}(xi)]``, with ``f'`` piecewise constant (linear for
    hardswish) so that the integrals are ``[-phi(x) He_{k-2}(x)]`` at the break points (``Phi``
    differences for k = 1). Smooth f: composite Gauss-Legendre quadrature.

    Args:
        mu, sigma: (N,). order: highest k (``k!`` must fit in float64: order <= 170).

    Returns:
        c: (N, order+1) float64. Rows with sigma == 0 are ``[f(mu), 0, ..., 0]``.
    """
    if order > 170:
        raise ValueError("order > 170 overflows k!; use the normalised form internally")
    chat = _normalized_coefficients(mu, sigma, act, order)
    sqrt_fact = np.exp(0.5 * np.array([lgamma(k + 1.0) for k in range(order + 1)]))
    return chat * sqrt_fact[None, :]


# --- blocked evaluation of symmetric (N, N) results --------------------------------------------------------------
# The N x N matrices below are built one block of rows at a time, lower triangle only: rows r0:r1, columns 0:r1.
# A block of at most _BLOCK_ELEMS entries (plus the matching correlation block) stays in the L2 cache while the
# series is evaluated on it, so each order costs two in-cache passes instead of several passes over memory.
_BLOCK_ELEMS = 65536
_MIN_BLOCK_ROWS = 16
_MAX_BLOCK_ROWS = 128


def _row_blocks(n: int) -> list[tuple[int, int]]:
    """Row ranges ``(r0, r1)`` covering ``0..n``, ``B = clip(65536 // n, 16, 128)`` rows each (the last shorter)."""
    rows = max(_MIN_BLOCK_ROWS, min(_MAX_BLOCK_ROWS, _BLOCK_ELEMS // max(n, 1)))
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _store_lower_block(out: np.ndarray, blk: np.ndarray, r0: int, r1: int) -> None:
    """Write ``blk = X[r0:r1, :r1]`` of a symmetric X into ``out`` (N, N) and mirror it above the diagonal.

    The diagonal block ``blk[:, r0:r1]`` is replaced by ``(D + D^T) / 2`` and ``out[:r0, r0:r1] = blk[:, :r0]^T``,
    so ``out`` is exactly symmetric once every block is stored. ``blk`` is modified.
    """
    diag = blk[:, r0:r1]
    diag[...] = 0.5 * (diag + diag.T)
    out[r0:r1, :r1] = blk
    out[:r0, r0:r1] = blk[:, :r0].T


def _corr_input(corr, n: int) -> np.ndarray:
    """``corr`` as float64 (N, N), without a copy when it already is (symmetrised and clipped per block later)."""
    corr = np.asarray(corr, dtype=np.float64)
    if corr.shape != (n, n):
        raise ValueError(f"corr must have shape ({n}, {n}), got {corr.shape}")
    return corr


def _corr_block(corr: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1, columns 0:r1 of ``clip((corr + corr^T) / 2, -1, 1)``: a new C-contiguous (r1 - r0, r1) array."""
    blk = np.add(corr[r0:r1, :r1], corr[:r1, r0:r1].T)
    blk *= 0.5
    return np.clip(blk, -1.0, 1.0, out=blk)


def _coefficients_and_variance(mu, sigma, act: Activation, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coefficients (N, order+1) and exact variances (N,), from one call of the moment formulas."""
    mean, var = gaussian_activation_moments(mu, sigma, act)
    return _normalized_coefficients(mu, sigma, act, order, mean=mean), var


def _tail_rows(chat: np.ndarray, var: np.ndarray, order: int) -> np.ndarray:
    """Rows ``tail_i = sqrt(t_i) unit_i`` (N, m), so that ``(tail tail^T)_ij = a_ij sqrt(t_i t_j)``.

    ``t_i = max(Var_i - sum_{k=1..order} chat_ik^2, 0)`` is the variance the truncated series misses and
    ``unit_i`` the last ``m = min(4, order)`` normalised coefficients of channel i scaled to unit length
    (zero if they all vanish), so ``a_ij`` is their cosine.
    """
    missing = np.sqrt(np.maximum(var - np.sum(chat[:, 1:] ** 2, axis=1), 0.0))
    last = chat[:, max(1, order - 3):]
    norms = np.linalg.norm(last, axis=1)
    unit = np.divide(last, norms[:, None], out=np.zeros_like(last), where=norms[:, None] > 0)
    return missing[:, None] * unit


def _mehler_horner_block(coefs: np.ndarray, r0: int, r1: int, rb: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Rows r0:r1, columns 0:r1 of ``sum_{k=1..K} (c_k c_k^T) o R^k + A o R^(K+1)`` (``o``: elementwise).

    Horner's scheme in the elementwise sense, innermost term first:
    ``R o (c_1 c_1^T + R o (c_2 c_2^T + ... + R o (c_K c_K^T + R o A)))``; each order is one in-place
    multiply and one in-place rank-1 update (BLAS ger on the Fortran-ordered transpose of the block).

    Args:
        coefs: (K, N) C-contiguous, ``coefs[k - 1] = c_k``.
        rb: (B, r1) block of R (B = r1 - r0). acc: (B, r1) C-contiguous block of A; overwritten with the result.

    Returns:
        acc.
    """
    acc_t = acc.T  # (r1, B), Fortran-ordered view: ger updates it (and so acc) in place
    ger = _blas().dger
    for k in range(coefs.shape[0], 0, -1):
        acc *= rb
        res = ger(1.0, coefs[k - 1, :r1], coefs[k - 1, r0:r1], a=acc_t, overwrite_a=True)
        if res is not acc_t:  # BLAS wrapper made a copy (never for a Fortran-ordered float64 block)
            acc_t[...] = res
    acc *= rb
    return acc


def _check_lag_factors(lag_factors) -> np.ndarray:
    """Lag factors as a float64 (L,) array; ValueError unless 1-D with values in [-1, 1]."""
    factors = np.atleast_1d(np.asarray(lag_factors, dtype=np.float64))
    if factors.ndim != 1 or np.any(np.abs(factors) > 1.0):
        raise ValueError("lag_factors must be a 1-D array with values in [-1, 1]")
    return factors


def lagged_activation_covariance(mu, sigma, corr, act: Activation, lag_factors, order: int = 16) -> np.ndarray:
    """Covariances of activations at lags: ``cov[l, i, j] = Cov(f(z_i), f(z'_j))`` with
    ``corr(z_i, z'_j) = lag_factors[l] * corr[i, j]``.

    Formula (Mehler, truncated): ``cov[l, i, j] = sum_{k=1..order} c_ik c_jk (f_l corr_ij)^k / k!``
    plus the tail estimate ``a_ij sqrt(t_i t_j) (f_l corr_ij)^(order+1)``, ``t_i = Var_i - sum_k c_ik^2 / k!``,
    ``a_ij`` the cosine of the last few normalised coefficients of channels i and j
    for every (i, j) including the diagonal (at lag > 0 a channel is only partly correlated with
    itself: ``sum_k c_ik^2 f_l^k / k!``), except that where ``f_l == 1`` exactly the diagonal is the
    exact variance of :func:`gaussian_activation_moments`.

    Evaluation: with ``R_l = f_l corr`` and ``chat_k = c_:k / sqrt(k!)`` each slice is Horner's scheme in the
    elementwise sense, tail innermost:
    ``R_l o (chat_1 chat_1^T + R_l o (chat_2 chat_2^T + ... + R_l o (chat_K chat_K^T + R_l o tail tail^T)))``,
    computed on blocks of rows of the lower triangle (mirrored above the diagonal, diagonal blocks symmetrised),
    so the result is exactly symmetric; a slice with ``f_l == 0`` is exactly zero.

    Args:
        mu, sigma: (N,) pre-activation means and standard deviations.
        corr: (N, N) correlation matrix of the pre-activations at the same pixel (unit diagonal;
            symmetrised and clipped to [-1, 1]).
        act: activation f.
        lag_factors: (L,) scalars in [-1, 1], e.g. ``rho ** (|dy| + |dx|)``.
        order: truncation order of the series.

    Returns:
        cov: (L, N, N) float64, each slice symmetric.
    """
    mu, sigma, _, _ = _prepare(mu, sigma)
    n = mu.shape[0]
    corr = _corr_input(corr, n)
    factors = _check_lag_factors(lag_factors)
    chat, var = _coefficients_and_variance(mu, sigma, act, order)
    # Tail of the series, sum_{k>order} c_ik c_jk r^k / k!, estimated as a_ij sqrt(t_i t_j) r^(order+1).
    # Exact when r = 1 and c_i is a positive multiple of c_j (a channel that is a scaled copy of another);
    # a Hadamard product of PSD matrices otherwise (keeps the result PSD); vanishing fast for |r| < 1.
    tail = _tail_rows(chat, var, order)
    coefs = np.ascontiguousarray(chat[:, 1:].T)  # (order, N)
    cov = np.empty((factors.shape[0], n, n))
    for r0, r1 in _row_blocks(n):
        rb = _corr_block(corr, r0, r1)
        tail_blk = tail[r0:r1] @ tail[:r1].T
        for l_idx, f in enumerate(factors):
            if f == 0.0:
                blk = np.zeros_like(tail_blk)
            else:
                acc = tail_blk if l_idx == factors.shape[0] - 1 else tail_blk.copy()
                blk = _mehler_horner_block(coefs, r0, r1, rb if f == 1.0 else rb * f, acc)
            _store_lower_block(cov[l_idx], blk, r0, r1)
    idx = np.arange(n)
    for l_idx in np.flatnonzero(factors == 1.0):
        cov[l_idx, idx, idx] = var
    return cov


def _symmetric_tap_powers(tap_corr: np.ndarray, count: int) -> np.ndarray:
    """``S_k = (P^k + (P^k)^T) / 2``, k = 1..count, ``P^k`` elementwise powers of ``tap_corr`` (T, T): (count, T, T)."""
    out = np.empty((count,) + tap_corr.shape)
    power = np.ones_like(tap_corr)
    for k in range(count):
        power = power * tap_corr
        out[k] = 0.5 * (power + power.T)
    return out


def _tapped_horner_block(left: np.ndarray, right: np.ndarray, r0: int, r1: int, rb: np.ndarray,
                         acc: np.ndarray) -> np.ndarray:
    """Rows r0:r1, columns 0:r1 of ``sum_{k=1..K} (L_k M_k^T) o R^k + A o R^(K+1)``, Horner's scheme:
    ``R o (L_1 M_1^T + R o (... + R o (L_K M_K^T + R o A)))``; each order one in-place multiply and one GEMM
    accumulated into the block (``beta = 1``, on its Fortran-ordered transpose).

    Args:
        left, right: (K, N, T) C-contiguous, ``L_k = left[k - 1]``, ``M_k = right[k - 1]``.
        rb: (B, r1) block of R. acc: (B, r1) C-contiguous block of A; overwritten with the result.
    """
    acc_t = acc.T
    gemm = _blas().dgemm
    for k in range(left.shape[0], 0, -1):
        acc *= rb
        # acc^T += M_k[:r1] L_k[r0:r1]^T
        res = gemm(1.0, right[k - 1, :r1].T, left[k - 1, r0:r1].T, beta=1.0, c=acc_t, trans_a=1, overwrite_c=1)
        if res is not acc_t:
            acc_t[...] = res
    acc *= rb
    return acc


def tapped_activation_covariance(mu, sigma, corr, act: Activation, taps, tap_corr, order: int = 16) -> np.ndarray:
    """Covariance of ``u_i = sum_t k_i(t) f(z_i(p + t))`` (a depthwise filter over activated Gaussians)
    with ``corr(z_i(p + t), z_j(p + t')) = tap_corr[t, t'] * corr[i, j]``.

    Same Mehler series as :func:`lagged_activation_covariance` summed against the kernels, regrouped
    by order so that no (lags, N, N) stack is built:
    ``cov = sum_k (C_k K) (tap_corr^k) (C_k K)^T * corr^k`` (powers elementwise, ``C_k = diag(c_:k)``
    normalised Hermite coefficients), plus the tail estimate at order+1, plus, on the diagonal, the
    exact variance wherever ``tap_corr == 1`` (a channel with itself at the same pixel).

    Evaluation: with ``S_k`` the symmetric part of ``tap_corr^k``, ``L_k = C_k K S_k`` and ``M_k = C_k K`` (N, T),
    Horner's scheme in the elementwise sense, tail innermost:
    ``R o (L_1 M_1^T + R o (... + R o (L_K M_K^T + R o ((K S_(K+1) K^T) o (tail tail^T)))))``, ``R = corr``,
    on blocks of rows of the lower triangle (mirrored, diagonal blocks symmetrised: exactly symmetric).

    Args:
        mu, sigma: (N,) pre-activation moments. corr: (N, N) correlation at the same pixel.
        taps: (N, T) kernel rows. tap_corr: (T, T) spatial correlation factors in [-1, 1].

    Returns:
        (N, N) float64, symmetric.
    """
    mu, sigma, _, _ = _prepare(mu, sigma)
    n = mu.shape[0]
    corr = _corr_input(corr, n)
    k2 = np.asarray(taps, dtype=np.float64).reshape(n, -1)
    tap_corr = np.asarray(tap_corr, dtype=np.float64)
    chat, var = _coefficients_and_variance(mu, sigma, act, order)
    tail_rows = _tail_rows(chat, var, order)
    sym_powers = _symmetric_tap_powers(tap_corr, order + 1)  # (order+1, T, T)
    right = chat[:, 1:].T[:, :, None] * k2[None]  # (order, N, T): C_k K
    left = np.ascontiguousarray(right @ sym_powers[:order])  # C_k K S_k
    tail_left = k2 @ sym_powers[order]  # K S_(K+1)
    cov = np.empty((n, n))
    for r0, r1 in _row_blocks(n):
        rb = _corr_block(corr, r0, r1)
        acc = tail_left[r0:r1] @ k2[:r1].T
        acc *= tail_rows[r0:r1] @ tail_rows[:r1].T
        _store_lower_block(cov, _tapped_horner_block(left, right, r0, r1, rb, acc), r0, r1)
    # where tap_corr == 1 the series' diagonal (sum_k chat^2 + tail^2 unit.unit) is replaced by the exact variance
    same = (tap_corr == 1.0).astype(np.float64)
    series_diag = np.sum(chat[:, 1:] ** 2, axis=1) + np.sum(tail_rows ** 2, axis=1)
    idx = np.arange(n)
    cov[idx, idx] += np.einsum("it,ts,is->i", k2, same, k2) * (var - series_diag)
    return cov


def activation_covariance(mu, sigma, corr, act: Activation, order: int = 16) -> np.ndarray:
    """Covariance of ``a = f(z)``, ``z ~ N(mu, diag(sigma) corr diag(sigma))``.

    ``cov[i, j] = sum_{k=1..order} c_ik c_jk corr_ij^k / k!`` (Mehler expansion, c from
    :func:`hermite_coefficients`) off the diagonal; ``cov[i, i] = Var f(z_i)`` exactly.

    Args:
        mu, sigma: (N,). corr: (N, N) correlation matrix (unit diagonal). order: truncation order.

    Returns:
        cov: (N, N) float64, symmetric.
    """
    return lagged_activation_covariance(mu, sigma, corr, act, np.array([1.0]), order=order)[0]

"""Moments of activations of Gaussian pre-activations (the BN prior, methods.md section 2).

For channel i the pre-activation is ``z_i = mu_i + sigma_i * xi_i`` with ``xi_i ~ N(0, 1)``
and the activation ``a_i = f(z_i)``.

* :func:`gaussian_activation_moments`: ``E[a_i]``, ``Var[a_i]``. Exact closed forms for every
  piecewise-polynomial activation (identity, relu, clip, leakyrelu, hardsigmoid, hardswish), e.g.
  ``E[relu(u)] = mu Phi(t) + s phi(t)``, ``t = mu/s``; quadrature for sigmoid and silu.
* :func:`hermite_coefficients`: ``c_ik = E[f(z_i) He_k(xi_i)]``.
* :func:`activation_covariance`: Mehler expansion. If ``corr(xi_i, xi_j) = r``,
  ``Cov(a_i, a_j) = sum_{k>=1} c_ik c_jk r^k / k!``. The series is truncated at ``order``;
  the diagonal uses the exact variance (which adds the non-negative tail, so the result stays PSD
  whenever ``corr`` is).
* :func:`lagged_activation_covariance`: the same with ``corr`` scaled by lag factors, for the
  spatial correlation of feature maps (the same channel at two pixels is correlated ``< 1``).

Internally the coefficients are used normalised, ``c_ik / sqrt(k!)``, so orders up to a few
hundred do not overflow.
"""

from __future__ import annotations

import logging
from math import lgamma

import numpy as np

from . import _gauss
from .activations import Activation

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


def _normalized_coefficients(mu, sigma, act: Activation, order: int) -> np.ndarray:
    """``E[f(mu + s xi) he_k(xi)]`` with ``he_k = He_k / sqrt(k!)``; shape (N, order+1)."""
    if order < 0:
        raise ValueError("order must be >= 0")
    mu, sigma, s, degenerate = _prepare(mu, sigma)
    out = np.empty((mu.shape[0], order + 1))
    out[:, 0] = gaussian_activation_moments(mu, sigma, act)[0]
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


def _check_corr(corr, n: int) -> np.ndarray:
    corr = np.asarray(corr, dtype=np.float64)
    if corr.shape != (n, n):
        raise ValueError(f"corr must have shape ({n}, {n}), got {corr.shape}")
    return np.clip(0.5 * (corr + corr.T), -1.0, 1.0)


def lagged_activation_covariance(mu, sigma, corr, act: Activation, lag_factors, order: int = 16) -> np.ndarray:
    """Covariances of activations at lags: ``cov[l, i, j] = Cov(f(z_i), f(z'_j))`` with
    ``corr(z_i, z'_j) = lag_factors[l] * corr[i, j]``.

    Formula (Mehler, truncated): ``cov[l, i, j] = sum_{k=1..order} c_ik c_jk (f_l corr_ij)^k / k!``
    plus the tail estimate ``a_ij sqrt(t_i t_j) (f_l corr_ij)^(order+1)``, ``t_i = Var_i - sum_k c_ik^2 / k!``,
    ``a_ij`` the cosine of the last few normalised coefficients of channels i and j
    for every (i, j) including the diagonal (at lag > 0 a channel is only partly correlated with
    itself: ``sum_k c_ik^2 f_l^k / k!``), except that where ``f_l == 1`` exactly the diagonal is the
    exact variance of :func:`gaussian_activation_moments`.

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
    corr = _check_corr(corr, n)
    factors = np.atleast_1d(np.asarray(lag_factors, dtype=np.float64))
    if factors.ndim != 1 or np.any(np.abs(factors) > 1.0):
        raise ValueError("lag_factors must be a 1-D array with values in [-1, 1]")
    chat = _normalized_coefficients(mu, sigma, act, order)
    cov = np.zeros((factors.shape[0], n, n))
    power = np.ones((n, n))
    fpow = np.ones_like(factors)
    for k in range(1, order + 1):
        power *= corr
        fpow *= factors
        term = np.outer(chat[:, k], chat[:, k]) * power
        for l_idx in range(factors.shape[0]):
            if fpow[l_idx] != 0.0:
                cov[l_idx] += fpow[l_idx] * term
    # Tail of the series, sum_{k>order} c_ik c_jk r^k / k!, estimated as a_ij sqrt(t_i t_j) r^(order+1) with
    # t_i = Var_i - sum_k chat_ik^2 and a_ij the cosine of the last few normalised coefficients of i and j.
    # Exact when r = 1 and c_i is a positive multiple of c_j (a channel that is a scaled copy of another);
    # a Hadamard product of PSD matrices otherwise (keeps the result PSD); vanishing fast for |r| < 1.
    var = gaussian_activation_moments(mu, sigma, act)[1]
    tail = np.sqrt(np.maximum(var - np.sum(chat[:, 1:] ** 2, axis=1), 0.0))
    last = chat[:, max(1, order - 3):]
    norms = np.linalg.norm(last, axis=1)
    unit = np.divide(last, norms[:, None], out=np.zeros_like(last), where=norms[:, None] > 0)
    tail = tail[:, None] * unit  # rows: tail_i * unit_i, so tail @ tail.T = a_ij sqrt(t_i t_j)
    power *= corr
    fpow *= factors
    tail_term = (tail @ tail.T) * power
    for l_idx in range(factors.shape[0]):
        if fpow[l_idx] != 0.0:
            cov[l_idx] += fpow[l_idx] * tail_term
    exact = factors == 1.0
    if np.any(exact):
        idx = np.arange(n)
        for l_idx in np.flatnonzero(exact):
            cov[l_idx, idx, idx] = var
    return 0.5 * (cov + np.swapaxes(cov, 1, 2))


def tapped_activation_covariance(mu, sigma, corr, act: Activation, taps, tap_corr, order: int = 16) -> np.ndarray:
    """Covariance of ``u_i = sum_t k_i(t) f(z_i(p + t))`` (a depthwise filter over activated Gaussians)
    with ``corr(z_i(p + t), z_j(p + t')) = tap_corr[t, t'] * corr[i, j]``.

    Same Mehler series as :func:`lagged_activation_covariance` summed against the kernels, regrouped
    by order so that no (lags, N, N) stack is built:
    ``cov = sum_k (C_k K) (tap_corr^k) (C_k K)^T * corr^k`` (powers elementwise, ``C_k = diag(c_:k)``
    normalised Hermite coefficients), plus the tail estimate at order+1, plus, on the diagonal, the
    exact variance wherever ``tap_corr == 1`` (a channel with itself at the same pixel).

    Args:
        mu, sigma: (N,) pre-activation moments. corr: (N, N) correlation at the same pixel.
        taps: (N, T) kernel rows. tap_corr: (T, T) spatial correlation factors in [-1, 1].

    Returns:
        (N, N) float64, symmetric.
    """
    mu, sigma, _, _ = _prepare(mu, sigma)
    n = mu.shape[0]
    corr = _check_corr(corr, n)
    k2 = np.asarray(taps, dtype=np.float64).reshape(n, -1)
    tap_corr = np.asarray(tap_corr, dtype=np.float64)
    chat = _normalized_coefficients(mu, sigma, act, order)
    cov = np.zeros((n, n))
    power = np.ones((n, n))
    tap_power = np.ones_like(tap_corr)
    for k in range(1, order + 1):
        power *= corr
        tap_power *= tap_corr
        scaled = chat[:, k:k + 1] * k2  # (N, T)
        cov += ((scaled @ tap_power) @ scaled.T) * power
    var = gaussian_activation_moments(mu, sigma, act)[1]
    tail = np.sqrt(np.maximum(var - np.sum(chat[:, 1:] ** 2, axis=1), 0.0))
    last = chat[:, max(1, order - 3):]
    norms = np.linalg.norm(last, axis=1)
    unit = np.divide(last, norms[:, None], out=np.zeros_like(last), where=norms[:, None] > 0)
    tail_rows = tail[:, None] * unit
    power *= corr
    tap_power *= tap_corr
    cov += ((k2 @ tap_power) @ k2.T) * (tail_rows @ tail_rows.T) * power
    # where tap_corr == 1 the series' diagonal (sum_k chat^2 + tail^2 unit.unit) is replaced by the exact variance
    same = (tap_corr == 1.0).astype(np.float64)
    series_diag = np.sum(chat[:, 1:] ** 2, axis=1) + np.sum(tail_rows ** 2, axis=1)
    idx = np.arange(n)
    cov[idx, idx] += np.einsum("it,ts,is->i", k2, same, k2) * (var - series_diag)
    return 0.5 * (cov + cov.T)


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

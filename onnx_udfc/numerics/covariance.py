"""Covariance models of feature maps (methods.md sections 2 and 8.2).

Spatial model: every feature map is a stationary field, separable AR(1) in space,
``corr(x_c(p), x_c'(p + d)) = R_cc' * rho^(|d|_1)`` (``|d|_1 = |dy| + |dx|``, scaled by the dilation).
Through a linear layer this gives the pre-activation covariance; through a pointwise activation
and a depthwise conv, the Mehler series at each spatial lag (:mod:`.moments`).
"""

from __future__ import annotations

import logging

import numpy as np

from .activations import Activation
from .moments import tapped_activation_covariance

__all__ = ["conv_preactivation_covariance", "depthwise_output_covariance", "nearest_psd", "cov_to_corr"]

log = logging.getLogger(__name__)


def _tap_distances(tap_shape, dilations=None) -> np.ndarray:
    """L1 distances between the taps of a kernel of shape ``tap_shape``: (T, T) integers."""
    tap_shape = tuple(int(k) for k in tap_shape)
    if not tap_shape:
        return np.zeros((1, 1))
    dil = np.ones(len(tap_shape)) if dilations is None else np.asarray(dilations, dtype=np.float64)
    coords = np.indices(tap_shape).reshape(len(tap_shape), -1).T * dil[None, :]  # (T, d)
    return np.abs(coords[:, None, :] - coords[None, :, :]).sum(axis=2)


def _spatial_corr(tap_shape, rho: float, dilations=None) -> np.ndarray:
    """``R[t, t'] = rho ** |t - t'|_1`` over the taps, (T, T)."""
    return float(rho) ** _tap_distances(tap_shape, dilations)


def conv_preactivation_covariance(w, input_var, spatial_rho: float = 0.5, input_corr=None, group: int = 1,
                                  dilations=None) -> np.ndarray:
    """Covariance of the outputs of a linear layer (conv or Gemm) over a stationary input field.

    Formula: ``cov[i, j] = sum_{c,c'} sqrt(v_c v_c') Rin[c, c'] sum_{t,t'} w[i,c,t] w[j,c',t'] rho^|t-t'|_1``
    i.e. ``W_s (Rin kron R) W_s^T`` with ``W_s[i, c, t] = w[i, c, t] sqrt(v_c)`` and
    ``R[t, t'] = spatial_rho ** |t - t'|_1`` (AR(1) separable in each spatial dim).

    Args:
        w: (N, Cg, *taps) conv weight (taps of any rank, e.g. (kh, kw)) or (N, C) Gemm rows.
        input_var: (group * Cg,) per-input-channel variances ``v_c`` (>= 0).
        spatial_rho: correlation between neighbouring pixels of the same channel.
        input_corr: optional (group * Cg, group * Cg) input channel correlation ``Rin`` (default identity).
        group: conv groups; output i reads input channels ``(i // (N / group)) * Cg + c``.
        dilations: optional per-spatial-dim dilation (distances scale by it).

    Returns:
        cov: (N, N) float64, symmetric PSD.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError("w must have shape (N, C, *taps) or (N, C)")
    n, cg = w.shape[:2]
    if group < 1 or n % group:
        raise ValueError(f"N={n} is not divisible by group={group}")
    v = np.asarray(input_var, dtype=np.float64).reshape(-1)
    if v.shape != (group * cg,) or np.any(v < 0):
        raise ValueError(f"input_var must be nonnegative with shape ({group * cg},), got {v.shape}")
    r_sp = _spatial_corr(w.shape[2:], spatial_rho, dilations)
    t = r_sp.shape[0]
    w3 = w.reshape(n, cg, t)
    gidx = np.arange(n) // (n // group)  # group of each output
    ws = w3 * np.sqrt(v.reshape(group, cg)[gidx])[:, :, None]  # (N, Cg, T)
    if input_corr is None:
        z = ws @ r_sp.T  # (N, Cg, T)
        cov = ws.reshape(n, -1) @ z.reshape(n, -1).T
        if group > 1:
            cov = np.where(gidx[:, None] == gidx[None, :], cov, 0.0)
    else:
        rin = np.asarray(input_corr, dtype=np.float64)
        if rin.shape != (group * cg, group * cg):
            raise ValueError(f"input_corr must have shape ({group * cg}, {group * cg}), got {rin.shape}")
        dense = np.zeros((n, group * cg, t))  # outputs scattered onto all input channels
        cols = gidx[:, None] * cg + np.arange(cg)[None, :]
        dense[np.arange(n)[:, None], cols] = ws
        z = (rin @ dense) @ r_sp.T  # (N, C, T)
        cov = dense.reshape(n, -1) @ z.reshape(n, -1).T
    return 0.5 * (cov + cov.T)


def depthwise_output_covariance(mu, sigma, corr, act: Activation, kernel, spatial_rho: float = 0.5,
                                order: int = 16, dilations=None) -> np.ndarray:
    """Covariance of depthwise-conv outputs of activated Gaussian fields (methods.md 8.2).

    Model: ``z_i(p) ~ N(mu_i, sigma_i^2)``, ``corr(z_i(p), z_j(p + d)) = corr_ij * rho^|d|_1``;
    ``u_i = sum_t k_i(t) f(z_i(p + t))``. Then
    ``Cov(u_i, u_j) = sum_{t,t'} k_i(t) k_j(t') M(rho^|t-t'|_1)_ij = sum_l X_l[i, j] M_l[i, j]``,
    where ``M(f) = lagged_activation_covariance(..., f)`` (Mehler series, exact variance at lag 0)
    and ``X_l = K A_l K^T`` sums the kernels' cross-correlations over the tap pairs at L1 lag l
    (``A_l[t, t'] = 1`` iff ``|t - t'|_1 = l``).

    Args:
        mu, sigma: (N,) pre-activation means and standard deviations.
        corr: (N, N) cross-channel correlation at the same pixel.
        act: activation applied before the depthwise conv.
        kernel: (N, 1, *taps) depthwise kernel (one filter per channel).
        spatial_rho: per-pixel correlation. order: Mehler truncation order.
        dilations: optional per-spatial-dim dilation of the depthwise conv.

    Returns:
        cov: (N, N) float64, symmetric (project with :func:`nearest_psd` if needed).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    n = kernel.shape[0]
    if kernel.ndim < 2 or kernel.shape[1] != 1:
        raise ValueError(f"kernel must have shape (N, 1, *taps), got {kernel.shape}")
    tap_corr = _spatial_corr(kernel.shape[2:], spatial_rho, dilations)
    return tapped_activation_covariance(mu, sigma, corr, act, kernel.reshape(n, -1), tap_corr, order=order)


def nearest_psd(cov, floor: float = 0.0) -> np.ndarray:
    """Symmetric eigenvalue clipping: ``V diag(max(lambda, floor)) V^T`` of ``(cov + cov^T) / 2``.

    Args:
        cov: (N, N). floor: smallest eigenvalue kept.

    Returns:
        (N, N) float64 symmetric matrix with eigenvalues >= floor (up to rounding).
    """
    cov = np.asarray(cov, dtype=np.float64)
    sym = 0.5 * (cov + cov.T)
    if floor <= 0.0 and sym.size:
        try:  # a Cholesky factorisation exists only for positive definite matrices: 10x cheaper than eigh
            np.linalg.cholesky(sym)
            return sym
        except np.linalg.LinAlgError:
            pass
    vals, vecs = np.linalg.eigh(sym)
    if vals.size and vals.min() >= floor:
        return sym
    out = (vecs * np.maximum(vals, floor)[None, :]) @ vecs.T
    return 0.5 * (out + out.T)


def cov_to_corr(cov) -> tuple[np.ndarray, np.ndarray]:
    """Correlation matrix and standard deviations of a covariance matrix.

    ``std = sqrt(max(diag(cov), 0))``; ``corr[i, j] = cov[i, j] / (std_i std_j)`` clipped to [-1, 1],
    0 where either std is 0; unit diagonal.

    Args:
        cov: (N, N).

    Returns:
        corr (N, N), std (N,), float64.
    """
    cov = np.asarray(cov, dtype=np.float64)
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    denom = np.outer(std, std)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
    corr = np.clip(0.5 * (corr + corr.T), -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr, std

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
from .moments import _row_blocks, _store_lower_block, tapped_activation_covariance

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

    Evaluation: ``Z = W_s x_C Rin x_T R`` by GEMMs over flattened axes (no per-output batched products), then
    ``W_s Z^T`` on the lower triangle only, one block of rows at a time, mirrored (exactly symmetric; with
    ``Rin`` and N < C the full product is symmetrised instead, see :func:`_kron_gram`). Groups without ``Rin``:
    one product per group on the block diagonal.

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
    r_sp = 0.5 * (r_sp + r_sp.T)  # symmetric already (|t - t'| = |t' - t|); makes the bilinear forms below symmetric
    t = r_sp.shape[0]
    gidx = np.arange(n) // (n // group)  # group of each output
    ws = w.reshape(n, cg, t) * np.sqrt(v.reshape(group, cg)[gidx])[:, :, None]  # (N, Cg, T)
    if input_corr is None:
        return _grouped_gram(ws, r_sp, group)
    rin = np.asarray(input_corr, dtype=np.float64)
    if rin.shape != (group * cg, group * cg):
        raise ValueError(f"input_corr must have shape ({group * cg}, {group * cg}), got {rin.shape}")
    if group == 1:
        dense = ws
    else:  # outputs scattered onto all input channels
        dense = np.zeros((n, group * cg, t))
        dense[np.arange(n)[:, None], gidx[:, None] * cg + np.arange(cg)[None, :]] = ws
    return _kron_gram(dense, rin, r_sp)


def _spatial_mix(x: np.ndarray, r_sp: np.ndarray) -> np.ndarray:
    """``x @ r_sp^T`` over the last (tap) axis of ``x`` (..., T) as one GEMM; ``x`` itself when T == 1 (R = [[1]])."""
    t = r_sp.shape[0]
    if t == 1:
        return x
    return (x.reshape(-1, t) @ r_sp.T).reshape(x.shape)


def _lower_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a b^T`` (N, N) for ``b = a M`` with M symmetric (so ``a b^T`` is symmetric): rows r0:r1 of the lower triangle
    as one GEMM ``a[r0:r1] b[:r1]^T`` each (half the flops of the full product), mirrored; exactly symmetric.

    Args:
        a, b: (N, K).
    """
    n = a.shape[0]
    out = np.empty((n, n))
    for r0, r1 in _row_blocks(n):
        _store_lower_block(out, a[r0:r1] @ b[:r1].T, r0, r1)
    return out


def _grouped_gram(ws: np.ndarray, r_sp: np.ndarray, group: int) -> np.ndarray:
    """``cov[i, j] = sum_{c,t,t'} ws[i,c,t] r_sp[t,t'] ws[j,c,t']`` for outputs i, j of the same group, 0 across groups.

    Args:
        ws: (N, Cg, T) input-scaled weights. r_sp: (T, T) symmetric. group: number of groups (N divisible by it).

    Returns:
        (N, N) exactly symmetric: lower-triangle GEMMs (:func:`_lower_gram`) for one group, else a batched
        product per group placed on the block diagonal (each block symmetrised).
    """
    n = ws.shape[0]
    flat = ws.reshape(n, -1)
    z = _spatial_mix(ws, r_sp).reshape(n, -1)
    if group == 1:
        return _lower_gram(flat, z)
    m = n // group
    blocks = flat.reshape(group, m, -1) @ z.reshape(group, m, -1).transpose(0, 2, 1)  # (group, m, m)
    cov = np.zeros((group, m, group, m))
    g = np.arange(group)
    cov[g, :, g, :] = 0.5 * (blocks + blocks.transpose(0, 2, 1))
    return cov.reshape(n, n)


def _channel_spatial_mix(dense: np.ndarray, rin: np.ndarray, r_sp: np.ndarray) -> np.ndarray:
    """``z[n, c, t] = sum_{c', t'} rin[c, c'] dense[n, c', t'] r_sp[t, t']`` (N, C, T) C-contiguous: one GEMM
    ``(N T, C) @ rin^T`` with the channel axis moved last, then one over the taps (:func:`_spatial_mix`)."""
    n, c, t = dense.shape
    dt = dense.transpose(0, 2, 1) if t > 1 else dense.reshape(n, 1, c)  # (N, T, C)
    zt = (np.ascontiguousarray(dt).reshape(n * t, c) @ rin.T).reshape(n, t, c)
    return np.ascontiguousarray(_spatial_mix(zt.transpose(0, 2, 1), r_sp))


def _kron_gram(dense: np.ndarray, rin: np.ndarray, r_sp: np.ndarray) -> np.ndarray:
    """``sym(D (Rin kron R_sp) D^T)`` for ``D = dense.reshape(N, C * T)``, ``dense`` (N, C, T), ``rin`` (C, C),
    ``r_sp`` (T, T) symmetric; ``sym(X) = (X + X^T) / 2``, exactly symmetric.

    Since ``sym(D M D^T) = D sym(M) D^T`` and ``sym(Rin kron R_sp) = sym(Rin) kron R_sp``, when N >= C the
    cheaper way is to symmetrise Rin (C x C) and take the lower-triangle product (:func:`_lower_gram`); otherwise
    the full product ``D z^T`` (``z`` from :func:`_channel_spatial_mix`) is symmetrised (N x N).
    """
    n, c, _ = dense.shape
    flat = dense.reshape(n, -1)
    if n >= c:
        z = _channel_spatial_mix(dense, 0.5 * (rin + rin.T), r_sp)
        return _lower_gram(flat, z.reshape(n, -1))
    cov = flat @ _channel_spatial_mix(dense, rin, r_sp).reshape(n, -1).T
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


def _is_positive_definite(sym: np.ndarray) -> bool:
    """True if LAPACK's Cholesky factorisation ``dpotrf`` of the symmetric ``sym`` (N, N) succeeds.

    Called on ``sym^T`` (Fortran-ordered, the same matrix), so the wrapper's private copy is a plain copy;
    no zeroing of the other triangle and no finiteness check (as ``np.linalg.cholesky``, NaN is not an error).
    """
    from scipy.linalg.lapack import dpotrf  # on first use: scipy.linalg costs 0.2 s to import

    _, info = dpotrf(sym.T, lower=1, clean=0, overwrite_a=0)
    return info == 0


def nearest_psd(cov, floor: float = 0.0) -> np.ndarray:
    """Symmetric eigenvalue clipping: ``V diag(max(lambda, floor)) V^T`` of ``(cov + cov^T) / 2``.

    With ``floor <= 0`` a matrix that has a Cholesky factorisation (positive definite) is returned as
    ``(cov + cov^T) / 2`` without an eigendecomposition (the check is ~N^3/3 flops, ~10x cheaper than eigh).

    Args:
        cov: (N, N). floor: smallest eigenvalue kept.

    Returns:
        (N, N) float64 symmetric matrix with eigenvalues >= floor (up to rounding).
    """
    cov = np.asarray(cov, dtype=np.float64)
    sym = 0.5 * (cov + cov.T)
    if floor <= 0.0 and sym.size and _is_positive_definite(sym):
        return sym
    vals, vecs = np.linalg.eigh(sym)
    if vals.size and vals.min() >= floor:
        return sym
    out = (vecs * np.maximum(vals, floor)[None, :]) @ vecs.T
    return 0.5 * (out + out.T)


def _corr_rows(cov: np.ndarray, std: np.ndarray, r0: int, r1: int, zero_possible: bool) -> np.ndarray:
    """Rows r0:r1, columns 0:r1 of ``clip((cov / d + cov^T / d) / 2, -1, 1)``, ``d_ij = std_i std_j``,
    0 where ``d_ij == 0``; a new (r1 - r0, r1) array. ``zero_possible``: whether some ``d_ij`` can be 0."""
    denom = np.multiply.outer(std[r0:r1], std[:r1])
    blk = np.divide(cov[r0:r1, :r1], denom)
    blk += np.divide(cov[:r1, r0:r1].T, denom, out=np.empty_like(blk))
    blk *= 0.5
    np.clip(blk, -1.0, 1.0, out=blk)
    if zero_possible:
        blk[denom == 0.0] = 0.0
    return blk


def cov_to_corr(cov) -> tuple[np.ndarray, np.ndarray]:
    """Correlation matrix and standard deviations of a covariance matrix.

    ``std = sqrt(max(diag(cov), 0))``; ``corr[i, j] = cov[i, j] / (std_i std_j)`` symmetrised
    (``(corr + corr^T) / 2``) and clipped to [-1, 1], 0 where ``std_i std_j == 0``; unit diagonal.
    Computed on blocks of rows of the lower triangle (mirrored above the diagonal) with no (N, N)
    temporaries.

    Args:
        cov: (N, N).

    Returns:
        corr (N, N), std (N,), float64.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {cov.shape}")
    n = cov.shape[0]
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    positive = std[std > 0]
    # some std_i std_j is 0 iff a std is 0 or the smallest product underflows
    zero_possible = positive.size < n or (n > 0 and float(positive.min()) ** 2 == 0.0)
    corr = np.empty((n, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        for r0, r1 in _row_blocks(n):
            _store_lower_block(corr, _corr_rows(cov, std, r0, r1, zero_possible), r0, r1)
    np.fill_diagonal(corr, 1.0)
    return corr, std

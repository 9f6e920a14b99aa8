"""Error-feedback rounding (GPTQ / Optimal Brain Quantization) with a data-free input covariance.

A layer's output error for input x is ``dW x``; after the bias correction removes its mean, what is
left has variance ``dW_o H dW_o^T`` per output channel o, with ``H`` the input covariance. Rounding the
columns one at a time and moving each column's rounding error onto the columns not yet rounded, in
proportion to their covariance with it, minimises that variance column by column (GPTQ):

    H^-1 = U^T U                       U (D, D) upper triangular (Cholesky of the inverse)
    for j in order:  q_j = round(w_j);  e = (w_j - q_j) / U[j, j];  w_{j+1:} -= e U[j, j+1:]

For a conv, the D = C * T columns of a row are (input channel, tap) pairs, and the covariance of the
window is modelled as ``H = Sigma_C kron R_T``: channel covariance times the AR(1) correlation of the
taps (the model of `stats.propagate.spatial_correlation`). Then ``H^-1 = Sigma^-1 kron R^-1`` and
``U = U_C kron U_T``, so no (D, D) matrix is ever formed: the updates inside a block of channels use
``kron(U_C[block, block], U_T)`` and the deferred update of the later columns is two small GEMMs.

Channels are taken in order of decreasing variance ("act order"), a damping of ``DAMP`` times the mean
variance keeps H invertible (dead channels), and entries whose nearest level is an end level holding a
nonzero value keep it (as in the balanced rounding), so the quantized channel's range, and the grid
that re-quantization recovers, are unchanged.

The levels fixed, each row's scale then moves half-way (`REFIT_WEIGHT`) to the scale that minimises the same
objective (`refit_scales`): the grid was chosen before the rounding (MSE clipping of nearest rounding, with
per-channel weights only), and the error feedback moved the levels off nearest. ImageNet sample, udfc, KL to
the original, before -> full refit (an experiment) -> half-way (`results/imagenet_scale_refit.md`; top-1
within 1-5 of 500 images either way): W5 MobileNetV2 BN kept 0.0264 -> 0.0260 -> 0.0261, EfficientNet-Lite0
0.0245 -> 0.0232 -> 0.0238, folded 0.0396 -> 0.0389 -> 0.0392 and 0.0346 -> 0.0341 -> 0.0342; W4 0.1213 ->
0.1186 -> 0.1194, 0.1082 -> 0.1035 -> 0.1031, 0.1732 -> 0.1707 -> 0.1714, 0.1497 -> 0.1512 -> 0.1497. Pruned
W4 (prune 0.1 / 0.3, the four exports): the full refit lowered the KL in 7 of 8 cells but top-1 in 6 (by 1-4
images), half-way lowered the KL in all 8 with top-1 even. Rounding and refit alternated two or three times
was worse (W4 MobileNetV2 BN kept KL 0.131 / 0.122): the covariance is a model, and the half step hedges
against it.

Cost per layer ``N * D^2`` flops (the same order as the Hessian-weighted error itself) and ``N * D``
float64 of working memory; `MAX_COLUMNS` bounds D, wider layers keep the balanced rounding.
"""
from __future__ import annotations

import numpy as np

#: damping of the channel covariance, relative to its mean diagonal
DAMP = 0.01
#: columns rounded between two deferred (GEMM) updates of the later columns, and inside such a block,
#: between two GEMM updates of the block's later columns (the rank-1 updates stay this narrow)
BLOCK_COLUMNS = 128
SUB_BLOCK_COLUMNS = 16
#: widest row (C * taps) rounded with error feedback; cost grows as N * D^2
MAX_COLUMNS = 1280
#: how far each row's scale moves from the clipping's to the refitted one after the rounding (`refit_scales`)
REFIT_WEIGHT = 0.5


def upper_inverse_cholesky(cov: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper triangular U with ``U^T U = (cov + damp * mean(diag) I)^-1``, (D, D) float64.

    Computed without the inverse: with J the reversal permutation, ``J cov J = L L^T`` (Cholesky) gives
    ``cov = A A^T`` with ``A = J L J`` upper triangular, hence ``U = A^-1 = J L^-1 J``. Two (D, D) copies:
    the reversed matrix (factorised and inverted in place, Fortran order) and the result.
    """
    from scipy.linalg import lapack  # noqa: PLC0415 (scipy only where covariances are used)

    cov = np.asarray(cov, dtype=np.float64)
    d = cov.shape[0]
    rev = np.array(cov[::-1, ::-1], order="F")  # symmetric: its Fortran copy is J cov J
    diag = np.diagonal(rev)
    mean_diag = float(diag.mean()) if d else 0.0
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    rev[np.diag_indices(d)] = np.maximum(diag, 0.0) + damp * mean_diag
    lower, info = lapack.dpotrf(rev, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError("input covariance is not positive definite after damping")
    inverse, info = lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError("singular Cholesky factor")
    return np.ascontiguousarray(inverse[::-1, ::-1])


def error_feedback_levels(w2: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: float, qmax: float,
                          channel_cov: np.ndarray, tap_corr: np.ndarray) -> np.ndarray:
    """Integer levels (N, C * T) float64 of the rows ``w2`` (N, C * T) on the per-row grids.

    Args:
        w2: (N, C * T) weights, columns channel-major (row o = w[o].reshape(-1) of an (N, C, *taps) weight).
        scale, zp: (N,) grid of each row (value of level q: ``(q - zp) * scale``); qmin, qmax: level range.
        channel_cov: (C, C) covariance of the input channels. tap_corr: (T, T) correlation of the taps.
    """
    n, d = w2.shape
    c, t = channel_cov.shape[0], tap_corr.shape[0]
    if c * t != d:
        raise ValueError(f"covariance of {c} channels x {t} taps does not match {d} columns")
    order = np.argsort(-np.diagonal(channel_cov), kind="stable")
    u_c = upper_inverse_cholesky(channel_cov[np.ix_(order, order)])
    u_t = upper_inverse_cholesky(tap_corr, damp=0.0) if t > 1 else np.ones((1, 1))
    columns = (order[:, None] * t + np.arange(t)[None, :]).ravel()
    # transposed working copy: a column is a contiguous row of `wt`
    wt = np.array(w2.T[columns], dtype=np.float64)  # (D, N)
    inv_scale = 1.0 / scale
    zpf = zp.astype(np.float64)
    nearest = np.clip(np.rint(wt * inv_scale + zpf), qmin, qmax)
    locked = ((nearest == qmin) & (qmin != zpf)) | ((nearest == qmax) & (qmax != zpf))
    any_locked = locked.any(axis=1)
    q_all = np.empty_like(wt)
    per_block = max(1, BLOCK_COLUMNS // t)
    for c0 in range(0, c, per_block):
        c1 = min(c, c0 + per_block)
        b0, b1 = c0 * t, c1 * t
        u_block = np.kron(u_c[c0:c1, c0:c1], u_t)  # (b, b) upper triangular
        inv_diag = 1.0 / np.diagonal(u_block)
        errors = np.empty((b1 - b0, n))
        for s0 in range(0, b1 - b0, SUB_BLOCK_COLUMNS):
            s1 = min(b1 - b0, s0 + SUB_BLOCK_COLUMNS)
            for j in range(s0, s1):
                row, q, err = wt[b0 + j], q_all[b0 + j], errors[j]
                np.multiply(row, inv_scale, out=q)
                q += zpf
                np.rint(q, out=q)
                np.clip(q, qmin, qmax, out=q)
                if any_locked[b0 + j]:
                    np.copyto(q, nearest[b0 + j], where=locked[b0 + j])
                np.subtract(q, zpf, out=err)
                err *= scale
                np.subtract(row, err, out=err)
                err *= inv_diag[j]
                if j + 1 < s1:
                    wt[b0 + j + 1:b0 + s1] -= np.multiply.outer(u_block[j, j + 1:s1], err)
            if s1 < b1 - b0:
                wt[b0 + s1:b1] -= u_block[s0:s1, s1:].T @ errors[s0:s1]
        if c1 < c:
            # wt[later] -= kron(U_C[block, later], U_T)^T @ errors, as two GEMMs
            e3 = errors.reshape(c1 - c0, t, n)
            f = np.einsum("st,csn->ctn", u_t, e3, optimize=True)  # (cb, T, N): over taps
            upd = u_c[c0:c1, c1:].T @ f.reshape(c1 - c0, t * n)  # (C_rest, T * N)
            wt[b1:] -= upd.reshape((c - c1) * t, n)
    out = np.empty_like(q_all)
    out[columns] = q_all
    return np.ascontiguousarray(out.T)


def kronecker_times(x: np.ndarray, channel_cov: np.ndarray, tap_corr=None) -> np.ndarray:
    """``H x_o`` for every row of `x` (b, C, T), ``H = Sigma_C kron R_T``: ``Sigma X_o R`` with ``X_o`` the
    (C, T) row, as one GEMM over the (b * T, C) rows ``X_o^T`` (Sigma is symmetric) and a batched product with
    R (`tap_corr` None: identity). (b, C, T) float64."""
    b, c, t = x.shape
    rows = np.ascontiguousarray(np.asarray(x, np.float64).transpose(0, 2, 1)).reshape(b * t, c)
    out = (rows @ np.asarray(channel_cov, np.float64)).reshape(b, t, c).transpose(0, 2, 1)
    if t > 1 and tap_corr is not None:
        out = np.matmul(out, np.asarray(tap_corr, np.float64))
    return out


def refit_scales(w2: np.ndarray, levels: np.ndarray, scale: np.ndarray, zp: np.ndarray, channel_cov: np.ndarray,
                 tap_corr: np.ndarray, block_rows: int = 256) -> np.ndarray:
    """(N,) scales minimising the rounding objective of each row with its levels fixed:

        s_o = (u_o^T H w_o) / (u_o^T H u_o),   u_o = q_o - zp_o (C * T,),   H = Sigma_C kron R_T

    ``H u_o`` by `kronecker_times`; rows in blocks of `block_rows` (two (block, C, T) float64 temporaries).
    Rows whose denominator or refitted scale is not positive and finite keep `scale`. The result is not yet truncated to the grid's precision.

    Args:
        w2: (N, C * T) weights; levels: (N, C * T) integer levels; scale, zp: (N,) the grid they were rounded on.
        channel_cov: (C, C) the rounding's input covariance; tap_corr: (T, T) the taps' correlation.
    """
    n = w2.shape[0]
    c, t = channel_cov.shape[0], tap_corr.shape[0]
    out = np.array(scale, dtype=np.float64)
    cov = np.asarray(channel_cov, np.float64)
    corr = np.asarray(tap_corr, np.float64)
    for r0 in range(0, n, block_rows):
        r1 = min(n, r0 + block_rows)
        b = r1 - r0
        u = levels[r0:r1].reshape(b, c, t) - zp[r0:r1, None, None].astype(np.float64)
        hu = kronecker_times(u, cov, corr)
        num = np.einsum("bct,bct->b", hu, w2[r0:r1].reshape(b, c, t).astype(np.float64))
        den = np.einsum("bct,bct->b", hu, u)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = num / den
        ok = np.isfinite(fitted) & (den > 0) & (fitted > 0)
        out[r0:r1][ok] = fitted[ok]
    return out

"""Per-output-channel uniform weight fake-quantization and bias correction (methods.md 4, 8.1).

Grid of channel o: value of integer level q is ``(q - zp[o]) * scale[o]``.

* asymmetric: levels ``0 .. 2^B - 1``, ``lo = min(0, lo)``, ``hi = max(0, hi)``,
  ``scale = (hi - lo) / (2^B - 1)``, ``zp = round(-lo / scale)`` (zero exactly on the grid);
* symmetric: levels ``-(2^(B-1) - 1) .. 2^(B-1) - 1``, ``zp = 0``, ``scale = max|w| / (2^(B-1) - 1)``.

Scales are floored at ``SCALE_FLOOR`` (an all-zero channel gets a positive scale) and then
truncated to ``24 - B`` significant bits, so every grid value ``(q - zp) * scale`` is exact in
float32. That makes the fake-quantized weights reproducible bit for bit and the quantizer
idempotent: re-quantizing ``w_q`` with ``clip="max"`` recovers the same scale, zero point and
levels (truncating, not rounding, keeps both range ends on the end levels). The truncation changes
the scale by less than ``2^(B-24)`` relative.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ._error_feedback import MAX_COLUMNS, REFIT_WEIGHT, error_feedback_levels, refit_scales
from ._rounding import _balance, _row_broadcast_buffers

__all__ = ["QuantSpec", "quantization_grid", "fake_quantize", "uses_error_feedback", "bias_correction", "bias_shift",
           "SCALE_FLOOR", "MAX_COLUMNS", "ROUNDINGS"]

log = logging.getLogger(__name__)

SCALE_FLOOR = 1e-10
ROUNDINGS = ("error-feedback", "balanced", "nearest")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight tensor.

    Attributes:
        bits: bit width B, 2..16.
        symmetric: symmetric grid (zero point 0) instead of asymmetric.
        clip: "mse" (search the clipping factor alpha minimising the tap-weighted squared error)
            or "max" (alpha = 1).
        rounding: "error-feedback" (GPTQ-like: each column's rounding error is moved onto the columns
            not yet rounded through the input covariance, see ``_error_feedback``; needs the covariance,
            else balanced), "balanced" (SQuant-like: errors of each kernel and output channel sum to ~0)
            or "nearest" (ties away from zero).
        clip_steps: number of alpha values in the search (linearly spaced on [clip_min, 1]).
        clip_min: smallest alpha.
    """

    bits: int
    symmetric: bool = False
    clip: str = "mse"
    rounding: str = "error-feedback"
    clip_steps: int = 80
    clip_min: float = 0.25

    def __post_init__(self) -> None:
        if not 2 <= int(self.bits) <= 16 or int(self.bits) != self.bits:
            raise ValueError(f"bits must be an integer in [2, 16], got {self.bits}")
        if self.clip not in ("mse", "max"):
            raise ValueError(f"clip must be 'mse' or 'max', got {self.clip!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if int(self.clip_steps) < 1 or not 0.0 < float(self.clip_min) <= 1.0:
            raise ValueError("clip_steps must be >= 1 and clip_min in (0, 1]")


def _levels(bits: int, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        n = float(2 ** (bits - 1) - 1)
        return -n, n
    return 0.0, float(2**bits - 1)


def _truncate_mantissa(x: np.ndarray, keep: int, nearest: bool = False) -> np.ndarray:
    """Round positive ``x`` down (`nearest`: to the nearest) to ``keep`` significant bits."""
    m, e = np.frexp(x)
    return np.ldexp((np.rint if nearest else np.floor)(np.ldexp(m, keep)), e - keep)


def quantization_grid(lo, hi, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel grid covering ``[lo, hi]`` (see module docstring for the formulas).

    Args:
        lo, hi: (N,) range ends per channel (lo <= hi; zero is always included).
        bits: B in [2, 16]. symmetric: grid type.

    Returns:
        scale: (N,) float64, > 0, exactly representable in float32 (24 - B significant bits).
        zero_point: (N,) int64, in ``[0, 2^B - 1]`` (asymmetric) or 0 (symmetric).
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = _levels(bits, symmetric)
    if symmetric:
        raw = np.maximum(-lo, hi) / qmax
    else:
        raw = (hi - lo) / qmax
    scale = _truncate_mantissa(np.maximum(raw, SCALE_FLOOR), 24 - bits)
    if symmetric:
        zp = np.zeros(scale.shape, dtype=np.int64)
    else:
        # ties round down so the channel minimum lands on level 0 (re-quantizing w_q keeps the same grid)
        zp = np.clip(np.ceil(-lo / scale - 0.5), qmin, qmax).astype(np.int64)
    return scale, zp


#: elements per row block of the rounding (float64 temporaries) and of the clipping search (float32):
#: the extra memory stays a few MiB and the passes stay in cache
ROUND_BLOCK = 1 << 17
SEARCH_BLOCK = 1 << 17


def _row_blocks(n: int, d: int, block: int) -> list[slice]:
    """Slices of consecutive rows of an (n, d) array, about ``block`` elements each (at least one row)."""
    step = max(1, block // max(d, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _nearest_levels(w2, scale, zp, qmin, qmax):
    """Nearest levels of w2 (N, D) on the grids (N,): (q, r, e), (N, D) float64, C-contiguous.

    ``r = w / scale + zp`` are the real level positions, ``e = r - q`` the errors, and
    ``q = clip(round_half_away(r))``: ``rint`` (ties to even) and clipping, then the ties (``|e| = 0.5``
    exactly, ``r - q`` being exact) get the level away from zero instead. A tie clipped by more than
    half a level keeps the end level either way.
    """
    r = w2.astype(np.float64, order="C")
    with _row_broadcast_buffers(r.shape[1]):
        r /= scale[:, None]
        r += zp[:, None].astype(np.float64)
    q = np.rint(r)
    np.clip(q, qmin, qmax, out=q)
    e = r - q
    ties = np.abs(e) == 0.5
    if ties.any():
        rt = r[ties]
        qt = np.clip(rt + np.copysign(0.5, rt), qmin, qmax)  # exact: rt + 0.5 is an integer
        q[ties], e[ties] = qt, rt - qt
    return q, r, e


def _quantize_rows(w2, scale, zp, qmin, qmax, channels) -> np.ndarray:
    """Grid values ``float32(q - zp) * float32(scale)`` of w2 (N, D), (N, D) float32.

    Levels: nearest, then, if ``channels`` (C, dividing D) is given, balanced rounding of the
    (N, C, D / C) kernels. Row blocks of ``ROUND_BLOCK`` elements: every output channel is independent.
    """
    n, d = w2.shape
    out = np.empty((n, d), dtype=np.float32)
    lock_lo, lock_hi = (qmin - zp) != 0, (qmax - zp) != 0
    for rows in _row_blocks(n, d, ROUND_BLOCK):
        q, r, e = _nearest_levels(w2[rows], scale[rows], zp[rows], qmin, qmax)
        if channels is not None:
            shape3 = (q.shape[0], channels, d // channels)
            _balance(r.reshape(shape3), q.reshape(shape3), qmin, qmax, lock_lo[rows], lock_hi[rows],
                     e=e.reshape(shape3))
        del r, e
        with _row_broadcast_buffers(d):
            _grid_values(q, scale[rows], zp[rows], out=out[rows])
    return out


def _grid_values(levels: np.ndarray, scale: np.ndarray, zp: np.ndarray, out=None) -> np.ndarray:
    """``float32(q - zp) * float32(scale)`` per row of integer levels (N, D): (N, D) float32 (no -0.0),
    written into ``out`` when given. Integers are exact in float32, and so are the steps."""
    if out is None:
        out = levels.astype(np.float32)
    else:
        out[...] = levels
    out -= zp.astype(np.float32)[:, None]
    out *= scale.astype(np.float32)[:, None]
    out += np.float32(0.0)
    return out


def _search_alpha(w2, lo, hi, tw, spec: QuantSpec) -> np.ndarray:
    """Per-channel alpha minimising ``sum_d tw[d] (w - Q_alpha(w))^2`` (nearest rounding), (N,).

    Candidates: ``linspace(1, clip_min, clip_steps)``. Coarse to fine: every `COARSE_STRIDE`-th candidate
    (and the last) for all channels, then, per channel, the candidates within one coarse stride of its
    best coarse one; about a third of the passes of the full scan, and the same choice whenever the
    error's minimum lies in that window. Ties keep the larger alpha (less clipping). One (N, D) work
    buffer; ties of the rounding are half to even here (``np.rint``): both neighbours have the same
    error, so the errors equal those of the final round-half-away quantization.
    """
    n = w2.shape[0]
    if spec.clip == "max":
        return np.ones(n)
    grid = np.linspace(1.0, spec.clip_min, int(spec.clip_steps))  # descending
    buf = np.empty_like(w2)
    best_idx, best_err = np.zeros(n, dtype=np.int64), np.full(n, np.inf)
    coarse = np.unique(np.r_[np.arange(0, grid.size, COARSE_STRIDE), grid.size - 1])
    for i in coarse:
        best_idx, best_err = _keep_better(_clip_error(w2, lo, hi, tw, grid[i], spec, buf), np.full(n, i),
                                          best_err, best_idx)
    centre = best_idx.copy()
    for offset in range(-COARSE_STRIDE + 1, COARSE_STRIDE):
        idx = centre + offset
        valid = (idx >= 0) & (idx < grid.size) & (offset != 0)
        if not valid.any():
            continue
        idx = np.clip(idx, 0, grid.size - 1)
        rows = None if valid.all() else np.flatnonzero(valid)  # the other rows' errors are not used
        err = np.where(valid, _clip_error(w2, lo, hi, tw, grid[idx], spec, buf, rows), np.inf)
        # ties keep the larger alpha (the smaller index)
        better = (err < best_err) | ((err == best_err) & (idx < best_idx))
        best_err, best_idx = np.where(better, err, best_err), np.where(better, idx, best_idx)
    return grid[best_idx]


#: coarse step of the clipping search, in candidates
COARSE_STRIDE = 8


def _keep_better(err, idx, best_err, best_idx):
    better = err < best_err
    return np.where(better, idx, best_idx), np.where(better, err, best_err)


def _clip_error(w2, lo, hi, tw, alpha, spec: QuantSpec, buf, rows=None) -> np.ndarray:
    """``sum_d tw[d] (w - Q(w))^2`` per channel for the grid of ``(alpha lo, alpha hi)``; alpha scalar or (N,).

    ``w2``, ``buf``: (N, D) float32, ``tw`` (D,) float32. The squared errors are made in units of each
    channel's step (`_squared_step_errors`) in row blocks of ``SEARCH_BLOCK`` elements (all passes in
    cache); the weighted sum is one matrix-vector product over the whole buffer (the same call, so the
    same sums, whatever the blocks), times the squared step. ``rows``: only these channels are wanted
    (sorted indices; None: all); the other rows of ``buf`` keep stale values and their results are
    meaningless.
    """
    qmin, qmax = _levels(spec.bits, spec.symmetric)
    scale, zp = quantization_grid(alpha * lo, alpha * hi, spec.bits, spec.symmetric)
    inv_col, z_col = (1.0 / scale)[:, None].astype(w2.dtype), zp[:, None].astype(w2.dtype)
    n, d = w2.shape
    with _row_broadcast_buffers(d):
        if rows is None:
            blocks = _row_blocks(n, d, SEARCH_BLOCK)
            levels = np.empty_like(w2[blocks[0]])
            for blk in blocks:
                _squared_step_errors(w2[blk], inv_col[blk], z_col[blk], qmin, qmax, buf[blk], levels)
        else:
            for blk in _row_blocks(rows.size, d, SEARCH_BLOCK):
                sel = rows[blk]
                w_sel = np.take(w2, sel, axis=0)
                b = np.empty_like(w_sel)
                _squared_step_errors(w_sel, inv_col[sel], z_col[sel], qmin, qmax, b, np.empty_like(w_sel))
                buf[sel] = b
    return (buf @ tw) * np.square(scale)


def _squared_step_errors(w, inv, z, qmin, qmax, out, levels) -> None:
    """``out = (u - clip(rint(u), qmin, qmax)) ** 2`` with ``u = w / s + z``: the squared rounding error in
    steps (the error is ``s`` times it). w, out (m, D) float32, inv = 1 / s and z (m, 1); ``levels``: a
    scratch of at least m rows. Six passes (division as a product by the reciprocal: ranks candidates
    only)."""
    q = levels[:w.shape[0]]
    np.multiply(w, inv, out=out)
    out += z
    np.rint(out, out=q)
    np.clip(q, qmin, qmax, out=q)
    out -= q
    np.square(out, out=out)


def uses_error_feedback(w_shape, spec: QuantSpec, input_covariance) -> bool:
    """True when :func:`fake_quantize` rounds ``w`` with error feedback (else it falls back to balanced)."""
    columns = int(np.prod(w_shape[1:])) if len(w_shape) >= 2 else 0
    return (spec.rounding == "error-feedback" and input_covariance is not None and len(w_shape) >= 2
            and np.shape(input_covariance) == (w_shape[1], w_shape[1]) and 0 < columns <= MAX_COLUMNS)


def fake_quantize(w, spec: QuantSpec, tap_weight=None, input_covariance=None,
                  tap_correlation=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w`` per output channel (axis 0) and return it as floats exactly on the grid.

    Clipping ("mse"): for alpha in ``linspace(1, clip_min, clip_steps)`` the grid of
    ``(alpha lo, alpha hi)`` (lo/hi the channel's min/max) is tried; each channel keeps the alpha
    minimising ``sum_taps tap_weight * (w - Q(w))^2`` with nearest rounding (ties: the larger alpha).
    Rounding: nearest, balanced (see ``_rounding.balanced_round``; kernels are the trailing dims
    after axis 1; for 2-D weights each entry is its own kernel, so only the channel stage acts), or
    error feedback through ``input_covariance`` (see ``_error_feedback``; balanced where it does not
    apply, :func:`uses_error_feedback`), after which each row's scale moves half-way to the one refitted
    to its levels (``_error_feedback.refit_scales``, ``REFIT_WEIGHT``; rounded to the grid's precision).

    Args:
        w: (N, ...) weights (typically float32, BN folded), N output channels.
        spec: the :class:`QuantSpec`.
        tap_weight: optional nonnegative array broadcastable to ``w.shape[1:]`` (e.g. (C, 1, 1)
            input-channel variances); default ones.
        input_covariance: optional (C, C) covariance of the input channels (C = w.shape[1]).
        tap_correlation: optional (T, T) correlation of the T taps of a kernel (default identity).

    Returns:
        w_q: same shape and dtype as w, ``w_q[o] = float32(q[o] - zp[o]) * float32(scale[o])``
            with integer levels q in range (exact in float32).
        scale: (N,) float64 (float32-exact). zero_point: (N,) int64.
    """
    w = np.asarray(w)
    if w.ndim < 1 or w.shape[0] == 0:
        raise ValueError("w must have at least one output channel on axis 0")
    n = w.shape[0]
    w2 = w.reshape(n, -1)
    if w2.dtype not in (np.float32, np.float64):
        w2 = w2.astype(np.float64)
    lo, hi = w2.min(axis=1).astype(np.float64), w2.max(axis=1).astype(np.float64)  # exact in float64
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):  # NaN or inf anywhere shows here
        raise ValueError("w contains non-finite values")
    if tap_weight is None:
        tw = np.ones(w2.shape[1])
    else:
        tw = np.broadcast_to(np.asarray(tap_weight, dtype=np.float64), w.shape[1:]).reshape(-1)
        if np.any(tw < 0) or not np.all(np.isfinite(tw)):
            raise ValueError("tap_weight must be finite and nonnegative")
    # the search only ranks candidate grids: float32 halves its memory traffic
    alpha = _search_alpha(w2.astype(np.float32, copy=False), lo, hi, tw.astype(np.float32), spec)
    scale, zp = quantization_grid(alpha * lo, alpha * hi, spec.bits, spec.symmetric)
    qmin, qmax = _levels(spec.bits, spec.symmetric)
    if uses_error_feedback(w.shape, spec, input_covariance):
        taps = w2.shape[1] // w.shape[1]
        corr = np.eye(taps) if tap_correlation is None else np.asarray(tap_correlation, np.float64)
        cov = np.asarray(input_covariance, np.float64)
        levels = error_feedback_levels(w2, scale, zp, qmin, qmax, cov, corr)
        # the scale moved toward the one refitted to the levels, rounded to the grid's precision (float32-exact
        # grid values, see above; to the nearest, so that a weight already on its grid keeps its scale)
        refitted = refit_scales(w2, levels, scale, zp, cov, corr)
        scale = scale + REFIT_WEIGHT * (refitted - scale)
        scale = _truncate_mantissa(np.maximum(scale, SCALE_FLOOR), 24 - spec.bits, nearest=True)
        w_q = _grid_values(levels, scale, zp)
    else:
        channels = (w.shape[1] if w.ndim >= 2 else 1) if spec.rounding != "nearest" else None
        w_q = _quantize_rows(w2, scale, zp, qmin, qmax, channels)
    log.debug("fake_quantize: %d channels, %d bits, mean alpha %.3f", n, spec.bits, float(alpha.mean()))
    out_dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
    return w_q.reshape(w.shape).astype(out_dtype, copy=False), scale, zp


def bias_correction(w, w_q, input_mean, group: int = 1) -> np.ndarray:
    """Expected output shift caused by quantization (DFQ bias correction), to add to the bias.

    Formula: ``delta_b[o] = sum_{c, taps} (w - w_q)[o, c, taps] * E[x_{c'}]`` with the actual input
    channel ``c' = (o // (N / group)) * Cg + c``, ``Cg = w.shape[1]``. For 2-D weights (N, C):
    ``delta_b = (w - w_q) @ E[x]``. Exact except at zero-padded borders.

    Args:
        w, w_q: (N, Cg, *taps) or (N, C) original and quantized weights.
        input_mean: (group * Cg,) per-input-channel means ``E[x_c]``.
        group: conv groups (N divisible by group).

    Returns:
        delta_b: (N,) float64.
    """
    w, w_q = np.asarray(w), np.asarray(w_q)
    if w.shape != w_q.shape or w.ndim < 2:
        raise ValueError("w and w_q must have the same shape (N, C, ...)")
    # exact differences, without float64 copies of w and w_q
    return bias_shift(np.subtract(w, w_q, dtype=np.float64), input_mean, group)


def bias_shift(d, input_mean, group: int = 1) -> np.ndarray:
    """`bias_correction` from the weight change ``d = w - w_q`` (N, Cg, *taps) or (N, C), float64: (N,)."""
    n, cg = d.shape[:2]
    if group < 1 or n % group:
        raise ValueError(f"N={n} is not divisible by group={group}")
    m = np.asarray(input_mean, dtype=np.float64).reshape(-1)
    if m.shape != (group * cg,):
        raise ValueError(f"input_mean must have shape ({group * cg},), got {m.shape}")
    dsum = d.reshape(n, cg, -1).sum(axis=2) if d[0, 0].size > 1 else d.reshape(n, cg)  # (N, Cg)
    per_out = m.reshape(group, cg)[np.arange(n) // (n // group)]  # (N, Cg)
    return np.sum(dsum * per_out, axis=1)

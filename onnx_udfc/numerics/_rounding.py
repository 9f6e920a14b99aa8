"""Private rounding rules for the weight quantizer (see :mod:`onnx_udfc.numerics.quantize`).

Level positions are real numbers ``r = w / scale + zero_point``; a rounding picks integer levels
``q`` in ``[qmin, qmax]``; the rounding error in level units is ``e = r - q``.
"""

from __future__ import annotations

import numpy as np


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (deterministic, odd-symmetric: R(-x) = -R(x))."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def _flip_scores(e, q, direction, qmin, qmax, lock_lo, lock_hi):
    """Score ``direction * e`` of entries that may move one level in ``direction`` (else -inf).

    An entry may move toward its other neighbour only: ``direction * e > 0``; the target level must
    lie in ``[qmin, qmax]``; and an entry on an end level that carries a nonzero value (``lock_lo`` /
    ``lock_hi``, per output channel) never leaves it, so the range of the quantized channel, and with
    it the grid that re-quantization recovers, is unchanged.
    """
    score = direction * e
    target = q + direction
    ok = (score > 0) & (target >= qmin) & (target <= qmax)
    ok &= ~((q == qmin) & lock_lo & (direction > 0))
    ok &= ~((q == qmax) & lock_hi & (direction < 0))
    return np.where(ok, score, -np.inf)


def _n_flips(total: np.ndarray) -> np.ndarray:
    """Flips that minimise ``|total - k|`` (k integer >= 0), ties toward fewer flips."""
    return np.maximum(np.ceil(np.abs(total) - 0.5), 0.0)


def balanced_round(r: np.ndarray, q: np.ndarray, qmin: float, qmax: float, lock_lo, lock_hi) -> np.ndarray:
    """SQuant-like data-free rounding; returns new integer levels (float64 array like ``q``).

    Args:
        r: (N, C, T) real level positions; ``q``: (N, C, T) nearest levels (clamped).
        qmin, qmax: level range. lock_lo, lock_hi: (N,) bool, see :func:`_flip_scores`.

    Stage 1 (kernel, the T taps of one (o, c)): with ``E = sum_t e``, flip the ``round(|E|)``
    eligible entries with the largest ``|e|`` whose error has the sign of E (each flip moves E by
    one toward 0). Stage 2 (output channel): with ``E_o = sum_{c,t} e``, flip ``round(|E_o|)`` more
    entries, at most one per kernel, in kernels whose current sum has the sign of ``E_o``, taking
    the kernels whose best eligible entry has the largest ``|e|``.
    """
    n, c, t = r.shape
    q = q.copy()
    lock_lo = np.asarray(lock_lo, dtype=bool)[:, None, None]
    lock_hi = np.asarray(lock_hi, dtype=bool)[:, None, None]

    # stage 1: inside each kernel
    e = r - q
    ksum = e.sum(axis=2)
    sgn = np.sign(ksum)[:, :, None]
    score = _flip_scores(e, q, sgn, qmin, qmax, lock_lo, lock_hi)
    order = np.argsort(-score, axis=2, kind="stable")
    ranked = np.take_along_axis(score, order, axis=2)
    take_sorted = (np.arange(t)[None, None, :] < _n_flips(ksum)[:, :, None]) & np.isfinite(ranked)
    take = np.zeros_like(take_sorted)
    np.put_along_axis(take, order, take_sorted, axis=2)
    q += sgn * take

    # stage 2: over each output channel, at most one more flip per kernel
    e = r - q
    ksum = e.sum(axis=2)
    osum = ksum.sum(axis=1)
    osgn = np.sign(osum)[:, None, None]
    score = _flip_scores(e, q, osgn, qmin, qmax, lock_lo, lock_hi)
    best_tap = np.argmax(score, axis=2)[:, :, None]  # (N, C, 1)
    best = np.take_along_axis(score, best_tap, axis=2)[:, :, 0]
    best = np.where(osgn[:, :, 0] * ksum > 0, best, -np.inf)
    korder = np.argsort(-best, axis=1, kind="stable")
    kranked = np.take_along_axis(best, korder, axis=1)
    ktake_sorted = (np.arange(c)[None, :] < _n_flips(osum)[:, None]) & np.isfinite(kranked)
    ktake = np.zeros_like(ktake_sorted)
    np.put_along_axis(ktake, korder, ktake_sorted, axis=1)
    flip = np.zeros(q.shape, dtype=bool)
    np.put_along_axis(flip, best_tap, ktake[:, :, None], axis=2)
    q += osgn * flip
    return q

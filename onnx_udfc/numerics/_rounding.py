"""Private rounding rules for the weight quantizer (see :mod:`onnx_udfc.numerics.quantize`).

Level positions are real numbers ``r = w / scale + zero_point``; a rounding picks integer levels
``q`` in ``[qmin, qmax]``; the rounding error in level units is ``e = r - q``.

The balanced rounding works on a kernel-major view: ``K = N * C`` kernels of ``T`` taps, arrays
(K, T). Its results equal those of the plain formulation (scores ``-inf`` where no flip is allowed,
stable ``argsort`` of the scores, ``take_along_axis``) bit for bit:

* a score is positive exactly where a flip is allowed (``direction * e > 0`` and the move allowed),
  and is ``<= 0`` elsewhere, so "finite score" becomes "positive score";
* "the ``k`` largest scores, equal scores lower index first" is what a stable descending argsort
  followed by its first ``k`` entries gives; over the taps of a kernel it is found round by round
  with the maximum and its first occurrence, over the kernels of a channel with a ``k``-th largest
  threshold (``np.partition``) plus the lowest-index ties;
* errors are always ``r - q`` and kernel sums always ``ndarray.sum`` over the contiguous tap axis,
  so they are the same numbers whatever subset of kernels or rows is processed.
"""

from __future__ import annotations

import contextlib

import numpy as np


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (deterministic, odd-symmetric: R(-x) = -R(x))."""
    x = np.asarray(x)
    q = np.asarray(np.rint(x))
    _fix_ties_away(x, q)
    return q


def _fix_ties_away(x: np.ndarray, q: np.ndarray) -> None:
    """Turn ``q = rint(x)`` into round-half-away in place (any shape): only exact ``.5`` fractions differ.

    ``x - rint(x)`` is exact, so the ties are found exactly; ``x + copysign(0.5, x)`` is then an integer.
    """
    d = np.subtract(x, q)
    ties = np.abs(d, out=d) == 0.5
    del d
    if ties.any():
        xt = x[ties]
        q[ties] = xt + np.copysign(0.5, xt)


def _flip_scores(e, q, d, stay, qmin, qmax):
    """Scores of moving entries one level in direction ``d``: ``d * e`` where allowed, else ``<= 0``.

    An entry may move toward its other neighbour only: ``d * e > 0``; the target level must lie in
    ``[qmin, qmax]``; and an entry on an end level that carries a nonzero value never leaves it
    (``stay``, see :func:`_stay_level`), so the range of the quantized channel, and with it the grid
    that re-quantization recovers, is unchanged. A score is positive exactly when the move is
    allowed (the plain formulation uses ``-inf`` for the others).

    Shapes: ``e``, ``q`` (M, L); ``d`` (+-1 or 0) and ``stay`` (or None: no lock) broadcastable to
    them. Element-wise only. Returns a new (M, L) array.
    """
    score = d * e
    target = q + d
    ok = target >= qmin
    ok &= target <= qmax
    del target
    if stay is not None:
        ok &= q != stay
    np.logical_not(ok, out=ok)
    np.copyto(score, 0.0, where=ok)  # few entries: a masked copy is cheaper than a product
    return score


def _stay_level(d, lock_lo, lock_hi, qmin: float, qmax: float):
    """Level an entry moving in direction ``d`` may not leave: ``qmin`` (moving up, ``lock_lo``),
    ``qmax`` (moving down, ``lock_hi``), else NaN (equal to nothing); None when nothing is locked.
    All arrays of one shape (one value per kernel or per channel)."""
    lo, hi = lock_lo & (d > 0), lock_hi & (d < 0)
    if not (lo.any() or hi.any()):
        return None
    return np.where(lo, qmin, np.where(hi, qmax, np.nan))


@contextlib.contextmanager
def _row_broadcast_buffers(d: int):
    """Ufunc buffer size for element-wise ops of (n, d) rows with (n, 1) columns (no reductions inside).

    With the default size numpy gathers several short rows into its buffers and copies the broadcast
    column for them; a buffer shorter than a row keeps it on the direct loops (about twice as fast
    here). Results do not depend on the buffer size.
    """
    if d < 512:
        yield
        return
    old = np.setbufsize(256)
    try:
        yield
    finally:
        np.setbufsize(old)


def _per_tap(x: np.ndarray, t: int) -> np.ndarray:
    """(M,) per-kernel values as a (M, T) array (a view when T == 1)."""
    return x[:, None] if t == 1 else np.repeat(x, t).reshape(-1, t)


def _n_flips(total: np.ndarray) -> np.ndarray:
    """Flips that minimise ``|total - k|`` (k integer >= 0), ties toward fewer flips."""
    return np.maximum(np.ceil(np.abs(total) - 0.5), 0.0)


def _row_max(a: np.ndarray) -> np.ndarray:
    """(M,) maximum over the few columns of a (M, T) array (column by column: exact and fast)."""
    best = a[:, 0].copy()
    for j in range(1, a.shape[1]):
        np.maximum(best, a[:, j], out=best)
    return best


def _first_max(a: np.ndarray, best: np.ndarray) -> np.ndarray:
    """(M, T) bool marking, per row, the first column where ``a`` equals ``best`` (what argmax picks)."""
    first = np.empty(a.shape, dtype=bool)
    seen = np.zeros(a.shape[0], dtype=bool)
    for j in range(a.shape[1]):
        eq = a[:, j] == best
        np.greater(eq, seen, out=first[:, j])  # eq and not seen
        seen |= eq
    return first


def _top_taps(score: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(M, T) bool: per row the ``k`` largest positive scores, equal scores lower index first.

    Same choice as the first ``k`` entries of ``argsort(-score, kind="stable")`` restricted to
    positive scores. Round by round, each row still wanting a flip takes its first maximum; rows drop
    out fast (most want one flip), and at most ``T`` rounds run.
    """
    take, rows = None, np.arange(score.shape[0])
    for rnd in range(score.shape[1]):
        best = _row_max(score)
        pick = (best > 0) & (k > rnd)
        first = _first_max(score, best)
        first &= pick[:, None]
        if take is None:
            take = first
        else:
            take[rows] |= first
        more = np.flatnonzero(pick & (k > rnd + 1))
        if more.size == 0:
            break
        rows, k = rows[more], k[more]
        score, first = np.take(score, more, axis=0), np.take(first, more, axis=0)
        score[first] = 0.0  # taken: no longer a candidate
    return take


def _top_kernels(best: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``best`` (R, C) the ``k`` (>= 1) largest positive values, equal values lower index first.

    Same choice as the first ``k`` entries of ``argsort(-best, kind="stable")`` restricted to positive
    values: with ``v`` the ``k``-th largest value of the row (``np.partition``), the entries ``>= v``;
    a row with more than ``k`` of them (equal values at ``v``) takes the values above ``v`` and the
    lowest-index ones equal to ``v``.

    Returns:
        (rows, cols) of the taken entries, sorted.
    """
    n_rows, c = best.shape
    k = np.minimum(k, c).astype(np.intp)
    width = min(int(k.max()), c)
    head = np.partition(best, c - width, axis=1)[:, c - width:] if width < c else best.copy()
    head.sort(axis=1)
    v = head[np.arange(n_rows), width - k][:, None]  # (R, 1) k-th largest
    sel = best >= v
    sel &= best > 0
    flat = np.flatnonzero(sel)
    rows = flat // c
    tied = np.flatnonzero(np.bincount(rows, minlength=n_rows) > k)
    if tied.size:
        b, vt = best[tied], v[tied]
        eq = b == vt
        room = (k[tied] - np.count_nonzero(b > vt, axis=1))[:, None]
        take = (b > vt) | (eq & (np.cumsum(eq, axis=1) <= room))
        sel[tied] = take & (b > 0)
        flat = np.flatnonzero(sel)
        rows = flat // c
    return rows, flat - rows * c


def _subset(want: np.ndarray):
    """Indices of the True entries of ``want``, or None when most are True (then work on everything)."""
    return None if 4 * np.count_nonzero(want) > 3 * want.size else np.flatnonzero(want)


def _rows(a: np.ndarray, idx) -> np.ndarray:
    """``a[idx]`` (rows), or ``a`` itself when ``idx`` is None."""
    return a if idx is None else np.take(a, idx, axis=0)


def _per_kernel(x: np.ndarray, c: int, idx) -> np.ndarray:
    """Per-channel values x (N,) for kernels ``idx`` (or all N * C kernels when None)."""
    return np.repeat(x, c) if idx is None else x[idx // c]


def _kernel_stage(r2, q2, e2, ksum, c, qmin, qmax, lock_lo, lock_hi) -> np.ndarray:
    """Stage 1 in place: balance the error sum of each kernel; returns the (sorted) kernels changed.

    Args: r2 (K, T) positions. Updated in place (C-contiguous): q2, e2 (K, T) levels and errors
    ``r - q``; ksum (K,) kernel sums of e2. c: kernels per output channel. lock_lo, lock_hi: (N,).
    Only kernels asking for a flip (``|E| > 0.5``, never a 1x1 kernel from nearest rounding) are
    looked at, and only they are worked on when they are few.
    """
    want = np.abs(ksum) > 0.5  # the same as _n_flips(ksum) > 0
    if not want.any():
        return np.zeros(0, dtype=np.intp)
    idx = _subset(want)
    ks = _rows(ksum, idx)
    sgn = np.sign(ks)
    t = e2.shape[1]
    stay = _stay_level(sgn, _per_kernel(lock_lo, c, idx), _per_kernel(lock_hi, c, idx), qmin, qmax)
    score = _flip_scores(_rows(e2, idx), _rows(q2, idx), _per_tap(sgn, t),
                         None if stay is None else _per_tap(stay, t), qmin, qmax)
    take = _top_taps(score, _n_flips(ks))
    flipped = np.flatnonzero(take)  # flat (M * T) entries, sorted
    if flipped.size == 0:
        return flipped
    kern = flipped // t
    if idx is not None:
        kern = idx[kern]
    flat = kern * t + flipped % t  # entries of q2 / e2, sorted
    q1, e1 = q2.reshape(-1), e2.reshape(-1)
    q1[flat] += sgn[flipped // t]  # the same numbers as q + sgn * take
    e1[flat] = np.reshape(r2, -1)[flat] - q1[flat]  # r - q where q changed
    changed = kern[np.r_[True, kern[1:] != kern[:-1]]]  # kern is sorted
    ksum[changed] = np.take(e2, changed, axis=0).sum(axis=1)
    return changed


def _channel_stage(q2, e2, ksum, n, c, qmin, qmax, lock_lo, lock_hi) -> None:
    """Stage 2 in place on ``q2`` (K, T): balance each output channel, at most one flip per kernel.

    ``e2``, ``ksum``: errors and kernel sums after stage 1 (see :func:`_kernel_stage`). Only kernels
    whose sum has the sign of their channel's sum, in channels asking for a flip, can flip.
    """
    osum = ksum.reshape(n, c).sum(axis=1)
    flips = _n_flips(osum)
    rows = np.flatnonzero(flips)
    if rows.size == 0:
        return
    osgn = np.zeros(n)
    osgn[rows] = np.sign(osum[rows])
    t = e2.shape[1]
    if t == 1:  # a kernel is its entry: its sum has the wrong sign exactly when its score is <= 0
        want, idx = None, None
    else:
        with _row_broadcast_buffers(c):
            want = (osgn[:, None] * ksum.reshape(n, c) > 0).reshape(-1)
        if not want.any():
            return
        idx = _subset(want)
    stay = _stay_level(osgn, lock_lo, lock_hi, qmin, qmax)
    if idx is None:  # (N, C * T) rows, one direction each
        with _row_broadcast_buffers(c * t):
            score = _flip_scores(e2.reshape(n, -1), q2.reshape(n, -1), osgn[:, None],
                                 None if stay is None else stay[:, None], qmin, qmax).reshape(-1, t)
        best = score[:, 0] if t == 1 else _row_max(score)
        if want is not None:
            best *= want  # kernels of the wrong sign cannot flip
    else:
        owner = idx // c
        score = _flip_scores(np.take(e2, idx, axis=0), np.take(q2, idx, axis=0), _per_tap(osgn[owner], t),
                             None if stay is None else _per_tap(stay[owner], t), qmin, qmax)
        best = np.zeros(ksum.size)
        best[idx] = _row_max(score)
    best = best.reshape(n, c)
    ri, ci = _top_kernels(best if rows.size == n else best[rows], flips[rows])
    flat = rows[ri] * c + ci
    tap = np.argmax(score[flat if idx is None else np.searchsorted(idx, flat)], axis=1)
    q2[flat, tap] += osgn[rows[ri]]


def balanced_round(r: np.ndarray, q: np.ndarray, qmin: float, qmax: float, lock_lo, lock_hi) -> np.ndarray:
    """SQuant-like data-free rounding; returns new integer levels (float64 array like ``q``).

    Args:
        r: (N, C, T) real level positions; ``q``: (N, C, T) nearest levels (clamped).
        qmin, qmax: level range. lock_lo, lock_hi: (N,) bool, see :func:`_flip_scores` and
            :func:`_stay_level`.

    Stage 1 (kernel, the T taps of one (o, c)): with ``E = sum_t e``, flip the ``round(|E|)``
    eligible entries with the largest ``|e|`` whose error has the sign of E (each flip moves E by
    one toward 0). Stage 2 (output channel): with ``E_o = sum_{c,t} e``, flip ``round(|E_o|)`` more
    entries, at most one per kernel, in kernels whose current sum has the sign of ``E_o``, taking
    the kernels whose best eligible entry has the largest ``|e|``. Equal scores: lower index first.
    Memory: a few arrays of ``q``'s size; every output channel is independent, so callers may pass
    row blocks.
    """
    q = np.array(q, copy=True, order="C")
    _balance(r, q, qmin, qmax, lock_lo, lock_hi)
    return q


def _balance(r: np.ndarray, q: np.ndarray, qmin: float, qmax: float, lock_lo, lock_hi, e=None) -> None:
    """:func:`balanced_round` in place on ``q`` (N, C, T), C-contiguous float64.

    ``e``: optional ``r - q`` already at hand (C-contiguous, overwritten).
    """
    if not q.flags.c_contiguous:
        raise ValueError("q must be C-contiguous")
    n, c, t = q.shape
    lock_lo = np.broadcast_to(np.asarray(lock_lo, dtype=bool), (n,))
    lock_hi = np.broadcast_to(np.asarray(lock_hi, dtype=bool), (n,))
    if e is None:
        e = r - q
    ksum = e.sum(axis=2).reshape(-1)
    q2, r2 = q.reshape(n * c, t), np.reshape(r, (n * c, t))
    e2 = np.ascontiguousarray(e).reshape(n * c, t)
    changed = _kernel_stage(r2, q2, e2, ksum, c, qmin, qmax, lock_lo, lock_hi)
    if changed.size and not e.flags.c_contiguous:  # sum as the plain formulation does on this layout
        ksum = (r - q).sum(axis=2).reshape(-1)
    _channel_stage(q2, e2, ksum, n, c, qmin, qmax, lock_lo, lock_hi)

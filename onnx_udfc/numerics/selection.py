"""Which channels to remove (methods.md section 8.2: selection matters more than compensation).

* :func:`select_by_norm`: the channels with the smallest L1 filter norm (the classic baseline).
* :func:`select_by_expected_error`: backward greedy on the expected consumer-output error after
  the best linear compensation from the remaining channels. With ``Q = (cov + lambda I)^{-1}``
  (precision of the activations), the residual covariance of removed channels D given the rest is
  ``Q_DD^{-1}``, so the error is ``err(D) = tr(G_DD Q_DD^{-1})`` with ``G = sum_taps V_tap^T V_tap``.
"""

from __future__ import annotations

import heapq
import logging

import numpy as np

from .covariance import nearest_psd

__all__ = ["select_by_norm", "select_by_expected_error", "greedy_removal_order", "BackwardGreedy",
           "allocate_greedily", "aligned_removal", "effective_multiple"]

log = logging.getLogger(__name__)


def _check_n_remove(n_remove: int, n: int) -> int:
    n_remove = int(n_remove)
    if n_remove < 0:
        raise ValueError("n_remove must be >= 0")
    if n_remove >= n:
        raise ValueError(f"refusing to remove {n_remove} of {n} channels: at least one must stay")
    return n_remove


def select_by_norm(w, n_remove: int) -> np.ndarray:
    """Indices of the ``n_remove`` channels with the smallest ``||w[i]||_1`` (ties: lower index).

    Args:
        w: (N, ...) producer weights, output channels on axis 0.
        n_remove: number of channels to remove, ``0 <= n_remove < N``.

    Returns:
        (n_remove,) int64 indices, sorted ascending.
    """
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    n_remove = _check_n_remove(n_remove, n)
    norms = np.abs(w.reshape(n, -1)).sum(axis=1)
    order = np.argsort(norms, kind="stable")
    return np.sort(order[:n_remove]).astype(np.int64)


def _precision(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``Q = (cov+ + ridge * mean(diag(cov+)) I)^{-1}``, symmetric.

    ``cov+`` is ``cov`` where that makes the sum positive definite, else its projection on the positive
    semi-definite cone (eigenvalues clipped at 0): covariances measured in float32 can have slightly
    negative variances where a channel is nearly constant (a PaddleOCR classifier: variances -1e-7 next to
    consumer weights of 1e15), and an indefinite Q makes the greedy's error increments negative and
    unbounded. If every variance is 0 the ridge is taken relative to 1 instead; pseudo-inverse as a last
    resort.
    """
    for attempt in range(2):
        a = _ridged(cov, ridge)
        inverse = _cholesky_inverse(a)
        if inverse is not None:
            return inverse
        if attempt == 0 and np.all(np.isfinite(cov)):
            log.debug("select_by_expected_error: covariance not positive semi-definite, projected")
            cov = nearest_psd(cov)
    log.debug("select_by_expected_error: covariance not positive definite, using pinv")
    return _symmetrised(np.linalg.pinv(_ridged(cov, ridge)))  # the failed factorisation overwrote `a`


def _symmetrised(a: np.ndarray) -> np.ndarray:
    """``(a + a^T) / 2`` as one new array (no second temporary)."""
    out = a + a.T
    out *= 0.5
    return out


def _ridged(cov: np.ndarray, ridge: float) -> np.ndarray:
    """A new array ``cov + ridge * mean(diag(cov)+) I`` (the ridge added on the diagonal of a copy: no
    (N, N) identity)."""
    scale = float(np.mean(np.maximum(np.diag(cov), 0.0)))
    a = cov.copy()
    a.flat[::a.shape[0] + 1] += float(ridge) * (scale if scale > 0 else 1.0)
    return a


def _cholesky_inverse(a: np.ndarray):
    """Inverse of a symmetric positive definite ``a`` by Cholesky (half the work of LU, exactly symmetric),
    or None when ``a`` is not positive definite or not finite. ``a`` is overwritten (factor and inverse
    are computed in its memory)."""
    from scipy.linalg.lapack import dpotrf, dpotri  # on first use: scipy.linalg costs 0.2 s to import

    if not np.all(np.isfinite(a)):
        return None
    # LAPACK works in place on a Fortran-ordered array: a.T is one (the same matrix: a is symmetric), where
    # a C-ordered `a` would be copied. The inverse is returned C-ordered (its transpose, equal by symmetry),
    # so the greedy's row reads are contiguous.
    factor, info = dpotrf(a.T, lower=1, clean=0, overwrite_a=1)
    if info != 0:
        return None
    inverse, info = dpotri(factor, lower=1, overwrite_c=1)
    return _mirror_lower(inverse).T if info == 0 else None


def _mirror_lower(a: np.ndarray, block: int = 256) -> np.ndarray:
    """``a`` (N, N) made symmetric in place from its lower triangle (the upper one is overwritten), by
    row blocks: no N x N temporary (np.tril builds a mask and a copy)."""
    n = a.shape[0]
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        a[r0:r1, r1:] = a[r1:, r0:r1].T
        diag = a[r0:r1, r0:r1]
        upper = np.triu_indices(r1 - r0, 1)
        diag[upper] = diag.T[upper]
    return a


class BackwardGreedy:
    """Backward greedy removal on ``err(D) = tr(G_DD Q_DD^{-1})``, one channel per `step()`.

    For every remaining candidate c, with ``U = Q_DD^{-1} Q_{D,:}`` (|D|, N) and the Schur complement
    ``s_c = Q_cc - Q_Dc . U_c``::

        err(D + c) - err(D) = (t_c + G_cc) / s_c,   t = diag(U^T G_DD U) - 2 diag(G_{:,D} U)

    Removing c updates everything with the block inverse in O(|D| N): ``beta = (Q_c: - Q_cD U) / s_c``,
    ``U <- [U - U_c beta; beta]``, ``s <- s - s_c beta^2``, and ``t`` from the same rank-1 terms
    (one (4, |D|) x (|D|, N) product and one matrix-vector product per step).

    The rank-1 updates of U are delayed: ``U = U_stored - P B`` with the last (at most `PENDING`) update
    columns ``P`` (|D|, m) and rows ``B`` (m, N), folded into ``U_stored`` by one matrix product every
    `PENDING` steps. A step then reads U once (its product) instead of three times (product, and the
    read and write of an immediate update): the greedy is bound by memory traffic over U.
    """

    #: delayed rank-1 updates of U before they are folded in
    PENDING = 16
    #: rows of U, P, G rows and G_DD allocated at first (grown by doubling)
    INITIAL_ROWS = 64
    #: the stored columns are compacted to the candidates when at least this fraction of them was removed
    COMPACT_FRACTION = 0.125

    def __init__(self, cov, gram, max_remove: int, ridge: float = 1.0):
        cov = np.asarray(cov, dtype=np.float64)
        gram = np.asarray(gram, dtype=np.float64)
        n = cov.shape[0]
        if cov.shape != (n, n) or gram.shape != (n, n):
            raise ValueError("cov and gram must both be (N, N)")
        self.n = n
        self.max_remove = _check_n_remove(max_remove, n)
        self.q = _precision(_symmetrised(cov), ridge)
        self.g = _symmetrised(gram)
        # Everything indexed by candidate lives on the stored columns `cols` (channel indices, ascending): the
        # removed channels' columns are never read again, and dropping them (`_compact`) shrinks the product
        # that bounds a step (MobileNetV2's 1280-channel chain ends with 384 candidates).
        self.cols = np.arange(n)
        self.dropped = np.zeros(n, dtype=bool)  # stored columns whose channel was removed
        self.g_diag = np.diag(self.g).copy()
        self.s = np.diag(self.q).copy()
        self.t = np.zeros(n)
        # rows grow with the removals (`_reserve`): a chain's greedy usually stops far below its cap
        # (MobileNetV2 prune 0.3: 336 of 672 on a 960-channel chain), and all chains' states live at once
        k = min(self.max_remove, self.INITIAL_ROWS)
        self.u = np.zeros((k, n))  # rows: Q_DD^{-1} Q_{D,cols}, before the pending updates
        self.pending_cols = np.zeros((k, self.PENDING))  # P: U_c of each pending update (0 on later rows)
        self.pending_rows = np.zeros((self.PENDING, n))  # B: beta of each pending update
        self.n_pending = 0
        self.g_rows = np.zeros((k, n))  # rows: G_{c,cols} of the removed channels, in removal order
        self.g_dd = np.zeros((k, k))  # G_DD in removal order
        self.order = np.zeros(self.max_remove, dtype=np.int64)
        self.errors = np.zeros(self.max_remove)
        self.d = 0
        self.err = 0.0
        self._next = None

    def peek(self) -> tuple[int, float]:
        """(channel, error increase) of the next removal; (-1, inf) when `max_remove` is reached."""
        if self._next is None:
            if self.d >= self.max_remove:
                self._next = (-1, np.inf, -1)
            else:
                # a candidate whose remaining precision vanished numerically costs inf (it is kept), not a warning
                with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                    delta = (self.t + self.g_diag) / np.maximum(self.s, _TINY)
                delta[~np.isfinite(delta)] = np.inf
                delta[self.dropped] = np.inf
                j = int(np.argmin(delta))  # stored columns ascend: ties go to the lower channel
                self._next = (int(self.cols[j]), float(delta[j]), j)
        return self._next[:2]

    def step(self) -> int:
        """Remove the best candidate; returns its index."""
        c, delta = self.peek()
        if c < 0:
            raise ValueError("max_remove reached")
        j = self._next[2]  # c's stored column
        self._next = None
        self._reserve(self.d + 1)
        d, g, q, m = self.d, self.g, self.q, self.n_pending
        ud, gd, idx = self.u[:d], self.g_rows[:d], self.order[:d]
        p, b = self.pending_cols[:d, :m], self.pending_rows[:m]
        sc = max(float(self.s[j]), _TINY)
        uc = ud[:, j] - p @ b[:, j]
        g_c_d = g[c, idx]
        w = self.g_dd[:d, :d] @ uc  # G_DD U_c
        h = gd[:, j] - w
        x = np.stack([h, q[c, idx], g_c_d, w])  # (4, |D|)
        products = x @ ud - (x @ p) @ b  # (4, stored) = x U
        g_c = g[c, self.cols]
        beta = (q[c, self.cols] - products[1]) / sc
        new_row = products[2] - float(g_c_d @ uc) * beta + g[c, c] * beta
        self.t += (beta * (products[0] - products[3] + 2.0 * (uc @ gd)) - beta * beta * float(uc @ h)
                   + beta * new_row - 2.0 * g_c * beta)
        if d:  # rank-1 update U -= U_c beta^T of the existing rows, delayed
            self.pending_cols[:d, m] = uc
            self.pending_rows[m] = beta
            self.n_pending = m = m + 1
        self.u[d] = beta
        self.g_rows[d] = g_c
        self.g_dd[d, :d] = g_c_d
        self.g_dd[:d, d] = g_c_d
        self.g_dd[d, d] = g[c, c]
        self.s -= sc * beta * beta
        self.dropped[j] = True
        self.err += delta
        self.order[d] = c
        self.errors[d] = self.err
        self.d += 1
        if m == self.PENDING:
            self._fold_pending(d + 1)
            if np.count_nonzero(self.dropped) >= self.COMPACT_FRACTION * self.cols.size:
                self._compact()
        return c

    def _reserve(self, rows: int) -> None:
        """Room for `rows` removals in U, P, the G rows and G_DD (capacity doubled, at most `max_remove`)."""
        capacity = self.u.shape[0]
        if rows <= capacity:
            return
        new = min(max(rows, 2 * capacity), self.max_remove)

        def grown(a, shape):
            out = np.zeros(shape)
            out[tuple(slice(0, k) for k in a.shape)] = a
            return out

        self.u = grown(self.u, (new, self.cols.size))
        self.pending_cols = grown(self.pending_cols, (new, self.PENDING))
        self.g_rows = grown(self.g_rows, (new, self.cols.size))
        self.g_dd = grown(self.g_dd, (new, new))

    def _compact(self) -> None:
        """Drop the removed channels' stored columns (no update pending)."""
        keep = ~self.dropped
        self.cols = self.cols[keep]
        self.u = np.ascontiguousarray(self.u[:, keep])
        self.g_rows = np.ascontiguousarray(self.g_rows[:, keep])
        self.pending_rows = np.zeros((self.PENDING, self.cols.size))
        self.t, self.s, self.g_diag = self.t[keep], self.s[keep], self.g_diag[keep]
        self.dropped = np.zeros(self.cols.size, dtype=bool)

    def _fold_pending(self, rows: int) -> None:
        """``U_stored[:rows] -= P B``; no update pending afterwards."""
        m = self.n_pending
        self.u[:rows] -= self.pending_cols[:rows, :m] @ self.pending_rows[:m]
        self.pending_cols[:rows, :m] = 0.0
        self.n_pending = 0


_TINY = 1e-300


def greedy_removal_order(cov, gram, n_remove: int, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Backward greedy removal (see `BackwardGreedy`), in removal order, with the error after each step.

    Returns:
        order: (n_remove,) int64 removal order; errors: (n_remove,) ``err`` after each removal.
    """
    greedy = BackwardGreedy(cov, gram, n_remove, ridge=ridge)
    for _ in range(greedy.max_remove):
        greedy.step()
    return greedy.order, greedy.errors


def select_by_expected_error(cov, gram, n_remove: int, ridge: float = 1.0) -> np.ndarray:
    """Channels to remove by backward greedy minimisation of ``tr(G_DD Q_DD^{-1})``.

    ``Q = (cov + ridge * mean(diag(cov)) I)^{-1}``; ``err(D)`` is the expected squared consumer-output
    error after removing D and compensating it linearly from the remaining channels. Removal proceeds
    one channel at a time (see :func:`greedy_removal_order`), O(N n_remove^2) overall.

    Args:
        cov: (N, N) activation covariance. gram: (N, N) ``sum_taps V_tap^T V_tap`` of the consumer.
        n_remove: ``0 <= n_remove < N``. ridge: shrinkage relative to the mean variance.

    Returns:
        (n_remove,) int64 indices, sorted ascending.
    """
    order, errors = greedy_removal_order(cov, gram, n_remove, ridge=ridge)
    if n_remove:
        log.debug("select_by_expected_error: removed %d, expected error %.4g", n_remove, errors[-1])
    return np.sort(order)


def aligned_removal(n: int, n_remove: int, multiple: int, max_remove: int = None) -> int:
    """The removal count nearest to `n_remove` that leaves a multiple of `multiple` channels.

    Kept counts allowed: N itself, or a positive multiple of `multiple` below N (vectorised conv kernels
    in onnxruntime and TensorRT want channel counts in blocks of 8 or 16; other widths fall back to slower
    kernels). Ties keep more channels; `max_remove` (default N - 1) bounds the result. `multiple` 1 is off.
    """
    n, n_remove, multiple = int(n), int(n_remove), max(int(multiple), 1)
    max_remove = n - 1 if max_remove is None else min(int(max_remove), n - 1)
    if multiple == 1 or n_remove <= 0:
        return max(min(n_remove, max_remove), 0)
    keep = n - n_remove
    options = [n] + [m for m in range(multiple, n, multiple) if n - m <= max_remove]
    best = min(options, key=lambda m: (abs(m - keep), -m))
    return n - best


def effective_multiple(n: int, multiple: int) -> int:
    """`multiple`, halved down to 8 while the chain is narrower than 4 of its blocks, or 1 for chains narrower
    than 4 blocks of 8 (or of `multiple` when it is below 8): there a block is over a quarter of the layer,
    too coarse a step (the quick-start VGG's 16-channel layers lost 9 points when cut 16 -> 8), and the conv
    is too small for its kernel choice to matter. With `multiple` 16, a 32- or 48-channel chain still keeps
    multiples of 8: an unaligned width (MobileNetV2's 32-channel stem cut to 25) makes onnxruntime reorder
    the layout around that conv and run its depthwise conv on the slow path (prune 0.3, batch 32: 1.22x the
    original's latency)."""
    multiple = max(int(multiple), 1)
    while multiple > 8 and n < 4 * multiple:
        multiple //= 2
    return multiple if n >= 4 * multiple else 1


def allocate_greedily(states, budget: int) -> np.ndarray:
    """Spend a budget of removed channels over several layers, cheapest next removal first.

    states: objects with ``peek() -> (size, cost)`` (the number of channels of their next removal step and
    its cost per channel; cost inf when exhausted) and ``step()``; a heap keeps the layers ordered by that
    cost (ties: earlier layer). Steps are taken until `budget` channels are removed (the last step may
    overshoot by less than its size). Each layer advances only as far as its share. With single-channel
    steps and convex cost curves (increasing marginal costs) this minimises the summed cost.

    Returns:
        (L,) int64 channels removed per layer (less than `budget` in total only if every layer is exhausted).
    """
    heap = [(float(state.peek()[1]), i) for i, state in enumerate(states)]
    heapq.heapify(heap)
    counts = np.zeros(len(states), dtype=np.int64)
    removed = 0
    while heap and removed < int(budget):
        cost, i = heapq.heappop(heap)
        if not np.isfinite(cost):
            break
        size = int(states[i].peek()[0])
        states[i].step()
        counts[i] += size
        removed += size
        heapq.heappush(heap, (float(states[i].peek()[1]), i))
    return counts

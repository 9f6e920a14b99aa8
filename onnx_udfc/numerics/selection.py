"""Which channels to remove (methods.md section 8.2: selection matters more than compensation).

* :func:`select_by_norm`: the channels with the smallest L1 filter norm (the classic baseline).
* :func:`select_by_expected_error`: backward greedy on the expected consumer-output error after
  the best linear compensation from the remaining channels. With ``Q = (cov + lambda I)^{-1}``
  (precision of the activations), the residual covariance of removed channels D given the rest is
  ``Q_DD^{-1}``, so the error is ``err(D) = tr(G_DD Q_DD^{-1})`` with ``G = sum_taps V_tap^T V_tap``.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

__all__ = ["select_by_norm", "select_by_expected_error", "greedy_removal_order", "lower_convex_hull",
           "allocate_removals"]

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
    """``Q = (cov + ridge * mean(diag(cov)) I)^{-1}``, symmetric; pseudo-inverse if singular.

    If every variance is 0 the ridge is taken relative to 1 instead.
    """
    n = cov.shape[0]
    scale = float(np.mean(np.diag(cov)))
    a = cov + float(ridge) * (scale if scale > 0 else 1.0) * np.eye(n)
    try:
        q = scipy.linalg.inv(a)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, ValueError):
        log.debug("select_by_expected_error: singular covariance, using pinv")
        q = np.linalg.pinv(a)
    return 0.5 * (q + q.T)


def greedy_removal_order(cov, gram, n_remove: int, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Backward greedy removal, in removal order, with the running error after each step.

    Step: for every remaining candidate c, with ``A = Q_DD^{-1}``, ``U = A Q_{D,:}``,
    ``s_c = Q_cc - Q_Dc . U_c`` (Schur complement),
    ``err(D + c) = err(D) + (U_c^T G_DD U_c - 2 G_Dc . U_c + G_cc) / s_c``; take the argmin (ties: lower
    index). ``U``, ``G_DD U`` and ``s`` are updated in O(|D| N) per step with the block inverse:
    ``beta = (Q_c: - Q_cD U) / s_c``, ``U <- [U - U_c beta; beta]``, ``s <- s - s_c beta^2``.

    Returns:
        order: (n_remove,) int64 removal order; errors: (n_remove,) ``err`` after each removal.
    """
    cov = np.asarray(cov, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    n = cov.shape[0]
    if cov.shape != (n, n) or gram.shape != (n, n):
        raise ValueError("cov and gram must both be (N, N)")
    n_remove = _check_n_remove(n_remove, n)
    q = _precision(0.5 * (cov + cov.T), ridge)
    g = 0.5 * (gram + gram.T)
    g_diag = np.diag(g).copy()
    u = np.zeros((n_remove, n))  # rows: A Q_{D,:}
    gu = np.zeros((n_remove, n))  # rows: G_DD U
    s = np.diag(q).copy()
    tiny = 1e-300
    removed = np.zeros(n, dtype=bool)
    order = np.zeros(n_remove, dtype=np.int64)
    errors = np.zeros(n_remove)
    err = 0.0
    g_rows = np.zeros((n_remove, n))  # rows: G_{c,:} of the removed channels, in removal order
    for d in range(n_remove):
        ud, gud, idx, gd = u[:d], gu[:d], order[:d], g_rows[:d]
        a_term = np.einsum("dj,dj->j", ud, gud)
        b_term = np.einsum("dj,dj->j", gd, ud)
        delta = (a_term - 2.0 * b_term + g_diag) / np.maximum(s, tiny)
        delta[removed] = np.inf
        c = int(np.argmin(delta))
        err += float(delta[c])
        sc = max(float(s[c]), tiny)
        beta = (q[c, :] - q[c, idx] @ ud) / sc
        uc = ud[:, c].copy()
        guc = gud[:, c].copy()
        g_cd_u = g[c, idx] @ ud
        g_cd_uc = float(g[c, idx] @ uc)
        ud -= uc[:, None] * beta  # rank-1 updates in place
        gud += (gd[:, c] - guc)[:, None] * beta
        u[d] = beta
        gu[d] = g_cd_u - g_cd_uc * beta + g[c, c] * beta
        g_rows[d] = g[c]
        s = s - sc * beta * beta
        removed[c] = True
        order[d] = c
        errors[d] = err
    return order, errors


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


def lower_convex_hull(errors: np.ndarray) -> np.ndarray:
    """Per-step slopes of the lower convex hull of the points ``(k, e(k))``, ``k = 0..K`` with ``e(0) = 0``.

    Args:
        errors: (K,) error after removing 1..K channels (need not be convex or monotone).

    Returns:
        (K,) nondecreasing marginal costs: step k costs ``slope[k-1]``; summing the first k steps gives
        the hull value at k (<= e(k), equal at the hull's vertices).
    """
    e = np.concatenate([[0.0], np.asarray(errors, dtype=np.float64)])
    hull = [0]
    for k in range(1, e.size):  # monotone chain; K is at most a few thousand per layer
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            if (e[j] - e[i]) * (k - i) >= (e[k] - e[i]) * (j - i):
                hull.pop()
            else:
                break
        hull.append(k)
    vertices = np.asarray(hull)
    slopes = np.diff(e[vertices]) / np.diff(vertices)
    return np.repeat(slopes, np.diff(vertices))


def allocate_removals(curves, budget: int) -> np.ndarray:
    """How many channels each layer loses so that the summed error is smallest for `budget` removals.

    Each layer's curve is replaced by its lower convex hull; the `budget` cheapest hull steps over all
    layers are taken (ties: earlier layer, then earlier step). With convex curves this is the exact
    minimiser of ``sum_l e_l(k_l)`` subject to ``sum_l k_l = budget`` (a Lagrangian / water-filling
    argument); otherwise it is exact on the hulls.

    Args:
        curves: list of (K_l,) arrays, error after removing 1..K_l channels of layer l.
        budget: total channels to remove, ``0 <= budget <= sum K_l``.

    Returns:
        (L,) int64 removals per layer.
    """
    slopes = [lower_convex_hull(c) for c in curves]
    total = sum(s.size for s in slopes)
    budget = int(budget)
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} outside [0, {total}]")
    if not slopes:
        return np.zeros(0, dtype=np.int64)
    layer = np.concatenate([np.full(s.size, i, dtype=np.int64) for i, s in enumerate(slopes)])
    taken = np.argsort(np.concatenate(slopes), kind="stable")[:budget]
    return np.bincount(layer[taken], minlength=len(slopes)).astype(np.int64)

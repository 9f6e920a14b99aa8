"""BatchNormalization folding and the BN prior (methods.md sections 1, 2 and 8.1 step 1).

A BatchNormalization after a conv/Gemm computes ``gamma (y - mean) / sigma + beta`` with
``sigma = sqrt(var + eps)``. Folding it into the producer gives ``w' = w * gamma / sigma``
(per output channel) and ``b' = (b - mean) * gamma / sigma + beta``. Over data the BN output
of channel j is modelled as ``z_j ~ N(beta_j, gamma_j^2)`` (the BN prior).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fold_batchnorm", "bn_prior"]


def fold_batchnorm(w, b, gamma, beta, mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """Fold BatchNormalization into the preceding layer's weight and bias.

    Formula: ``sigma = sqrt(var + eps)``, ``w'[o, ...] = w[o, ...] * gamma[o] / sigma[o]``,
    ``b'[o] = (b[o] - mean[o]) * gamma[o] / sigma[o] + beta[o]``.

    Args:
        w: (N, ...) weight with output channels on axis 0 (any trailing dims, e.g. (N, C, kh, kw)).
        b: (N,) bias or None (treated as zeros).
        gamma, beta, mean, var: (N,) BN parameters. eps: scalar.

    Returns:
        (w_folded (N, ...), b_folded (N,)), both with the dtype of ``w`` (computed in float64).
    """
    w = np.asarray(w)
    n = w.shape[0]
    gamma, beta, mean, var = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (gamma, beta, mean, var))
    for name, arr in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    b64 = np.zeros(n) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    if b64.shape != (n,):
        raise ValueError(f"b must have shape ({n},), got {b64.shape}")
    scale = gamma / np.sqrt(var + float(eps))
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64
    # the product is formed in float64 and rounded once into the output's dtype, chunk by chunk inside
    # numpy's loop: no float64 copy of the whole weight
    w_f = np.empty(w.shape, dtype=dtype)
    np.multiply(w, scale.reshape((n,) + (1,) * (w.ndim - 1)), out=w_f, casting="same_kind")
    b_f = (b64 - mean) * scale + beta
    return w_f, b_f.astype(dtype)


def bn_prior(gamma, beta) -> tuple[np.ndarray, np.ndarray]:
    """The BN prior of the BN output: ``z ~ N(beta, gamma^2)``.

    Args:
        gamma, beta: (N,).

    Returns:
        (mu, sigma) = (beta, |gamma|), both (N,) float64.
    """
    gamma = np.asarray(gamma, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma and beta shapes differ: {gamma.shape} vs {beta.shape}")
    return beta.copy(), np.abs(gamma)

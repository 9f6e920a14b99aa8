"""Pointwise activation functions as data.

An :class:`Activation` names one of the pointwise nonlinearities that follow a
BatchNormalization in the CNNs we compress, with the ONNX parameters:

==============  ==============================================================
kind            f(x)
==============  ==============================================================
``identity``    ``x``
``relu``        ``max(0, x)``
``clip``        ``min(hi, max(lo, x))`` (ReLU6: lo=0, hi=6; lo/hi may be +-inf)
``leakyrelu``   ``x if x >= 0 else alpha * x``
``sigmoid``     ``1 / (1 + exp(-x))``
``silu``        ``x * sigmoid(x)`` (Swish)
``hardsigmoid`` ``max(0, min(1, alpha * x + beta))`` (ONNX HardSigmoid; note the
                ONNX default is alpha=0.2, the dataclass default 0.01 is the
                LeakyRelu one: pass alpha explicitly)
``hardswish``   ``x * hardsigmoid(x)`` with the fixed ONNX constants
                alpha=1/6, beta=0.5 (the ``alpha``/``beta`` fields are ignored)
``prelu``       ``x if x >= 0 else slopes[c] * x``: a LeakyRelu slope per channel c
                (ONNX PRelu with a per-channel slope); arrays given to ``apply``
                carry the channels on axis 0
==============  ==============================================================

Every kind except sigmoid/silu is piecewise polynomial of degree <= 2 and
continuous; :meth:`Activation.pieces` returns that description, which the
moment code integrates exactly against a Gaussian. ``prelu`` has different
pieces per channel: the moment code writes it as ``a_c x + (1 - a_c) relu(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Activation", "KINDS", "PIECEWISE_KINDS", "SMOOTH_KINDS", "PER_CHANNEL_KINDS"]

PIECEWISE_KINDS = frozenset({"identity", "relu", "clip", "leakyrelu", "hardsigmoid", "hardswish"})
SMOOTH_KINDS = frozenset({"sigmoid", "silu"})
PER_CHANNEL_KINDS = frozenset({"prelu"})
KINDS = PIECEWISE_KINDS | SMOOTH_KINDS | PER_CHANNEL_KINDS

_HSWISH_ALPHA = 1.0 / 6.0
_HSWISH_BETA = 0.5


@dataclass(frozen=True)
class Activation:
    """A pointwise activation ``f`` (see module docstring for the formulas).

    Attributes:
        kind: one of :data:`KINDS`.
        lo, hi: Clip bounds (``clip`` only), ``lo <= hi``; infinite bounds allowed.
        alpha: LeakyRelu negative slope, or HardSigmoid slope.
        beta: HardSigmoid offset.
        slopes: PRelu negative slope of every channel (``prelu`` only).
    """

    kind: str
    lo: float = 0.0
    hi: float = 6.0
    alpha: float = 0.01
    beta: float = 0.5
    slopes: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.kind == "clip" and not float(self.lo) <= float(self.hi):
            raise ValueError(f"clip needs lo <= hi, got lo={self.lo}, hi={self.hi}")
        for name in ("alpha", "beta"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        if self.kind == "prelu" and (not self.slopes or not np.all(np.isfinite(self.slopes))):
            raise ValueError("prelu needs one finite slope per channel")

    @property
    def channel_slopes(self) -> np.ndarray:
        """(C,) float64 per-channel negative slopes (``prelu``)."""
        return np.asarray(self.slopes, dtype=np.float64)

    def restricted(self, kept: np.ndarray) -> "Activation":
        """The activation of channels `kept` only (itself unless it is per channel)."""
        if self.kind not in PER_CHANNEL_KINDS:
            return self
        return Activation("prelu", slopes=tuple(float(a) for a in self.channel_slopes[kept]))

    @property
    def is_piecewise(self) -> bool:
        """True if ``f`` is piecewise polynomial (exact Gaussian integrals apply)."""
        return self.kind in PIECEWISE_KINDS

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Evaluate ``f(x)`` elementwise; float input keeps its dtype, other input becomes float64."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        k = self.kind
        if k == "identity":
            return x.copy()
        if k == "relu":
            return np.maximum(x, 0).astype(x.dtype)
        if k == "clip":
            return np.clip(x, self.lo, self.hi).astype(x.dtype)
        if k == "leakyrelu":
            return np.where(x >= 0, x, x * self.alpha).astype(x.dtype)
        if k == "prelu":
            a = self.channel_slopes.astype(x.dtype).reshape((-1,) + (1,) * max(x.ndim - 1, 0))
            return np.where(x >= 0, x, x * a).astype(x.dtype)
        if k == "sigmoid":
            return _expit(x).astype(x.dtype)
        if k == "silu":
            return (x * _expit(x)).astype(x.dtype)
        alpha, beta = self._hard_params()
        hs = np.clip(x * alpha + beta, 0.0, 1.0).astype(x.dtype)
        return hs if k == "hardsigmoid" else (x * hs).astype(x.dtype)

    def _hard_params(self) -> tuple[float, float]:
        if self.kind == "hardswish":
            return _HSWISH_ALPHA, _HSWISH_BETA
        return float(self.alpha), float(self.beta)

    def pieces(self) -> tuple[np.ndarray, np.ndarray]:
        """Piecewise-polynomial form of ``f`` (piecewise kinds only).

        Returns:
            breaks: (P-1,) sorted finite break points ``b_1 < ... < b_{P-1}``.
            coefs: (P, 3) rows ``(e0, e1, e2)``: on piece ``p`` (the interval
                ``(b_p, b_{p+1})`` with ``b_0 = -inf``, ``b_P = +inf``)
                ``f(x) = e0 + e1 x + e2 x^2``.
        """
        k = self.kind
        if k == "identity":
            return np.zeros(0), np.array([[0.0, 1.0, 0.0]])
        if k == "relu":
            return np.array([0.0]), np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        if k == "leakyrelu":
            return np.array([0.0]), np.array([[0.0, float(self.alpha), 0.0], [0.0, 1.0, 0.0]])
        if k == "clip":
            lo, hi = float(self.lo), float(self.hi)
            breaks, coefs = [], []
            if np.isfinite(lo):
                breaks.append(lo)
                coefs.append([lo, 0.0, 0.0])
            coefs.append([0.0, 1.0, 0.0])
            if np.isfinite(hi):
                breaks.append(hi)
                coefs.append([hi, 0.0, 0.0])
            if np.isfinite(lo) and np.isfinite(hi) and lo == hi:  # constant function
                return np.zeros(0), np.array([[lo, 0.0, 0.0]])
            return np.array(breaks), np.array(coefs)
        if k in ("hardsigmoid", "hardswish"):
            alpha, beta = self._hard_params()
            if alpha == 0.0:
                c = float(np.clip(beta, 0.0, 1.0))
                row = [c, 0.0, 0.0] if k == "hardsigmoid" else [0.0, c, 0.0]
                return np.zeros(0), np.array([row])
            # hardsigmoid = 0 / alpha*x+beta / 1 (alpha > 0); 1 / ... / 0 (alpha < 0)
            b0, b1 = -beta / alpha, (1.0 - beta) / alpha
            left, right = (0.0, 1.0) if alpha > 0 else (1.0, 0.0)
            if k == "hardsigmoid":
                rows = [[left, 0.0, 0.0], [beta, alpha, 0.0], [right, 0.0, 0.0]]
            else:
                rows = [[0.0, left, 0.0], [0.0, beta, alpha], [0.0, right, 0.0]]
            return np.array(sorted((b0, b1))), np.array(rows)
        raise ValueError(f"activation {k!r} is not piecewise polynomial")


def _expit(x: np.ndarray) -> np.ndarray:
    """Logistic sigmoid ``1 / (1 + exp(-x)) = exp(-log(1 + exp(-x)))``, without overflow for any x."""
    return np.exp(-np.logaddexp(0.0, -x))

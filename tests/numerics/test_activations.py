import numpy as np
import pytest

from onnx_udfc.numerics.activations import KINDS, PER_CHANNEL_KINDS, PIECEWISE_KINDS, Activation

X = np.linspace(-9.0, 9.0, 3601)


def _reference(act: Activation, x):
    sig = 1.0 / (1.0 + np.exp(-x))
    return {
        "identity": x,
        "relu": np.maximum(x, 0.0),
        "clip": np.minimum(np.maximum(x, act.lo), act.hi),
        "leakyrelu": np.where(x >= 0, x, act.alpha * x),
        "sigmoid": sig,
        "silu": x * sig,
        "hardsigmoid": np.maximum(0.0, np.minimum(1.0, act.alpha * x + act.beta)),
        "hardswish": x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0,  # x * relu6(x + 3) / 6
    }[act.kind]


ACTS = [
    Activation("identity"),
    Activation("relu"),
    Activation("clip"),
    Activation("clip", lo=-1.5, hi=2.0),
    Activation("leakyrelu", alpha=0.1),
    Activation("sigmoid"),
    Activation("silu"),
    Activation("hardsigmoid", alpha=0.2, beta=0.5),
    Activation("hardswish"),
]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.kind)
def test_apply_matches_formula(act):
    np.testing.assert_allclose(act.apply(X), _reference(act, X), rtol=1e-12, atol=1e-12)


def test_apply_keeps_float32():
    x = np.linspace(-3, 3, 11).astype(np.float32)
    for kind in KINDS:
        act = Activation(kind, slopes=(0.1,) * x.size) if kind in PER_CHANNEL_KINDS else Activation(kind)
        assert act.apply(x).dtype == np.float32


def test_prelu_applies_one_slope_per_channel_on_axis_0_and_needs_its_slopes():
    act = Activation("prelu", slopes=(0.5, -0.25))
    x = np.array([[-2.0, 1.0, -4.0], [-2.0, 3.0, -4.0]])
    np.testing.assert_array_equal(act.apply(x), [[-1.0, 1.0, -2.0], [0.5, 3.0, 1.0]])
    with pytest.raises(ValueError):
        Activation("prelu")
    with pytest.raises(ValueError):
        Activation("prelu", slopes=(0.1, float("nan")))


def test_invalid_kind_and_bounds():
    with pytest.raises(ValueError):
        Activation("gelu")
    with pytest.raises(ValueError):
        Activation("clip", lo=2.0, hi=1.0)


PIECE_ACTS = ACTS + [
    Activation("clip", lo=-np.inf, hi=1.0),
    Activation("clip", lo=0.0, hi=np.inf),
    Activation("clip", lo=1.0, hi=1.0),
    Activation("hardsigmoid", alpha=-0.3, beta=0.4),
    Activation("hardsigmoid", alpha=0.0, beta=1.7),
    Activation("leakyrelu", alpha=-0.5),
]


@pytest.mark.parametrize("act", [a for a in PIECE_ACTS if a.kind in PIECEWISE_KINDS], ids=lambda a: a.kind)
def test_pieces_reproduce_apply(act):
    breaks, coefs = act.pieces()
    assert np.all(np.diff(breaks) >= 0)
    idx = np.searchsorted(breaks, X)
    e = coefs[idx]
    val = e[:, 0] + e[:, 1] * X + e[:, 2] * X * X
    np.testing.assert_allclose(val, act.apply(X), rtol=1e-12, atol=1e-12)


def test_hardswish_ignores_alpha_beta_fields():
    a = Activation("hardswish", alpha=0.9, beta=0.1)
    np.testing.assert_allclose(a.apply(X), Activation("hardswish").apply(X))

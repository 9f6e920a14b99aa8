import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_udfc.numerics import _rounding
from onnx_udfc.numerics import quantize as quantize_mod
from onnx_udfc.numerics.quantize import QuantSpec, bias_correction, fake_quantize, quantization_grid

SHAPES = [(16, 8, 3, 3), (24, 1, 3, 3), (10, 20), (8, 16, 1, 1), (6, 4, 5)]


def _weights(rng, shape, positive=False, zero_channel=False):
    scale = rng.uniform(0.01, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    if positive:
        w = np.abs(w)
    if zero_channel:
        w[0] = 0.0
    return w


def _levels(bits, symmetric):
    if symmetric:
        n = 2 ** (bits - 1) - 1
        return -n, n
    return 0, 2**bits - 1


def _assert_on_grid(w_q, scale, zp, bits, symmetric):
    n = w_q.shape[0]
    q = w_q.reshape(n, -1).astype(np.float64) / scale[:, None] + zp[:, None]
    assert np.array_equal(q, np.round(q)), "values off the grid"
    qmin, qmax = _levels(bits, symmetric)
    assert q.min() >= qmin and q.max() <= qmax
    rebuilt = (q - zp[:, None]).astype(np.float32) * scale.astype(np.float32)[:, None]
    assert np.array_equal(rebuilt.reshape(w_q.shape), w_q)
    assert np.array_equal(scale.astype(np.float32).astype(np.float64), scale)  # float32-exact
    assert np.all(scale > 0)


def test_grid_asymmetric_and_symmetric_formulas():
    lo, hi = np.array([-1.0, 0.5, -3.0, 0.0]), np.array([3.0, 2.0, -1.0, 0.0])
    scale, zp = quantization_grid(lo, hi, 4, symmetric=False)
    ref = (np.maximum(hi, 0) - np.minimum(lo, 0)) / 15
    assert np.all(scale[:3] <= ref[:3]) and np.all(scale[:3] > ref[:3] * (1 - 2.0**-19))
    assert zp.dtype == np.int64
    np.testing.assert_array_equal(zp, [4, 0, 15, 0])
    assert scale[3] > 0  # all-zero channel
    scale, zp = quantization_grid(lo, hi, 4, symmetric=True)
    np.testing.assert_array_equal(zp, 0)
    ref = np.maximum(np.abs(lo), np.abs(hi)) / 7
    assert np.all(scale[:3] <= ref[:3]) and np.all(scale[:3] > ref[:3] * (1 - 2.0**-19))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip,rounding", [("max", "nearest"), ("mse", "balanced"), ("mse", "nearest"), ("max", "balanced")])
def test_values_on_grid_and_idempotent(shape, symmetric, clip, rounding):
    rng = np.random.default_rng(hash((shape, symmetric, clip, rounding)) % 2**32)
    for bits in (2, 4, 8):
        w = _weights(rng, shape, positive=rng.random() < 0.3, zero_channel=True)
        spec = QuantSpec(bits, symmetric=symmetric, clip=clip, rounding=rounding, clip_steps=20)
        w_q, scale, zp = fake_quantize(w, spec)
        assert w_q.dtype == np.float32 and w_q.shape == w.shape
        _assert_on_grid(w_q, scale, zp, bits, symmetric)
        again, scale2, zp2 = fake_quantize(w_q, QuantSpec(bits, symmetric=symmetric, clip="max", rounding="nearest"))
        assert np.array_equal(again, w_q)
        np.testing.assert_array_equal(scale2, scale)
        np.testing.assert_array_equal(zp2, zp)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 12),
    symmetric=st.booleans(),
    offset=st.floats(-2.0, 2.0),
    spread=st.floats(1e-6, 1e3),
)
def test_idempotence_property(seed, bits, symmetric, offset, spread):
    rng = np.random.default_rng(seed)
    w = ((rng.standard_normal((4, 3, 3, 3)) + offset) * spread).astype(np.float32)
    spec = QuantSpec(bits, symmetric=symmetric, clip="max", rounding="nearest")
    w_q, scale, zp = fake_quantize(w, spec)
    _assert_on_grid(w_q, scale, zp, bits, symmetric)
    assert np.array_equal(fake_quantize(w_q, spec)[0], w_q)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "balanced"])
def test_zero_is_representable_and_exact_zeros_stay(symmetric, rounding):
    rng = np.random.default_rng(4)
    w = _weights(rng, (8, 6, 3, 3))
    w[rng.random(w.shape) < 0.2] = 0.0
    w_q, scale, zp = fake_quantize(w, QuantSpec(4, symmetric=symmetric, rounding=rounding))
    assert np.all(w_q[w == 0.0] == 0.0)
    # level zp is exactly zero
    assert np.all((zp - zp).astype(np.float32) * scale.astype(np.float32) == 0.0)


def _kernel_sums(w, w_q):
    n, c = w.shape[:2]
    return (w.astype(np.float64) - w_q).reshape(n, c, -1).sum(axis=2)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (32, 1, 3, 3), (12, 16, 5, 5)])
def test_balanced_rounding_reduces_error_sums(shape):
    rng = np.random.default_rng(5)
    w = _weights(rng, shape)
    base = dict(bits=4, clip="max", symmetric=False)
    wn, scale, _ = fake_quantize(w, QuantSpec(rounding="nearest", **base))
    wb, scale_b, _ = fake_quantize(w, QuantSpec(rounding="balanced", **base))
    np.testing.assert_array_equal(scale, scale_b)
    kn = np.abs(_kernel_sums(w, wn)) / scale[:, None]
    kb = np.abs(_kernel_sums(w, wb)) / scale[:, None]
    assert kb.mean() < 0.75 * kn.mean()
    assert kb.max() <= 1.5 + 1e-9  # within half a step of zero after stage 1, one flip after stage 2
    on = np.abs(_kernel_sums(w, wn).sum(axis=1)) / scale
    ob = np.abs(_kernel_sums(w, wb).sum(axis=1)) / scale
    assert np.all(ob <= np.maximum(on, 0.5) + 1e-9)
    assert np.mean(ob <= 0.5 + 1e-9) > 0.9
    # each entry moves at most one level away from nearest rounding
    assert np.all(np.abs(wb - wn) <= scale.reshape((-1,) + (1,) * (len(shape) - 1)) * (1 + 1e-6))


def test_balanced_rounding_2d_is_channel_level():
    rng = np.random.default_rng(6)
    w = _weights(rng, (20, 64))
    wn, scale, _ = fake_quantize(w, QuantSpec(3, clip="max", rounding="nearest"))
    wb, _, _ = fake_quantize(w, QuantSpec(3, clip="max", rounding="balanced"))
    en = np.abs((w - wn.astype(np.float64)).sum(axis=1)) / scale
    eb = np.abs((w - wb.astype(np.float64)).sum(axis=1)) / scale
    assert np.all(eb <= 0.5 + 1e-9) and en.mean() > 1.0


def _weighted_err(w, w_q, tw):
    d = (w.astype(np.float64) - w_q) ** 2 * tw
    return d.reshape(w.shape[0], -1).sum(axis=1)


def test_mse_clipping_never_worse_than_max_and_matches_brute_force():
    rng = np.random.default_rng(7)
    w = (rng.laplace(size=(12, 6, 3, 3)) * rng.uniform(0.1, 2, (12, 1, 1, 1))).astype(np.float32)  # heavy tails
    tw = rng.uniform(0.1, 3.0, size=(6, 1, 1))
    for symmetric in (False, True):
        wmax = fake_quantize(w, QuantSpec(4, symmetric, "max", "nearest"))[0]
        spec = QuantSpec(4, symmetric, "mse", "nearest", clip_steps=30, clip_min=0.3)
        wmse = fake_quantize(w, spec, tap_weight=tw)[0]
        e_max, e_mse = _weighted_err(w, wmax, tw), _weighted_err(w, wmse, tw)
        assert np.all(e_mse <= e_max * (1 + 1e-12))
        assert e_mse.sum() < 0.95 * e_max.sum()  # measured ~0.89
        # brute force: quantize each channel alone at every alpha, keep the best
        for o in range(w.shape[0]):
            errs = []
            for alpha in np.linspace(1.0, 0.3, 30):
                lo, hi = alpha * w[o].min(), alpha * w[o].max()
                s, z = quantization_grid(np.array([lo]), np.array([hi]), 4, symmetric)
                qmin, qmax = _levels(4, symmetric)
                r = w[o].astype(np.float64) / s[0] + z[0]
                q = np.clip(np.where(r >= 0, np.floor(r + 0.5), np.ceil(r - 0.5)), qmin, qmax)
                errs.append(np.sum(tw * (w[o] - (q - z[0]) * s[0]) ** 2))
            assert e_mse[o] == pytest.approx(min(errs), rel=1e-9)


def test_error_decreases_with_bits_and_is_deterministic():
    rng = np.random.default_rng(8)
    w = _weights(rng, (16, 8, 3, 3))
    errs = []
    for bits in (2, 3, 4, 6, 8):
        a = fake_quantize(w, QuantSpec(bits))
        b = fake_quantize(w.copy(), QuantSpec(bits))
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
        errs.append(np.mean((w.astype(np.float64) - a[0]) ** 2))
    assert all(e2 < 0.5 * e1 for e1, e2 in zip(errs[:-1], errs[1:]))


def test_quant_spec_validation():
    for bad in (dict(bits=1), dict(bits=4, clip="l2"), dict(bits=4, rounding="stochastic"), dict(bits=4, clip_steps=0)):
        with pytest.raises(ValueError):
            QuantSpec(**bad)
    with pytest.raises(ValueError):
        fake_quantize(np.ones((2, 3), np.float32), QuantSpec(4), tap_weight=-np.ones(3))


def _conv_out(w, x, group):
    """Brute-force grouped conv at one output pixel: w (N, Cg, k, k), x (P, C, k, k) -> (P, N)."""
    n, cg = w.shape[:2]
    out = np.zeros((x.shape[0], n))
    for o in range(n):
        g = o // (n // group)
        out[:, o] = np.einsum("cij,pcij->p", w[o], x[:, g * cg:(g + 1) * cg])
    return out


@pytest.mark.parametrize("group", [1, 2, 8])
def test_bias_correction_matches_expected_output_shift(group):
    rng = np.random.default_rng(9)
    n, c_total, k = 8, 8, 3
    w = _weights(rng, (n, c_total // group, k, k))
    w_q = fake_quantize(w, QuantSpec(3))[0]
    mean = rng.normal(1.0, 1.0, c_total)
    delta = bias_correction(w, w_q, mean, group=group)
    # exact: expected shift with x = mean everywhere
    exact = _conv_out(w.astype(np.float64) - w_q, np.broadcast_to(mean[None, :, None, None], (1, c_total, k, k)), group)[0]
    np.testing.assert_allclose(delta, exact, rtol=1e-12, atol=1e-12)
    # Monte Carlo: average output difference over random inputs with that mean
    x = mean[None, :, None, None] + rng.standard_normal((20_000, c_total, k, k))
    mc = (_conv_out(w.astype(np.float64), x, group) - _conv_out(w_q.astype(np.float64), x, group)).mean(axis=0)
    np.testing.assert_allclose(delta, mc, atol=0.05 * np.abs(w).max())


def test_bias_correction_gemm():
    rng = np.random.default_rng(10)
    w = _weights(rng, (5, 12))
    w_q = fake_quantize(w, QuantSpec(4))[0]
    mean = rng.normal(0, 1, 12)
    np.testing.assert_allclose(bias_correction(w, w_q, mean), (w.astype(np.float64) - w_q) @ mean, rtol=1e-12)


# --- the fast rounding equals the plain formulation (stable argsorts, -inf for forbidden flips) ---


def _plain_round_half_away(x):
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= 0.5)


def _plain_take_top(score, k, axis):
    """First k entries of a stable descending argsort along `axis`, finite scores only."""
    order = np.argsort(-score, axis=axis, kind="stable")
    ranked = np.take_along_axis(score, order, axis=axis)
    shape = [1] * score.ndim
    shape[axis] = -1
    take_sorted = (np.arange(score.shape[axis]).reshape(shape) < np.expand_dims(k, axis)) & np.isfinite(ranked)
    take = np.zeros_like(take_sorted)
    np.put_along_axis(take, order, take_sorted, axis=axis)
    return take


def _plain_balanced_round(r, q, qmin, qmax, lock_lo, lock_hi):
    """The original argsort-based balanced rounding (see onnx_udfc.numerics._rounding)."""
    def scores(e, q, d):
        s = d * e
        target = q + d
        ok = (s > 0) & (target >= qmin) & (target <= qmax)
        ok &= ~((q == qmin) & lock_lo & (d > 0))
        ok &= ~((q == qmax) & lock_hi & (d < 0))
        return np.where(ok, s, -np.inf)

    def n_flips(total):
        return np.maximum(np.ceil(np.abs(total) - 0.5), 0.0)

    q = q.copy()
    lock_lo = np.asarray(lock_lo, dtype=bool)[:, None, None]
    lock_hi = np.asarray(lock_hi, dtype=bool)[:, None, None]
    e = r - q
    ksum = e.sum(axis=2)
    sgn = np.sign(ksum)[:, :, None]
    q += sgn * _plain_take_top(scores(e, q, sgn), n_flips(ksum), axis=2)
    e = r - q
    ksum = e.sum(axis=2)
    osum = ksum.sum(axis=1)
    osgn = np.sign(osum)[:, None, None]
    score = scores(e, q, osgn)
    best_tap = np.argmax(score, axis=2)[:, :, None]
    best = np.take_along_axis(score, best_tap, axis=2)[:, :, 0]
    best = np.where(osgn[:, :, 0] * ksum > 0, best, -np.inf)
    flip = np.zeros(q.shape, dtype=bool)
    np.put_along_axis(flip, best_tap, _plain_take_top(best, n_flips(osum), axis=1)[:, :, None], axis=2)
    return q + osgn * flip


def _tied_levels(rng, shape, qmin, qmax, mode):
    """Positions r and nearest levels q with many exactly equal errors (ties everywhere)."""
    if mode == "quarters":  # errors in {0, +-0.25, +-0.5}, positions beyond the range too
        r = np.round(rng.uniform(qmin - 1.5, qmax + 1.5, shape) * 4) / 4
        return r, np.clip(_plain_round_half_away(r), qmin, qmax)
    if mode == "random":
        r = rng.uniform(qmin - 2, qmax + 2, shape)
        return r, np.clip(_plain_round_half_away(r), qmin, qmax)
    # any integer levels: large errors, several flips per kernel
    q = rng.integers(int(qmin), int(qmax) + 1, shape).astype(np.float64)
    return q + rng.choice([-0.5, -0.375, -0.25, 0.0, 0.25, 0.375, 0.5, 1.25, -2.0], shape), q


def test_round_half_away_matches_plain_formula():
    x = np.r_[np.arange(-6, 6, 0.25), np.nextafter(0.5, 0), -np.nextafter(0.5, 0), 2.5 - 2.0**-51,
              np.random.default_rng(11).normal(0, 50, 1000)]
    for dtype in (np.float64, np.float32):
        got = _rounding.round_half_away(x.astype(dtype))
        assert got.dtype == dtype and np.array_equal(got, _plain_round_half_away(x.astype(dtype)))
    assert np.array_equal(_rounding.round_half_away(np.array([0.5, 1.5, 2.5, -0.5, -2.5])), [1, 2, 3, -1, -3])


def test_top_taps_equals_stable_argsort_selection():
    rng = np.random.default_rng(12)
    for t in (1, 2, 3, 9, 25):
        score = rng.choice([-1.0, 0.0, 0.125, 0.25, 0.375, 0.5], size=(400, t))  # many ties, <= 0 forbidden
        score += (rng.random(score.shape) < 0.2) * rng.random(score.shape)  # some distinct values too
        k = rng.integers(0, t + 2, 400).astype(float)
        plain = _plain_take_top(np.where(score > 0, score, -np.inf), k, axis=1)
        assert np.array_equal(_rounding._top_taps(score, k), plain)


@pytest.mark.parametrize("c", [1, 2, 7, 64, 300])
def test_top_kernels_equals_stable_argsort_selection(c):
    rng = np.random.default_rng(13 + c)
    best = rng.choice([0.0, -0.5, 0.1, 0.2, 0.3, 0.4], size=(50, c)) + (rng.random((50, c)) < 0.5) * rng.random((50, c))
    best[:5] = 0.25  # whole rows tied
    k = rng.integers(1, c + 3, 50).astype(float)
    rows, cols = _rounding._top_kernels(best, k)
    got = np.zeros(best.shape, dtype=bool)
    got[rows, cols] = True
    assert rows.size == np.count_nonzero(got)  # no duplicates
    assert np.array_equal(got, _plain_take_top(np.where(best > 0, best, -np.inf), k, axis=1))


@pytest.mark.parametrize("t", [1, 2, 4, 9, 25])
@pytest.mark.parametrize("mode", ["quarters", "random", "levels"])
def test_balanced_round_equals_plain_formulation(t, mode):
    rng = np.random.default_rng(hash((t, mode)) % 2**32)
    for trial in range(12):
        n, c = int(rng.integers(1, 9)), int(rng.integers(1, 40))
        qmin, qmax = (0.0, float(2 ** rng.integers(1, 7) - 1)) if trial % 2 else (-3.0, 3.0)
        r, q = _tied_levels(rng, (n, c, t), qmin, qmax, mode)
        lock_lo, lock_hi = rng.random(n) < 0.7, rng.random(n) < 0.7
        expected = _plain_balanced_round(r, q, qmin, qmax, lock_lo, lock_hi)
        got = _rounding.balanced_round(r, q, qmin, qmax, lock_lo, lock_hi)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        got_f = _rounding.balanced_round(np.asfortranarray(r), q, qmin, qmax, lock_lo, lock_hi)
        assert np.array_equal(got_f, expected)


def _plain_fake_quantize_max(w, bits, symmetric, balanced):
    """fake_quantize with clip="max" written plainly (no row blocks, plain rounding)."""
    n = w.shape[0]
    w2 = w.reshape(n, -1).astype(np.float64)
    scale, zp = quantization_grid(w2.min(axis=1), w2.max(axis=1), bits, symmetric)
    qmin, qmax = _levels(bits, symmetric)
    r = w2 / scale[:, None] + zp[:, None]
    q = np.clip(_plain_round_half_away(r), qmin, qmax)
    if balanced:
        shape3 = (n, w.shape[1] if w.ndim >= 2 else 1, -1)
        q = _plain_balanced_round(r.reshape(shape3), q.reshape(shape3), qmin, qmax,
                                  (qmin - zp) != 0, (qmax - zp) != 0).reshape(n, -1)
    w_q = (q - zp[:, None]).astype(np.float32) * scale.astype(np.float32)[:, None] + np.float32(0.0)
    return w_q.reshape(w.shape), scale, zp


def _awkward_weights(rng, shape, kind):
    w = _weights(rng, shape)
    n = shape[0]
    if kind == "dup":
        w = np.round(w * 4) / 4  # duplicated values, exact zeros
    elif kind == "ties":  # values exactly half-way between levels of a 3-bit grid with scale 1/16
        flat = w.reshape(n, -1)
        z = rng.integers(0, 8, n)
        flat[:] = (np.clip(rng.integers(-8, 8, flat.shape), -z[:, None], 7 - z[:, None])
                   + rng.choice([0.0, 0.5], flat.shape)) / 16
        flat[:, 0], flat[:, -1] = -z / 16, (7 - z) / 16
    elif kind == "flat":
        w[0] = 0.0
        w[min(1, n - 1)] = 0.375  # constant channel
    return w.astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 16, 3, 3), (24, 1, 3, 3), (33, 70), (16, 8, 1, 1), (5, 3, 1, 7), (1, 1, 1, 1)])
@pytest.mark.parametrize("kind", ["normal", "dup", "ties", "flat"])
def test_fake_quantize_equals_plain_formulation(shape, kind, monkeypatch):
    monkeypatch.setattr(quantize_mod, "ROUND_BLOCK", 200)  # many row blocks
    rng = np.random.default_rng(hash((shape, kind)) % 2**32)
    w = _awkward_weights(rng, shape, kind)
    for bits in (3, 4, 6, 8) if kind != "ties" else (3,):
        for symmetric in (False, True):
            for balanced in (False, True):
                spec = QuantSpec(bits, symmetric, clip="max", rounding="balanced" if balanced else "nearest")
                got = fake_quantize(w, spec)
                expected = _plain_fake_quantize_max(w, bits, symmetric, balanced)
                for a, b in zip(got, expected):
                    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_clipping_search_does_not_depend_on_blocks(monkeypatch):
    rng = np.random.default_rng(14)
    w = (rng.laplace(size=(37, 12, 3, 3)) * rng.uniform(0.1, 2, (37, 1, 1, 1))).astype(np.float32)
    tw = rng.uniform(0.0, 2.0, size=(12, 1, 1))
    for spec in (QuantSpec(4), QuantSpec(6, symmetric=True, clip_steps=33), QuantSpec(2, clip_min=0.5)):
        base = fake_quantize(w, spec, tap_weight=tw)
        monkeypatch.setattr(quantize_mod, "SEARCH_BLOCK", 300)
        monkeypatch.setattr(quantize_mod, "ROUND_BLOCK", 250)
        small = fake_quantize(w, spec, tap_weight=tw)
        monkeypatch.undo()
        for a, b in zip(base, small):
            assert np.array_equal(a, b)
    # the errors of a subset of channels are those of the full computation
    w2 = w.reshape(37, -1)
    lo, hi = w2.min(axis=1).astype(np.float64), w2.max(axis=1).astype(np.float64)
    alpha = rng.uniform(0.3, 1.0, 37)
    tw32 = np.broadcast_to(tw, w.shape[1:]).reshape(-1).astype(np.float32)
    full = quantize_mod._clip_error(w2, lo, hi, tw32, alpha, QuantSpec(4), np.empty_like(w2))
    rows = np.flatnonzero(rng.random(37) < 0.4)
    part = quantize_mod._clip_error(w2, lo, hi, tw32, alpha, QuantSpec(4), np.zeros_like(w2), rows)
    assert np.array_equal(part[rows], full[rows])

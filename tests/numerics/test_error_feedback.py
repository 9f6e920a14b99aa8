"""Error-feedback (GPTQ-like) rounding through a Kronecker input covariance."""
import numpy as np
import pytest

from onnx_udfc.numerics._error_feedback import DAMP, error_feedback_levels, refit_scales, upper_inverse_cholesky
from onnx_udfc.numerics.quantize import QuantSpec, fake_quantize, uses_error_feedback
from onnx_udfc.stats.propagate import spatial_correlation


def correlated_covariance(c, seed, strength=3.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((c, 2)) * strength
    return a @ a.T + np.diag(rng.uniform(0.2, 2.0, c))


def damped(cov, damp=DAMP):
    return cov + damp * np.mean(np.diag(cov)) * np.eye(cov.shape[0])


def dense_reference(w2, scale, zp, cov, tap_corr):
    """Plain GPTQ on the full (C*T, C*T) matrix: every remaining column updated after every step."""
    t = tap_corr.shape[0]
    order = np.argsort(-np.diag(cov), kind="stable")
    columns = (order[:, None] * t + np.arange(t)[None, :]).ravel()
    h = np.kron(damped(cov)[np.ix_(order, order)], tap_corr)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    w = np.array(w2, np.float64)[:, columns]
    q = np.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = np.rint(w[:, j] / scale + zp)
        err = (w[:, j] - (q[:, j] - zp) * scale) / u[j, j]
        w[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    out = np.empty_like(q)
    out[:, columns] = q
    return out


def test_upper_inverse_cholesky():
    cov = correlated_covariance(7, seed=1)
    u = upper_inverse_cholesky(cov)
    assert np.allclose(u, np.triu(u))
    assert np.allclose(u.T @ u, np.linalg.inv(damped(cov)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("taps", [1, 4, 9])
def test_blocked_kronecker_equals_dense_reference(taps, monkeypatch):
    """Deferred block updates through kron(U_C, U_T) equal the plain column-by-column algorithm."""
    import onnx_udfc.numerics._error_feedback as ef

    monkeypatch.setattr(ef, "BLOCK_COLUMNS", 10)  # several blocks, some of them cut inside a channel's taps
    rng = np.random.default_rng(taps)
    c, n = 13, 6
    cov = correlated_covariance(c, seed=taps)
    side = int(np.sqrt(taps))
    tap_corr = spatial_correlation(side, taps // side) if taps > 1 else np.ones((1, 1))
    w2 = rng.standard_normal((n, c * taps))
    scale, zp = np.full(n, 0.05), np.zeros(n)
    levels = error_feedback_levels(w2, scale, zp, -1e6, 1e6, cov, tap_corr)  # range wide: nothing locked
    assert np.array_equal(levels, dense_reference(w2, scale, zp, cov, tap_corr))


def expected_error(w, wq, cov, tap_corr):
    d = (np.asarray(w, np.float64) - wq).reshape(w.shape[0], -1)
    h = np.kron(cov, tap_corr)
    return float(np.einsum("od,de,oe->", d, h, d))


@pytest.mark.parametrize("shape", [(32, 24), (16, 12, 3, 3)])
def test_error_feedback_lowers_the_covariance_weighted_error(shape):
    rng = np.random.default_rng(7)
    w = rng.standard_normal(shape).astype(np.float32)
    cov = correlated_covariance(shape[1], seed=3)
    tap_corr = spatial_correlation(3, 3) if len(shape) == 4 else np.ones((1, 1))
    spec = QuantSpec(bits=4)
    ef, _, _ = fake_quantize(w, spec, input_covariance=cov, tap_correlation=tap_corr if len(shape) == 4 else None)
    balanced, _, _ = fake_quantize(w, QuantSpec(bits=4, rounding="balanced"))
    nearest, _, _ = fake_quantize(w, QuantSpec(bits=4, rounding="nearest"))
    assert expected_error(w, ef, cov, tap_corr) < 0.7 * min(expected_error(w, balanced, cov, tap_corr),
                                                            expected_error(w, nearest, cov, tap_corr))


@pytest.mark.parametrize("taps", [1, 9])
def test_refitted_scale_is_the_least_squares_scale_of_the_levels(taps):
    """Per row, the refitted scale minimises (w - s u)^T H (w - s u) over s (u = q - zp, H = Sigma kron R),
    checked against the dense H and a scan of scales, in row blocks smaller than the layer."""
    rng = np.random.default_rng(taps + 20)
    c, n = 10, 7
    cov = correlated_covariance(c, seed=taps)
    tap_corr = spatial_correlation(3, 3) if taps == 9 else np.ones((1, 1))
    w2 = rng.standard_normal((n, c * taps))
    scale, zp = np.full(n, 0.3), np.full(n, 7.0)
    levels = error_feedback_levels(w2, scale, zp, 0.0, 15.0, cov, tap_corr)
    fitted = refit_scales(w2, levels, scale, zp, cov, tap_corr, block_rows=3)
    h = np.kron(cov, tap_corr)
    u = levels - zp[:, None]
    assert np.allclose(fitted, np.einsum("od,de,oe->o", u, h, w2) / np.einsum("od,de,oe->o", u, h, u), rtol=1e-12)

    def error(s):
        d = w2 - s[:, None] * u
        return np.einsum("od,de,oe->o", d, h, d)

    assert np.all(error(fitted) <= error(scale) + 1e-12)
    for factor in np.linspace(0.8, 1.2, 41):
        assert np.all(error(fitted) <= error(fitted * factor) + 1e-12)


def test_refit_keeps_the_scale_where_the_levels_say_nothing():
    """A row of zero levels (all at the zero point) has no scale to fit: it keeps its own."""
    cov = correlated_covariance(4, seed=2)
    w2 = np.zeros((2, 4))
    levels = np.full((2, 4), 3.0)
    fitted = refit_scales(w2, levels, np.array([0.5, 0.25]), np.array([3, 3]), cov, np.ones((1, 1)))
    assert np.array_equal(fitted, [0.5, 0.25])


def test_error_feedback_keeps_the_grid_and_is_idempotent():
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((20, 16, 1, 1)) + 0.3).astype(np.float32)
    cov = correlated_covariance(16, seed=5)
    for bits in (3, 4, 6):
        wq, scale, zp = fake_quantize(w, QuantSpec(bits=bits), input_covariance=cov)
        levels = np.rint(wq.reshape(20, -1) / scale[:, None] + zp[:, None])
        assert np.allclose(wq.reshape(20, -1), (levels - zp[:, None]) * scale[:, None], atol=0)
        again, scale2, zp2 = fake_quantize(wq, QuantSpec(bits=bits, clip="max", rounding="nearest"))
        assert np.array_equal(again, wq)
        assert np.array_equal(scale2, scale) and np.array_equal(zp2, zp)


def test_when_error_feedback_applies():
    spec = QuantSpec(bits=4)
    cov = np.eye(8)
    assert uses_error_feedback((4, 8, 3, 3), spec, cov)
    assert uses_error_feedback((4, 8), spec, cov)
    assert not uses_error_feedback((4, 8, 3, 3), spec, None)
    assert not uses_error_feedback((4, 8, 3, 3), spec, np.eye(7))
    assert not uses_error_feedback((4, 8), QuantSpec(bits=4, rounding="balanced"), cov)
    assert not uses_error_feedback((4, 1024, 3, 3), spec, np.eye(1024))  # 9216 columns: too wide

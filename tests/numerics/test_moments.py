import warnings
from math import lgamma

import numpy as np
import pytest
from numpy.polynomial.hermite_e import HermiteE
from scipy import integrate, special

from onnx_udfc.numerics.activations import Activation
from onnx_udfc.numerics.moments import (_row_blocks, _store_lower_block, activation_covariance,
                                        gaussian_activation_moments, gaussian_slope_power, hermite_coefficients,
                                        lagged_activation_covariance, tapped_activation_covariance)

ACTS = [
    Activation("identity"),
    Activation("relu"),
    Activation("clip", lo=0.0, hi=6.0),
    Activation("leakyrelu", alpha=0.1),
    Activation("sigmoid"),
    Activation("silu"),
    Activation("hardsigmoid", alpha=0.2, beta=0.5),
    Activation("hardswish"),
]
IDS = [a.kind for a in ACTS]
MU = np.array([-2.0, -0.5, 0.0, 0.7, 3.0, 8.0, 1.0, -4.0])
SIGMA = np.array([0.5, 1.0, 2.0, 1.5, 2.0, 1.0, 10.0, 0.05])


def _quad(fun, mu, s):
    """E[fun(mu + s xi)] by adaptive quadrature split at every kink of our activations."""
    kinks = [0.0, 6.0, -3.0, 3.0, -2.5, 2.5]
    pts = sorted({float(np.clip((k - mu) / s, -12, 12)) for k in kinks})
    dens = lambda t: fun(mu + s * t) * np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    edges = [-12.0] + pts + [12.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)  # roundoff near 1e-13 is fine
        return sum(integrate.quad(dens, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0] for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_moments_match_quadrature(act):
    mean, var = gaussian_activation_moments(MU, SIGMA, act)
    f = lambda x: act.apply(np.asarray(x, dtype=np.float64))
    for i in range(MU.size):
        m_ref = _quad(f, MU[i], SIGMA[i])
        v_ref = _quad(lambda x: (f(x) - m_ref) ** 2, MU[i], SIGMA[i])
        assert mean[i] == pytest.approx(m_ref, rel=1e-7, abs=1e-10)
        assert var[i] == pytest.approx(v_ref, rel=1e-6, abs=1e-12)


PRELU = Activation("prelu", slopes=tuple(np.linspace(-0.5, 0.5, MU.size)))


def _channel_function(act, i):
    """f of channel i as a function of float64 arrays (PRelu with its own slope)."""
    if act.kind == "prelu":
        a = act.channel_slopes[i]
        return lambda x: np.where(np.asarray(x) > 0, x, a * np.asarray(x))
    return lambda x: act.apply(np.asarray(x, dtype=np.float64))


@pytest.mark.parametrize("act", ACTS + [PRELU], ids=IDS + ["prelu"])
def test_slope_power_matches_quadrature_and_the_error_gain(act):
    """E[f'(u)^2] against quadrature of the squared slope, and against what it stands for: the mean square
    change of f(u) under a small independent error e, divided by E[e^2] (Monte Carlo)."""
    power = gaussian_slope_power(MU, SIGMA, act)
    rng = np.random.default_rng(5)
    h = 1e-6
    for i in range(MU.size):
        f = _channel_function(act, i)
        ref = _quad(lambda x: ((f(x + h) - f(x - h)) / (2.0 * h)) ** 2, MU[i], SIGMA[i])
        assert power[i] == pytest.approx(ref, rel=1e-5, abs=1e-9), i
        u = MU[i] + SIGMA[i] * rng.standard_normal(200_000)
        e = 1e-3 * SIGMA[i] * rng.standard_normal(u.size)
        gain = np.mean((f(u + e) - f(u)) ** 2) / np.mean(e ** 2)
        assert power[i] == pytest.approx(gain, rel=0.03, abs=2e-3), i
    # a point mass: the squared slope at the mean
    np.testing.assert_allclose(gaussian_slope_power(np.array([1.0, -1.0]), np.zeros(2), Activation("relu")), [1.0, 0.0])


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_moments_match_monte_carlo(act):
    rng = np.random.default_rng(12)
    xi = rng.standard_normal(400_000)
    mean, var = gaussian_activation_moments(MU, SIGMA, act)
    for i in range(MU.size):
        a = act.apply(MU[i] + SIGMA[i] * xi)
        se = np.sqrt(a.var() / xi.size) + 1e-8  # rare events are the quadrature test's job
        assert abs(mean[i] - a.mean()) < 5 * se
        d2 = (a - a.mean()) ** 2
        se_var = np.sqrt(d2.var() / xi.size) + 1e-9
        assert abs(var[i] - a.var()) < 5 * se_var


def test_relu_and_clip_closed_forms_of_methods_md():
    mu, s = MU, SIGMA
    t = mu / s
    phi = np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    Phi = special.ndtr(t)
    m, v = gaussian_activation_moments(mu, s, Activation("relu"))
    np.testing.assert_allclose(m, mu * Phi + s * phi, rtol=1e-12, atol=1e-300)
    second = (mu**2 + s**2) * Phi + mu * s * phi
    np.testing.assert_allclose(v, second - m**2, rtol=1e-9, atol=1e-12)
    lo, hi = 0.0, 6.0
    al, be = (lo - mu) / s, (hi - mu) / s
    n = lambda x: np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
    e_clip = lo * special.ndtr(al) + mu * (special.ndtr(be) - special.ndtr(al)) + s * (n(al) - n(be)) + hi * (1 - special.ndtr(be))
    m, _ = gaussian_activation_moments(mu, s, Activation("clip", lo=lo, hi=hi))
    np.testing.assert_allclose(m, e_clip, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_zero_sigma_is_degenerate(act):
    mu = np.array([-1.0, 0.0, 2.5, 7.0])
    mean, var = gaussian_activation_moments(mu, np.zeros(4), act)
    np.testing.assert_array_equal(mean, act.apply(mu))
    np.testing.assert_array_equal(var, 0.0)
    c = hermite_coefficients(mu, np.zeros(4), act, 5)
    np.testing.assert_array_equal(c[:, 0], act.apply(mu))
    np.testing.assert_array_equal(c[:, 1:], 0.0)


def test_extreme_tails_are_finite_and_accurate():
    act = Activation("relu")
    mu = np.array([-30.0, 30.0, -1e3, 1e3])
    m, v = gaussian_activation_moments(mu, np.ones(4), act)
    assert np.all(np.isfinite(m)) and np.all(np.isfinite(v))
    np.testing.assert_allclose(m[[1, 3]], mu[[1, 3]], rtol=1e-12)
    np.testing.assert_allclose(v[[1, 3]], 1.0, rtol=1e-9)
    assert 0.0 <= m[0] < 1e-100 and 0.0 <= v[0] < 1e-100
    # sigmoid of a wide Gaussian is nearly a step: quadrature must still be accurate
    m, v = gaussian_activation_moments(np.array([1.0]), np.array([300.0]), Activation("sigmoid"))
    ref = _quad(special.expit, 1.0, 300.0)
    assert m[0] == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_hermite_coefficients_match_quadrature(act):
    order = 10
    c = hermite_coefficients(MU, SIGMA, act, order)
    assert c.shape == (MU.size, order + 1)
    f = lambda x: act.apply(np.asarray(x, dtype=np.float64))
    for i in [0, 2, 3, 4, 6]:
        for k in range(order + 1):
            he = HermiteE.basis(k)
            ref = _quad(lambda x, i=i: f(x) * he((x - MU[i]) / SIGMA[i]), MU[i], SIGMA[i])
            assert c[i, k] == pytest.approx(ref, rel=1e-7, abs=1e-8 * np.sqrt(float(np.prod(range(1, k + 1)))))


def test_hermite_first_coefficient_is_stein():
    # c_1 = s E[f'(u)]; for relu: s Phi(mu/s)
    c = hermite_coefficients(MU, SIGMA, Activation("relu"), 1)
    np.testing.assert_allclose(c[:, 1], SIGMA * special.ndtr(MU / SIGMA), rtol=1e-12)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
def test_hermite_parseval(act):
    # Var f = sum_k c_k^2 / k!  (k >= 1): the series converges to the exact variance
    order = 100
    c = hermite_coefficients(MU[:5], SIGMA[:5], act, order)
    fact = np.exp(special.gammaln(np.arange(order + 1) + 1.0))
    series = np.sum(c[:, 1:] ** 2 / fact[1:], axis=1)
    _, var = gaussian_activation_moments(MU[:5], SIGMA[:5], act)
    assert np.all(series <= var * (1 + 1e-9) + 1e-14)
    np.testing.assert_allclose(series, var, rtol=5e-3)


def _random_corr(rng, n, max_corr):
    """Valid correlation matrix with corr[0, 1] = max_corr, corr[2, 3] = -0.6, others random."""
    b = np.zeros((n, n + 2))
    b[0, 0] = 1.0
    b[1, 0], b[1, 1] = max_corr, np.sqrt(1 - max_corr**2)
    b[2, 2] = 1.0
    b[3, 2], b[3, 3] = -0.6, 0.8
    for i in range(4, n):
        v = rng.standard_normal(n + 2)
        b[i] = v / np.linalg.norm(v)
    return b @ b.T


MC_ACTS = [Activation("relu"), Activation("clip", lo=0.0, hi=6.0), Activation("leakyrelu", alpha=0.1),
           Activation("identity"), Activation("silu")]


@pytest.mark.parametrize("act", MC_ACTS, ids=[a.kind for a in MC_ACTS])
def test_activation_covariance_matches_monte_carlo(act):
    rng = np.random.default_rng(3)
    n = 5
    corr = _random_corr(rng, n, 0.95)
    mu = np.array([0.5, 1.0, -0.3, 2.0, 4.0])
    sigma = np.array([1.5, 2.0, 1.0, 2.5, 3.0])
    cov = activation_covariance(mu, sigma, corr, act)
    assert np.allclose(cov, cov.T)
    np.testing.assert_allclose(np.diag(cov), gaussian_activation_moments(mu, sigma, act)[1], rtol=1e-13)
    z = mu + rng.multivariate_normal(np.zeros(n), corr * np.outer(sigma, sigma), size=200_000, method="cholesky")
    mc = np.cov(act.apply(z), rowvar=False)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(np.diag(mc), np.diag(cov), rtol=0.02)
    err = np.abs(mc - cov) / np.outer(sd, sd)
    assert err.max() < 0.01, err


def _exact_pair_cov(mu, s, r, act):
    """Cov(f(z1), f(z2)) by conditioning: E[f(z1) E[f(z2) | z1]] on a fine grid (independent of Mehler)."""
    xs = np.linspace(-9, 9, 40001)
    w = np.exp(-0.5 * xs**2) / np.sqrt(2 * np.pi) * (xs[1] - xs[0])
    inner, _ = gaussian_activation_moments(mu[1] + s[1] * r * xs, np.full_like(xs, s[1] * np.sqrt(1 - r * r)), act)
    m, _ = gaussian_activation_moments(mu, s, act)
    return np.sum(w * act.apply(mu[0] + s[0] * xs) * inner) - m[0] * m[1]


@pytest.mark.parametrize("r", [0.5, 0.9, 0.99, -0.95])
def test_mehler_order16_accuracy_for_relu6_near_one(r):
    act = Activation("clip", lo=0.0, hi=6.0)
    for mu, s in [((3.0, 3.0), (2.0, 2.0)), ((0.0, 0.0), (1.0, 1.0)), ((5.0, -1.0), (2.0, 2.0))]:
        mu, s = np.array(mu), np.array(s)
        v = gaussian_activation_moments(mu, s, act)[1]
        cov = activation_covariance(mu, s, np.array([[1.0, r], [r, 1.0]]), act, order=16)
        exact = _exact_pair_cov(mu, s, r, act)
        assert abs(cov[0, 1] - exact) / np.sqrt(v[0] * v[1]) < 2e-3


def test_identity_covariance_is_exact():
    rng = np.random.default_rng(0)
    corr = _random_corr(rng, 5, 0.9)
    sigma = rng.uniform(0.5, 2, 5)
    cov = activation_covariance(rng.standard_normal(5), sigma, corr, Activation("identity"))
    np.testing.assert_allclose(cov, corr * np.outer(sigma, sigma), rtol=1e-12, atol=1e-14)


def test_lagged_covariance_slices():
    rng = np.random.default_rng(1)
    corr = _random_corr(rng, 4, 0.8)
    mu, sigma = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    act = Activation("clip", lo=0.0, hi=6.0)
    factors = np.array([1.0, 0.5, 0.25, 0.0])
    lag = lagged_activation_covariance(mu, sigma, corr, act, factors)
    assert lag.shape == (4, 4, 4)
    np.testing.assert_allclose(lag[0], activation_covariance(mu, sigma, corr, act), rtol=1e-13)
    np.testing.assert_array_equal(lag[3], 0.0)
    for l_idx in (1, 2):
        scaled = corr * factors[l_idx]
        np.fill_diagonal(scaled, 1.0)
        ref = activation_covariance(mu, sigma, scaled, act)
        off = ~np.eye(4, dtype=bool)
        np.testing.assert_allclose(lag[l_idx][off], ref[off], rtol=1e-12, atol=1e-15)
        assert np.all(np.diag(lag[l_idx]) < np.diag(lag[0]))  # partly correlated with itself


def test_lagged_covariance_monte_carlo_same_channel():
    # the same channel at two pixels with pre-activation correlation 0.5
    rng = np.random.default_rng(5)
    act = Activation("relu")
    mu, s, f = np.array([0.3]), np.array([1.2]), 0.5
    lag = lagged_activation_covariance(mu, s, np.ones((1, 1)), act, np.array([f]))[0, 0, 0]
    z = rng.multivariate_normal([0, 0], [[1, f], [f, 1]], size=300_000) * s[0] + mu[0]
    a = act.apply(z)
    mc = np.cov(a[:, 0], a[:, 1])[0, 1]
    assert lag == pytest.approx(mc, abs=0.01 * a.var())


@pytest.mark.parametrize("kind", ["relu", "clip", "leakyrelu"])
def test_scaled_copy_covariance_is_exact(kind):
    """z_2 = 2 z_1 (correlation 1): Cov(f(z_1), f(z_2)) = 2 Var f(z_1) for positively homogeneous f,
    and for any f the series tail makes Cov equal to sqrt(Var_1 Var_2) when f(z_2) is a multiple of f(z_1)."""
    act = Activation(kind) if kind != "clip" else Activation("clip", lo=0.0, hi=np.inf)
    mu, sigma = np.array([0.3, 0.6]), np.array([1.0, 2.0])
    cov = activation_covariance(mu, sigma, np.ones((2, 2)), act)
    np.testing.assert_allclose(cov[0, 1], 2 * cov[0, 0], rtol=1e-10)


# --- blocked Horner evaluation against the series written out term by term ---------------------------------------

SERIES_ACTS = [Activation("clip", lo=0.0, hi=6.0), Activation("relu"), Activation("silu"), Activation("hardswish"),
               Activation("identity")]


def _messy_corr(rng, n):
    """A correlation matrix from Gaussian factors with an exact +-1 pair, then made slightly asymmetric and
    pushed outside [-1, 1] (the functions symmetrise and clip)."""
    f = rng.standard_normal((n, n + 2))
    if n >= 4:
        f[1], f[3] = f[0], -f[2]
    c = f @ f.T
    d = np.sqrt(np.diag(c))
    c = c / np.outer(d, d)
    return 1.001 * c + 1e-4 * rng.standard_normal((n, n))


def _series_inputs(rng, n):
    mu = rng.normal(0.5, 1.0, n)
    sigma = rng.uniform(0.5, 2.0, n)
    sigma[:: 7] = 0.0  # degenerate channels
    return mu, sigma, _messy_corr(rng, n)


def _direct_series(mu, sigma, act, order):
    """Normalised coefficients chat (N, order+1), exact variances and tail rows, from the public functions."""
    c = hermite_coefficients(mu, sigma, act, order)
    chat = c / np.exp(0.5 * np.array([lgamma(k + 1.0) for k in range(order + 1)]))[None, :]
    var = gaussian_activation_moments(mu, sigma, act)[1]
    missing = np.sqrt(np.maximum(var - np.sum(chat[:, 1:] ** 2, axis=1), 0.0))
    last = chat[:, max(1, order - 3):]
    norms = np.linalg.norm(last, axis=1)
    unit = np.divide(last, norms[:, None], out=np.zeros_like(last), where=norms[:, None] > 0)
    return chat, var, missing[:, None] * unit


@pytest.mark.parametrize("n", [1, 2, 9, 300])
@pytest.mark.parametrize("order", [0, 1, 2, 16])
def test_lagged_covariance_horner_matches_direct_sum(n, order):
    rng = np.random.default_rng(100 + n + order)
    mu, sigma, corr = _series_inputs(rng, n)
    r = np.clip(0.5 * (corr + corr.T), -1.0, 1.0)
    factors = np.array([1.0, 0.5, 0.0, -0.3])
    for act in SERIES_ACTS:
        chat, var, tail = _direct_series(mu, sigma, act, order)
        lag = lagged_activation_covariance(mu, sigma, corr, act, factors, order=order)
        for l_idx, f in enumerate(factors):
            ref = sum(np.outer(chat[:, k], chat[:, k]) * (f * r) ** k for k in range(1, order + 1))
            ref = ref + (tail @ tail.T) * (f * r) ** (order + 1)
            if f == 1.0:
                np.fill_diagonal(ref, var)
            np.testing.assert_allclose(lag[l_idx], ref, rtol=0, atol=1e-13 * max(1.0, np.abs(ref).max()))
            np.testing.assert_array_equal(lag[l_idx], lag[l_idx].T)  # exactly symmetric
        np.testing.assert_array_equal(np.diag(lag[0]), var)  # exact variance at factor 1
        np.testing.assert_array_equal(lag[2], 0.0)  # factor 0: exactly zero
        np.testing.assert_array_equal(activation_covariance(mu, sigma, corr, act, order=order), lag[0])


@pytest.mark.parametrize("n", [1, 5, 200])
def test_tapped_covariance_horner_matches_direct_sum(n):
    rng = np.random.default_rng(7 + n)
    mu, sigma, corr = _series_inputs(rng, n)
    r = np.clip(0.5 * (corr + corr.T), -1.0, 1.0)
    taps = rng.standard_normal((n, 4))
    tap_corr = rng.uniform(-0.9, 0.9, (4, 4))  # not symmetric: the result is the symmetric part
    tap_corr[0, 0] = tap_corr[2, 2] = tap_corr[1, 3] = 1.0
    order = 16
    for act in SERIES_ACTS[:3]:
        chat, var, tail = _direct_series(mu, sigma, act, order)
        ref = np.zeros((n, n))
        for k in range(1, order + 1):
            scaled = chat[:, k:k + 1] * taps
            ref += ((scaled @ tap_corr ** k) @ scaled.T) * r ** k
        ref += ((taps @ tap_corr ** (order + 1)) @ taps.T) * (tail @ tail.T) * r ** (order + 1)
        same = (tap_corr == 1.0).astype(np.float64)
        series_diag = np.sum(chat[:, 1:] ** 2, axis=1) + np.sum(tail ** 2, axis=1)
        ref[np.arange(n), np.arange(n)] += np.einsum("it,ts,is->i", taps, same, taps) * (var - series_diag)
        ref = 0.5 * (ref + ref.T)
        cov = tapped_activation_covariance(mu, sigma, corr, act, taps, tap_corr, order=order)
        np.testing.assert_allclose(cov, ref, rtol=0, atol=1e-13 * max(1.0, np.abs(ref).max()))
        np.testing.assert_array_equal(cov, cov.T)


@pytest.mark.parametrize("n", [0, 1, 16, 129, 1000])
def test_row_blocks_and_lower_block_store(n):
    blocks = _row_blocks(n)
    covered = [i for r0, r1 in blocks for i in range(r0, r1)]
    assert covered == list(range(n)) and all(r1 > r0 for r0, r1 in blocks)  # consecutive, non-empty, 0..n
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n))
    out = np.full((n, n), np.nan)
    for r0, r1 in blocks:
        _store_lower_block(out, x[r0:r1, :r1].copy(), r0, r1)
    low = np.tril(np.ones((n, n), dtype=bool))
    sym = 0.5 * (x + x.T)
    same_block = np.zeros((n, n), dtype=bool)
    for r0, r1 in blocks:
        same_block[r0:r1, r0:r1] = True
    np.testing.assert_array_equal(out[low & ~same_block], x[low & ~same_block])  # lower part stored as is
    np.testing.assert_array_equal(out[same_block], sym[same_block])  # diagonal blocks symmetrised
    np.testing.assert_array_equal(out, out.T)


def test_prelu_moments_equal_leakyrelu_per_channel_and_sampling():
    """PRelu with a slope per channel, written as a x + (1 - a) relu(x): its moments, Hermite coefficients and
    covariance equal those of a LeakyRelu with each channel's slope, and sampling agrees."""
    rng = np.random.default_rng(7)
    n = 6
    mu, sigma = rng.normal(0.0, 1.5, n), rng.uniform(0.1, 2.0, n)
    mu[0], sigma[1] = 8.0, 0.0  # far from the break; degenerate
    slopes = rng.uniform(-0.5, 0.8, n)
    act = Activation("prelu", slopes=tuple(slopes))
    mean, var = gaussian_activation_moments(mu, sigma, act)
    coefs = hermite_coefficients(mu, sigma, act, 8)
    for c in range(n):
        leaky = Activation("leakyrelu", alpha=float(slopes[c]))
        m, v = gaussian_activation_moments(mu[c:c + 1], sigma[c:c + 1], leaky)
        np.testing.assert_allclose([mean[c], var[c]], [m[0], v[0]], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(coefs[c], hermite_coefficients(mu[c:c + 1], sigma[c:c + 1], leaky, 8)[0],
                                   rtol=1e-9, atol=1e-12)
    x = mu[:, None] + sigma[:, None] * rng.standard_normal((n, 400_000))
    f = act.apply(x)
    assert np.all(np.abs(mean - f.mean(axis=1)) <= 0.01 * (1 + np.abs(mean))), (mean, f.mean(axis=1))
    np.testing.assert_allclose(var, f.var(axis=1), rtol=0.02, atol=1e-6)
    corr = np.full((n, n), 0.4) + 0.6 * np.eye(n)
    cov = activation_covariance(mu, sigma, corr, act)
    z = mu[:, None] + sigma[:, None] * (np.linalg.cholesky(corr) @ rng.standard_normal((n, 400_000)))
    np.testing.assert_allclose(cov, np.cov(act.apply(z)), atol=0.02 * float(np.max(var)))
    kept = np.array([1, 4])
    assert act.restricted(kept) == Activation("prelu", slopes=tuple(slopes[kept]))

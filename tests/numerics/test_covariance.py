import itertools

import numpy as np
import pytest

from onnx_udfc.numerics.activations import Activation
from onnx_udfc.numerics.covariance import (conv_preactivation_covariance, cov_to_corr, depthwise_output_covariance,
                                           nearest_psd)


def _patch_cov(var, rin, tap_shape, rho):
    """Explicit covariance of a flattened input patch (C * T), built entry by entry over positions."""
    taps = list(itertools.product(*[range(k) for k in tap_shape]))
    c = var.size
    big = np.zeros((c, len(taps), c, len(taps)))
    for (a, ta), (b, tb) in itertools.product(enumerate(taps), repeat=2):
        dist = sum(abs(x - y) for x, y in zip(ta, tb))
        big[:, a, :, b] = np.sqrt(np.outer(var, var)) * rin * rho**dist
    return big.reshape(c * len(taps), c * len(taps))


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 6, 1, 1), (3, 2, 2, 4), (6, 7), (4, 3, 5)])
@pytest.mark.parametrize("with_corr", [False, True])
def test_conv_preactivation_covariance_brute_force(shape, with_corr):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape)
    c = shape[1]
    var = rng.uniform(0.2, 3.0, c)
    if with_corr:
        a = rng.standard_normal((c, c + 1))
        rin = a @ a.T
        d = np.sqrt(np.diag(rin))
        rin = rin / np.outer(d, d)
    else:
        rin = np.eye(c)
    rho = 0.6
    cov = conv_preactivation_covariance(w, var, spatial_rho=rho, input_corr=rin if with_corr else None)
    big = _patch_cov(var, rin, shape[2:], rho)
    wf = w.reshape(shape[0], -1)
    np.testing.assert_allclose(cov, wf @ big @ wf.T, rtol=1e-12, atol=1e-12)


def test_conv_preactivation_covariance_grouped():
    rng = np.random.default_rng(1)
    n, group, cg = 6, 3, 2
    w = rng.standard_normal((n, cg, 3, 3))
    var = rng.uniform(0.5, 2.0, group * cg)
    a = rng.standard_normal((group * cg, group * cg + 1))
    rin = a @ a.T
    rin = rin / np.sqrt(np.outer(np.diag(rin), np.diag(rin)))
    for corr in (None, rin):
        cov = conv_preactivation_covariance(w, var, 0.4, input_corr=corr, group=group)
        dense = np.zeros((n, group * cg, 3, 3))  # the grouped conv as a dense conv
        for o in range(n):
            g = o // (n // group)
            dense[o, g * cg:(g + 1) * cg] = w[o]
        big = _patch_cov(var, np.eye(group * cg) if corr is None else corr, (3, 3), 0.4)
        df = dense.reshape(n, -1)
        np.testing.assert_allclose(cov, df @ big @ df.T, rtol=1e-12, atol=1e-12)


def _sample_field(rng, mu, sigma, corr, kh, kw, rho, n_draws):
    """Draws of z over an N x kh x kw patch with corr_ij * rho^(|dy|+|dx|) (explicit joint covariance)."""
    n = mu.size
    big = _patch_cov(sigma**2, corr, (kh, kw), rho)
    z = rng.multivariate_normal(np.zeros(big.shape[0]), big, size=n_draws, method="cholesky")
    return z.reshape(n_draws, n, kh * kw) + mu[None, :, None]


DW_ACTS = [Activation("clip", lo=0.0, hi=6.0), Activation("relu"), Activation("silu")]


@pytest.mark.parametrize("act", DW_ACTS, ids=[a.kind for a in DW_ACTS])
def test_depthwise_output_covariance_monte_carlo(act):
    rng = np.random.default_rng(2)
    n, rho = 3, 0.5
    mu = np.array([1.0, 2.5, -0.5])
    sigma = np.array([1.5, 2.0, 1.0])
    corr = np.array([[1.0, 0.8, -0.3], [0.8, 1.0, -0.2], [-0.3, -0.2, 1.0]])
    kernel = rng.standard_normal((n, 1, 3, 3))
    cov = depthwise_output_covariance(mu, sigma, corr, act, kernel, spatial_rho=rho)
    z = _sample_field(rng, mu, sigma, corr, 3, 3, rho, 100_000)
    u = np.einsum("pnt,nt->pn", act.apply(z), kernel.reshape(n, -1))
    mc = np.cov(u, rowvar=False)
    sd = np.sqrt(np.diag(mc))
    np.testing.assert_allclose(np.diag(cov), np.diag(mc), rtol=0.03)
    assert np.max(np.abs(cov - mc) / np.outer(sd, sd)) < 0.02


def test_depthwise_identity_is_exact_and_matches_linear_model():
    rng = np.random.default_rng(3)
    n = 4
    mu, sigma = rng.standard_normal(n), rng.uniform(0.5, 2.0, n)
    a = rng.standard_normal((n, n + 1))
    corr = a @ a.T
    corr = corr / np.sqrt(np.outer(np.diag(corr), np.diag(corr)))
    kernel = rng.standard_normal((n, 1, 3, 3))
    cov = depthwise_output_covariance(mu, sigma, corr, Activation("identity"), kernel, spatial_rho=0.7)
    big = _patch_cov(sigma**2, corr, (3, 3), 0.7).reshape(n, 9, n, 9)
    k = kernel.reshape(n, 9)
    ref = np.einsum("it,itju,ju->ij", k, big, k)
    np.testing.assert_allclose(cov, ref, rtol=1e-12, atol=1e-12)


def test_depthwise_rho_zero_is_sum_of_squares():
    # no spatial correlation: Cov(u_i, u_j) = sum_t k_i(t) k_j(t) Cov(f(z_i), f(z_j)) (same pixel only)
    rng = np.random.default_rng(4)
    n = 3
    mu, sigma = rng.standard_normal(n), rng.uniform(0.5, 2.0, n)
    corr = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 1.0]])
    kernel = rng.standard_normal((n, 1, 3, 3))
    act = Activation("relu")
    from onnx_udfc.numerics.moments import activation_covariance

    cov = depthwise_output_covariance(mu, sigma, corr, act, kernel, spatial_rho=0.0)
    k = kernel.reshape(n, 9)
    np.testing.assert_allclose(cov, (k @ k.T) * activation_covariance(mu, sigma, corr, act), rtol=1e-12)


def test_nearest_psd():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 6))
    sym = a + a.T
    out = nearest_psd(sym)
    assert np.allclose(out, out.T)
    assert np.linalg.eigvalsh(out).min() > -1e-10
    # Frobenius-nearest: no random PSD matrix is closer
    best = np.linalg.norm(out - sym)
    for _ in range(200):
        b = rng.standard_normal((6, 6))
        cand = out + 0.1 * (b @ b.T) * rng.random() - 0.05 * np.eye(6) * rng.random()
        if np.linalg.eigvalsh(cand).min() >= 0:
            assert np.linalg.norm(cand - sym) >= best - 1e-12
    floored = nearest_psd(sym, floor=0.3)
    assert np.linalg.eigvalsh(floored).min() > 0.3 - 1e-10
    psd = a @ a.T
    np.testing.assert_array_equal(nearest_psd(psd), psd)


def test_cov_to_corr_with_zero_variance():
    cov = np.array([[4.0, 2.0, 0.0], [2.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    corr, std = cov_to_corr(cov)
    np.testing.assert_allclose(std, [2.0, 3.0, 0.0])
    np.testing.assert_allclose(corr, [[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.all(np.isfinite(corr))
    rng = np.random.default_rng(6)
    a = rng.standard_normal((5, 8))
    c = a @ a.T
    corr, std = cov_to_corr(c)
    np.testing.assert_allclose(corr * np.outer(std, std), c, rtol=1e-12, atol=1e-12)


# --- blocked / lower-triangle evaluations against the formulas written out directly ------------------------------

def _dense_conv_cov(w, var, rin, rho, group=1):
    """``sym(W_s (Rin kron R) W_s^T)`` with the grouped weight scattered onto all input channels, via np.kron."""
    n, cg = w.shape[:2]
    tap_shape = w.shape[2:]
    taps = list(itertools.product(*[range(k) for k in tap_shape]))
    r_sp = np.array([[rho ** sum(abs(a - b) for a, b in zip(p, q)) for q in taps] for p in taps]).reshape(len(taps), -1)
    dense = np.zeros((n, group * cg, len(taps)))
    for o in range(n):
        g = o // (n // group)
        dense[o, g * cg:(g + 1) * cg] = w[o].reshape(cg, -1)
    ws = (dense * np.sqrt(var)[None, :, None]).reshape(n, -1)
    cov = ws @ np.kron(rin, r_sp) @ ws.T
    return 0.5 * (cov + cov.T)


@pytest.mark.parametrize("n,c,taps,group", [(200, 30, (3, 3), 1), (40, 250, (1, 1), 1), (300, 7, (), 1),
                                            (160, 12, (3,), 4), (130, 1, (3, 3), 130)])
@pytest.mark.parametrize("with_corr", [False, True])
def test_conv_preactivation_covariance_blocked_matches_kron(n, c, taps, group, with_corr):
    rng = np.random.default_rng(n + c)
    w = rng.standard_normal((n, c) + taps)
    var = rng.uniform(0.2, 3.0, group * c)
    var[0] = 0.0
    if with_corr:
        a = rng.standard_normal((group * c, group * c + 1))
        rin = a @ a.T
        rin = rin / np.sqrt(np.outer(np.diag(rin), np.diag(rin)))
        rin = rin + 1e-3 * rng.standard_normal(rin.shape)  # not symmetric: the result is the symmetric part
    else:
        rin = np.eye(group * c)
    cov = conv_preactivation_covariance(w, var, 0.6, rin if with_corr else None, group=group)
    ref = _dense_conv_cov(w, var, rin, 0.6, group)
    np.testing.assert_allclose(cov, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_array_equal(cov, cov.T)


def _cov_to_corr_direct(cov):
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    denom = np.outer(std, std)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
    corr = np.clip(0.5 * (corr + corr.T), -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr, std


@pytest.mark.parametrize("n", [0, 1, 3, 300])
@pytest.mark.parametrize("scale", [1.0, 1e-317, 1e300])
def test_cov_to_corr_blocked_matches_direct(n, scale):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n // 2 + 1))
    cov = a @ a.T + 1e-3 * rng.standard_normal((n, n))  # asymmetric, some |corr| > 1
    if n >= 3:
        cov[1, :] = cov[:, 1] = 0.0  # zero variance channel
        cov[2, 2] = -1.0  # negative variance: std 0
    cov *= scale  # 1e-317: std_i std_j underflows to 0 for every pair
    corr, std = cov_to_corr(cov)
    ref_corr, ref_std = _cov_to_corr_direct(cov)
    np.testing.assert_array_equal(std, ref_std)
    np.testing.assert_allclose(corr, ref_corr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(corr, corr.T)
    assert np.all(np.isfinite(corr)) and np.all(np.abs(corr) <= 1.0)


@pytest.mark.parametrize("n", [1, 4, 300])
def test_nearest_psd_matches_eigenvalue_clipping(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    asym = a @ a.T + 1e-6 * a  # positive definite up to a small asymmetry: returned symmetrised, unchanged
    sym = 0.5 * (asym + asym.T)
    np.testing.assert_array_equal(nearest_psd(asym), sym)
    indefinite = sym - 0.5 * np.abs(np.linalg.eigvalsh(sym)).max() * np.eye(n)
    vals, vecs = np.linalg.eigh(indefinite)
    for floor in (0.0, 0.2):
        ref = (vecs * np.maximum(vals, floor)) @ vecs.T
        out = nearest_psd(indefinite, floor)
        np.testing.assert_allclose(out, 0.5 * (ref + ref.T), rtol=0, atol=1e-12 * np.abs(ref).max())
        np.testing.assert_array_equal(out, out.T)

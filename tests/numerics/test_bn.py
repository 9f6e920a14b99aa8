import numpy as np
import pytest

from onnx_udfc.numerics.bn import bn_prior, fold_batchnorm


def _bn_params(rng, n):
    return (rng.normal(1.0, 0.5, n), rng.normal(0, 1, n), rng.normal(0, 1, n), rng.uniform(0.1, 2.0, n), 1e-5)


def test_fold_conv_matches_bn_of_conv_on_random_patches():
    rng = np.random.default_rng(0)
    n, c, k = 6, 4, 3
    w = rng.standard_normal((n, c, k, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    gamma, beta, mean, var, eps = _bn_params(rng, n)
    wf, bf = fold_batchnorm(w, b, gamma, beta, mean, var, eps)
    assert wf.dtype == np.float32 and bf.dtype == np.float32 and wf.shape == w.shape
    x = rng.standard_normal((100, c, k, k))  # 100 input patches, one output pixel each
    y = np.einsum("ocij,pcij->po", w.astype(np.float64), x) + b
    bn = gamma * (y - mean) / np.sqrt(var + eps) + beta
    folded = np.einsum("ocij,pcij->po", wf.astype(np.float64), x) + bf
    np.testing.assert_allclose(folded, bn, rtol=1e-5, atol=1e-4)


def test_fold_gemm_without_bias_float64():
    rng = np.random.default_rng(1)
    n, c = 5, 7
    w = rng.standard_normal((n, c))
    gamma, beta, mean, var, eps = _bn_params(rng, n)
    wf, bf = fold_batchnorm(w, None, gamma, beta, mean, var, eps)
    assert wf.dtype == np.float64
    x = rng.standard_normal((50, c))
    bn = gamma * (x @ w.T - mean) / np.sqrt(var + eps) + beta
    np.testing.assert_allclose(x @ wf.T + bf, bn, rtol=1e-12, atol=1e-12)


def test_fold_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fold_batchnorm(np.ones((3, 2)), None, np.ones(2), np.zeros(3), np.zeros(3), np.ones(3), 1e-5)


def test_bn_prior_matches_bn_output_statistics():
    # BN output of a normalised input: z = gamma * u + beta, u ~ N(0, 1)  =>  z ~ N(beta, |gamma|^2)
    rng = np.random.default_rng(2)
    gamma, beta = np.array([2.0, -0.5, 0.0]), np.array([0.3, 1.0, -2.0])
    mu, sigma = bn_prior(gamma, beta)
    z = gamma * rng.standard_normal((200_000, 3)) + beta
    np.testing.assert_allclose(mu, z.mean(axis=0), atol=0.01)
    np.testing.assert_allclose(sigma, z.std(axis=0), rtol=0.01, atol=1e-12)
    assert np.all(sigma >= 0)

"""The quantization noise a layer passes on to the compensation of the chain it produces (errors in variables)."""
import numpy as np

from onnx_udfc.numerics.quantize import QuantSpec, fake_quantize
from onnx_udfc.passes.quantize import _correlated_noise_variance, _noise_variance
from onnx_udfc.stats.propagate import SPATIAL_RHO, spatial_correlation


class _Conv:
    op_type = "Conv"


def _correlated_covariance(rng, c):
    mix = rng.standard_normal((c, c)) / np.sqrt(c) + 2.0 * np.eye(c)
    common = rng.standard_normal(c)
    return mix @ mix.T + 3.0 * np.outer(common, common)


def test_correlated_noise_is_the_output_error_variance_under_the_input_covariance():
    """Monte Carlo: inputs with channel covariance C and tap correlation R (x ~ N(0, C (x) R)); the error
    `sum dW x` of every output channel has the variance the quadratic form gives."""
    rng = np.random.default_rng(0)
    n, c, k = 6, 10, 3
    cov = _correlated_covariance(rng, c)
    taps = spatial_correlation(k, k)
    dw = rng.standard_normal((n, c, k, k)) * 0.01
    predicted = _correlated_noise_variance(dw, cov, taps)
    samples = 100_000
    x = rng.standard_normal((samples, c, k * k))
    x = np.einsum("cd,sdt->sct", np.linalg.cholesky(cov), x) @ np.linalg.cholesky(taps).T
    errors = np.einsum("nct,sct->sn", dw.reshape(n, c, -1), x)
    np.testing.assert_allclose(errors.var(axis=0), predicted, rtol=0.02)


def test_correlated_noise_with_independent_channels_is_the_diagonal_form():
    rng = np.random.default_rng(1)
    dw = rng.standard_normal((5, 7, 3, 3))
    var_in = rng.uniform(0.5, 2.0, 7)
    diagonal = _noise_variance(_Conv(), dw, var_in, 1, None)
    np.testing.assert_allclose(_correlated_noise_variance(dw, np.diag(var_in), spatial_correlation(3, 3, SPATIAL_RHO)),
                               diagonal, rtol=1e-10)


def test_error_feedback_noise_is_below_the_independent_channels_estimate():
    """Error feedback puts the rounding error where the inputs hardly vary: on strongly correlated channels
    the real noise is a fraction of what independent channels would give, which the compensation would
    otherwise over-count (shrinking its regression on the kept channels too far)."""
    rng = np.random.default_rng(2)
    n, c = 16, 32
    cov = _correlated_covariance(rng, c)
    w = rng.standard_normal((n, c, 1, 1)).astype(np.float32)
    wq, _, _ = fake_quantize(w, QuantSpec(bits=4, rounding="error-feedback"), input_covariance=cov)
    dw = np.subtract(w, wq, dtype=np.float64)
    correlated = _correlated_noise_variance(dw, cov, None)
    diagonal = _noise_variance(_Conv(), dw, np.diag(cov), 1, None)
    assert np.all(correlated < diagonal)
    assert correlated.sum() < 0.7 * diagonal.sum()


def test_quantization_noise_in_the_compensation_is_an_option_off_by_default():
    """Off: the compensation of a BN-kept chain ignores the producer's rounding error (the same output as
    without any noise); on: it shrinks toward the kept channels' noise, so the consumer weights differ."""
    import onnx

    from onnx_udfc import compress

    from builders import plain_chain

    model = plain_chain(seed=4)
    outputs = {}
    for flag in (False, True):
        out, _ = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=4,
                          channel_multiple=1, quantization_noise=flag, validate=False)
        outputs[flag] = out.SerializeToString()
    default, _ = compress(onnx.load_from_string(model.SerializeToString()), prune=0.3, bits=4, channel_multiple=1,
                          validate=False)
    assert default.SerializeToString() == outputs[False]
    assert outputs[True] != outputs[False]

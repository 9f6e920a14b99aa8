"""Moment propagation through activations spelled out by exporters, checked against sampled moments.

The pre-activation is a pad-free Conv of N(0, 1) inputs followed by a BN calibrated on those same inputs,
so the BN prior N(beta, gamma^2) is exactly the sampled distribution and the remaining gap is the
propagation through the pointwise ops.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from builders import ModelBuilder, calibrate_batchnorm
from onnx_udfc.config import Options
from onnx_udfc.ir.graph import Graph
from onnx_udfc.ir.shapes import resolve_input_shapes
from onnx_udfc.passes.base import PassContext
from onnx_udfc.passes.compress import StatisticsPass
from onnx_udfc.passes.fold_bn import FoldBatchNormPass
from onnx_udfc.passes.normalize import NormalizeGraphPass

BATCH, SEED = 128, 1  # calibration and sampling use the same inputs


def scalar(b: ModelBuilder, op: str, x: str, c: float, first: bool = True) -> str:
    inputs = [x, b.const(np.array(c, np.float32), "c")]
    return b._same(op, inputs if first else inputs[::-1], x)


def preactivation(b: ModelBuilder, cout: int = 12) -> str:
    return b.bn(b.conv("input", cout, k=3, pad=0, bias=True))


def paddle_hardswish() -> tuple:
    """BN -> x * Clip(x + 3, 0, 6) / 6 -> * 1.3 -> + 0.2 (paddle2onnx, with a learnable scalar affine)."""
    b = ModelBuilder((1, 3, 16, 16), seed=11)
    x = preactivation(b)
    a = scalar(b, "Add", x, 3.0)
    c = b.clip(a, 0.0, 6.0)
    d = scalar(b, "Div", c, 6.0)
    m = b._same("Mul", [x, d], x)
    s = scalar(b, "Mul", m, 1.3, first=False)
    y = scalar(b, "Add", s, 0.2)
    out = b.conv(y, 8, k=1)
    return calibrate_batchnorm(b.build(out), batch=BATCH, seed=SEED), [a, c, d, m, s, y]


def tf_leaky_max() -> tuple:
    """BN -> Max(LeakyRelu(x, 0.2), -0.15) (tf2onnx), plus `Min(x, 0.4)` on a BN output with two readers."""
    b = ModelBuilder((1, 3, 16, 16), seed=12)
    x = preactivation(b)
    leaky = b._same("LeakyRelu", [x], x, alpha=0.2)
    top = scalar(b, "Max", leaky, -0.15, first=False)
    z = preactivation(b)
    low = scalar(b, "Min", z, 0.4)
    out = b.conv(b.add(b.add(top, low), z), 8, k=1)
    return calibrate_batchnorm(b.build(out), batch=BATCH, seed=SEED), [leaky, top, low]


def spelled_silu() -> tuple:
    """BN -> x * Sigmoid(x) -> * 1.5 (smooth: quadrature on the composed function)."""
    b = ModelBuilder((1, 3, 16, 16), seed=13)
    x = preactivation(b)
    sig = b._same("Sigmoid", [x], x)
    m = b._same("Mul", [sig, x], x)
    y = scalar(b, "Mul", m, 1.5)
    out = b.conv(y, 8, k=1)
    return calibrate_batchnorm(b.build(out), batch=BATCH, seed=SEED), [sig, m, y]


def propagated(model):
    """The statistics context as compression builds it (BN folded, its prior on the conv output)."""
    original = onnx.ModelProto()
    original.CopyFrom(model)
    ctx = PassContext(graph=Graph(model), options=Options(), input_shapes=resolve_input_shapes(model),
                      original=original)
    for p in (NormalizeGraphPass(), FoldBatchNormPass(), StatisticsPass()):
        p.run(ctx)
    return ctx.stats


def sampled(model, tensors):
    """Per-channel (mean, var) of `tensors` on the calibration inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    x = np.random.default_rng(SEED).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": x})
    return {t: (o.mean(axis=(0, 2, 3)).astype(np.float64), o.var(axis=(0, 2, 3)).astype(np.float64))
            for t, o in zip(tensors, outs)}


@pytest.mark.parametrize("build", [paddle_hardswish, tf_leaky_max, spelled_silu])
def test_moments_through_spelled_activations_match_sampled_ones(build):
    model, tensors = build()
    measured = sampled(model, tensors)
    stats = propagated(onnx.load_from_string(model.SerializeToString()))
    assert stats.unknown_ops == {}
    for t in tensors:
        moments = stats.tensor_moments(t)
        assert moments is not None, t
        mean, var = moments
        real_mean, real_var = measured[t]
        np.testing.assert_allclose(mean, real_mean, atol=0.03 * np.sqrt(real_var.max()), err_msg=t)
        # a mostly clamped channel (tiny variance) is judged against the tensor's scale
        np.testing.assert_allclose(var, real_var, rtol=0.04, atol=0.005 * real_var.max(), err_msg=t)
    assert stats.tensor_moments(model.graph.output[0].name) is not None


def test_gated_product_is_not_an_independent_product():
    """x * h(x): an independent product would miss Cov(x, h(x)), several times the sampled mean's error."""
    model, tensors = paddle_hardswish()
    stats = propagated(onnx.load_from_string(model.SerializeToString()))
    x, h, m = model.graph.node[1].output[0], tensors[2], tensors[3]
    real_mean = sampled(model, [m])[m][0]
    (mx, _), (mh, _) = stats.tensor_moments(x), stats.tensor_moments(h)
    independent_error = np.abs(mx * mh - real_mean).max()
    error = np.abs(stats.tensor_moments(m)[0] - real_mean).max()
    assert error < 0.2 * independent_error

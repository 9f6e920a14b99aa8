"""Compressing a compressed model again with the same --bits (no pruning) leaves every weight as it was.

Weights already on a B-bit per-channel grid must be reproduced by the clipping search, the rounding and
the bias correction: the second output's weights equal the first's.
"""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import ModelBuilder, depthwise_block, gemm_chain, plain_chain, residual_block
from onnx_udfc import compress
from onnx_udfc.cli import main
from onnx_udfc.numerics.quantize import QuantSpec, fake_quantize

MODELS = {"plain": plain_chain, "depthwise": depthwise_block, "residual": residual_block, "gemm": gemm_chain}
_cache = {}


def model(name):
    if name not in _cache:
        _cache[name] = MODELS[name]()
    return _cache[name]


def weights(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def twice(m, **options):
    first, _ = compress(m, validate=False, **options)
    second, report = compress(first, validate=False, **options)
    return first, second, report


def assert_same_weights(first, second):
    a, b = weights(first), weights(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert [(n.op_type, list(n.input)) for n in first.graph.node] == [(n.op_type, list(n.input)) for n in second.graph.node]


@pytest.mark.parametrize("grid", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_requantizing_keeps_every_weight(name, bits, grid):
    first, second, report = twice(model(name), bits=bits, grid=grid)
    assert any(layer.get("bits") == bits for layer in report.layers)  # the layers were quantized again
    assert_same_weights(first, second)


@pytest.mark.parametrize("options", [dict(clip="max"), dict(rounding="nearest"), dict(first_last_bits=None),
                                     dict(no=None)], ids=["clip-max", "nearest", "all-layers-4-bit", "defaults"])
def test_requantizing_other_recipes(options):
    options = {k: v for k, v in options.items() if k != "no"}
    first, second, _ = twice(model("plain"), bits=4, **options)
    assert_same_weights(first, second)


@pytest.mark.parametrize("grid", [
    "asymmetric",
    "symmetric",
])
def test_second_output_is_byte_identical(grid):
    first, second, _ = twice(model("plain"), bits=4, grid=grid)
    assert second.SerializeToString() == first.SerializeToString()


def test_cli_second_pass_keeps_the_weights(tmp_path):
    src, a, b = tmp_path / "m.onnx", tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model("depthwise"), str(src))
    assert main([str(src), str(a), "--bits", "5", "-q", "--no-validate"]) == 0
    assert main([str(a), str(b), "--bits", "5", "-q", "--no-validate"]) == 0
    assert_same_weights(onnx.load(str(a)), onnx.load(str(b)))


# A channel whose minimum sits exactly half a step below a level: -lo / scale = 1.5 with scale = 1/16.
HALF_STEP_ROW = np.array([-1.5, 13.5, 0.0, 5.0]) / 16

@pytest.mark.parametrize("rounding", ["nearest", "balanced"])
def test_quantizer_is_idempotent_at_a_half_step_zero_point(rounding):
    spec = QuantSpec(bits=4, clip="max", rounding=rounding)
    once, _, _ = fake_quantize(HALF_STEP_ROW[None, :].astype(np.float32), spec)
    again, _, _ = fake_quantize(once, spec)
    np.testing.assert_array_equal(again, once)


def test_half_step_zero_point_through_the_tool():
    b = ModelBuilder((1, 4))
    b.inputs = [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])]
    rows = np.stack([HALF_STEP_ROW, np.array([0.3, -0.2, 0.1, 0.25])])
    m = b.build(b.gemm("input", 2, weight=rows))
    first, second, _ = twice(m, bits=4, clip="max", first_last_bits=None)
    assert_same_weights(first, second)

"""prune 0 / bits 32 changes nothing; a channel that is a positive multiple of a kept one is absorbed exactly."""
import numpy as np
import onnx
import pytest

from builders import ModelBuilder, plain_chain, random_input, rel_error, run
from onnx_udfc import compress


def test_prune0_bits32_is_identity():
    model = plain_chain()
    out, report = compress(model, prune=0.0, bits=32)
    assert out.SerializeToString() == model.SerializeToString()
    x = random_input(model)
    np.testing.assert_array_equal(run(model, x), run(out, x))
    assert report.validation["outputs"]
    assert all(m["max_abs_error"] == 0.0 for m in report.validation["outputs"].values())


def duplicate_channel_model(scale=2.0):
    """conv(3->8, bias) -> relu -> conv(8->6): channel 5 = scale * channel 2 (weights and bias)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w[5] = scale * w[2]
    b = ModelBuilder((1, 3, 8, 8), seed=4)
    x = b.conv("input", 8, weight=w, bias=True)
    bias_name = b.nodes[-1].input[2]
    bias = next(t for t in b.inits if t.name == bias_name)
    arr = onnx.numpy_helper.to_array(bias).copy()
    arr[5] = scale * arr[2]
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias_name))
    y = b.conv(b.relu(x), 6)
    return b.build(y)


@pytest.mark.parametrize("method", ["merge", "udfc"])
def test_multiple_of_kept_channel_is_reconstructed_exactly(method):
    model = duplicate_channel_model()
    kw = {"ridge": 0.0} if method == "udfc" else {}
    # prune 1 of 8 channels; the expected-error selection must pick the redundant one (or its twin)
    out, report = compress(model, channel_multiple=1, prune=0.125, bits=32, method=method, select="expected-error", **kw)
    pruned = report.layers[0]["pruned"]
    assert pruned in ([5], [2]), pruned
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 1e-5


def test_none_is_not_exact_on_the_same_case():
    model = duplicate_channel_model()
    out, _ = compress(model, channel_multiple=1, prune=0.125, bits=32, method="none", select="norm")
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) > 1e-2

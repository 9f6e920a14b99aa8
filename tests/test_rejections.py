"""Every candidate layer that is not pruned says why, one test per reason."""
import numpy as np

from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu
from onnx_udfc import compress


def reasons(model, **kw):
    _, report = compress(model, channel_multiple=1, prune=0.5, bits=32, validate=True, **kw)
    convs = [" | ".join(l.get("skipped", [])) for l in report.layers if l["op"] == "Conv"]
    return convs, report


def test_fan_out_is_rejected():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 8))
    y1, y2 = b.conv(x, 4), b.conv(x, 4)
    model = b.build([y1, y2])
    why, _ = reasons(model)
    assert "fan-out" in why[0]


def test_graph_output_is_rejected():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 8))
    y = b.conv(x, 4)
    model = b.build([y, x])
    why, _ = reasons(model)
    assert "graph output" in why[0]


def test_unsupported_op_on_the_path_is_rejected():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.conv("input", 8)
    t = b.node("Softmax", [x], "softmax", axis=1)
    b.shapes[t] = b.shapes[x]
    model = b.build(b.conv(t, 4))
    why, _ = reasons(model)
    assert "unsupported op Softmax" in why[0]


def test_grouped_conv_is_rejected():
    b = ModelBuilder((1, 8, 8, 8))
    x = b.relu(b.conv("input", 8, group=2))
    model = b.build(b.conv(x, 4))
    why, _ = reasons(model)
    assert "grouped conv (group=2)" in why[0]


def test_residual_add_is_a_coupled_group():
    b = ModelBuilder((1, 4, 8, 8))
    x = b.relu(b.conv("input", 8))
    y = b.relu(b.add(b.conv(x, 8), x))
    model = b.build(b.conv(y, 4))
    why, _ = reasons(model)
    assert "coupled" in why[0] and "coupled" in why[1]


def test_last_layer_feeding_output_is_not_pruned_but_model_still_compresses():
    b = ModelBuilder((1, 3, 8, 8))
    x = conv_bn_relu(b, "input", 8)
    model = calibrate_batchnorm(b.build(b.conv(x, 4)))
    why, report = reasons(model)
    assert "graph output" in why[1]
    assert report.after.params < report.before.params


def test_single_channel_producer_is_not_pruned():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 1))
    model = b.build(b.conv(x, 4))
    why, _ = reasons(model)
    assert "only one output channel" in why[0]


def test_ratio_that_removes_nothing_is_reported():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 3))
    model = b.build(b.conv(x, 4))
    _, report = compress(model, channel_multiple=1, prune=0.2, bits=32)
    first = report.layers[0]
    assert first["channels_after"] == 3 and "removes no channel" in first["skipped"][0]


def _gap_reshape_gemm(shape_value):
    b = ModelBuilder((1, 3, 8, 8), dynamic_batch=False)
    x = b.relu(b.conv("input", 8))
    g = b.node("GlobalAveragePool", [x], "gap")
    b.shapes[g] = (1, 8, 1, 1)
    r = b.node("Reshape", [g, b.const(np.array(shape_value, np.int64), "shape")], "reshape")
    b.shapes[r] = (1, 8)
    return b.build(b.gemm(r, 4))


def test_reshape_to_a_fixed_channel_count_is_rejected():
    why, _ = reasons(_gap_reshape_gemm([1, 8]))
    assert "fixed channel count" in why[0]


def test_reshape_to_minus_one_is_followed():
    why, report = reasons(_gap_reshape_gemm([1, -1]))
    assert why[0] == "" and report.layers[0]["channels_after"] == 4


def test_constant_pad_between_act_and_consumer_is_followed():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 8))
    p = b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")], "pad")
    b.shapes[p] = (1, 8, 10, 10)
    y = b.conv(p, 4, pad=0)
    why, report = reasons(b.build(y))
    assert why[0] == "" and report.layers[0]["channels_after"] == 4

"""ConvTranspose layers: weight layout as rows, quantization, tap coverage and bias correction."""
import numpy as np
import onnx
import pytest
from onnx import helper

from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu, random_input, rel_error, run
from onnx_udfc import compress
from onnx_udfc.config import Options
from onnx_udfc.passes.base import PassContext
from onnx_udfc.passes.fold_bn import FoldBatchNormPass
from onnx_udfc.ir.graph import Graph
from onnx_udfc.ir.layers import read_layer, tap_coverage, write_layer
from onnx_udfc.ir.shapes import infer_static_shapes, resolve_input_shapes
from onnx_udfc.numerics.quantize import bias_correction
from onnx_udfc.stats.propagate import transposed_linear_moments


def conv_then_transpose(group=1, seed=0, output_padding=0, k=4) -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> ConvTranspose (stride 2): the transposed conv reads non-zero-mean channels."""
    b = ModelBuilder((1, 3, 12, 12), seed=seed)
    x = conv_bn_relu(b, "input", 8)
    y = b.conv_transpose(x, 6, k=k, group=group, output_padding=output_padding, pad=1)
    return calibrate_batchnorm(b.build(y))


def transpose_node(model):
    return next(n for n in model.graph.node if n.op_type == "ConvTranspose")


@pytest.mark.parametrize("group", [1, 2])
def test_rows_are_per_output_channel_and_write_back_restores_the_layout(group):
    model = conv_then_transpose(group=group)
    graph = Graph(model)
    node = transpose_node(model)
    w = graph.constant(node.input[1]).copy()  # (Cin, Cout/g, k, k)
    layer = read_layer(graph, node)
    cin, cog = w.shape[:2]
    assert layer.rows.shape == (cog * group, cin // group) + w.shape[2:]
    assert layer.group == group
    for o in range(cog * group):
        gi, oo = divmod(o, cog)
        np.testing.assert_array_equal(layer.rows[o], w[gi * (cin // group):(gi + 1) * (cin // group), oo])
    x = random_input(model, batch=2)
    before = run(model, x)
    # scaling row o must scale output channel o (bias removed) and nothing else
    factors = np.arange(1, layer.out_channels + 1, dtype=np.float64)
    write_layer(graph, layer, layer.rows * factors[:, None, None, None], np.zeros(layer.out_channels))
    after = run(graph.model, x)  # graph.model: the weights written so far, serialised
    nobias = before - layer.bias.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(after, nobias * factors.reshape(1, -1, 1, 1), rtol=1e-4, atol=1e-4)
    write_layer(graph, read_layer(graph, node), read_layer(graph, node).rows / factors[:, None, None, None], None)
    np.testing.assert_allclose(graph.constant(node.input[1]), w, rtol=1e-6)


@pytest.mark.parametrize("k,stride,pad,output_padding", [(4, 2, 1, 0), (3, 2, 1, 1), (3, 3, 0, 0), (5, 2, 2, 1)])
def test_tap_coverage_is_the_fraction_of_output_pixels_each_tap_reaches(k, stride, pad, output_padding):
    """With an all-ones input and a kernel with one tap, the output mean is that tap's coverage."""
    b = ModelBuilder((1, 1, 7, 9), seed=0)
    weight = np.zeros((1, 1, k, k))
    y = b.conv_transpose("input", 1, k=k, stride=stride, pad=pad, output_padding=output_padding, bias=False,
                       weight=weight)
    model = b.build(y)
    node = transpose_node(model)
    shapes = infer_static_shapes(model, {"input": (1, 1, 7, 9)})
    coverage = tap_coverage(node, (k, k), shapes[node.input[0]], shapes[node.output[0]])
    graph = Graph(model)
    layer = read_layer(graph, node)
    measured = np.zeros((k, k))
    for ty in range(k):
        for tx in range(k):
            one_hot = np.zeros((1, 1, k, k))
            one_hot[0, 0, ty, tx] = 1.0
            write_layer(graph, layer, one_hot, None)
            measured[ty, tx] = run(graph.model, np.ones((1, 1, 7, 9), np.float32)).mean()
    np.testing.assert_allclose(coverage, measured, atol=1e-6)
    # on average an output pixel sees about prod(kernel) / prod(strides) taps
    assert coverage.sum() == pytest.approx(k * k / stride ** 2, rel=0.35)


def test_transposed_moments_match_sampled_outputs():
    """Independent inputs N(mu_c, v_c) per pixel (rho = 0): phase-averaged moments of the output."""
    rng = np.random.default_rng(3)
    b = ModelBuilder((1, 4, 24, 24), seed=1)
    y = b.conv_transpose("input", 6, k=3, stride=2, pad=1, output_padding=1, group=2)
    model = b.build(y)
    node = transpose_node(model)
    graph = Graph(model)
    layer = read_layer(graph, node)
    mu, sd = rng.normal(0.5, 0.5, 4), rng.uniform(0.5, 1.5, 4)
    x = (mu.reshape(1, -1, 1, 1) + sd.reshape(1, -1, 1, 1) * rng.standard_normal((64, 4, 24, 24))).astype(np.float32)
    out = run(model, x)
    shapes = infer_static_shapes(model, {"input": (1, 4, 24, 24)})
    coverage = tap_coverage(node, (3, 3), shapes[node.input[0]], shapes[node.output[0]])
    mean, var = transposed_linear_moments(layer.rows, layer.bias, mu, sd ** 2, group=2, strides=(2, 2),
                                          coverage=coverage, rho=0.0)
    real_mean, real_var = out.mean(axis=(0, 2, 3)), out.var(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, real_mean, atol=0.02 * np.sqrt(real_var).max())
    np.testing.assert_allclose(var, real_var, rtol=0.08)


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bits", [8, 4])
def test_convtranspose_is_quantized_per_output_channel(group, bits):
    model = conv_then_transpose(group=group, seed=group)
    out, report = compress(model, bits=bits, first_last_bits=None, validate=False)
    onnx.checker.check_model(out)
    record = next(r for r in report.layers if r["op"] == "ConvTranspose")
    assert record["bits"] == bits and record.get("bias_correction")
    assert record["weights"] == Graph(model).constant(transpose_node(model).input[1]).size
    layer = read_layer(Graph(out), transpose_node(out))
    original = read_layer(Graph(model), transpose_node(model))
    assert not np.array_equal(layer.rows, original.rows)
    for row in layer.rows.reshape(layer.out_channels, -1).astype(np.float64):
        levels = np.unique(row)
        assert len(levels) <= 2 ** bits
        steps = np.diff(levels)
        ratio = steps / steps.min()
        np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-3)  # on one uniform grid
    x = random_input(model, batch=8)
    error = rel_error(run(model, x), run(out, x))
    if bits == 8:
        assert error < 0.02
    else:
        assert error < 0.3


@pytest.mark.parametrize("group,output_padding,k", [(1, 0, 4), (2, 1, 3)])
def test_bias_correction_reduces_the_mean_output_shift(group, output_padding, k):
    """At 4 bits the per-channel mean output shift shrinks with the coverage-scaled correction, and the
    correction summed over every tap (no coverage) would overshoot."""
    model = conv_then_transpose(group=group, seed=4 + group, output_padding=output_padding, k=k)
    x = random_input(model, batch=32, seed=9)
    ref = run(model, x)

    def shift(m):
        return np.linalg.norm((run(m, x) - ref).mean(axis=(0, 2, 3)))

    options = dict(bits=4, first_last_bits=None, validate=False, rounding="nearest")
    corrected, _ = compress(model, bias_correction=True, **options)
    plain, _ = compress(model, bias_correction=False, **options)
    # the same quantized weights with the correction summed over every tap (what a Conv gets)
    node = transpose_node(plain)
    graph = Graph(plain)
    layer = read_layer(graph, node)
    original = read_layer(Graph(model), transpose_node(model))
    conv_out = next(n for n in model.graph.node if n.op_type == "Relu").output[0]
    mean_in = run_tensor_mean(model, x, conv_out)
    naive = onnx.ModelProto()
    naive.CopyFrom(plain)
    graph = Graph(naive)
    delta = bias_correction(original.rows, layer.rows, mean_in, group=group)
    write_layer(graph, read_layer(graph, transpose_node(naive)), layer.rows, layer.bias + delta)
    assert shift(corrected) < 0.5 * shift(plain)
    assert shift(corrected) < shift(naive)


def run_tensor_mean(model, x, tensor) -> np.ndarray:
    """Per-channel mean of an intermediate tensor on x."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return run(probe, x).mean(axis=(0, 2, 3)).astype(np.float64)


def transposed_chain(seed=0, group=1, bn=True) -> onnx.ModelProto:
    """Conv -> BN -> ReLU -> ConvTranspose -> BN -> ReLU -> ConvTranspose -> BN -> ReLU -> Conv (a decoder):
    chains with a ConvTranspose producer, a ConvTranspose consumer, and both."""
    b = ModelBuilder((1, 3, 8, 8), seed=seed)
    x = conv_bn_relu(b, "input", 16)
    y = b.conv_transpose(x, 16, bias=not bn, group=group)
    y = b.relu(b.bn(y) if bn else y)
    z = b.conv_transpose(y, 12, bias=not bn)
    z = b.relu(b.bn(z) if bn else z)
    return calibrate_batchnorm(b.build(b.conv(z, 3, k=3)))


def transposed_weights(model):
    graph = Graph(model)
    return [graph.constant(n.input[1]) for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


def folded(model):
    """The model after the fold pass alone, and the BN priors it recorded."""
    ctx = PassContext(graph=Graph(onnx.load_from_string(model.SerializeToString())), options=Options(),
                      input_shapes=resolve_input_shapes(model))
    FoldBatchNormPass().run(ctx)
    return ctx.graph.model, ctx.priors


def test_batchnorm_after_convtranspose_is_folded_exactly_with_its_prior():
    model = transposed_chain(seed=1)
    out, priors = folded(model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "ConvTranspose", "Relu", "ConvTranspose", "Relu",
                                                   "Conv"]
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 1e-5
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    graph = Graph(model)
    for bn in bns[1:]:
        beta, gamma = graph.constant(bn.input[2]), graph.constant(bn.input[1])
        mu, sigma = priors[bn.output[0]]  # z ~ N(beta, gamma^2)
        np.testing.assert_allclose(mu, beta, rtol=1e-6)
        np.testing.assert_allclose(sigma, np.abs(gamma), rtol=1e-6)


def test_per_channel_mul_add_after_convtranspose_is_folded_exactly():
    b = ModelBuilder((1, 4, 6, 6), seed=2)
    y = b.conv_transpose("input", 6)
    y = b.node("Mul", [y, b.const(b.rng.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32), "s")], "mul")
    y = b.node("Add", [y, b.const(b.rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "t")], "add")
    b.shapes[y] = (1, 6, 12, 12)
    model = b.build(b.relu(y))
    out, _ = folded(model)
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose", "Relu"]
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 1e-5


def test_convtranspose_producers_and_consumers_are_pruned():
    """Every chain is pruned (ConvTranspose as producer, as consumer, as both); the weights lose the pruned
    channels on the right axes ((Cin, Cout, k, k): axis 1 as producer, axis 0 as consumer); udfc's
    compensation beats the mean's and none (same channels: the selection does not depend on the method)."""
    model = transposed_chain(seed=3)
    x = random_input(model, batch=32)
    ref = run(model, x)
    errors = {}
    for method in ("none", "mean", "udfc"):
        out, report = compress(model, prune=0.25, bits=32, method=method, allocation="uniform", validate=False)
        onnx.checker.check_model(out)
        records = [r for r in report.layers if r["op"] in ("Conv", "ConvTranspose")]
        assert [(r["op"], r.get("channels_before"), r.get("channels_after")) for r in records] == [
            ("Conv", 16, 12), ("ConvTranspose", 16, 12), ("ConvTranspose", 12, 9), ("Conv", None, None)]
        assert [w.shape for w in transposed_weights(out)] == [(12, 3, 3, 3), (12, 12, 4, 4), (12, 9, 4, 4),
                                                             (3, 9, 3, 3)]
        errors[method] = rel_error(ref, run(out, x))
    assert errors["udfc"] < errors["mean"] < errors["none"], errors
    assert errors["udfc"] < 0.85 * errors["none"], errors


def redundant_transposed_model(duplicates=(5, 9), sources=(2, 4), scales=(1.7, 0.6)) -> onnx.ModelProto:
    """ConvTranspose (16 channels, no BN) -> ReLU -> ConvTranspose, where channel d is a positive multiple of
    channel s (weights and bias): ReLU keeps the ratio, so the consumer can take over channel d exactly."""
    b = ModelBuilder((1, 4, 6, 6), seed=4)
    w = b.rng.standard_normal((4, 16, 4, 4)) * 0.3
    bias = b.rng.standard_normal(16) * 0.3
    for d, src, scale in zip(duplicates, sources, scales):
        w[:, d], bias[d] = scale * w[:, src], scale * bias[src]
    y = b.node("ConvTranspose", ["input", b.const(w.astype(np.float32), "wt"), b.const(bias.astype(np.float32), "bt")],
               "convt", kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
    b.shapes[y] = (1, 16, 12, 12)
    z = b.conv_transpose(b.relu(y), 5, k=3, stride=2, pad=1, output_padding=1)
    return b.build(z)


@pytest.mark.parametrize("method", ["merge", "udfc"])
def test_redundant_convtranspose_channels_are_removed_exactly(method):
    model = redundant_transposed_model()
    kw = {"ridge": 0.0} if method == "udfc" else {}
    out, report = compress(model, prune=0.125, bits=32, method=method, channel_multiple=1, validate=False, **kw)
    record = next(r for r in report.layers if r["op"] == "ConvTranspose")
    assert sorted(record["pruned"]) in ([2, 4], [2, 9], [4, 5], [5, 9]), record["pruned"]
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 1e-4


def constant_channel_model() -> onnx.ModelProto:
    """Conv (channel 0 constant: zero weights, bias 2) -> ReLU -> ConvTranspose stride 2 kernel 3."""
    b = ModelBuilder((1, 3, 7, 7), seed=6)
    w = b.rng.standard_normal((8, 3, 3, 3)) * 0.4
    w[0] = 0.0
    bias = b.rng.standard_normal(8) * 0.1
    bias[0] = 2.0
    y = b.conv("input", 8, weight=w)
    b.inits[-1].CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), b.inits[-1].name))
    z = b.conv_transpose(b.relu(y), 4, k=3, stride=2, pad=1, output_padding=1)
    return b.build(z)


def test_mean_compensation_restores_the_mean_over_output_pixels():
    """Removing a constant channel before a stride-2 ConvTranspose: the consumer bias takes its mean
    contribution weighted by tap coverage, so each output channel's mean over pixels is kept (summing over
    all taps, as for a Conv, would add about 4x too much)."""
    model = constant_channel_model()
    x = random_input(model, batch=32)
    ref = run(model, x)
    out, report = compress(model, prune=0.125, bits=32, method="mean", select="norm", channel_multiple=1,
                           validate=False)
    assert report.layers[0]["pruned"] == [0]
    shift = np.abs((run(out, x) - ref).mean(axis=(0, 2, 3)))
    dropped, _ = compress(model, prune=0.125, bits=32, method="none", select="norm", channel_multiple=1,
                          validate=False)
    lost = np.abs((run(dropped, x) - ref).mean(axis=(0, 2, 3)))
    assert lost.max() > 0.2
    assert shift.max() < 0.02 * lost.max(), (shift, lost)


def test_grouped_convtranspose_is_not_a_producer():
    model = transposed_chain(seed=7, group=2)
    out, report = compress(model, prune=0.5, bits=8, validate=False)
    transposed = next(r for r in report.layers if r["op"] == "ConvTranspose")
    assert any("grouped ConvTranspose (group=2)" in s for s in transposed.get("skipped", [])), transposed
    assert transposed.get("channels_after", 16) == 16


def test_transposed_output_correlation_sums_each_phase_of_the_kernel():
    """Input: independent channels, each a separable AR(1) field with neighbour correlation 0.5 (the model's
    spatial rho). The measured channel correlation of a stride-2 ConvTranspose output matches the phase
    model (a pixel sums the taps of its phase, which read neighbouring input pixels) better than the conv
    model over all 16 taps at kernel distances."""
    from onnx_udfc.stats.model import linear_output_correlation
    from onnx_udfc.stats.propagate import SPATIAL_RHO

    rng = np.random.default_rng(11)
    b = ModelBuilder((1, 5, 20, 20), seed=12)
    model = b.build(b.conv_transpose("input", 6, bias=False))
    node = transpose_node(model)
    rows = read_layer(Graph(model), node).rows.astype(np.float64)
    var_in = rng.uniform(0.5, 2.0, 5)

    def ar1(e, axis):
        """AR(1) along `axis` with unit variance: out_i = rho out_{i-1} + sqrt(1 - rho^2) e_i."""
        e = np.moveaxis(e, axis, 0)
        out = np.empty_like(e)
        out[0] = e[0]
        for i in range(1, e.shape[0]):
            out[i] = SPATIAL_RHO * out[i - 1] + np.sqrt(1 - SPATIAL_RHO ** 2) * e[i]
        return np.moveaxis(out, 0, axis)

    field = ar1(ar1(rng.standard_normal((256, 5, 20, 20)), 2), 3)  # separable: rho^|dy| rho^|dx|
    x = (field * np.sqrt(var_in).reshape(1, -1, 1, 1)).astype(np.float32)
    out = run(model, x)[:, :, 4:-4, 4:-4]  # interior pixels: every phase sees all its taps
    a = np.moveaxis(out, 1, -1).reshape(-1, 6).astype(np.float64)
    measured = np.corrcoef(a, rowvar=False)
    phased = linear_output_correlation(rows, var_in, None, SPATIAL_RHO, node)
    plain = linear_output_correlation(rows, var_in, None, SPATIAL_RHO, None)
    off = ~np.eye(6, dtype=bool)
    phased_error = np.abs(phased - measured)[off].max()
    plain_error = np.abs(plain - measured)[off].max()
    assert phased_error < 0.03, (phased_error, plain_error)  # measured 0.006 against 0.27
    assert phased_error < 0.2 * plain_error, (phased_error, plain_error)


@pytest.mark.parametrize("spelling", ["output_shape", "same_upper", "dilated"])
def test_convtranspose_spellings_prune_to_valid_models(spelling):
    """ConvTranspose consumers and producers written with `output_shape`, `auto_pad=SAME_UPPER` or dilations:
    the pruned, quantized model passes the checker, runs, and udfc's error is below no compensation's."""
    b = ModelBuilder((1, 3, 8, 8), seed=21)
    x = conv_bn_relu(b, "input", 16)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2])
    if spelling == "output_shape":
        attrs.update(output_shape=[16, 16])
    elif spelling == "same_upper":
        attrs.update(auto_pad="SAME_UPPER")
    else:
        attrs.update(dilations=[2, 2], pads=[2, 2, 2, 2], output_padding=[1, 1])
    w = (b.rng.standard_normal((16, 16, 3, 3)) * 0.25).astype(np.float32)
    y = b.node("ConvTranspose", [x, b.const(w, "wt")], "convt", **attrs)
    b.shapes[y] = (1, 16, 16, 16)
    y = b.relu(b.bn(y))
    w2 = (b.rng.standard_normal((16, 8, 3, 3)) * 0.25).astype(np.float32)
    z = b.node("ConvTranspose", [y, b.const(w2, "wt")], "convt", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.shapes[z] = (1, 8, 16, 16)
    model = calibrate_batchnorm(b.build(b.conv(b.relu(z), 3, k=3)))
    x_in = random_input(model, batch=16)
    ref = run(model, x_in)
    errors = {}
    for method in ("none", "udfc"):
        out, report = compress(model, prune=0.3, bits=8, method=method, allocation="uniform", validate=False)
        onnx.checker.check_model(out, full_check=True)
        pruned = [r for r in report.layers if r["op"] == "ConvTranspose" and r.get("channels_after")]
        assert pruned and all(r["channels_after"] < r["channels_before"] for r in pruned), report.layers
        errors[method] = rel_error(ref, run(out, x_in))
    assert errors["udfc"] < errors["none"], errors

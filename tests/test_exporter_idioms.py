"""Exporter idioms met in third-party models (paddle2onnx, tf2onnx, keras2onnx, older PyTorch exports),
rebuilt in tiny models: activations spelled with several nodes, BN/bias/affine spelled as Mul/Add,
squeeze-excitation gates, per-channel PRelu, Resize, constant subgraphs."""
import numpy as np
import onnx
import pytest

from builders import ModelBuilder, calibrate_batchnorm, random_input, rel_error, run
from onnx_udfc import compress
from onnx_udfc.ir.graph import Graph
from onnx_udfc.ir.shapes import infer_static_shapes
from onnx_udfc.numerics.activations import Activation
from onnx_udfc.passes.base import PassContext
from onnx_udfc.passes.fold_bn import FoldBatchNormPass
from onnx_udfc.passes.normalize import NormalizeGraphPass
from onnx_udfc.patterns.activations import ComposedActivation, pointwise_run
from onnx_udfc.patterns.chains import ChainFinder
from onnx_udfc.patterns.groups import coupled_groups

SHAPE = (1, 3, 8, 8)


def scalar(b: ModelBuilder, value) -> str:
    return b.const(np.array(value, np.float32), "s")


def same(b: ModelBuilder, op, inputs, like, **attrs) -> str:
    y = b.node(op, inputs, op.lower(), **attrs)
    b.shapes[y] = b.shapes[like]
    return y


def hardswish_paddle(b, x):
    """x * Clip(x + 3, 0, 6) / 6 (paddle2onnx, opset 11/12)."""
    clipped = b.clip(same(b, "Add", [x, scalar(b, 3.0)], x), 0.0, 6.0)
    return same(b, "Div", [same(b, "Mul", [x, clipped], x), scalar(b, 6.0)], x)


def hardswish_gated(b, x):
    return same(b, "Mul", [x, same(b, "HardSigmoid", [x], x, alpha=1.0 / 6.0, beta=0.5)], x)


def silu_spelled(b, x):
    return same(b, "Mul", [same(b, "Sigmoid", [x], x), x], x)


def affine_after(act):
    """act, then the scalar `Mul`/`Add` of paddle's learnable affine blocks."""
    def spell(b, x):
        y = act(b, x)
        return same(b, "Add", [same(b, "Mul", [scalar(b, 0.7), y], y), scalar(b, -0.2)], y)
    return spell


def tf_leaky_max(b, x):
    """tf2onnx: LeakyRelu(0.2) then Max(x, -0.4) (a clipped leaky ReLU)."""
    y = same(b, "LeakyRelu", [x], x, alpha=0.2)
    return same(b, "Max", [y, b.const(np.full((1, 1, 1, 1), -0.4, np.float32), "c")], y)


def twin_chain(act, opset=13, twin=(2, 5)):
    """conv(3->8) -> act -> conv(8->6); producer channel twin[1] is an exact copy of channel twin[0]."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5
    w[twin[1]] = w[twin[0]]
    b = ModelBuilder(SHAPE, seed=4, opset=opset)
    x = b.conv("input", 8, weight=w, bias=False)
    y = b.conv(act(b, x), 6)
    return b.build(y)


def chains_of(model, shapes=None):
    graph = Graph(model)
    FoldBatchNormPass().run(PassContext(graph=graph, options=None, input_shapes={}))
    return ChainFinder(graph, infer_static_shapes(model, shapes or {"input": SHAPE})).find()


@pytest.mark.parametrize("spell, kind", [(hardswish_paddle, "hardswish"), (hardswish_gated, "hardswish"),
                                         (silu_spelled, "silu"), (affine_after(hardswish_paddle), "composed"),
                                         (tf_leaky_max, "composed")])
def test_spelled_activation_is_one_stage_of_the_chain(spell, kind):
    model = twin_chain(spell, opset=12 if spell is hardswish_paddle else 13)
    chains, rejections = chains_of(model)
    assert len(chains) == 1, [r.reason for r in rejections]
    assert chains[0].first.activation.kind == kind
    # the twin channel is absorbed exactly by its copy: the surgery is what the graph computes
    out, report = compress(model, channel_multiple=1, prune=0.125, bits=32, method="merge")
    onnx.checker.check_model(out, full_check=True)
    record = next(l for l in report.layers if l.get("chain"))
    assert record["channels_after"] == 7 and record["pruned"] in ([2], [5])
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 1e-5


@pytest.mark.parametrize("spell", [affine_after(hardswish_paddle), tf_leaky_max])
def test_composed_activation_pieces_match_its_graph(spell):
    model = twin_chain(spell)
    run_ = pointwise_run(Graph(model), model.graph.node[0].output[0], infer_static_shapes(model, {"input": SHAPE}))
    act = run_.activation
    assert isinstance(act, ComposedActivation) and act.is_piecewise
    z = np.linspace(-9, 9, 3601)
    breaks, coefs = act.pieces()
    piece = np.searchsorted(breaks, z)
    value = coefs[piece, 0] + coefs[piece, 1] * z + coefs[piece, 2] * z ** 2
    np.testing.assert_allclose(value, act.apply(z), atol=1e-9)
    # and `apply` is what onnxruntime computes for the run
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.output[:]
    cut.graph.output.extend([onnx.helper.make_tensor_value_info(run_.output, onnx.TensorProto.FLOAT, None),
                             onnx.helper.make_tensor_value_info(run_.source, onnx.TensorProto.FLOAT, None)])
    import onnxruntime as ort
    sess = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    y, pre = sess.run(None, {"input": random_input(model)})
    np.testing.assert_allclose(act.apply(pre), y, atol=1e-5)


def test_mul_by_the_same_tensor_twice_is_not_an_activation():
    b = ModelBuilder(SHAPE, seed=1)
    x = b.conv("input", 8)
    sq = same(b, "Mul", [x, x], x)
    model = b.build(b.conv(sq, 4))
    chains, rejections = chains_of(model)
    assert not chains
    assert "Mul" in rejections[0].reason


def se_block(gate_first=True):
    """conv -> relu -> [GAP -> conv -> relu -> conv -> HardSigmoid -> Mul(x, gate)] -> conv (paddle SE)."""
    b = ModelBuilder(SHAPE, seed=2)
    x = b.relu(b.conv("input", 8))
    g = b.node("GlobalAveragePool", [x], "gap")
    b.shapes[g] = (1, 8, 1, 1)
    s = b.relu(b.conv(g, 2, k=1))
    e = b.conv(s, 8, k=1)
    gate = same(b, "HardSigmoid", [e], e, alpha=0.2, beta=0.5)
    y = b.node("Mul", [x, gate] if gate_first else [gate, x], "se")
    b.shapes[y] = b.shapes[x]
    return b.build(b.conv(y, 4))


def test_squeeze_excitation_is_rejected_with_a_clear_reason_and_still_quantized():
    model = se_block()
    out, report = compress(model, channel_multiple=1, prune=0.5, bits=8)
    producer = report.layers[0]
    assert any("squeeze-excitation" in s for s in producer.get("skipped", [])), producer
    assert producer.get("channels_after", 8) == 8
    assert all(l.get("bits") == 8 for l in report.layers if l["op"] == "Conv")
    # the SE's own hidden channels (conv 8->2 -> relu -> conv 2->8) are a plain chain
    chains, _ = chains_of(model)
    assert [c.channels for c in chains] == [2]
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 0.05


def prelu(slope):
    def spell(b, x):
        return same(b, "PRelu", [x, b.const(np.asarray(slope, np.float32), "slope")], x)
    return spell


def test_scalar_prelu_is_leakyrelu_and_per_channel_prelu_keeps_its_slopes():
    chains, _ = chains_of(twin_chain(prelu(np.full((1, 1, 1), 0.25))))
    assert len(chains) == 1
    assert chains[0].first.activation == Activation("leakyrelu", alpha=0.25)
    slopes = np.linspace(0.1, 0.3, 8)
    for shape in ((8, 1, 1), (1, 8, 1, 1)):
        chains, rejections = chains_of(twin_chain(prelu(slopes.reshape(shape))))
        assert len(chains) == 1, [r.reason for r in rejections]
        act = chains[0].first.activation
        assert act.kind == "prelu"
        np.testing.assert_allclose(act.channel_slopes, slopes.astype(np.float32))
    # a 1-D slope broadcasts along W of an NCHW input (8 = W here): not one per channel
    chains, rejections = chains_of(twin_chain(prelu(slopes)))
    assert not chains and "not one per channel" in rejections[0].reason


def test_pruning_through_per_channel_prelu_slices_the_slopes():
    """conv -> BN -> PRelu (one slope per channel) -> conv, pruned by every method: the PRelu keeps the kept
    channels' slopes, the model runs, and udfc's compensation with the per-channel moments beats none."""
    def build(seed):
        b = ModelBuilder((1, 3, 16, 16), seed=seed)
        x = b.bn(b.conv("input", 16, bias=False))
        x = same(b, "PRelu", [x, b.const(np.linspace(-0.2, 0.4, 16).reshape(16, 1, 1).astype(np.float32), "s")], x)
        x = b.relu(b.bn(b.conv(x, 24, bias=False)))
        return calibrate_batchnorm(b.build(b.gemm(b.gap_flatten(x), 10)))

    model = build(2)
    x = random_input(model)
    errors = {}
    for method in ("none", "merge", "udfc"):
        out, report = compress(model, prune=0.5, method=method, channel_multiple=1, allocation="uniform")
        (prelu_node,) = [n for n in out.graph.node if n.op_type == "PRelu"]
        slope = next(t for t in out.graph.initializer if t.name == prelu_node.input[1])
        record = next(r for r in report.layers if r.get("channels_after") is not None and r["channels_before"] == 16)
        assert record["channels_after"] == 8 and tuple(slope.dims) == (8, 1, 1)
        kept = np.setdiff1d(np.arange(16), record["pruned"])
        np.testing.assert_allclose(onnx.numpy_helper.to_array(slope).ravel(),
                                   np.linspace(-0.2, 0.4, 16).astype(np.float32)[kept])
        errors[method] = rel_error(run(model, x), run(out, x))
    assert errors["udfc"] < errors["none"]


def test_per_channel_mul_after_the_activation_is_rejected():
    def spell(b, x):
        y = b.relu(x)
        return same(b, "Mul", [y, b.const(np.linspace(0.5, 1.5, 8).reshape(1, 8, 1, 1).astype(np.float32), "k")], y)
    chains, rejections = chains_of(twin_chain(spell))
    assert not chains and "per-channel constant" in rejections[0].reason


def affine_spelled_model():
    """paddle idioms: Mul(scalar, conv) -> Add(Reshape(Constant bias)) per channel -> relu -> conv."""
    b = ModelBuilder(SHAPE, seed=6, opset=12)
    x = b.conv("input", 8, bias=False)
    scaled = same(b, "Mul", [scalar(b, 1.7), x], x)
    bias_values = b.const(np.linspace(-1, 1, 8).astype(np.float32), "bias")
    bias = b.node("Reshape", [bias_values, b.const(np.array([1, 8, 1, 1], np.int64), "shape")], "reshape")
    shifted = same(b, "Add", [scaled, bias], x)
    per_channel = same(b, "Mul", [shifted, b.const(np.linspace(0.5, 2, 8).reshape(8, 1, 1).astype(np.float32), "k")], x)
    return b.build(b.conv(b.relu(per_channel), 4))


def test_mul_add_after_a_conv_fold_into_it_exactly():
    model = affine_spelled_model()
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = Graph(folded)
    ctx = PassContext(graph=graph, options=None, input_shapes={})
    assert NormalizeGraphPass().run(ctx).stats["constant_ops_folded"] == 1
    assert FoldBatchNormPass().run(ctx).stats["affine_ops_folded"] == 3
    graph.remove_unused_initializers()
    graph.flush()  # the folded weights into the ModelProto
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]
    onnx.checker.check_model(folded, full_check=True)
    x = random_input(model)
    assert rel_error(run(model, x), run(folded, x)) < 1e-6
    out, report = compress(model, channel_multiple=1, prune=0.25, bits=8)
    assert report.layers[0]["channels_after"] == 6
    assert rel_error(run(model, x), run(out, x)) < 0.5


def test_affine_fold_skips_constants_that_vary_along_space():
    b = ModelBuilder(SHAPE, seed=6)
    x = b.conv("input", 8)
    y = same(b, "Add", [x, b.const(np.ones((1, 1, 8, 8), np.float32), "map")], x)
    model = b.build(b.conv(b.relu(y), 4))
    graph = Graph(model)
    result = FoldBatchNormPass().run(PassContext(graph=graph, options=None, input_shapes={}))
    assert result.stats["affine_ops_folded"] == 0


def resize_model(sizes=False):
    b = ModelBuilder(SHAPE, seed=7, opset=13)
    x = b.relu(b.conv("input", 8))
    if sizes:
        inputs = [x, "", "", b.const(np.array([1, 8, 16, 16], np.int64), "sizes")]
    else:
        inputs = [x, "", b.const(np.array([1, 1, 2, 2], np.float32), "scales")]
    y = b.node("Resize", inputs, "resize", mode="nearest")
    b.shapes[y] = (1, 8, 16, 16)
    return b.build(b.conv(y, 4))


def test_resize_by_scales_is_channel_preserving_but_sizes_are_not():
    chains, _ = chains_of(resize_model())
    assert len(chains) == 1 and [p.op_type for p in chains[0].first.pools] == ["Resize"]
    model = resize_model()
    out, report = compress(model, channel_multiple=1, prune=0.25, bits=8)
    onnx.checker.check_model(out, full_check=True)
    assert report.layers[0]["channels_after"] == 6
    chains, rejections = chains_of(resize_model(sizes=True))
    assert not chains and "sizes" in rejections[0].reason


def test_residual_through_spelled_hardswish_is_a_coupled_group():
    b = ModelBuilder(SHAPE, seed=8, opset=12)
    a = hardswish_paddle(b, b.conv("input", 8))
    c = hardswish_paddle(b, b.conv(a, 8))
    model = b.build(b.conv(b.add(a, c), 4))
    groups = coupled_groups(Graph(model))
    assert len(groups) == 1 and len(groups[0]) == 2


def test_dynamic_height_and_width_need_and_accept_input_shapes():
    model = twin_chain(hardswish_paddle, opset=12)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "height"
    dims[3].ClearField("dim_value")
    dims[3].dim_param = "width"
    from onnx_udfc.errors import UsageError
    with pytest.raises(UsageError, match="--input-shape"):
        compress(model, bits=8)
    out, report = compress(model, channel_multiple=1, prune=0.125, bits=8, input_shapes={"input": (1, 3, 12, 20)})
    onnx.checker.check_model(out, full_check=True)
    assert report.validation["outputs"]
    # the output keeps its dynamic spatial axes
    assert out.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "height"

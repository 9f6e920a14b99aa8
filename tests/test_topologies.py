"""One test per topology: the chain is found (or rejected with the right reason), the result is a valid
model with the expected shapes, and it stays close to the original."""
import numpy as np
import onnx
import pytest

from builders import (ModelBuilder, depthwise_block, flatten_gemm, fold_all_batchnorm, gemm_chain, plain_chain,
                      random_input, rel_error, residual_block, run)
from onnx_udfc import compress
from onnx_udfc.ir.graph import Graph, attr


def layers_by_op(report, op):
    return [l for l in report.layers if l["op"] == op]


def weight_shapes(model):
    g = Graph(model)
    return {n.name: g.constant(n.input[1]).shape for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def compress_and_check(model, **kw):
    """Compress (uniform allocation and no channel alignment unless asked: these tests check each chain's
    floor(R * N)), check, compare."""
    kw.setdefault("allocation", "uniform")
    kw.setdefault("channel_multiple", 1)
    out, report = compress(model, **kw)
    onnx.checker.check_model(out, full_check=True)
    x = random_input(model)
    err = rel_error(run(model, x), run(out, x))
    return out, report, err


def test_plain_chain_prunes_every_chain_and_stays_close():
    model = plain_chain()
    out, report, err = compress_and_check(model, prune=0.3, bits=6)
    pruned = [l for l in report.layers if l.get("channels_after", 0) < l.get("channels_before", 0)]
    assert [(l["channels_before"], l["channels_after"]) for l in pruned] == [(16, 12), (32, 23), (32, 23)]
    assert report.after.macs < report.before.macs
    assert report.after.params < report.before.params
    assert err < 0.35


def test_residual_block_is_coupled_and_left_unpruned_but_quantized():
    model = residual_block()
    out, report, err = compress_and_check(model, prune=0.3, bits=6)
    convs = layers_by_op(report, "Conv")
    # stem and the second conv of the block feed the residual Add: coupled, not pruned
    coupled = [l for l in convs if any("coupled" in s for s in l.get("skipped", []))]
    assert len(coupled) == 2
    # the first conv of the block is a clean chain into the second: pruned
    assert any(l.get("channels_after") == 12 for l in convs)
    assert all(l["bits"] in (6, 8) for l in convs)
    assert err < 0.3


def test_depthwise_block_prunes_through_the_depthwise_conv():
    model = depthwise_block()
    out, report, err = compress_and_check(model, prune=0.25, bits=32)
    dw = [n for n in out.graph.node if n.op_type == "Conv" and attr(n, "group", 1) > 1]
    assert len(dw) == 1 and attr(dw[0], "group") == 36
    shapes = list(weight_shapes(out).values())
    # expand 48->36 through the depthwise conv; the projection 16->12 is a chain of its own into the Gemm
    assert sorted(shapes) == sorted([(36, 8, 1, 1), (36, 1, 3, 3), (12, 36, 1, 1), (10, 12)])
    expand = [l for l in report.layers if l.get("through_depthwise")]
    assert expand and expand[0]["channels_after"] == 36
    assert err < 0.3


@pytest.mark.parametrize("matmul", [False, True])
def test_gemm_chain(matmul):
    model = gemm_chain(matmul=matmul)
    out, report, err = compress_and_check(model, prune=0.25, bits=8)
    assert sorted(weight_shapes(out).values()) == sorted(
        [(48, 32), (36, 48), (36, 10) if matmul else (10, 36)])
    # random weights, N(0, 1) inputs: the statistics are exact here, so least squares alone is best; the
    # default blend toward Neuron Merging (made for biased synthetic statistics) costs here (relative error
    # 0.23-0.28 without it, 0.42 with the square-root weight, 0.30 with the cosine itself)
    assert err < 0.45
    _, _, err_least_squares = compress_and_check(model, prune=0.25, bits=8, merge_blend=False)
    assert err_least_squares < 0.3
    assert err_least_squares < err


def test_gap_gemm_consumer_loses_columns():
    model = plain_chain()
    out, report, _ = compress_and_check(model, prune=0.5, bits=32)
    gemm = [s for n, s in weight_shapes(out).items() if len(s) == 2][0]
    assert gemm == (10, 16)


def test_flatten_gemm_consumer_loses_column_blocks():
    model = flatten_gemm()
    out, report, err = compress_and_check(model, prune=0.25, bits=32)
    gemm = [s for n, s in weight_shapes(out).items() if len(s) == 2][0]
    assert gemm == (10, 12 * 16)  # 12 channels x 4x4 map
    assert err < 0.3


def test_folded_bn_model_uses_synthetic_samples_and_moment_propagation():
    model = fold_all_batchnorm(plain_chain())
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    # pink noise: this network's "data" is white noise (its BNs were calibrated on N(0, 1) inputs, as the
    # error below is measured), which unit-contrast pink noise matches and the default's image-prior samples
    # (contrast 0.3-1, brightness offsets) do not; the default's choice is measured on real models
    out, report, err = compress_and_check(model, prune=0.3, bits=6, synthetic_inputs="pink")
    source = report.statistics_source
    assert "pink-noise" in source and "moment propagation" in source and "BatchNormalization" not in source
    assert "BN normalising" not in source  # the folded model has none
    assert any(l.get("channels_after", 99) < l.get("channels_before", 0) for l in report.layers)
    assert err < 0.5


def test_bn_model_says_statistics_come_from_bn():
    _, report = compress(plain_chain(), prune=0.3, bits=6, validate=False)
    source = report.statistics_source
    assert "BatchNormalization priors" in source and source.startswith("average of the analytic")
    assert "every BN normalising by its batch statistics" in source
    _, analytic = compress(plain_chain(), prune=0.3, bits=6, validate=False, statistics="analytic")
    assert "pink-noise" not in analytic.statistics_source


def test_shared_weight_producer_is_rejected():
    b = ModelBuilder((1, 3, 8, 8))
    x = b.relu(b.conv("input", 8))
    w = (np.random.default_rng(0).standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)
    wname = b.const(w)
    y1 = b.node("Conv", [x, wname], "conv", kernel_shape=[3, 3], pads=[1] * 4)
    b.shapes[y1] = b.shapes[x]
    y1 = b.relu(y1)
    y2 = b.node("Conv", [y1, wname], "conv", kernel_shape=[3, 3], pads=[1] * 4)
    b.shapes[y2] = b.shapes[x]
    model = b.build(y2)
    out, report, err = compress_and_check(model, prune=0.5, bits=32)
    reasons = [s for l in report.layers for s in l.get("skipped", [])]
    assert any("shared weight" in r for r in reasons)
    assert err < 0.6


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_clip_bounds_from_constant_nodes_or_initializers(constant_nodes):
    model = plain_chain(act="relu6", constant_clip=constant_nodes)
    assert any(n.op_type == "Constant" for n in model.graph.node) == constant_nodes
    out, report, err = compress_and_check(model, prune=0.3, bits=8)
    first = report.layers[0]
    assert first["channels_after"] == 12
    assert err < 0.35


@pytest.mark.parametrize("opset", [11, onnx.defs.onnx_opset_version()])
def test_opset_11_and_newest(opset):
    import onnxruntime

    model = plain_chain(opset=opset)
    try:
        out, report, err = compress_and_check(model, prune=0.3, bits=6)
    except Exception as exc:  # onnxruntime may lag behind the newest onnx opset
        if "opset" in str(exc).lower() and opset > 21:
            pytest.skip(f"onnxruntime {onnxruntime.__version__} does not run opset {opset}")
        raise
    assert out.opset_import[0].version == opset
    assert err < 0.35


def test_residual_coupled_group_is_reported():
    model = residual_block()
    _, report = compress(model, prune=0.3, bits=32, validate=False, allocation="uniform", channel_multiple=1)
    assert len(report.coupled_groups) == 1
    names = {n.name for n in model.graph.node if n.op_type == "Conv"}
    group = report.coupled_groups[0]
    assert len(group) == 2 and set(group) <= names
    # the block's first conv is not in the group: it is pruned
    first_of_block = [l for l in report.layers if l.get("channels_after") == 12]
    assert first_of_block and first_of_block[0]["name"] not in group

"""The graph's pending weights, the MACs of a pruned model read with the unpruned shapes, and shape reuse."""
import numpy as np
import onnx
from onnx import numpy_helper

from builders import plain_chain, random_input, run
from onnx_udfc import compress
from onnx_udfc.ir.graph import Graph
from onnx_udfc.ir.shapes import infer_static_shapes, resolve_input_shapes
from onnx_udfc.report.metrics import count_macs


def test_written_weights_reach_the_model_proto_once_it_is_asked_for():
    model = plain_chain(seed=1)
    graph = Graph(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = graph.constant(conv.input[1])
    graph.set_weight(conv, 1, 2.0 * w)
    raw = {t.name: t for t in model.graph.initializer}[conv.input[1]]
    np.testing.assert_array_equal(numpy_helper.to_array(raw), w)  # pending: the proto is untouched
    np.testing.assert_array_equal(graph.constant(conv.input[1]), 2.0 * w)  # reads see the new value
    proto = graph.model  # flushes
    raw = {t.name: t for t in proto.graph.initializer}[conv.input[1]]
    np.testing.assert_array_equal(numpy_helper.to_array(raw), 2.0 * w)
    x = random_input(model)
    assert np.all(np.isfinite(run(proto, x)))


def test_pruned_macs_from_the_unpruned_shapes_equal_a_fresh_inference():
    model = plain_chain(seed=2)
    out, report = compress(model, prune=0.5, bits=32, channel_multiple=1, allocation="uniform", validate=False)
    shapes = resolve_input_shapes(model)  # batch 1
    before_shapes = infer_static_shapes(model, shapes)
    fresh = count_macs(out, shapes)
    assert fresh < count_macs(model, shapes)
    assert count_macs(out, shapes, shapes=before_shapes) == fresh == report.after.macs


def test_known_shapes_fill_what_static_inference_cannot_find():
    model = plain_chain(seed=3)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    invented = (1, 999, 7, 7)  # a known shape is taken as given, without running the model
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.input[0].type.tensor_type.shape.dim[:]  # static inference now finds nothing
    found = infer_static_shapes(stripped, {}, known={conv.output[0]: invented})
    assert found[conv.output[0]] == invented


def test_depthwise_convs_keep_depthwise_bits():
    from builders import depthwise_block

    model = depthwise_block(seed=4)
    depthwise = [n.name or n.output[0] for n in model.graph.node
                 if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise
    _, report = compress(model, bits=4, first_last_bits=None, validate=False)
    bits = {layer["name"]: layer["bits"] for layer in report.layers if "bits" in layer}
    assert all(bits[name] == 8 for name in depthwise)
    assert any(b == 4 for name, b in bits.items() if name not in depthwise)
    _, report = compress(model, bits=4, first_last_bits=None, depthwise_bits=None, validate=False)
    assert all(layer["bits"] == 4 for layer in report.layers if "bits" in layer)

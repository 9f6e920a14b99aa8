"""Loading and saving: external data, Constant-node weights, initializers listed as inputs, atomic writes,
pass failures named."""
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import ModelBuilder, plain_chain, random_input, rel_error, run
from onnx_udfc import compress, load_model, save_model
from onnx_udfc.errors import PassError
from onnx_udfc.passes.base import Pass, PassContext, PassManager


def test_external_data_round_trip(tmp_path):
    model = plain_chain()
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    loaded = load_model(str(src))
    out, _ = compress(loaded, prune=0.3, bits=8)
    dst = tmp_path / "out.onnx"
    save_model(out, str(dst), external_data=True)
    assert (tmp_path / "out.onnx.data").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".udfc-")]
    again = onnx.load(str(dst))
    x = random_input(model)
    np.testing.assert_allclose(run(again, x), run(out, x), rtol=0, atol=0)
    # the in-memory model is still complete after saving
    np.testing.assert_allclose(run(out, x), run(again, x), rtol=0, atol=0)


def test_constant_node_weights_and_initializer_inputs():
    model = plain_chain()
    g = model.graph
    # first conv weight as a Constant node; the Gemm weight listed as a graph input too
    conv = next(n for n in g.node if n.op_type == "Conv")
    init = next(t for t in g.initializer if t.name == conv.input[1])
    g.node.insert(0, helper.make_node("Constant", [], [init.name], name="wconst", value=init))
    g.initializer.remove(init)
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    w = next(t for t in g.initializer if t.name == gemm.input[1])
    g.input.append(helper.make_tensor_value_info(w.name, onnx.TensorProto.FLOAT, list(w.dims)))
    onnx.checker.check_model(model)
    out, report = compress(model, prune=0.3, bits=6)
    onnx.checker.check_model(out, full_check=True)
    assert report.layers[0]["channels_after"] == 12
    assert [i.name for i in out.graph.input] == ["input"]
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 0.35


def test_failing_pass_is_named():
    class Broken(Pass):
        name = "broken-pass"

        def run(self, ctx):
            raise ValueError("boom")

    class Fine(Pass):
        name = "fine-pass"

        def run(self, ctx):
            from onnx_udfc.passes.base import PassResult
            return PassResult(False)

    with pytest.raises(PassError, match=r"pass 'broken-pass' failed \(after: fine-pass\): boom"):
        PassManager([Fine(), Broken()]).run(PassContext(graph=None, options=None, input_shapes={}))


def test_float16_and_quantized_models_are_refused():
    from onnx_udfc.errors import BadModelError

    model = plain_chain()
    t = model.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    with pytest.raises(BadModelError, match="float16"):
        compress(model, bits=8)


def test_input_model_object_is_not_modified():
    model = plain_chain()
    before = model.SerializeToString()
    compress(model, prune=0.5, bits=4)
    assert model.SerializeToString() == before


def test_identity_linked_weights_are_constants():
    """Exporters link bit-identical initializers with Identity nodes; such weights are still compressible."""
    model = plain_chain()
    g = model.graph
    conv = [n for n in g.node if n.op_type == "Conv"][1]
    g.node.insert(0, helper.make_node("Identity", [conv.input[1]], ["w_alias"], name="alias"))
    conv.input[1] = "w_alias"
    onnx.checker.check_model(model)
    out, report = compress(model, prune=0.3, bits=6)
    assert report.layers[1]["channels_after"] == 23
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 0.35

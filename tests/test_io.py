"""Loading and saving: external data, Constant-node weights, initializers listed as inputs, atomic writes,
pass failures named."""
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import plain_chain, random_input, rel_error, run
from onnx_udfc import compress, load_model, save_model
from onnx_udfc.errors import PassError
from onnx_udfc.passes.base import Pass, PassContext, PassManager


def test_external_data_round_trip(tmp_path):
    model = plain_chain()
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    loaded = load_model(str(src))
    out, _ = compress(loaded, channel_multiple=1, prune=0.3, bits=8)
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
    out, report = compress(model, channel_multiple=1, prune=0.3, bits=6)
    onnx.checker.check_model(out, full_check=True)
    assert report.layers[0]["channels_after"] < report.layers[0]["channels_before"] == 16  # pruned
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
    compress(model, channel_multiple=1, prune=0.5, bits=4)
    assert model.SerializeToString() == before


def test_identity_linked_weights_are_constants():
    """Exporters link bit-identical initializers with Identity nodes; such weights are still compressible."""
    model = plain_chain()
    g = model.graph
    conv = [n for n in g.node if n.op_type == "Conv"][1]
    g.node.insert(0, helper.make_node("Identity", [conv.input[1]], ["w_alias"], name="alias"))
    conv.input[1] = "w_alias"
    onnx.checker.check_model(model)
    out, report = compress(model, channel_multiple=1, prune=0.3, bits=6)
    assert report.layers[1]["channels_after"] < report.layers[1]["channels_before"] == 32  # pruned
    x = random_input(model)
    assert rel_error(run(model, x), run(out, x)) < 0.35


def _save_with_external_data(model, path):
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path.parent / (path.name + ".data")


def _fingerprint(path):
    return open(path, "rb").read(), os.stat(path).st_mtime_ns


def test_cli_external_data_in_and_out(tmp_path, monkeypatch, capsys):
    """A model past the external-data threshold (lowered here) is written as model + `<name>.data`."""
    import json

    import onnx_udfc.ir.io as io
    from onnx_udfc.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src = tmp_path / "in" / "model.onnx"
    src_data = _save_with_external_data(plain_chain(), src)
    before = {p: _fingerprint(p) for p in (src, src_data)}
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    dst, rep = tmp_path / "out" / "small.onnx", tmp_path / "out" / "r.json"
    assert main([str(src), str(dst), "--prune", "0.3", "--bits", "8", "-q", "--report", str(rep)]) == 0
    assert capsys.readouterr().err == ""
    assert {p: _fingerprint(p) for p in (src, src_data)} == before  # input and its data untouched
    dst_data = tmp_path / "out" / "small.onnx.data"
    assert sorted(os.listdir(tmp_path / "out")) == ["r.json", "small.onnx", "small.onnx.data"]
    assert os.path.getsize(dst) < 10_000 < os.path.getsize(dst_data)
    locations = {e.value for t in onnx.load(str(dst), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"small.onnx.data"}  # relative: the pair can be moved together
    report = json.loads(rep.read_text())
    assert report["after"]["bytes"] == os.path.getsize(dst) + os.path.getsize(dst_data)
    assert report["before"]["bytes"] == os.path.getsize(src) + os.path.getsize(src_data)
    written = onnx.load(str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    expected, _ = compress(load_model(str(src)), prune=0.3, bits=8, validate=False)
    x = random_input(written)
    np.testing.assert_array_equal(run(written, x), run(expected, x))


def test_cli_external_data_file_missing_exit_3(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "model.onnx"
    _save_with_external_data(plain_chain(), src).unlink()
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnx_udfc", str(src), str(out), "--bits", "8"],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "external data file not found" in proc.stderr and "model.onnx.data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from onnx_udfc.errors import BadModelError

    (tmp_path / "a").mkdir()
    src = tmp_path / "a" / "model.onnx"
    _save_with_external_data(plain_chain(), src).rename(tmp_path / "secret.data")
    m = onnx.load(str(src), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(m, str(src))
    with pytest.raises(BadModelError, match="external data"):
        load_model(str(src))


def test_output_data_file_must_not_be_the_inputs(tmp_path, capsys):
    """`b.onnx` would write `b.onnx.data`, which here holds the weights of the input `a.onnx`."""
    from onnx_udfc.cli import main

    src = tmp_path / "a.onnx"
    onnx.save_model(plain_chain(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="b.onnx.data", size_threshold=0)
    data = tmp_path / "b.onnx.data"
    before = _fingerprint(data)
    assert main([str(src), str(tmp_path / "b.onnx"), "--bits", "8", "-q"]) == 2
    err = capsys.readouterr().err
    assert "external data file" in err and len(err.strip().splitlines()) == 1
    assert _fingerprint(data) == before and not (tmp_path / "b.onnx").exists()


def test_models_over_the_protobuf_limit_are_refused(monkeypatch):
    """Over 2 GiB in memory, onnx.checker, shape inference and onnxruntime cannot take the model: one line."""
    import onnx_udfc.ir.io as io
    from onnx_udfc.errors import BadModelError

    model = plain_chain()
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", model.ByteSize() - 1)
    with pytest.raises(BadModelError, match="over 2 GiB are not supported"):
        compress(model, bits=8)


def test_save_failure_leaves_no_file_and_a_complete_model(tmp_path, monkeypatch):
    """A write error while saving with external data: UsageError, no file left, the weights still in memory."""
    import onnx_udfc.ir.io as io
    from onnx_udfc.errors import UsageError

    model = plain_chain()
    expected = model.SerializeToString()
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith(".data"):
            raise OSError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(UsageError, match="cannot write .*Permission denied"):
        save_model(model, str(tmp_path / "o.onnx"), external_data=True)
    assert os.listdir(tmp_path) == []
    assert model.SerializeToString() == expected


def test_saving_with_external_data_keeps_the_model_in_memory_unchanged(tmp_path):
    model = plain_chain()
    expected = model.SerializeToString()
    assert save_model(model, str(tmp_path / "o.onnx"), external_data=True) == str(tmp_path / "o.onnx.data")
    assert model.SerializeToString() == expected
    assert save_model(model, str(tmp_path / "p.onnx"), external_data=False) is None
    assert sorted(os.listdir(tmp_path)) == ["o.onnx", "o.onnx.data", "p.onnx"]


def test_streamed_serialisation_equals_the_protobuf_one():
    import io as bytes_io

    from onnx_udfc.ir.io import write_serialized

    model = plain_chain()
    model.doc_string = "doc"
    model.metadata_props.add(key="k", value="v")
    model.graph.doc_string = "graph doc"
    model.graph.value_info.add(name="x")
    empty = onnx.ModelProto()
    empty.CopyFrom(model)
    del empty.graph.initializer[:]
    for m in (model, empty):
        buffer = bytes_io.BytesIO()
        assert write_serialized(m, buffer) == len(buffer.getvalue())
        assert buffer.getvalue() == m.SerializeToString(deterministic=True)


def test_cli_output_has_the_permissions_of_a_plain_file(tmp_path):
    from onnx_udfc.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(plain_chain(), str(src))
    assert main([str(src), str(dst), "--bits", "8", "-q", "--no-validate"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]  # no temporary file left

"""CLI: exit codes, one-line errors, report schema, determinism, the input file untouched."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import ModelBuilder, calibrate_batchnorm, conv_bn_relu, plain_chain, random_input, run
from onnx_udfc.cli import main


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    onnx.save(plain_chain(), str(path))
    return str(path)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def cli(*args):
    """Run the real console entry point in a subprocess: (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "onnx_udfc", *args], capture_output=True, text=True)
    return proc.returncode, proc.stderr


def test_compress_writes_model_and_report(model_path, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    before = sha(model_path)
    code, err = cli(model_path, str(out), "--prune", "0.3", "--bits", "6", "--report", str(rep))
    assert code == 0, err
    assert sha(model_path) == before
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    report = json.loads(rep.read_text())
    for key in ("schema_version", "options", "statistics_source", "before", "after", "layers", "passes",
                "validation", "seconds"):
        assert key in report, key
    for key in ("params", "bytes", "macs"):
        assert report["after"][key] < report["before"][key]
    assert report["after"]["bytes"] == os.path.getsize(out)
    assert set(report["validation"]["outputs"][next(iter(report["validation"]["outputs"]))]) >= {
        "max_abs_error", "rel_l2_error", "cosine", "top1_agreement"}
    assert all("name" in l and "op" in l for l in report["layers"])
    assert [p["name"] for p in report["passes"]] == ["normalize", "fold-batchnorm", "statistics",
                                                     "prune-quantize-compensate", "cleanup"]
    assert "params" in err and "statistics:" in err  # summary table on stderr


def test_same_input_same_bytes(model_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main([model_path, str(a), "--prune", "0.3", "--bits", "5", "-q", "--no-validate"]) == 0
    assert main([model_path, str(b), "--prune", "0.3", "--bits", "5", "-q", "--no-validate"]) == 0
    assert sha(a) == sha(b)


@pytest.mark.parametrize("args,code,text", [
    (["missing.onnx", "OUT"], 2, "not found"),
    (["MODEL", "OUT", "--prune", "1.0"], 2, "--prune"),
    (["MODEL", "OUT", "--prune", "-0.1"], 2, "--prune"),
    (["MODEL", "OUT", "--bits", "9"], 2, "--bits"),
    (["MODEL", "OUT", "--bits", "1"], 2, "--bits"),
    (["MODEL", "OUT", "--prune", "nan"], 2, "--prune"),
    (["MODEL", "OUT", "--prune", "abc"], 2, "--prune"),
    (["MODEL", "OUT", "--first-last-bits", "9"], 2, "--first-last-bits"),
    (["MODEL", "OUT", "--first-last-bits", "-1"], 2, "--first-last-bits"),
    (["MODEL", "OUT", "--samples", "1"], 2, "--samples"),
    (["MODEL", "OUT", "--seed", "-1"], 2, "--seed"),
    (["MODEL", "OUT", "--max-rel-error", "-1"], 2, "--max-rel-error"),
    (["MODEL", "OUT", "--max-rel-error", "nan"], 2, "--max-rel-error"),
    (["MODEL", "OUT", "--method", "magic"], 2, "invalid choice"),
    (["MODEL", "MODEL"], 2, "input"),
    (["MODEL", "/nonexistent-dir/out.onnx"], 2, "folder"),
    (["MODEL", "OUT", "--report", "/nonexistent-dir/r.json"], 2, "folder"),
    (["MODEL", "OUT", "--report", "OUT"], 2, "--report"),
    (["MODEL", "OUT", "--report", "MODEL"], 2, "--report"),
    (["MODEL", "OUT", "--input-shape", "bad"], 2, "input-shape"),
    (["MODEL", "OUT", "--input-shape", "nope:1x3x16x16"], 2, "unknown input"),
])
def test_usage_errors_exit_2_with_one_line(model_path, tmp_path, args, code, text):
    out = str(tmp_path / "o.onnx")
    args = [model_path if a == "MODEL" else out if a == "OUT" else a for a in args]
    before = sha(model_path)
    rc, err = cli(*args)
    assert rc == code, err
    assert text in err
    assert_refused(rc, err, code, text, out)
    assert sha(model_path) == before


def assert_refused(rc, err, code, text, out):
    """Exit `code`, one stderr line holding `text`, no traceback, nothing written next to `out`."""
    assert rc == code, err
    assert text in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    folder = os.path.dirname(str(out))
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".data")
    assert not [f for f in os.listdir(folder) if f.startswith(".udfc-")]


def test_not_onnx_and_truncated_exit_3(model_path, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all \x00\x01\x02")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(open(model_path, "rb").read()[:500])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (junk, trunc, empty):
        rc, err = cli(str(path), str(tmp_path / "o.onnx"))
        assert_refused(rc, err, 3, str(path), tmp_path / "o.onnx")


def test_input_directory_exit_2(tmp_path):
    rc, err = cli(str(tmp_path), str(tmp_path / "o.onnx"))
    assert_refused(rc, err, 2, "directory", tmp_path / "o.onnx")


def test_old_opset_exit_3(tmp_path):
    model = plain_chain()
    model.opset_import[0].version = 9
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    rc, err = cli(str(path), str(tmp_path / "o.onnx"))
    assert_refused(rc, err, 3, "opset 9", tmp_path / "o.onnx")


def test_model_failing_checker_exit_3(tmp_path):
    model = plain_chain()
    model.graph.node[1].input[0] = "nowhere"  # reads a tensor nothing produces
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    rc, err = cli(str(path), str(tmp_path / "o.onnx"), "--bits", "8")
    assert_refused(rc, err, 3, "onnx.checker", tmp_path / "o.onnx")


def _as_float16(model, data_type):
    """The same graph with every float initializer and the input/output declared as `data_type`."""
    for t in model.graph.initializer:
        values = numpy_helper.to_array(t).astype(np.float32)
        t.CopyFrom(helper.make_tensor(t.name, data_type, values.shape, values.flatten().tolist()))
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.elem_type = data_type
    return model


def _dequantized_weight():
    """conv weight stored as int8 and dequantized at run time (QDQ export)."""
    model = plain_chain()
    g = model.graph
    conv = next(n for n in g.node if n.op_type == "Conv")
    w = next(t for t in g.initializer if t.name == conv.input[1])
    scale = float(np.abs(numpy_helper.to_array(w)).max() / 127)
    q = np.round(numpy_helper.to_array(w) / scale).astype(np.int8)
    g.initializer.remove(w)
    g.initializer.extend([numpy_helper.from_array(q, "w_int8"), numpy_helper.from_array(np.float32(scale), "w_scale")])
    g.node.insert(0, helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], [conv.input[1]], name="dq"))
    return model


def _qlinear_conv():
    """x -> QuantizeLinear -> QLinearConv -> DequantizeLinear (an integer-only model)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
             numpy_helper.from_array(rng.integers(-20, 20, (4, 3, 3, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.int8(0), "wz"),
             numpy_helper.from_array(np.float32(0.1), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="qconv",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("make,text", [
    (lambda: _as_float16(plain_chain(), TensorProto.FLOAT16), "float16"),
    (lambda: _as_float16(plain_chain(), TensorProto.BFLOAT16), "bfloat16"),
    (_dequantized_weight, "already quantized (DequantizeLinear"),
    (_qlinear_conv, "already quantized (QuantizeLinear"),
])
def test_unsupported_weight_types_exit_3(tmp_path, make, text):
    model = make()
    onnx.checker.check_model(model)  # a valid model, only not one this tool compresses
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    rc, err = cli(str(path), str(tmp_path / "o.onnx"), "--prune", "0.3", "--bits", "8")
    assert_refused(rc, err, 3, text, tmp_path / "o.onnx")


def test_unwritable_output_folder_exit_2(model_path, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(str(folder), os.W_OK):  # root ignores the mode bits: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(folder)
                            and mode & os.W_OK else real_access(p, mode, **kw))
    try:
        rc = main([model_path, str(folder / "o.onnx"), "--bits", "8", "-q"])
        assert_refused(rc, capsys.readouterr().err, 2, "not writable", folder / "o.onnx")
    finally:
        folder.chmod(0o755)


def test_write_failure_at_save_time_exit_2_without_leftovers(model_path, tmp_path, monkeypatch, capsys):
    """Disk full while writing: one line, exit 2, no temporary or partial file left."""
    import onnx_udfc.ir.io as io

    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("o.onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", full_disk)
    rc = main([model_path, str(tmp_path / "o.onnx"), "--bits", "8", "-q", "--no-validate"])
    assert_refused(rc, capsys.readouterr().err, 2, "No space left on device", tmp_path / "o.onnx")


def _single_conv():
    b = ModelBuilder((1, 3, 8, 8))
    return calibrate_batchnorm(b.build(conv_bn_relu(b, "input", 8)))


def _gemm_softmax_gemm():
    b = ModelBuilder((1, 16))
    b.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])]
    x = b.gemm("input", 12)
    x = b._same("Softmax", [x], x, axis=1)
    return b.build(b.gemm(x, 4))


@pytest.mark.parametrize("make,bits", [(_single_conv, "8"), (_single_conv, "32"), (_gemm_softmax_gemm, "6")])
def test_prune_without_prunable_chain_warns_and_writes(tmp_path, make, bits):
    model = make()
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, str(src))
    rc, err = cli(str(src), str(out), "--prune", "0.5", "--bits", bits, "-q", "--report", str(rep))
    assert rc == 0, err
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert "WARNING: no prunable chain; pruning skipped" in err
    notes = json.loads(rep.read_text())["notes"]
    assert any(n.startswith("no prunable chain; pruning skipped (") for n in notes), notes
    result = onnx.load(str(out))
    weights = lambda m: sorted(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 2)
    assert weights(result) == weights(model)  # nothing pruned
    x = random_input(model)
    error = np.linalg.norm(run(result, x) - run(model, x)) / np.linalg.norm(run(model, x))
    assert error < (1e-5 if bits == "32" else 0.1)
    quantized = [l for l in json.loads(rep.read_text())["layers"] if l.get("bits", 32) < 32]
    assert bool(quantized) == (bits != "32")


def test_prune_ratio_too_small_warns(model_path, tmp_path):
    rep = tmp_path / "r.json"
    rc, err = cli(model_path, str(tmp_path / "o.onnx"), "--prune", "0.01", "-q", "--report", str(rep))
    assert rc == 0, err
    assert len(err.strip().splitlines()) == 1 and "removed no channel" in err
    assert any("removed no channel" in n for n in json.loads(rep.read_text())["notes"])


def test_pruning_that_removes_channels_has_no_warning(model_path, tmp_path):
    rc, err = cli(model_path, str(tmp_path / "o.onnx"), "--prune", "0.3", "-q")
    assert rc == 0 and err == ""


def test_validation_threshold_exit_1_without_output(model_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, err = cli(model_path, str(out), "--prune", "0.5", "--bits", "2", "--first-last-bits", "0",
                  "--max-rel-error", "1e-6", "--report", str(rep))
    assert rc == 1, err
    assert "exceeds" in err
    assert not out.exists()
    assert json.loads(rep.read_text())["validation"]["passed"] is False


def test_no_validate_skips_onnxruntime(model_path, tmp_path):
    rep = tmp_path / "r.json"
    assert main([model_path, str(tmp_path / "o.onnx"), "--bits", "8", "--no-validate", "-q",
                 "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["validation"] is None


def _run_with_flag(path, tmp_path, flag, *args):
    """(report, output bytes) of `--prune 0.3 --no-validate` on `path` with `args` and the flag list `flag`."""
    out, rep = tmp_path / f"o{len(flag)}.onnx", tmp_path / f"r{len(flag)}.json"
    assert main([str(path), str(out), "--prune", "0.3", *args, "--no-validate", "-q", "--report", str(rep),
                 *flag]) == 0
    return json.loads(rep.read_text()), out.read_bytes()


def test_no_merge_blend_reaches_the_folded_chains(tmp_path):
    from builders import fold_all_batchnorm

    path = tmp_path / "folded.onnx"
    onnx.save(fold_all_batchnorm(plain_chain(seed=3)), str(path))
    outputs = {}
    for flag in ([], ["--no-merge-blend"]):
        report, outputs[bool(flag)] = _run_with_flag(path, tmp_path, flag)
        assert report["options"]["merge_blend"] is not bool(flag)
        notes = [n for layer in report["layers"] for n in layer.get("notes", []) if "Neuron Merging" in n]
        assert bool(notes) is not bool(flag)
    assert outputs[True] != outputs[False]


def test_no_residual_share_reaches_the_allocation(tmp_path):
    from test_allocation import branch_beside_a_strong_skip_model

    model, branch_consumer = branch_beside_a_strong_skip_model()
    path = tmp_path / "residual.onnx"
    onnx.save(model, str(path))
    removed = {}
    for flag in ([], ["--no-residual-share"]):
        report, _ = _run_with_flag(path, tmp_path, flag, "--channel-multiple", "1")
        assert report["options"]["residual_share"] is not bool(flag)
        removed[bool(flag)] = next(l["channels_before"] - l["channels_after"] for l in report["layers"]
                                   if l.get("consumer") == branch_consumer)
    assert removed[False] > removed[True]


def test_no_restore_variance_keeps_the_solved_compensation(tmp_path):
    """udfc scales each pruned chain's consumer output back to its modelled variance and says by how much;
    `--no-restore-variance` leaves the solved compensation (same channels removed)."""
    path = tmp_path / "m.onnx"
    onnx.save(plain_chain(seed=4), str(path))
    runs = {}
    for flag in ([], ["--no-restore-variance"]):
        report, output = _run_with_flag(path, tmp_path, flag)
        assert report["options"]["restore_variance"] is not bool(flag)
        pruned = [l for l in report["layers"] if l.get("channels_after", 0) < l.get("channels_before", 0)]
        assert pruned
        scales = [l.get("variance_scale") for l in pruned]
        if flag:
            assert scales == [None] * len(pruned)
        else:
            assert all(1.0 <= s["mean"] <= s["max"] <= 1.3 for s in scales) and any(s["max"] > 1.0 for s in scales)
        runs[bool(flag)] = (output, [l["pruned"] for l in pruned])
    assert runs[True][0] != runs[False][0] and runs[True][1] == runs[False][1]


def test_dynamic_spatial_dims_need_input_shape(tmp_path):
    model = plain_chain()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    rc, err = cli(str(path), str(tmp_path / "o.onnx"), "--bits", "8")
    assert rc == 2 and "--input-shape" in err
    rc, err = cli(str(path), str(tmp_path / "o.onnx"), "--bits", "8", "--input-shape", "input:1x3x16x16")
    assert rc == 0, err


def test_cli_output_and_validation_equal_the_api_s(model_path, tmp_path):
    """The CLI compresses the model it read in place and re-reads the input for the statistics probe and the
    validation instead of keeping a copy: same bytes and same validation as the API, which copies."""
    from onnx_udfc import compress

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([model_path, str(out), "--prune", "0.3", "--bits", "6", "-q", "--report", str(rep)]) == 0
    model = onnx.load(model_path)
    expected, report = compress(model, prune=0.3, bits=6)
    assert out.read_bytes() == expected.SerializeToString(deterministic=True)
    assert json.loads(rep.read_text())["validation"]["outputs"] == json.loads(report.to_json())["validation"]["outputs"]
    assert onnx.load(model_path).SerializeToString() == model.SerializeToString()  # the API left its input alone


def test_input_changed_during_the_run_is_an_error(model_path, tmp_path, monkeypatch, capsys):
    import onnx_udfc.cli as cli_module

    stamps = iter([(1, 1), (2, 2)])
    monkeypatch.setattr(cli_module, "_file_stamp", lambda path: next(stamps, (3, 3)))
    out = tmp_path / "o.onnx"
    assert main([model_path, str(out), "--prune", "0.3", "--bits", "6", "-q"]) != 0
    err = capsys.readouterr().err
    assert "input file changed" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_fixes_the_mmap_threshold_when_pruning(model_path, tmp_path, monkeypatch):
    """On pruning runs the CLI (not the library: it is process-wide) keeps glibc from raising its mmap
    threshold, so freed large arrays leave the process (onnx_udfc.heap)."""
    import platform

    import onnx_udfc.cli as cli_module
    from onnx_udfc.heap import fix_mmap_threshold

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert fix_mmap_threshold() is True
    calls = []
    monkeypatch.setattr(cli_module, "fix_mmap_threshold", lambda: calls.append(1) or True)
    assert main([model_path, str(tmp_path / "o.onnx"), "--bits", "8", "--no-validate", "-q"]) == 0
    assert calls == []  # quantization only: the fixed threshold would only cost time
    assert main([model_path, str(tmp_path / "o.onnx"), "--prune", "0.3", "--no-validate", "-q"]) == 0
    assert calls == [1]

"""CLI: exit codes, one-line errors, report schema, determinism, the input file untouched."""
import hashlib
import json
import os
import subprocess
import sys

import onnx
import pytest

from builders import plain_chain
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
    (["MODEL", "OUT", "--method", "magic"], 2, "invalid choice"),
    (["MODEL", "MODEL"], 2, "input"),
    (["MODEL", "/nonexistent-dir/out.onnx"], 2, "folder"),
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
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out)
    assert sha(model_path) == before


def test_not_onnx_and_truncated_exit_3(model_path, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all \x00\x01\x02")
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(open(model_path, "rb").read()[:500])
    for path in (junk, trunc):
        rc, err = cli(str(path), str(tmp_path / "o.onnx"))
        assert rc == 3, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "o.onnx").exists()


def test_old_opset_exit_3(tmp_path):
    model = plain_chain()
    model.opset_import[0].version = 9
    path = tmp_path / "old.onnx"
    onnx.save(model, str(path))
    rc, err = cli(str(path), str(tmp_path / "o.onnx"))
    assert rc == 3 and "opset 9" in err


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

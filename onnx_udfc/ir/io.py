"""Loading, checking and atomically saving ONNX models (external data included)."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

import onnx
from onnx import TensorProto

from ..errors import BadModelError, UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 11
#: Above this serialized size the protobuf limit (2 GB) is near: weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_UNSUPPORTED_WEIGHT_TYPES = {
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}


def load_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) or raise a one-line UsageError/BadModelError."""
    if not os.path.exists(path):
        raise UsageError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"input path is a directory, not an ONNX file: {path}")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise BadModelError(f"cannot read {path} as ONNX: {_first_line(exc)}") from None
    if not model.graph.node:
        raise BadModelError(f"{path} holds no ONNX graph (empty or not an ONNX model)")
    return model


def model_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" or "ai.onnx") operator set."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise BadModelError("model imports no default ONNX operator set")


def check_supported(model: onnx.ModelProto) -> None:
    """Refuse models this tool cannot compress correctly, with the reason on one line."""
    opset = model_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise BadModelError(
            f"opset {opset} is not supported (need {MIN_OPSET}..{newest}); "
            "convert it first with onnx.version_converter"
        )
    if opset > newest:
        raise BadModelError(f"opset {opset} is newer than this onnx package supports ({newest})")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise BadModelError(f"model fails onnx.checker: {_first_line(exc)}") from None
    for t in model.graph.initializer:
        if t.data_type in _UNSUPPORTED_WEIGHT_TYPES:
            raise BadModelError(
                f"weights of type {_UNSUPPORTED_WEIGHT_TYPES[t.data_type]} are not supported "
                f"(initializer '{t.name}'); export the model in float32"
            )
    quantized = [n.op_type for n in model.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger",
                                  "MatMulInteger", "QLinearMatMul")]
    if quantized:
        raise BadModelError(
            f"model is already quantized ({quantized[0]} nodes); give the float32 original instead"
        )


def check_output_folder(path: str) -> str:
    """The folder `path` will be written in; UsageError when it is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}")
    return folder


def save_model(model: onnx.ModelProto, path: str, external_data: Optional[bool] = None) -> None:
    """Write `model` to `path` atomically (temporary file in the same folder, then rename).

    Models near the 2 GB protobuf limit are saved with their weights in `<name>.data` beside `path`.
    """
    folder = check_output_folder(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    fd, tmp = tempfile.mkstemp(prefix=".udfc-", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp_data = None
    try:
        if external_data:
            data_name = os.path.basename(path) + ".data"
            tmp_data_name = os.path.basename(tmp) + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data_name, size_threshold=1024)
            tmp_data = os.path.join(folder, tmp_data_name)
            # point the model at the final data file name, then rewrite the (small) model file
            for t in _all_tensors(model):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp_data, os.path.join(folder, data_name))
            tmp_data = None
            onnx.load_external_data_for_model(model, folder)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        raise


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def write_text_atomic(path: str, text: str) -> None:
    """Write a small text file (the JSON report) via a temporary file and a rename."""
    folder = check_output_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=".udfc-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

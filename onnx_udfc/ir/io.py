"""Loading, checking and atomically saving ONNX models (external data included)."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import List, Optional, Tuple

import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ..errors import BadModelError, UsageError

log = logging.getLogger(__name__)

MIN_OPSET = 11
#: Above this serialized size the protobuf limit (2 GB) is near: weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Largest model (serialized, weights included) that onnx.checker, shape inference and onnxruntime accept in memory.
PROTOBUF_LIMIT = 2**31 - 1
_UNSUPPORTED_WEIGHT_TYPES = {
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
}


def load_model(path: str) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) or raise a one-line UsageError/BadModelError."""
    return read_model(path)[0]


def read_model(path: str) -> Tuple[onnx.ModelProto, List[str]]:
    """The model at `path` with its weights in memory, and the absolute paths of its external data files."""
    model, data_files, _ = read_model_bytes(path)
    return model, data_files


def read_model_bytes(path: str) -> Tuple[onnx.ModelProto, List[str], Optional[bytes]]:
    """`read_model`, plus the file's bytes when they are the whole model (no external data), else None."""
    if not os.path.exists(path):
        raise UsageError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"input path is a directory, not an ONNX file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"input file is not readable: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        model = onnx.ModelProto()
        model.ParseFromString(data)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # protobuf DecodeError, ...
        raise BadModelError(f"cannot read {path} as ONNX: {_first_line(exc)}") from None
    if not model.graph.node:
        raise BadModelError(f"{path} holds no ONNX graph (empty or not an ONNX model)")
    folder = os.path.dirname(os.path.abspath(path))
    data_files = external_data_files(model, folder)
    for data in data_files:
        if not os.path.isfile(data):
            raise BadModelError(f"external data file not found: {data} (referenced by {path})")
    try:
        onnx.load_external_data_for_model(model, folder)
    except Exception as exc:  # truncated data file, location outside the model folder, ...
        raise BadModelError(f"cannot read the external data of {path}: {_first_line(exc)}") from None
    return model, data_files, None if data_files else data


def external_data_files(model: onnx.ModelProto, folder: str) -> List[str]:
    """Absolute paths of the external data files the tensors of `model` refer to, in first-use order."""
    files: List[str] = []
    for t in _all_tensors(model):
        if uses_external_data(t):
            location = os.path.abspath(os.path.join(folder, ExternalDataInfo(t).location))
            if location not in files:
                files.append(location)
    return files


def data_file_for(path: str) -> str:
    """Where `save_model` puts the weights of a model saved with external data at `path`."""
    return os.path.abspath(path) + ".data"


def model_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" or "ai.onnx") operator set."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise BadModelError("model imports no default ONNX operator set")


def check_supported(model: onnx.ModelProto, serialized: Optional[bytes] = None) -> None:
    """Refuse models this tool cannot compress correctly, with the reason on one line.

    `serialized`: the model's bytes when the caller has them (read from a file), so that neither the size
    check nor onnx.checker serialises the model again (a tenth of a second per 100 MB each).
    """
    size = len(serialized) if serialized is not None else model.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise BadModelError(
            f"model is {size / 2**30:.2f} GiB with its weights; models over 2 GiB are not supported "
            "(onnx.checker, shape inference and onnxruntime need them in one protobuf)"
        )
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
        onnx.checker.check_model(model if serialized is None else serialized, full_check=False)
    except Exception as exc:
        raise BadModelError(f"model fails onnx.checker: {_first_line(exc)}") from None
    _check_float_types(model)
    quantized = [n.op_type for n in model.graph.node
                 if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger",
                                  "MatMulInteger", "QLinearMatMul")]
    if quantized:
        raise BadModelError(
            f"model is already quantized ({quantized[0]} nodes); give the float32 original instead"
        )


def _check_float_types(model: onnx.ModelProto) -> None:
    """Refuse float16/bfloat16/float64 initializers and graph inputs."""
    for t in model.graph.initializer:
        if t.data_type in _UNSUPPORTED_WEIGHT_TYPES:
            raise BadModelError(
                f"weights of type {_UNSUPPORTED_WEIGHT_TYPES[t.data_type]} are not supported "
                f"(initializer '{t.name}'); export the model in float32"
            )
    for i in model.graph.input:
        elem = i.type.tensor_type.elem_type
        if elem in _UNSUPPORTED_WEIGHT_TYPES:
            raise BadModelError(
                f"input '{i.name}' is {_UNSUPPORTED_WEIGHT_TYPES[elem]}; export the model in float32"
            )


def check_output_folder(path: str) -> str:
    """The folder `path` will be written in; UsageError when it is missing or not writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}")
    return folder


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when `model`'s weights take it near the protobuf limit (`save_model` then splits them off).

    Summed tensor by tensor: the model's `ByteSize()` serialises it whole (ResNet-50-sized: 200 MB at peak).
    """
    return sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD


def temporary_file_beside(path: str) -> str:
    """A new empty file in `path`'s folder (a rename onto `path` is then atomic); the caller removes it."""
    folder = check_output_folder(path)
    try:
        return _new_file(folder)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or _first_line(exc)}") from None


def _new_file(folder: str) -> str:
    """A new empty file in `folder` with the permissions a plain `open` would give it (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=".udfc-", suffix=".onnx", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def replace_file(source: str, path: str) -> None:
    """Rename `source` onto `path` (same folder: atomic), or a one-line UsageError."""
    try:
        os.replace(source, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or _first_line(exc)}") from None


def save_model(model: onnx.ModelProto, path: str, external_data: Optional[bool] = None,
               serialized: Optional[bytes] = None) -> Optional[str]:
    """Write `model` to `path` atomically (temporary files in the same folder, then renames).

    `serialized`: `model.SerializeToString(deterministic=True)` when the caller already has it.

    Models near the 2 GB protobuf limit are saved with their weights in `<name>.data` beside `path`
    (`data_file_for(path)`); returns that file's path, or None when everything is in `path`.
    `model` is complete in memory again on return. An OSError (no space, no permission) becomes a
    one-line UsageError and leaves no temporary file behind.
    """
    folder = check_output_folder(path)
    if external_data is None:
        external_data = (len(serialized) if serialized is not None else model.ByteSize()) > EXTERNAL_DATA_THRESHOLD
    tmp = tmp_data = None
    try:
        tmp = _new_file(folder)
        if external_data:
            tmp_data = os.path.join(folder, os.path.basename(tmp) + ".data")
            _write_with_external_data(model, tmp, tmp_data, data_file_for(path))
            os.replace(tmp_data, data_file_for(path))
            tmp_data = None
        else:
            with open(tmp, "wb") as f:
                f.write(serialized if serialized is not None else model.SerializeToString(deterministic=True))
        os.replace(tmp, path)
    except BaseException as exc:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror or _first_line(exc)}") from None
        raise
    return data_file_for(path) if external_data else None


def _write_with_external_data(model: onnx.ModelProto, tmp: str, tmp_data: str, final_data: str) -> None:
    """Weights to `tmp_data`, the model (pointing at `final_data`'s name) to `tmp`; `model` reloaded after."""
    try:
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(tmp_data), size_threshold=1024)
        _set_location(model, os.path.basename(final_data))
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    except BaseException:
        try:  # best effort: the caller is failing anyway
            _reload_weights(model, tmp_data)
        except Exception:
            log.debug("weights of the failed save not reloaded", exc_info=True)
        raise
    _reload_weights(model, tmp_data)


def _set_location(model: onnx.ModelProto, location: str) -> None:
    for t in _all_tensors(model):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location


def _reload_weights(model: onnx.ModelProto, data_path: str) -> None:
    """Bring the weights saved in `data_path` back into `model` (in memory, no external reference left)."""
    _set_location(model, os.path.basename(data_path))
    moved = [t for t in _all_tensors(model) if uses_external_data(t)]
    onnx.load_external_data_for_model(model, os.path.dirname(data_path))
    for t in moved:  # as before the save, byte for byte (the loader sets data_location=DEFAULT explicitly)
        t.ClearField("data_location")


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
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".udfc-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror or _first_line(exc)}") from None
        raise


def write_serialized(model: onnx.ModelProto, f) -> int:
    """Write ``model.SerializeToString(deterministic=True)`` to the binary file `f`, one initializer at a
    time; returns the number of bytes written.

    Serialising a 100 MB model at once holds its bytes and the encoder's buffer (about 200 MB more at peak);
    here the largest transient is one weight. A message's deterministic encoding is its fields in
    field-number order, so the model is written as: its fields before `graph`, the graph's tag and length,
    the graph's fields before `initializer`, every initializer (tag, length, bytes), the graph's fields
    after it, the model's fields after `graph`. `test_streamed_serialisation_equals_the_protobuf_one`
    checks the bytes are the same.
    """
    graph = model.graph
    graph_head, graph_tail = _split_fields(graph, _GRAPH_INITIALIZER)
    model_head, model_tail = _split_fields(model, _MODEL_GRAPH)
    sizes = [t.ByteSize() for t in graph.initializer]
    initializer_tag = _varint(_GRAPH_INITIALIZER << 3 | 2)
    graph_size = (len(graph_head) + len(graph_tail)
                  + sum(len(initializer_tag) + len(_varint(n)) + n for n in sizes))
    written = 0
    for piece in (model_head, _varint(_MODEL_GRAPH << 3 | 2), _varint(graph_size), graph_head):
        written += f.write(piece)
    for tensor, size in zip(graph.initializer, sizes):
        written += f.write(initializer_tag) + f.write(_varint(size))
        written += f.write(tensor.SerializeToString(deterministic=True))
    written += f.write(graph_tail) + f.write(model_tail)
    return written


_MODEL_GRAPH = onnx.ModelProto.GRAPH_FIELD_NUMBER
_GRAPH_INITIALIZER = onnx.GraphProto.INITIALIZER_FIELD_NUMBER


def _split_fields(message, number: int) -> Tuple[bytes, bytes]:
    """Deterministic encodings of `message`'s set fields numbered below / above `number` (that field left out).

    Built from fresh messages that receive copies of those fields only: the left-out field (a graph or the
    initializers, the model's weights) is never copied.
    """
    head, tail = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number == number:
            continue
        part = head if field.number < number else tail
        if field.is_repeated:
            getattr(part, field.name).extend(value)
        elif field.message_type is not None:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)

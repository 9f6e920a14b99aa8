"""Shape inference with concrete input shapes, and input-shape resolution shared by validation and MACs."""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UsageError
from ..ort_session import inference_session

log = logging.getLogger(__name__)

Shape = Tuple[int, ...]
#: numpy dtype of an ONNX tensor element type, for building input feeds
NUMPY_TYPES = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
    TensorProto.BOOL: "bool",
}
_BATCH_NAMES = {"n", "batch", "batch_size", "batchsize", "b", "bs", "unk__0", "none", "?"}


def parse_input_shapes(specs: List[str]) -> Dict[str, Shape]:
    """Parse `name:1x3x224x224` strings (the `--input-shape` flag) into a dict."""
    out: Dict[str, Shape] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise UsageError(f"bad --input-shape '{spec}': expected name:1x3x224x224")
        out[name] = shape
    return out


def resolve_input_shapes(model: onnx.ModelProto, given: Optional[Dict[str, Shape]] = None,
                         batch: int = 1) -> Dict[str, Shape]:
    """Concrete shape of every real graph input.

    Static dims are kept; the first dim, when dynamic, becomes `batch`; any other dynamic dim must
    come from `given` (`--input-shape`), else a UsageError names the flag.
    """
    given = dict(given or {})
    inits = {t.name for t in model.graph.initializer}
    out: Dict[str, Shape] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name in given:
            out[inp.name] = tuple(given.pop(inp.name))
            continue
        if not inp.type.HasField("tensor_type") or not inp.type.tensor_type.HasField("shape"):
            raise UsageError(f"input '{inp.name}' has no declared shape; pass --input-shape {inp.name}:1x3x224x224")
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            elif i == 0 or d.dim_param.lower() in _BATCH_NAMES:
                dims.append(batch)
            else:
                raise UsageError(
                    f"input '{inp.name}' has dynamic dimension '{d.dim_param or '?'}' at axis {i}; "
                    f"pass --input-shape {inp.name}:" + "x".join(str(x) if x else "N" for x in
                                                                 [dd.dim_value for dd in inp.type.tensor_type.shape.dim])
                )
        out[inp.name] = tuple(dims)
    if given:
        raise UsageError(f"--input-shape names unknown input(s): {', '.join(sorted(given))}")
    return out


def with_batch(model: onnx.ModelProto, input_shapes: Dict[str, Shape], batch: int) -> Dict[str, Shape]:
    """`input_shapes` with the first dim set to `batch` where the model leaves it dynamic (static dims kept)."""
    out = {}
    for inp in model.graph.input:
        if inp.name not in input_shapes:
            continue
        shape = tuple(input_shapes[inp.name])
        dims = inp.type.tensor_type.shape.dim
        dynamic = bool(dims) and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0)
        out[inp.name] = ((batch,) + shape[1:]) if dynamic and len(shape) > 1 else shape
    return out


def infer_static_shapes(model: onnx.ModelProto, input_shapes: Dict[str, Shape],
                        known: Optional[Dict[str, Shape]] = None,
                        runnable: Optional[Callable[[], onnx.ModelProto]] = None) -> Dict[str, Shape]:
    """Shapes of every tensor when the inputs have `input_shapes` (model is not modified).

    Returns only fully static shapes; tensors whose shape stays unknown are absent. `known`: shapes found
    earlier for tensors of the same name in a model with the same inputs and the same shapes for them (the
    input model, before BN folding): where static inference fails, they are used before running the model
    in onnxruntime (a run of the whole model, per call, on TF-style exports with computed pads).
    `runnable`: the model with its weights for that run, when `model` is a weightless view (`graph_view`).
    """
    m = weightless_copy(model)
    del m.graph.value_info[:]
    for inp in m.graph.input:
        if inp.name in input_shapes:
            shape = inp.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[inp.name]:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:  # inference is best effort; callers fall back where shapes are missing
        log.warning("shape inference failed: %s", str(exc).splitlines()[0])
        inferred = m
    shapes: Dict[str, Shape] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[vi.name] = tuple(dims)
    for t in inferred.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    missing = [o for n in model.graph.node if n.op_type in _SHAPE_NEEDED for o in n.output[:1] if o not in shapes]
    if missing and known:
        shapes.update((o, known[o]) for o in missing if o in known)
        missing = [o for o in missing if o not in shapes]
    if missing:
        model = runnable() if runnable is not None else model
        found = _shapes_from_a_run(model, input_shapes, missing)
        if not found:  # a Pad on an integer tensor makes the float-typed probe fail: retry without Pads
            producers = {o: n.op_type for n in model.graph.node for o in n.output}
            found = _shapes_from_a_run(model, input_shapes, [m for m in missing if producers.get(m) != "Pad"])
        shapes.update(found)
    return shapes


#: ops whose output shapes the passes need (MACs, flatten blocks, moments)
#: (float outputs only: the probe declares them float; Reshape/Pad also run on int64 shape tensors)
_SHAPE_NEEDED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "GlobalAveragePool", "Flatten", "MaxPool", "AveragePool",
                 "BatchNormalization", "Pad")


def _shapes_from_a_run(model: onnx.ModelProto, input_shapes: Dict[str, Shape], names: List[str]) -> Dict[str, Shape]:
    """Shapes that static inference could not find (e.g. TF-style dynamic `Pad`), read off one onnxruntime run
    on zero inputs of the given shapes. Best effort: returns {} if the model does not run."""
    import numpy as np
    import onnxruntime as ort

    feeds = {}
    for inp in model.graph.input:
        if inp.name in input_shapes:
            feeds[inp.name] = np.zeros(input_shapes[inp.name], NUMPY_TYPES.get(inp.type.tensor_type.elem_type, "float32"))
    # the weights go in as inputs (onnxruntime reads numpy arrays in place) and the probe is serialised without
    # them: one copy of the weights instead of three (a model copy, its bytes, onnxruntime's own)
    probe = weightless_copy(model)
    weights = {t.name: t for t in model.graph.initializer if int(np.prod(t.dims)) > SMALL_TENSOR}
    kept = [t for t in probe.graph.initializer if t.name not in weights]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    declared = {i.name for i in probe.graph.input}
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims))
                             for name, t in weights.items() if name not in declared)
    feeds.update((name, numpy_helper.to_array(t)) for name, t in weights.items())
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in known)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = False  # one run: buffers go back to the system as soon as they are free
        opts.enable_mem_pattern = False
        sess = inference_session(probe.SerializeToString(), opts)
        values = sess.run(names, feeds)
    except Exception as exc:
        log.warning("shapes of %d tensors unknown (onnxruntime probe failed: %s)", len(names), str(exc).splitlines()[0])
        return {}
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, values)}


#: initializers up to this many elements keep their values in `weightless_copy` (shape tensors, scalars)
SMALL_TENSOR = 1024


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of `model` for shape inference: large initializers keep name, type and dims but no data.

    Built field by field so the weights are never copied (a full `CopyFrom` of a 100 MB model costs
    100 MB more at peak, and shape inference serialises its input once again).
    """
    dest = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                           producer_version=model.producer_version, domain=model.domain,
                           model_version=model.model_version)
    dest.opset_import.extend(model.opset_import)
    dest.functions.extend(model.functions)
    g, src = dest.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        if int(np.prod(t.dims)) <= SMALL_TENSOR:
            g.initializer.add().CopyFrom(t)
        else:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    return dest


def graph_view(graph) -> onnx.ModelProto:
    """`weightless_copy` of a `Graph`'s model as it stands, its pending weights included (their dims, and the
    values of small ones): what shape inference reads, without writing the pending weights into the model.

    Every write of a weight into the ModelProto leaves the old bytes in the protobuf arena until the model
    is freed; shape inference between BN folding and compression used to write all folded weights once
    more (ResNet-50-sized: 100 MB).
    """
    graph.refresh()
    view = weightless_copy(graph.model_unflushed)
    pending = graph.pending_weights
    if pending:
        for t in view.graph.initializer:
            array = pending.get(t.name)
            if array is None:
                continue
            if array.size <= SMALL_TENSOR:
                t.CopyFrom(numpy_helper.from_array(array, t.name))
            else:
                t.CopyFrom(TensorProto(name=t.name, dims=array.shape,
                                       data_type=helper.np_dtype_to_tensor_dtype(array.dtype)))
    return view


def refresh_value_info(model: onnx.ModelProto) -> None:
    """Drop stale `value_info` and output shapes and re-infer them (in place, symbolic dims kept)."""
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model))
        model.graph.value_info.extend(inferred.graph.value_info)
    except Exception as exc:
        log.warning("shape inference failed after compression: %s", str(exc).splitlines()[0])

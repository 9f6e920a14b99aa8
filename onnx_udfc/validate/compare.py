"""Compare the original and the compressed model in onnxruntime on seeded synthetic inputs.

CPU provider, graph optimizations off (so onnxruntime's own rewrites cannot hide or cause a difference).
Per output: max abs error, relative L2 error `||y' - y|| / ||y||`, cosine similarity, and for 2-D outputs
the top-1 agreement over the batch rows. Names, shapes and dtypes of the outputs must be identical.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Union

import numpy as np
import onnx

from ..errors import BadModelError, ValidationFailed
from ..ir.shapes import NUMPY_TYPES
from ..ort_session import inference_session

log = logging.getLogger(__name__)

def synthetic_inputs(model: onnx.ModelProto, input_shapes: Dict[str, tuple], seed: int = 0) -> Dict[str, np.ndarray]:
    """Seeded inputs: pink noise (1/f spectrum, standardised per channel, like normalised photos) for 4-D float
    image inputs, standard normal for other float inputs, zeros for integer inputs."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dtype = np.dtype(NUMPY_TYPES.get(inp.type.tensor_type.elem_type, "float32"))
        shape = input_shapes[inp.name]
        if np.issubdtype(dtype, np.floating) and len(shape) == 4 and min(shape[2:]) >= 8:
            from ..stats.sampled import pink_noise

            feeds[inp.name] = pink_noise(shape, seed=seed + 1000).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _session(model: Union[onnx.ModelProto, bytes, str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return inference_session(data, opts)


def run_model(model: Union[onnx.ModelProto, bytes, str], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    """Outputs of `model` (a ModelProto, its serialised bytes or its file) in onnxruntime, graph optimisations off."""
    return _session(model).run(None, feeds)


def compare_models(original: onnx.ModelProto, compressed: Union[onnx.ModelProto, bytes, str],
                   input_shapes: Dict[str, tuple], seed: int = 0, batch: int = 8) -> Dict[str, dict]:
    """Metrics per output name; raises ValidationFailed when outputs differ in name, shape or dtype.

    `compressed` may be given serialised (the bytes onnx.checker passed) or as the path of its file."""
    from ..ir.shapes import with_batch

    shapes = with_batch(original, input_shapes, batch)
    feeds = synthetic_inputs(original, shapes, seed)
    try:
        y0 = run_model(original, feeds)
    except Exception as exc:
        raise BadModelError(f"onnxruntime cannot run the input model: {str(exc).splitlines()[0][:300]}") from None
    try:
        session = _session(compressed)
        y1 = session.run(None, feeds)
    except Exception as exc:
        raise ValidationFailed(f"onnxruntime cannot run the compressed model: {str(exc).splitlines()[0][:300]}") from None
    names0 = [o.name for o in original.graph.output]
    names1 = [o.name for o in session.get_outputs()]
    if names0 != names1:
        raise ValidationFailed(f"output names changed: {names0} -> {names1}")
    metrics = {}
    for name, a, b in zip(names0, y0, y1):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValidationFailed(f"output '{name}' changed from {a.dtype}{list(a.shape)} to {b.dtype}{list(b.shape)}")
        metrics[name] = output_metrics(a, b)
    return metrics


def output_metrics(reference: np.ndarray, other: np.ndarray) -> dict:
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(other, np.float64).ravel()
    diff = b - a
    norm_a = float(np.linalg.norm(a))
    norm_b = float(np.linalg.norm(b))
    out = {
        "max_abs_error": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "rel_l2_error": float(np.linalg.norm(diff) / norm_a) if norm_a > 0 else float(np.linalg.norm(diff)),
        "cosine": float(a @ b / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b),
    }
    if reference.ndim == 2 and reference.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(np.argmax(reference, 1) == np.argmax(other, 1)))
    return out

"""onnxruntime sessions made from a model's bytes without keeping those bytes alive.

`onnxruntime.InferenceSession` built from bytes keeps a reference to them for as long as the session
lives (`_model_bytes`, only read to build the session again when providers change, which this project
never does): the whole serialised model stays in memory beside onnxruntime's own copy of the weights.
ResNet-50-sized model, prune 0.3: the statistics probe's peak 650 -> 586 MB, its runs 650 -> 550 MB.
"""
from __future__ import annotations

from typing import Union


def inference_session(model: Union[bytes, str], options):
    """A CPU `InferenceSession` of `model` (serialised bytes or a file path) with `options`
    (`onnxruntime.SessionOptions`), holding no reference to the bytes once built."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None
    return session

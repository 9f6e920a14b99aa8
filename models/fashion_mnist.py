"""Fashion-MNIST loading and ONNX accuracy evaluation (numpy + onnxruntime only).

This module deliberately does not import torch: the benchmarks and the
library's examples use it to measure the top-1 accuracy of (compressed) ONNX
models on the 10 000-image Fashion-MNIST test split.

The data set comes from the Debian package ``dataset-fashion-mnist``::

    apt-get install -y dataset-fashion-mnist

which installs the four original idx files (gzipped) under
``/usr/share/datasets/fashion-mnist``.  Uncompressed idx files (same names
without ``.gz``) are accepted too.

Images are scaled to [0, 1] and then normalised with ``FMNIST_MEAN`` and
``FMNIST_STD`` (computed over the 60 000 training images); the models in
``models/`` were trained on exactly this normalisation.
"""

from __future__ import annotations

import gzip
import os
from typing import Tuple, Union

import numpy as np

__all__ = [
    "DEFAULT_ROOT",
    "APT_PACKAGE",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "CLASSES",
    "DatasetNotFoundError",
    "load_fashion_mnist",
    "normalize",
    "evaluate_onnx",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"

# Mean / std of the 60k training images after scaling pixels to [0, 1].
FMNIST_MEAN = 0.2860405969887955
FMNIST_STD = 0.35302424451492254

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_PREFIX = {"train": "train", "test": "t10k"}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the Fashion-MNIST idx files cannot be found."""


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root!r}. "
        f"Install the data set with:  apt-get install -y {APT_PACKAGE}  "
        f"(it installs the idx files under {DEFAULT_ROOT}), "
        f"or pass root= pointing to a folder holding the original idx files."
    )


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte idx data, got type 0x{dtype_code:02x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    expected = int(np.prod(dims)) if dims else 0
    if arr.size != expected:
        raise ValueError(f"{path}: expected {expected} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist_uint8(split: str = "test", root: str = DEFAULT_ROOT) -> Tuple[np.ndarray, np.ndarray]:
    """Raw images uint8 (n, 28, 28) and labels int64 (n,)."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"Fashion-MNIST folder {root!r} does not exist. "
            f"Install the data set with:  apt-get install -y {APT_PACKAGE}"
        )
    prefix = _PREFIX[split]
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"inconsistent idx shapes: images {images.shape}, labels {labels.shape}")
    return images, labels.astype(np.int64)


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 (n, 28, 28) or (n, 1, 28, 28) -> normalised float32 (n, 1, 28, 28)."""
    x = np.asarray(images_uint8, dtype=np.float32) / np.float32(255.0)
    x = (x - np.float32(FMNIST_MEAN)) / np.float32(FMNIST_STD)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x, dtype=np.float32)


def load_fashion_mnist(split: str = "test", root: str = DEFAULT_ROOT,
                       limit: Union[int, None] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Returns ``(images, labels)``: images float32 of shape (n, 1, 28, 28),
    normalised as ``(pixel/255 - FMNIST_MEAN) / FMNIST_STD``; labels int64 (n,).
    ``limit`` keeps only the first ``limit`` samples (the order is the
    original file order).
    """
    images, labels = load_fashion_mnist_uint8(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize(images), labels


def _session(model, num_threads):
    import onnxruntime as ort

    if not isinstance(model, (str, bytes, os.PathLike)):
        # onnx.ModelProto or anything with SerializeToString()
        serialize = getattr(model, "SerializeToString", None)
        if serialize is None:
            raise TypeError("model must be a path, serialized bytes or an onnx.ModelProto")
        model = serialize()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def predict_onnx(model, images: np.ndarray, batch: int = 500, num_threads: int = 2) -> np.ndarray:
    """Run the model and return its first output, concatenated over batches.

    If the model's input has a fixed batch dimension, inputs are fed in
    chunks of that size (the last chunk is zero-padded and the padding
    dropped from the outputs).
    """
    sess = _session(model, num_threads)
    inp = sess.get_inputs()[0]
    out_name = sess.get_outputs()[0].name
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or max(1, int(batch))
    images = np.ascontiguousarray(images, dtype=np.float32)
    outs = []
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        n = len(chunk)
        if fixed and n < fixed:
            pad = np.zeros((fixed - n,) + chunk.shape[1:], dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outs.append(sess.run([out_name], {inp.name: chunk})[0][:n])
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


def evaluate_onnx(model_path_or_bytes, images: np.ndarray, labels: np.ndarray,
                  batch: int = 500, num_threads: int = 2) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of an ONNX classifier, on CPU.

    ``model_path_or_bytes`` is a file path, the serialized model bytes, or an
    ``onnx.ModelProto``.  The first input receives ``images``; the first
    output is taken as the logits (argmax over the last axis).
    """
    logits = predict_onnx(model_path_or_bytes, images, batch=batch, num_threads=num_threads)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        return float("nan")
    pred = np.asarray(logits).reshape(len(labels), -1).argmax(axis=1)
    return float((pred == labels).mean())


if __name__ == "__main__":  # python models/fashion_mnist.py MODEL.onnx [...]
    import sys

    x, y = load_fashion_mnist("test")
    print(f"test split: {x.shape} {x.dtype}, labels {y.shape} {y.dtype}")
    for p in sys.argv[1:]:
        print(f"{p}: top-1 = {evaluate_onnx(p, x, y):.4f}")

"""The 500-image ImageNet sample (shared/data/imagenet-sample) as NCHW float32 arrays (numpy + Pillow only).

    from imagenet_sample import load_imagenet_sample, PREPROCESSING
    images, labels, files = load_imagenet_sample(**PREPROCESSING["mobilenetv2"])

Preprocessing (the folder's README): convert to RGB, resize the short side to 256 (PIL bilinear, the long
side as torchvision's Resize computes it), center-crop 224 (torchvision's rounding), scale to [0, 1], then
`(x - mean) / std` per channel. `mean`/`std` are parameters because the models differ:

* torchvision MobileNetV2: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (the default here).
* EfficientNet-Lite0 (efficientnet-lite-pytorch, weights converted from the TF Lite checkpoint): the TF
  EfficientNet-Lite builder normalizes with MEAN_RGB = 127 and STDDEV_RGB = 128 on 0..255 pixels, i.e.
  mean 127/255 and std 128/255 on [0, 1] pixels (`PREPROCESSING["efficientnet_lite0"]`); measured on these
  500 images this gives a higher top-1 than the ImageNet mean/std the package's README shows (which is
  inherited from efficientnet_pytorch's non-Lite models).

The resized and cropped uint8 images are cached as .npy under ~/.cache/onnx-udfc/imagenet-sample/, keyed by
the resize/crop settings and the file list; normalization (cheap) is applied on every load.
"""
from __future__ import annotations

import csv
import hashlib
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_FOLDER = "../shared/data/imagenet-sample"  # relative to the repository root
CACHE = os.path.expanduser("~/.cache/onnx-udfc/imagenet-sample")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = {
    "mobilenetv2": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "efficientnet_lite0": dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
}


def preprocessing_for(model_name: str) -> dict:
    """mean/std for a model name such as `efficientnet_lite0_bn` (longest matching prefix; default ImageNet)."""
    best = max((k for k in PREPROCESSING if model_name.startswith(k)), key=len, default=None)
    return dict(PREPROCESSING[best]) if best else dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def resolve_folder(folder: str = DEFAULT_FOLDER) -> str:
    return folder if os.path.isabs(folder) else os.path.normpath(os.path.join(REPO, folder))


def read_labels(folder: str = DEFAULT_FOLDER):
    """(files, labels) in labels.csv order."""
    folder = resolve_folder(folder)
    with open(os.path.join(folder, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["file"] for r in rows], np.array([int(r["class_index"]) for r in rows], dtype=np.int64)


def _resize_crop(path: str, resize: int, crop: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        im = im.resize((nw, nh), Image.BILINEAR)
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
        im = im.crop((left, top, left + crop, top + crop))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)  # CHW


def load_imagenet_sample_uint8(folder: str = DEFAULT_FOLDER, resize: int = 256, crop: int = 224,
                               cache: bool = True):
    """(images uint8 (n,3,crop,crop), labels int64 (n,), files) for all images, cached."""
    folder = resolve_folder(folder)
    files, labels = read_labels(folder)
    key = hashlib.sha1(("\n".join(files) + f"|bilinear|{resize}|{crop}").encode()).hexdigest()[:12]
    path = os.path.join(CACHE, f"resize{resize}_crop{crop}_bilinear_{key}.npy")
    if cache and os.path.exists(path):
        images = np.load(path)
        if images.shape == (len(files), 3, crop, crop):
            return images, labels, files
    images = np.stack([_resize_crop(os.path.join(folder, f), resize, crop) for f in files])
    if cache:
        os.makedirs(CACHE, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp.npy"
        np.save(tmp, images)
        os.replace(tmp, path)
    return images, labels, files


def load_imagenet_sample(folder: str = DEFAULT_FOLDER, limit=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         resize: int = 256, crop: int = 224, cache: bool = True):
    """(images float32 (n,3,224,224), labels int64 (n,), files) with `(x/255 - mean) / std`.

    `folder` is resolved relative to the repository root; `limit` keeps the first `limit` images of
    labels.csv. See the module docstring for the mean/std each model needs (`PREPROCESSING`).
    """
    images, labels, files = load_imagenet_sample_uint8(folder, resize, crop, cache)
    if limit is not None:
        images, labels, files = images[:limit], labels[:limit], files[:limit]
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    out = (images.astype(np.float32) / np.float32(255.0) - m) / s
    return np.ascontiguousarray(out, dtype=np.float32), labels, list(files)


if __name__ == "__main__":
    x, y, f = load_imagenet_sample()
    print(x.shape, x.dtype, y.shape, y[:5], f[:2], float(x.mean()), float(x.std()))

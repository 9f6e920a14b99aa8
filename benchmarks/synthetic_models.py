"""Generated models for the speed, memory and latency benchmarks (random weights, no training).

    python benchmarks/synthetic_models.py [--out ~/.cache/onnx-udfc/models] [--seed 0] [--force]

`resnet50_model(seed)` builds a ResNet-50-sized CNN with `onnx.helper`: a 7x7/2 stem and 3x3/2 max pool,
bottleneck residual blocks 3-4-6-3 (widths 64, 128, 256, 512, expansion 4, so 256..2048 output
channels, stride on the 3x3 conv), BatchNorm kept after every conv, ReLU, global average pool and a
2048 -> 1000 Gemm head; about 25.6M parameters, opset 13, input `input` of shape batch x 3 x 224 x 224
(the batch dimension is dynamic, `batch`, like the other cached models; the library resolves it to 1).

Weights are He-initialised (normal, std sqrt(2 / fan_in)); each BatchNorm gets gamma ~ U(0.5, 1.5),
beta ~ N(0, 0.1), running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2). Everything comes from one seeded
numpy generator, so the same seed gives the same file. The accuracy of this model means nothing: it exists
to time and measure the tool on a model of realistic size.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_FOLDER = os.path.expanduser("~/.cache/onnx-udfc/models")
RESNET50_NAME = "resnet50_synthetic"
OPSET = 13
STAGES: Tuple[Tuple[int, int, int], ...] = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # width, blocks, stride
EXPANSION = 4
CLASSES = 1000


class _GraphBuilder:
    """Accumulates nodes and initializers; every helper returns the name of its output tensor."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []

    def _constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, name: str, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1) -> str:
        """Conv without bias (a BatchNorm follows), He-normal weights, 'same'-style padding."""
        fan_in = c_in * kernel * kernel
        std = np.float32(np.sqrt(2.0 / fan_in))
        w = self.rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32) * std
        self._constant(name + ".weight", w)
        pad = kernel // 2
        self.nodes.append(helper.make_node("Conv", [x, name + ".weight"], [name], name=name,
                                           kernel_shape=[kernel, kernel], strides=[stride, stride],
                                           pads=[pad, pad, pad, pad]))
        return name

    def batchnorm(self, name: str, x: str, channels: int) -> str:
        """BatchNormalization with plausible affine parameters and running statistics."""
        params = {
            "scale": self.rng.uniform(0.5, 1.5, channels),
            "bias": self.rng.normal(0.0, 0.1, channels),
            "mean": self.rng.normal(0.0, 0.1, channels),
            "var": self.rng.uniform(0.5, 2.0, channels),
        }
        inputs = [x] + [self._constant(f"{name}.{key}", value) for key, value in params.items()]
        self.nodes.append(helper.make_node("BatchNormalization", inputs, [name], name=name, epsilon=1e-5))
        return name

    def relu(self, name: str, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [name], name=name))
        return name

    def conv_bn(self, name: str, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1,
                activation: bool = True) -> str:
        """Conv -> BatchNorm (-> ReLU)."""
        y = self.batchnorm(name + "_bn", self.conv(name + "_conv", x, c_in, c_out, kernel, stride), c_out)
        return self.relu(name + "_relu", y) if activation else y

    def bottleneck(self, name: str, x: str, c_in: int, width: int, stride: int) -> str:
        """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus identity or 1x1 projection shortcut, then ReLU."""
        c_out = width * EXPANSION
        y = self.conv_bn(name + "_a", x, c_in, width, 1)
        y = self.conv_bn(name + "_b", y, width, width, 3, stride)
        y = self.conv_bn(name + "_c", y, width, c_out, 1, activation=False)
        shortcut = x
        if stride != 1 or c_in != c_out:
            shortcut = self.conv_bn(name + "_down", x, c_in, c_out, 1, stride, activation=False)
        self.nodes.append(helper.make_node("Add", [y, shortcut], [name + "_add"], name=name + "_add"))
        return self.relu(name + "_out", name + "_add")

    def head(self, x: str, c_in: int, classes: int) -> str:
        """Global average pool -> Flatten -> Gemm (transB) to `classes` logits."""
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat", axis=1))
        bound = np.sqrt(1.0 / c_in)
        self._constant("fc.weight", self.rng.uniform(-bound, bound, (classes, c_in)))
        self._constant("fc.bias", np.zeros(classes))
        self.nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                                           transB=1))
        return "logits"


def resnet50_model(seed: int = 0, classes: int = CLASSES) -> onnx.ModelProto:
    """ResNet-50-sized ModelProto (bottlenecks 3-4-6-3, BN kept, random weights from `seed`)."""
    b = _GraphBuilder(seed)
    x = b.conv_bn("stem", "input", 3, 64, 7, 2)
    b.nodes.append(helper.make_node("MaxPool", [x], ["stem_pool"], name="stem_pool", kernel_shape=[3, 3],
                                    strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c_in = "stem_pool", 64
    for stage, (width, blocks, stride) in enumerate(STAGES, start=1):
        for block in range(blocks):
            x = b.bottleneck(f"layer{stage}_{block}", x, c_in, width, stride if block == 0 else 1)
            c_in = width * EXPANSION
    logits = b.head(x, c_in, classes)
    graph = helper.make_graph(
        b.nodes, "resnet50_synthetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", classes])],
        initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnx-udfc-benchmarks")
    model.ir_version = 8  # opset 13 models with IR 8 load in every supported onnxruntime
    return model


def write_resnet50(folder: str = DEFAULT_FOLDER, seed: int = 0, force: bool = False) -> str:
    """Write `resnet50_synthetic.onnx` into `folder` (checked with full_check) unless it exists; return its path."""
    path = os.path.join(folder, RESNET50_NAME + ".onnx")
    if os.path.exists(path) and not force:
        return path
    model = resnet50_model(seed)
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


def parameter_count(model: onnx.ModelProto) -> int:
    """Number of values in the initializers."""
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_FOLDER, help="folder of the .onnx file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rewrite the file when it exists")
    ap.add_argument("--no-run", action="store_true", help="skip the onnxruntime smoke run")
    args = ap.parse_args(argv)
    path = write_resnet50(args.out, args.seed, args.force)
    model = onnx.load(path)
    print(f"{path}: {parameter_count(model):,} parameters, {os.path.getsize(path) / 1e6:.1f} MB", file=sys.stderr)
    if not args.no_run:
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(args.seed).standard_normal((1, 3, 224, 224), dtype=np.float32)
        logits = sess.run(None, {"input": x})[0]
        print(f"onnxruntime: logits {logits.shape}, finite {bool(np.isfinite(logits).all())}, "
              f"std {float(logits.std()):.3g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build small ONNX models in code for the tests (random weights, BN statistics calibrated on data).

`ModelBuilder` appends nodes in topological order; `calibrate_batchnorm` sets every BN's running mean
and variance to the statistics of its input on seeded N(0,1) inputs, as training would have, so the
BN prior the tool relies on holds.
"""
from __future__ import annotations

from typing import List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class ModelBuilder:
    def __init__(self, input_shape=(1, 3, 16, 16), seed: int = 0, opset: int = 13, dynamic_batch: bool = True):
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.opset = opset
        self.count = 0
        self.input_shape = tuple(input_shape)
        dims = ["batch"] + list(input_shape[1:]) if dynamic_batch else list(input_shape)
        self.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)]
        self.shapes = {"input": tuple(input_shape)}

    # --------------------------------------------------------------- helpers
    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array, base="w") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, base=None, **attrs) -> str:
        out = self._name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    # ------------------------------------------------------------------ ops
    def conv(self, x, cout, k=3, stride=1, group=1, bias=True, weight=None, pad=None) -> str:
        cin = self.shapes[x][1]
        w = weight if weight is not None else (
            self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k)))
        inputs = [x, self.const(w.astype(np.float32), "w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"))
        p = k // 2 if pad is None else pad
        y = self.node("Conv", inputs, "conv", kernel_shape=[k, k], pads=[p] * 4, strides=[stride] * 2, group=group)
        n, _, h, wd = self.shapes[x]
        self.shapes[y] = (n, cout, (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1)
        return y

    def conv_transpose(self, x, cout, k=4, stride=2, pad=1, group=1, output_padding=0, bias=True,
                       weight=None) -> str:
        """ConvTranspose (weight (Cin, Cout/g, k, k), He-scaled for the ~k^2 / stride^2 taps an output sees);
        output size `stride (H - 1) + output_padding + k - 2 pad`."""
        n, cin, h, w = self.shapes[x]
        wt = weight if weight is not None else (self.rng.standard_normal((cin, cout // group, k, k))
                                                * np.sqrt(2.0 / (cin // group * k * k / stride ** 2)))
        inputs = [x, self.const(np.asarray(wt, np.float32), "wt")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "bt"))
        attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4, group=group)
        if output_padding:
            attrs["output_padding"] = [output_padding] * 2
        y = self.node("ConvTranspose", inputs, "convt", **attrs)
        size = lambda d: stride * (d - 1) + output_padding + k - 2 * pad  # noqa: E731
        self.shapes[y] = (n, cout, size(h), size(w))
        return y

    def bn(self, x) -> str:
        c = self.shapes[x][1]
        gamma = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        beta = (self.rng.standard_normal(c) * 0.5).astype(np.float32)
        y = self.node("BatchNormalization", [x, self.const(gamma, "gamma"), self.const(beta, "beta"),
                                              self.const(np.zeros(c, np.float32), "mean"),
                                              self.const(np.ones(c, np.float32), "var")], "bn", epsilon=1e-5)
        self.shapes[y] = self.shapes[x]
        return y

    def relu(self, x) -> str:
        return self._same("Relu", [x], x)

    def clip(self, x, lo=0.0, hi=6.0, constant_nodes=False) -> str:
        if self.opset < 11:
            return self._same("Clip", [x], x, min=lo, max=hi)
        if constant_nodes:
            names = []
            for v in (lo, hi):
                out = self._name("cst")
                self.nodes.append(helper.make_node("Constant", [], [out], name=out + "_node",
                                                   value=numpy_helper.from_array(np.array(v, np.float32))))
                names.append(out)
            return self._same("Clip", [x] + names, x)
        return self._same("Clip", [x, self.const(np.array(lo, np.float32), "lo"),
                                    self.const(np.array(hi, np.float32), "hi")], x)

    def _same(self, op, inputs, x, **attrs) -> str:
        y = self.node(op, inputs, op.lower(), **attrs)
        self.shapes[y] = self.shapes[x]
        return y

    def maxpool(self, x, k=2) -> str:
        y = self.node("MaxPool", [x], "pool", kernel_shape=[k, k], strides=[k, k])
        n, c, h, w = self.shapes[x]
        self.shapes[y] = (n, c, h // k, w // k)
        return y

    def add(self, a, b) -> str:
        return self._same("Add", [a, b], a)

    def gap_flatten(self, x) -> str:
        g = self.node("GlobalAveragePool", [x], "gap")
        n, c = self.shapes[x][:2]
        self.shapes[g] = (n, c, 1, 1)
        y = self.node("Flatten", [g], "flat", axis=1)
        self.shapes[y] = (n, c)
        return y

    def flatten(self, x) -> str:
        y = self.node("Flatten", [x], "flat", axis=1)
        n = self.shapes[x][0]
        self.shapes[y] = (n, int(np.prod(self.shapes[x][1:])))
        return y

    def gemm(self, x, out, trans_b=True, weight=None) -> str:
        k = self.shapes[x][1]
        w = weight if weight is not None else self.rng.standard_normal((out, k)) * np.sqrt(2.0 / k)
        w = w if trans_b else w.T
        y = self.node("Gemm", [x, self.const(w.astype(np.float32), "fc"),
                               self.const((self.rng.standard_normal(out) * 0.1).astype(np.float32), "fcb")],
                      "gemm", transB=int(trans_b))
        self.shapes[y] = (self.shapes[x][0], out)
        return y

    def matmul(self, x, out) -> str:
        k = self.shapes[x][1]
        w = (self.rng.standard_normal((k, out)) * np.sqrt(2.0 / k)).astype(np.float32)
        y = self.node("MatMul", [x, self.const(w, "mm")], "matmul")
        self.shapes[y] = (self.shapes[x][0], out)
        return y

    def build(self, outputs, name="test") -> onnx.ModelProto:
        outs = []
        for o in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
            dims = ["batch"] + list(self.shapes[o][1:])
            outs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, dims))
        graph = helper.make_graph(self.nodes, name, self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 8) if self.opset <= 17 else model.ir_version
        onnx.checker.check_model(model)
        return model


def calibrate_batchnorm(model: onnx.ModelProto, batch: int = 64, seed: int = 1) -> onnx.ModelProto:
    """Set every BN's running mean/var to the per-channel statistics of its input on N(0,1) inputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = batch
    x = rng.standard_normal(shape).astype(np.float32)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        z = sess.run([node.input[0]], {model.graph.input[0].name: x})[0]
        axes = (0,) + tuple(range(2, z.ndim))
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(z.mean(axis=axes).astype(np.float32), node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(z.var(axis=axes).astype(np.float32), node.input[4]))
    return model


def conv_bn_relu(b: ModelBuilder, x, cout, k=3, stride=1, group=1, act="relu") -> str:
    y = b.bn(b.conv(x, cout, k=k, stride=stride, group=group, bias=False))
    return b.relu(y) if act == "relu" else b.clip(y) if act == "relu6" else y


def plain_chain(seed=0, opset=13, act="relu", constant_clip=False) -> onnx.ModelProto:
    """conv-bn-act x3 with a maxpool, GAP -> Flatten -> Gemm (10 classes)."""
    b = ModelBuilder((1, 3, 16, 16), seed=seed, opset=opset)
    x = conv_bn_relu(b, "input", 16, act="none")
    x = b.clip(x, constant_nodes=constant_clip) if act == "relu6" else b.relu(x)
    x = b.maxpool(conv_bn_relu(b, x, 32))
    x = conv_bn_relu(b, x, 32)
    y = b.gemm(b.gap_flatten(x), 10)
    return calibrate_batchnorm(b.build(y))


def residual_block(seed=0) -> onnx.ModelProto:
    b = ModelBuilder((1, 3, 16, 16), seed=seed)
    x = conv_bn_relu(b, "input", 16)
    h = conv_bn_relu(b, x, 16)
    h = b.bn(b.conv(h, 16, bias=False))
    x = b.relu(b.add(x, h))
    y = b.gemm(b.gap_flatten(x), 10)
    return calibrate_batchnorm(b.build(y))


def depthwise_block(seed=0) -> onnx.ModelProto:
    """MobileNetV2-style: expand 1x1 -> dw 3x3 -> project 1x1, ReLU6."""
    b = ModelBuilder((1, 8, 12, 12), seed=seed)
    x = conv_bn_relu(b, "input", 48, k=1, act="relu6")
    x = conv_bn_relu(b, x, 48, k=3, group=48, act="relu6")
    x = b.bn(b.conv(x, 16, k=1, bias=False))
    y = b.gemm(b.gap_flatten(x), 10)
    return calibrate_batchnorm(b.build(y))


def gemm_chain(seed=0, matmul=False) -> onnx.ModelProto:
    b = ModelBuilder((1, 32), seed=seed)
    b.inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])]
    x = b.relu(b.gemm("input", 64))
    x = b.relu(b.gemm(x, 48))
    y = b.matmul(x, 10) if matmul else b.gemm(x, 10)
    return b.build(y)


def flatten_gemm(seed=0) -> onnx.ModelProto:
    b = ModelBuilder((1, 3, 8, 8), seed=seed)
    x = b.maxpool(conv_bn_relu(b, "input", 16))
    y = b.gemm(b.flatten(x), 10)
    return calibrate_batchnorm(b.build(y))


def fold_all_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network as exported with BN folded into the convs (no BN nodes left)."""
    from onnx_udfc.ir.graph import Graph
    from onnx_udfc.passes.base import PassContext
    from onnx_udfc.passes.fold_bn import FoldBatchNormPass

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = Graph(m)
    FoldBatchNormPass().run(PassContext(graph=g, options=None, input_shapes={}))
    g.remove_unused_initializers()
    return m


def random_input(model: onnx.ModelProto, batch=16, seed=5) -> np.ndarray:
    shape = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    shape[0] = batch
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


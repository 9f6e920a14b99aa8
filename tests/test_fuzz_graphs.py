"""Property-based tests: random small CNN graphs x random flags through `compress`.

A hypothesis strategy builds random valid DAG models (Conv / ConvTranspose / BatchNormalization / activations /
pools, residual Add, channel Concat, optional Gemm head, opset 11/13/17, sometimes a second graph output) and
draws the compression flags. For every case `compress` must either raise a `UdfcError` with a one-line
message (no other exception type may escape), or return a model that

1. passes `onnx.checker.check_model(full_check=True)`,
2. runs in onnxruntime (CPU, graph optimizations off) on a random batch of 3,
3. has the same output names, shapes and dtypes as the original,
4. gives outputs identical to the original's when prune == 0 and bits == 32,
5. is byte-identical when compressed twice with the same flags (and an error is raised again, identically),
6. has no more parameters or MACs than the original (as reported),
7. and the input ModelProto is left unchanged.

Three tests share the strategy: (1)-(5) and (7) without and with the library's own onnxruntime validation,
and (6) on its own (hypothesis stops generating at a test's first failing example, so a size regression must
not hide the other properties). `derandomize=True` and `database=None` make every run test the same
examples (1200 + 400 + 600, about a minute on 2 cores).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from builders import ModelBuilder, calibrate_batchnorm
from onnx_udfc import UdfcError, compress

PRUNES = [0.0, 0.1, 0.3, 0.5, 0.9]
BITS = [32, 8, 6, 4, 2]
METHODS = ["none", "mean", "merge", "udfc"]
SELECTS = ["expected-error", "norm"]
STATISTICS = ["auto", "analytic", "synthetic"]
OPSETS = [11, 13, 17]


# --------------------------------------------------------------------------------------------- builder
class FuzzBuilder(ModelBuilder):
    """`ModelBuilder` plus the ops the fuzzer needs, with every random choice passed in explicitly."""

    def conv2(self, x, cout, k, stride, depthwise, bias) -> str:
        cin = self.shapes[x][1]
        group = cin if depthwise else 1
        if depthwise:
            cout = cin
        return self.conv(x, cout, k=k, stride=stride, group=group, bias=bias)

    def bn2(self, x, negative_gamma: bool) -> str:
        c = self.shapes[x][1]
        gamma = self.rng.uniform(0.5, 1.5, c)
        if negative_gamma:
            gamma *= np.where(self.rng.random(c) < 0.5, -1.0, 1.0)
        beta = self.rng.standard_normal(c) * 0.5
        mean = self.rng.standard_normal(c) * 0.5
        var = self.rng.uniform(0.05, 4.0, c)  # random positive; overwritten when the model is calibrated
        y = self.node("BatchNormalization",
                      [x] + [self.const(a.astype(np.float32), n) for a, n in
                             ((gamma, "gamma"), (beta, "beta"), (mean, "mean"), (var, "var"))],
                      "bn", epsilon=1e-5)
        self.shapes[y] = self.shapes[x]
        return y

    def act(self, x, kind: str) -> str:
        if kind == "none":
            return x
        if kind == "relu":
            return self.relu(x)
        if kind == "clip_init":
            return self.clip(x, 0.0, 6.0, constant_nodes=False)
        if kind == "clip_const":
            return self.clip(x, 0.0, 6.0, constant_nodes=True)
        if kind.startswith("leaky"):
            return self._same("LeakyRelu", [x], x, alpha=float(kind.split(":")[1]))
        if kind == "identity":
            return self._same("Identity", [x], x)
        raise ValueError(kind)

    def pool(self, x, kind: str) -> str:
        if kind == "max":
            return self.maxpool(x, 2)
        y = self.node("AveragePool", [x], "avgpool", kernel_shape=[2, 2], strides=[2, 2])
        n, c, h, w = self.shapes[x]
        self.shapes[y] = (n, c, h // 2, w // 2)
        return y

    def concat(self, a, b) -> str:
        y = self.node("Concat", [a, b], "concat", axis=1)
        n, ca, h, w = self.shapes[a]
        self.shapes[y] = (n, ca + self.shapes[b][1], h, w)
        return y

    def gemm2(self, x, out, trans_b, bias) -> str:
        k = self.shapes[x][1]
        w = self.rng.standard_normal((out, k)) * np.sqrt(2.0 / k)
        w = w if trans_b else w.T
        inputs = [x, self.const(w.astype(np.float32), "fc")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(out) * 0.1).astype(np.float32), "fcb"))
        y = self.node("Gemm", inputs, "gemm", transB=int(trans_b))
        self.shapes[y] = (self.shapes[x][0], out)
        return y


class Case:
    """A generated model and the text that describes it (what hypothesis prints on failure)."""

    def __init__(self, model: onnx.ModelProto, lines: List[str]):
        self.model = model
        self.lines = lines

    def __repr__(self) -> str:
        return "Case(\n  " + "\n  ".join(self.lines) + "\n)"


# conv-heavy so that prunable chains (conv -> [act, pool] -> conv/Gemm) are common
BLOCKS = ["conv", "conv", "conv", "conv", "bn", "act", "pool", "residual", "concat", "convt"]
ACTS = ["none", "relu", "clip_init", "clip_const", "leaky:0.01", "leaky:0.2", "identity"]


@st.composite
def conv_unit(draw, b: FuzzBuilder, x: str, log: List[str], cout=None, stride=None) -> str:
    """Conv [-> BN] [-> act] from `x`; `cout`/`stride` fixed when the caller needs a given shape."""
    cin = b.shapes[x][1]
    k = draw(st.sampled_from([1, 3]))
    s = stride if stride is not None else draw(st.sampled_from([1, 2]))
    c = cout if cout is not None else draw(st.integers(1, 24))
    dw = c == cin and draw(st.booleans())
    bias = draw(st.booleans())
    y = b.conv2(x, c, k, s, dw, bias)
    log.append(f"{y} = Conv({x}, {cin}->{c}, k{k}, s{s}{', depthwise' if dw and cin > 1 else ''}"
               f"{', bias' if bias else ''}) -> {b.shapes[y]}")
    return draw(bn_act(b, y, log))


@st.composite
def bn_act(draw, b: FuzzBuilder, y: str, log: List[str]) -> str:
    """[BN] [-> act] after a layer's output `y`."""
    if draw(st.booleans()):
        neg = draw(st.booleans())
        y2 = b.bn2(y, neg)
        log.append(f"{y2} = BN({y}{', signed gamma' if neg else ''})")
        y = y2
    a = draw(st.sampled_from(ACTS))
    if a != "none":
        y2 = b.act(y, a)
        log.append(f"{y2} = {a}({y})")
        y = y2
    return y


@st.composite
def cases(draw) -> Case:
    opset = draw(st.sampled_from(OPSETS))
    c = draw(st.integers(1, 8))
    hw = draw(st.integers(6, 16))
    seed = draw(st.integers(0, 2 ** 16))
    b = FuzzBuilder((1, c, hw, hw), seed=seed, opset=opset)
    log = [f"opset {opset}, input batch x {c} x {hw} x {hw}, weight seed {seed}"]
    x = "input"
    n_blocks = draw(st.integers(1, 7))
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(BLOCKS))
        h = b.shapes[x][2]
        if kind == "conv":
            x = draw(conv_unit(b, x, log))
        elif kind == "convt":
            cin = b.shapes[x][1]
            k = draw(st.sampled_from([1, 2, 3, 4]))
            stride = draw(st.sampled_from([1, 2])) if h <= 12 else 1
            pad = draw(st.integers(0, (k - 1) // 2))
            output_padding = draw(st.integers(0, stride - 1))
            cout = draw(st.integers(1, 24))
            group = cin if cin == cout and cin > 1 and draw(st.booleans()) else 1
            bias = draw(st.booleans())
            y = b.conv_transpose(x, cout, k=k, stride=stride, pad=pad, group=group,
                                 output_padding=output_padding, bias=bias)
            log.append(f"{y} = ConvTranspose({x}, {cin}->{cout}, k{k}, s{stride}, pad {pad}, output_padding "
                       f"{output_padding}, group {group}{', bias' if bias else ''}) -> {b.shapes[y]}")
            x = draw(bn_act(b, y, log))
        elif kind == "bn":
            neg = draw(st.booleans())
            y = b.bn2(x, neg)
            log.append(f"{y} = BN({x}{', signed gamma' if neg else ''})")
            x = y
        elif kind == "act":
            a = draw(st.sampled_from(ACTS[1:]))
            y = b.act(x, a)
            log.append(f"{y} = {a}({x})")
            x = y
        elif kind == "pool":
            if h < 4:
                continue
            p = draw(st.sampled_from(["max", "avg"]))
            y = b.pool(x, p)
            log.append(f"{y} = {p}pool2x2({x}) -> {b.shapes[y]}")
            x = y
        elif kind == "residual":
            same = [t for t, s in b.shapes.items() if s == b.shapes[x] and t != x]
            if same and draw(st.booleans()):
                other = draw(st.sampled_from(same))
                lhs = x
            else:
                other = x
                lhs = draw(conv_unit(b, x, log, cout=b.shapes[x][1], stride=1))
            a, bb = (lhs, other) if draw(st.booleans()) else (other, lhs)
            y = b.add(a, bb)
            log.append(f"{y} = Add({a}, {bb})")
            x = y
        else:  # concat of two branches on the channel axis
            left = draw(conv_unit(b, x, log, stride=1))
            choice = draw(st.sampled_from(["self", "conv", "earlier"]))
            same_hw = [t for t, s in b.shapes.items() if len(s) == 4 and s[2:] == b.shapes[x][2:] and t != left]
            if choice == "conv":
                right = draw(conv_unit(b, x, log, stride=1))
            elif choice == "earlier" and same_hw:
                right = draw(st.sampled_from(same_hw))
            else:
                right = x
            a, bb = (left, right) if draw(st.booleans()) else (right, left)
            y = b.concat(a, bb)
            log.append(f"{y} = Concat({a}, {bb}, axis=1) -> {b.shapes[y]}")
            x = y
    if x == "input":
        y = b.act(x, "identity")
        log.append(f"{y} = identity({x})")
        x = y
    feature = x
    head = draw(st.sampled_from(["gap_gemm", "flatten_gemm", "none"]))
    if head != "none":
        f = b.gap_flatten(x) if head == "gap_gemm" else b.flatten(x)
        out = draw(st.integers(1, 12))
        trans_b = draw(st.booleans())
        gbias = draw(st.booleans())
        x = b.gemm2(f, out, trans_b, gbias)
        log.append(f"{x} = Gemm({'GAP->' if head == 'gap_gemm' else ''}Flatten({feature}), {out}, "
                   f"transB={int(trans_b)}{', bias' if gbias else ''})")
    outputs = [x]
    inner = [t for t in b.shapes if t not in ("input", x) and not t.startswith("cst")]
    if inner and draw(st.integers(0, 2)) == 0:
        second = draw(st.sampled_from(inner))
        outputs.append(second)
    log.append(f"outputs {outputs}")
    model = b.build(outputs, name="fuzz")
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        calibrated = draw(st.booleans())
        log.append("BN statistics calibrated on N(0,1) inputs" if calibrated else "BN statistics random")
        if calibrated:
            model = calibrate_batchnorm(model, batch=16)
    return Case(model, log)


flags = st.fixed_dictionaries({
    "prune": st.sampled_from(PRUNES),
    "bits": st.sampled_from(BITS),
    "method": st.sampled_from(METHODS),
    "select": st.sampled_from(SELECTS),
    "statistics": st.sampled_from(STATISTICS),
})


# ------------------------------------------------------------------------------------------ properties
def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _declared_outputs(model: onnx.ModelProto) -> List[Tuple[str, int, Tuple]]:
    out = []
    for o in model.graph.output:
        t = o.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        out.append((o.name, t.elem_type, dims))
    return out


def _call(model: onnx.ModelProto, kw: dict, validate: bool):
    """(model, report) or the UdfcError raised; any other exception propagates and fails the test."""
    try:
        return compress(model, validate=validate, **kw), None
    except UdfcError as exc:
        return None, exc


def check_error(err: UdfcError) -> None:
    """The error contract: a `UdfcError` (checked by `_call`) with a non-empty one-line message."""
    msg = str(err).strip()
    event(f"UdfcError: {type(err).__name__}")
    assert msg, f"{type(err).__name__} with an empty message"
    assert "\n" not in msg, f"{type(err).__name__} message is not one line: {msg!r}"


def check_properties(case: Case, kw: dict, validate: bool) -> None:
    """Properties (1)-(5) and (7); (6) is `check_size`, in a test of its own so that a size regression
    does not hide the others (hypothesis stops generating at the first failing example)."""
    model = case.model
    original_bytes = model.SerializeToString()
    result, err = _call(model, kw, validate)

    # (7) the input ModelProto is never modified, whatever happened
    assert model.SerializeToString() == original_bytes, "compress modified its input model"

    # (5) same input and flags: byte-identical output, or the same error again
    result2, err2 = _call(model, kw, validate)
    assert model.SerializeToString() == original_bytes, "compress modified its input model (second call)"

    if err is not None:
        check_error(err)
        assert err2 is not None and type(err2) is type(err) and str(err2) == str(err), (
            f"second call did not raise the same error: {err!r} then {err2!r}")
        return
    assert err2 is None, f"second identical call raised {err2!r} while the first succeeded"
    event("compressed")
    out, report = result
    out2, _ = result2
    assert out.SerializeToString(deterministic=True) == out2.SerializeToString(deterministic=True), (
        "two compressions with the same flags differ")

    # (1) full checker
    onnx.checker.check_model(out, full_check=True)

    # (3) declared outputs: names, element types and dims
    assert _declared_outputs(out) == _declared_outputs(model)

    # (2) runs on a random batch of 3; (3) runtime shapes/dtypes match the original's
    inp = model.graph.input[0]
    shape = [3] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(123).standard_normal(shape).astype(np.float32)
    y0 = _session(model).run(None, {inp.name: x})
    sess = _session(out)
    assert [o.name for o in sess.get_outputs()] == [o.name for o in model.graph.output]
    y1 = sess.run(None, {inp.name: x})
    assert len(y0) == len(y1)
    for a, c in zip(y0, y1):
        assert a.shape == c.shape and a.dtype == c.dtype, (a.shape, a.dtype, c.shape, c.dtype)

    # (4) nothing to do -> exactly the same outputs
    if kw["prune"] == 0 and kw["bits"] == 32:
        for name, a, c in zip([o.name for o in model.graph.output], y0, y1):
            assert np.array_equal(a, c), f"output {name} changed with prune=0, bits=32"


def _bias_free_outputs(model) -> int:
    """Output channels of the Conv/ConvTranspose/Gemm/MatMul layers that have no bias (each may gain one)."""
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        has_bias = node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or has_bias:
            continue
        w = inits.get(node.input[1])
        if w is None:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if node.op_type == "ConvTranspose":  # W (Cin, Cout/g, k, k)
            total += w.dims[1] * next((a.i for a in node.attribute if a.name == "group"), 1)
            continue
        total += w.dims[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else w.dims[-1]
    return total


def check_size(case: Case, kw: dict) -> None:
    """(6) never more weights or MACs than the original (plus the error contract and (7)).

    Decision: a layer without a bias may gain one (quantization bias correction and the compensation's
    intercept need it; bias correction is the largest single quantization gain), so the parameter count
    may grow by at most the output channels of the bias-free layers, never more.
    """
    model = case.model
    original_bytes = model.SerializeToString()
    result, err = _call(model, kw, validate=False)
    assert model.SerializeToString() == original_bytes, "compress modified its input model"
    if err is not None:
        check_error(err)
        return
    event("compressed")
    _, report = result
    allowance = _bias_free_outputs(model)
    assert report.after.params <= report.before.params + allowance, (
        f"parameter count grew: {report.before.params} -> {report.after.params} (bias allowance {allowance})")
    assert report.after.macs <= report.before.macs, (
        f"MAC count grew: {report.before.macs} -> {report.after.macs}")


COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=1200, **COMMON)
@given(case=cases(), kw=flags)
def test_random_graphs_no_validate(case, kw):
    check_properties(case, kw, validate=False)


@settings(max_examples=400, **COMMON)
@given(case=cases(), kw=flags)
def test_random_graphs_with_validation(case, kw):
    check_properties(case, kw, validate=True)


@settings(max_examples=600, **COMMON)
@given(case=cases(), kw=flags)
def test_compressed_size_never_grows(case, kw):
    check_size(case, kw)

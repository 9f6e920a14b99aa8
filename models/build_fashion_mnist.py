"""Train the Fashion-MNIST reference CNNs and export them to ONNX.

Usage::

    python models/build_fashion_mnist.py [--out DIR] [--epochs E] [--models vgg,resnet20,vgg_small,hourglass]

For each model ``<name>`` it writes into ``--out`` (default
``~/.cache/onnx-udfc/models``):

* ``<name>_bn.onnx``     - BatchNormalization nodes kept (inference mode),
                           exported with ``TrainingMode.PRESERVE`` and
                           ``do_constant_folding=False``;
* ``<name>_folded.onnx`` - default export (constant folding on): BN folded
                           into the preceding Conv;
* ``<name>.json``        - accuracies (torch and onnxruntime, both exports),
                           parameter count, training time, ONNX op types...

Both exports use the legacy TorchScript exporter (``dynamo=False``), opset 13,
input ``input`` (N,1,28,28) float32 normalised as in ``models/fashion_mnist.py``
and output ``logits`` (N,10), with a dynamic batch axis.

Requires torch (CPU build, ``pip install torch==2.13.0``), onnx, onnxruntime,
numpy, and the data set (``apt-get install -y dataset-fashion-mnist``).
Training is seeded and deterministic for a given torch build and thread count.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fashion_mnist as fm  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "onnx-udfc", "models")
OPSET = 13
SEED = 0
NUM_THREADS = 2


# --------------------------------------------------------------------------- models

def conv_bn_relu(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FeaturesGapLinear(nn.Module):
    """`features` (a Sequential ending with `width` channels), global average pool, Linear to the classes.
    Submodules are created in that order (features, then the classifier), so seeded weights follow it."""

    def __init__(self, features: nn.Sequential, width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class VGG(FeaturesGapLinear):
    """Plain chain: 2 convs, maxpool, 2 convs, maxpool, 1 conv, GAP, Linear."""

    def __init__(self, widths=(32, 32, 64, 64, 128), num_classes=10):
        a, b, c, d, e = widths
        super().__init__(nn.Sequential(
            *conv_bn_relu(1, a), *conv_bn_relu(a, b), nn.MaxPool2d(2),
            *conv_bn_relu(b, c), *conv_bn_relu(c, d), nn.MaxPool2d(2),
            *conv_bn_relu(d, e),
        ), e, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stage = []
            for k in range(blocks):
                stage.append(BasicBlock(cin, w, 2 if (i > 0 and k == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def convtranspose_bn_relu(cin, cout):
    """x2 upsampling: ConvTranspose k4 s2 p1 (the DCGAN / pose-head spelling) -> BN -> ReLU."""
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Hourglass(FeaturesGapLinear):
    """Encoder-decoder classifier: stride-2 convs down to 7x7, two stride-2 ConvTranspose back up to 28x28 (the
    decoder of a segmentation or pose head), a stride-2 conv, GAP, Linear. Its chains have ConvTranspose
    producers and consumers."""

    def __init__(self, widths=(32, 64, 128), num_classes=10):
        a, b, c = widths
        super().__init__(nn.Sequential(
            *conv_bn_relu(1, a), *conv_bn_relu(a, b, 2), *conv_bn_relu(b, c, 2),
            *convtranspose_bn_relu(c, b), *convtranspose_bn_relu(b, a),
            *conv_bn_relu(a, b, 2),
        ), b, num_classes)


# name -> (constructor, default epochs, peak lr, description)
MODELS = collections.OrderedDict([
    ("vgg", (lambda: VGG((32, 32, 64, 64, 128)), 7, 0.1,
             "VGG-style chain 32-32-M-64-64-M-128-GAP-FC")),
    ("resnet20", (lambda: ResNet20(), 5, 0.1,
                  "ResNet-20 (3x3 BasicBlocks, 16/32/64, 1x1 conv+BN projection shortcuts)")),
    ("vgg_small", (lambda: VGG((16, 16, 32, 32, 64)), 10, 0.1,
                   "small VGG-style chain 16-16-M-32-32-M-64-GAP-FC")),
    ("hourglass", (lambda: Hourglass(), 6, 0.1,
                   "encoder-decoder 32-64/2-128/2-ConvT 64-ConvT 32-64/2-GAP-FC (ConvTranspose k4 s2)")),
])


# --------------------------------------------------------------------------- training

def augment(x, gen, pad=2):
    """Random horizontal flip + random crop with zero padding (in pixel space,
    i.e. the normalised background value), seeded through ``gen``."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad:
        bg = -fm.FMNIST_MEAN / fm.FMNIST_STD
        xp = F.pad(x, (pad, pad, pad, pad), value=bg)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        out = torch.empty_like(x)
        h, w = x.shape[2], x.shape[3]
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                idx = ((dy == oy) & (dx == ox)).nonzero(as_tuple=True)[0]
                if idx.numel():
                    out[idx] = xp[idx, :, oy:oy + h, ox:ox + w]
        x = out
    return x


@torch.no_grad()
def torch_predict(model, x, batch=1000):
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].contiguous(memory_format=torch.channels_last)
        outs.append(model(xb).float())
    return torch.cat(outs)


def torch_accuracy(model, x, y):
    return float((torch_predict(model, x).argmax(1) == y).float().mean())


def train(name, model, xtr, ytr, xte, yte, epochs, lr, batch=128, wd=5e-4, augment_on=True, log=print):
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total = epochs * steps_per_epoch
    warm = max(1, int(0.15 * total))

    def lr_at(step):  # linear warm-up then cosine decay to 0
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * lr * (1 + math.cos(math.pi * t))

    step = 0
    t0 = time.time()
    history = []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            xb, yb = xtr[idx], ytr[idx]
            if augment_on:
                xb = augment(xb, gen)
            xb = xb.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            seen += len(idx)
        acc = torch_accuracy(model, xte, yte)
        history.append({"epoch": ep + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_acc": acc, "elapsed_s": time.time() - t0})
        log(f"[{name}] epoch {ep + 1}/{epochs} loss {loss_sum / seen:.4f} train {correct / seen:.4f} "
            f"test {acc:.4f} ({time.time() - t0:.0f}s)")
    train_time = time.time() - t0
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, train_time, history


# --------------------------------------------------------------------------- export

def materialize_identity_initializers(m: onnx.ModelProto) -> int:
    """The TorchScript exporter de-duplicates identical initializers and links the
    copies with ``Identity`` nodes (e.g. a BN whose weight equals its running_var).
    Replace each such Identity (input = initializer) by a real initializer copy so the
    graph is a plain chain of compute nodes.  Returns the number of nodes removed."""
    inits = {i.name: i for i in m.graph.initializer}
    keep, removed = [], 0
    for node in m.graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits \
                and node.output[0] not in {o.name for o in m.graph.output}:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            m.graph.initializer.append(t)
            inits[t.name] = t
            removed += 1
        else:
            keep.append(node)
    if removed:
        del m.graph.node[:]
        m.graph.node.extend(keep)
    return removed


def export(model, path, keep_bn, meta):
    dummy = torch.randn(1, 1, 28, 28)
    kwargs = dict(opset_version=OPSET, input_names=["input"], output_names=["logits"],
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    if keep_bn:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter notice
        torch.onnx.export(model, (dummy,), path, **kwargs)
    m = onnx.load(path)
    ops_raw = collections.Counter(n.op_type for n in m.graph.node)
    removed = materialize_identity_initializers(m)
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    bn_nodes = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    if keep_bn:
        if not bn_nodes:
            raise RuntimeError(f"{path}: expected BatchNormalization nodes, found none")
        for n in bn_nodes:  # inference mode: a single output (no running stats / saved stats)
            if len([o for o in n.output if o]) != 1:
                raise RuntimeError(f"{path}: BatchNormalization {n.name} has training outputs")
            if any(a.name == "training_mode" and a.i != 0 for a in n.attribute):
                raise RuntimeError(f"{path}: BatchNormalization {n.name} in training mode")
    else:
        producers = {o: n.op_type for n in m.graph.node for o in n.output}
        unfolded = [n for n in bn_nodes if producers.get(n.input[0]) != "ConvTranspose"]
        if unfolded:  # the exporter folds BN into Conv only; after a ConvTranspose it stays
            raise RuntimeError(f"{path}: folded export still has {len(unfolded)} BatchNormalization nodes")
    with open(path, "rb") as f:
        data = f.read()
    return {
        "file": os.path.basename(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}",
        "op_counts": dict(sorted(ops.items())),
        "op_counts_raw_export": dict(sorted(ops_raw.items())),
        "identity_nodes_materialized": removed,
        "num_nodes": len(m.graph.node),
        "num_initializers": len(m.graph.initializer),
    }


# --------------------------------------------------------------------------- main

def build(name, out_dir, epochs, data, log=print, augment_on=True):
    ctor, default_epochs, lr, desc = MODELS[name]
    epochs = epochs or default_epochs
    xtr, ytr, xte, yte = data
    torch.manual_seed(SEED)
    model = ctor()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {desc}: {n_params} parameters, {epochs} epochs")
    model, train_time, history = train(name, model, xtr, ytr, xte, yte, epochs, lr, augment_on=augment_on, log=log)
    logits_t = torch_predict(model, xte).numpy()
    acc_t = float((logits_t.argmax(1) == yte.numpy()).mean())
    meta = {"dataset": "Fashion-MNIST", "input_normalization": f"(pixel/255 - {fm.FMNIST_MEAN}) / {fm.FMNIST_STD}",
            "classes": ",".join(fm.CLASSES), "torch_test_accuracy": f"{acc_t:.4f}",
            "builder": "onnx-udfc models/build_fashion_mnist.py"}
    xte_np, yte_np = xte.numpy(), yte.numpy()
    exports = {}
    for kind, keep_bn in (("bn", True), ("folded", False)):
        path = os.path.join(out_dir, f"{name}_{kind}.onnx")
        info = export(model, path, keep_bn, dict(meta, batchnorm="kept" if keep_bn else "folded"))
        logits_o = fm.predict_onnx(path, xte_np)
        info["onnxruntime_test_accuracy"] = float((logits_o.argmax(1) == yte_np).mean())
        info["max_abs_logit_diff_vs_torch"] = float(np.abs(logits_o - logits_t).max())
        info["prediction_mismatches_vs_torch"] = int((logits_o.argmax(1) != logits_t.argmax(1)).sum())
        exports[kind] = info
        log(f"[{name}] {info['file']}: {info['bytes']} bytes, ort acc {info['onnxruntime_test_accuracy']:.4f}, "
            f"max |dlogit| {info['max_abs_logit_diff_vs_torch']:.2e}, ops {info['op_counts']}")
    result = {
        "name": name,
        "description": desc,
        "params": n_params,
        "epochs": epochs,
        "batch_size": 128,
        "optimizer": f"SGD nesterov momentum 0.9, wd 5e-4 (not on BN/bias), peak lr {lr}, "
                     f"linear warm-up 15% then cosine to 0",
        "augmentation": "random horizontal flip + random crop (pad 2)" if augment_on else "none",
        "seed": SEED,
        "torch_threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 1),
        "torch_test_accuracy": acc_t,
        "onnxruntime_test_accuracy_bn": exports["bn"]["onnxruntime_test_accuracy"],
        "onnxruntime_test_accuracy_folded": exports["folded"]["onnxruntime_test_accuracy"],
        "exports": exports,
        "exporter": "torch.onnx.export(dynamo=False) (legacy TorchScript exporter)",
        "history": history,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": __import__("onnxruntime").__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs for every model (default per model: "
                         + ", ".join(f"{k} {v[1]}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--root", default=fm.DEFAULT_ROOT, help="Fashion-MNIST idx folder")
    ap.add_argument("--no-augment", action="store_true", help="disable flip/crop augmentation")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    xtr, ytr = fm.load_fashion_mnist("train", args.root)
    xte, yte = fm.load_fashion_mnist("test", args.root)
    data = (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))

    def log(msg):
        print(msg, flush=True)

    summary = []
    for n in names:
        r = build(n, args.out, args.epochs, data, log=log, augment_on=not args.no_augment)
        summary.append(r)
    print("\nsummary:")
    for r in summary:
        print(f"  {r['name']:10s} params {r['params']:7d}  train {r['train_time_s']:6.1f}s  "
              f"torch {r['torch_test_accuracy']:.4f}  ort bn {r['onnxruntime_test_accuracy_bn']:.4f}  "
              f"ort folded {r['onnxruntime_test_accuracy_folded']:.4f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

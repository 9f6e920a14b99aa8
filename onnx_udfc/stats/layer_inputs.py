"""Quantization statistics measured on synthetic images for models without BN priors.

The quantizer weighs each weight's rounding error by its input channel's variance (MSE clipping), rounds
with error feedback through the input channels' covariance at 5 bits or fewer, and corrects the bias by
the input means (`passes.quantize`). With BN kept, those moments come from the BN prior. A model exported
with BN folded has none, and moment propagation from `N(0, 1)` inputs drifts layer by layer (folded
MobileNetV2: predicted input variances 0.01-0.04 of the real ones past the 14th block).
`measure_layer_inputs` measures instead, at the input of every layer to quantize, the channel mean and
covariance of synthetic images pushed through the model (one onnxruntime run per batch, sums and Gram
matrices only, see `sampled.measure_channel_moments`); `MeasuredInputs` answers the quantizer's questions
from them and every other question from the statistics model it wraps (analytic, or the synthetic chain
statistics of a pruning run).

The images are the broad image prior (`sampled.image_prior_batches`: random spectral exponent, contrast and
brightness per image), which beat unit-contrast pink noise here on both folded ImageNet exports (W4 top-1 /
agreement, MobileNetV2 analytic 0.764 / 0.832, pink 0.780 / 0.844, prior 0.798 / 0.872; EfficientNet-Lite0
0.802 / 0.852, 0.812 / 0.866, 0.836 / 0.878; means, variances and covariances each needed: any one of them
alone gave at most 0.776).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import onnx

from ..heap import return_freed_memory
from .model import MAX_COVARIANCE_CHANNELS, Moments, StatisticsModel
from .sampled import images_per_run, measure_channel_moments, restrict_chain_moments, synthetic_batches

#: images per onnxruntime run: every linear layer's input is probed, the early full-resolution ones too
#: (folded MobileNetV2 W4, whole process: 8 images per run 625 MB, 4 478 MB, 2 306 MB). Without BN layers
#: (batch statistics) the images of a run do not interact, so the size changes nothing but memory.
RUN_BATCH = 2
#: most input pixels pushed through the model (64 ImageNet-sized images): larger inputs get fewer images, each
#: with more positions (PP-OCRv4's 640 x 640 detector: 7 images instead of 64, W4 probe 12 s -> about 2 s)
PIXEL_BUDGET = 64 * 224 * 224
#: fewest linear layers for which the inputs are measured: propagated moments drift layer by layer, so deep
#: models gain, while in shallow ones the synthetic images' own mismatch dominates. Folded Fashion-MNIST, udfc
#: top-1 analytic -> measured, prune 0.3 + W5 / W4: ResNet-20 (22 layers) 0.720 / 0.698 -> 0.724 / 0.719,
#: hourglass (7) 0.615 / 0.583 -> 0.578 / 0.567, small VGG (6) 0.847 / 0.842 -> 0.841 / 0.830, VGG (6)
#: 0.899 / 0.899 -> 0.896 / 0.900; W4 agreement without pruning: ResNet-20 0.986 -> 0.992, hourglass
#: 0.986 -> 0.981, small VGG 0.988 -> 0.986, VGG 0.991 -> 0.993. MobileNetV2 (53) and EfficientNet-Lite0
#: (50), W5 / W4 with and without pruning: top-1 up in 10 of 12 cells, equal in one, three images down in
#: one (EfficientNet-Lite0 W5, whose agreement and KL improved).
MIN_LAYERS = 10

log = logging.getLogger(__name__)


def measure_layer_inputs(original: Union[onnx.ModelProto, Callable[[], Tuple[onnx.ModelProto, bool]]],
                         tensors: Dict[str, int], input_shapes: Dict[str, tuple], shapes: Dict[str, tuple],
                         covariance: Iterable[str] = (), samples: int = 64, seed: int = 0, synthetic: str = "prior",
                         original_shapes: Optional[Dict[str, tuple]] = None,
                         batch: int = RUN_BATCH) -> Tuple[Dict[str, Moments], int]:
    """Mean (C,) and covariance (C, C) of each tensor in `tensors` (the inputs of the layers to quantize, with
    the channels each layer reads), measured on `samples` seeded synthetic images (`synthetic` kind; fewer
    for inputs larger than 224 x 224, see `PIXEL_BUDGET`) pushed through `original` (the input model, or a
    function returning (model, whether it may be edited)). Tensors not in `covariance` (inputs of grouped
    convs and of layers rounded without error feedback) get their variances (C,) only, a sum of squares
    per channel in onnxruntime instead of a Gram matrix.

    Only tensors that exist in the input model, whose channels (from shape inference where it reached them:
    `original_shapes`, else the working graph's `shapes`) are those the layer reads and number at most
    `MAX_COVARIANCE_CHANNELS`, are measured; where inference reached neither, every position is summed.
    Returns (moments per tensor, images used).
    """
    from ..ir.shapes import infer_static_shapes

    owned = False
    if callable(original):
        original, owned = original()
    known = {o for n in original.graph.node for o in n.output} | {i.name for i in original.graph.input}
    orig_shapes = original_shapes if original_shapes is not None else infer_static_shapes(original, input_shapes)
    gram_shapes = {}
    for name, channels in tensors.items():
        # where inference stopped (TF-style pads before depthwise convs: 26 of EfficientNet-Lite0's 50 layer
        # inputs) the channels the layer reads, all positions then
        shape = orig_shapes.get(name) or shapes.get(name) or (None, channels, None)
        if name in known and len(shape) >= 2 and int(shape[1]) == channels and 0 < channels <= MAX_COVARIANCE_CHANNELS:
            gram_shapes[name] = shape
    names = sorted(gram_shapes)
    if not names:
        return {}, 0
    input_name = next(iter(input_shapes))
    pixels = int(np.prod(input_shapes[input_name][2:]))
    run_batch, samples = images_per_run(original, input_shapes, samples, batch,
                                        most=max(1, PIXEL_BUDGET // max(pixels, 1)))
    image = (samples,) + tuple(input_shapes[input_name][1:])
    batches = synthetic_batches(image, seed=seed, kind=synthetic, batch=run_batch)
    handed_over = [original]
    del original
    measured = measure_channel_moments(handed_over, names, orig_shapes, gram_shapes, batches, input_name,
                                       batch_norm="running", model_owned=owned,
                                       diagonal=set(names) - set(covariance))
    return_freed_memory()
    log.debug("quantizer inputs: %d layer inputs measured on %d synthetic images", len(measured), samples)
    return measured, samples


class MeasuredInputs(StatisticsModel):
    """`base` (any statistics model), except for the moments and covariances of the tensors in `measured`
    (`measure_layer_inputs`): the inputs of the layers to quantize. Chain statistics stay the base's; after
    pruning, `restrict` keeps the kept channels of both."""

    def __init__(self, base: StatisticsModel, measured: Dict[str, Moments], samples: int, seed: int = 0,
                 synthetic: str = "prior"):
        self.base = base
        self._inputs = measured
        kind = "image-prior (random spectral exponent, contrast and brightness)" if synthetic == "prior" else "pink-noise"
        self.source = (f"quantizer input means and covariances of {len(measured)} layer(s) measured on {samples} "
                       f"synthetic {kind} images (seed {seed}); " + base.source)

    def __getattr__(self, name):  # everything not answered here: the base model's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def measured(self) -> int:
        return len(self._inputs)

    def tensor_moments(self, tensor: str) -> Optional[Moments]:
        measured = self._inputs.get(tensor)
        if measured is None:
            return self.base.tensor_moments(tensor)
        mean, second = measured  # covariance (C, C) or variances (C,)
        return mean, (second if second.ndim == 1 else np.maximum(np.diag(second).copy(), 0.0))

    def tensor_covariance(self, tensor: str) -> Optional[np.ndarray]:
        measured = self._inputs.get(tensor)
        if measured is not None and measured[1].ndim == 2:
            return measured[1]
        return self.base.tensor_covariance(tensor)

    def input_covariance(self, node) -> Optional[np.ndarray]:
        return self.tensor_covariance(node.input[0])

    def selection_moments(self, tensor: str) -> Optional[Moments]:
        """The base's: the measured tensors are only the layer inputs, so a residual share (a branch's variance
        against its sum's) would mix a propagated branch with a measured sum, two sources at different scales.
        Folded MobileNetV2 prune 0.1 / 0.3, udfc top-1 mixed -> base: W5 0.630 / 0.180 -> 0.754 / 0.210, W4
        0.580 / 0.138 -> 0.702 / 0.192 (`benchmarks/README.md`, "Folded exports at 5 bits or fewer")."""
        return self.base.selection_moments(tensor)

    def chain_statistics(self, chain) -> Optional[Moments]:
        return self.base.chain_statistics(chain)

    def selection_statistics(self, chain) -> Optional[Moments]:
        return self.base.selection_statistics(chain)

    def restrict(self, path, kept: np.ndarray) -> None:
        """After pruning: the base's restriction, and channels `kept` of every measured tensor on `path`."""
        self.base.restrict(path, kept)
        restrict_chain_moments(self._inputs, path, kept)

"""Statistics from synthetic inputs pushed through the model (still no data).

`SampledStatistics` runs the model in onnxruntime on a seeded batch of synthetic images and measures
the mean and channel covariance at every chain's compensation point. Two things make the samples look
like the real activations without any real data:

- the inputs are pink noise (amplitude spectrum ~ 1/f, per channel zero mean and unit variance, as
  normalised images are), which has the spatial correlation of natural images;
- every BatchNormalization normalises with the statistics of the synthetic batch itself (mean and
  variance over batch and positions) instead of its running statistics, so every BN output follows
  its prior `N(beta, gamma^2)` exactly, whatever the synthetic inputs' distribution.

Per-tensor moments (used by quantization) stay with the analytic model, which they match well.
The same class measures real data in the benchmarks (`inputs=` real images, `batch_norm="running"`),
which is how the statistics models are judged; the tool itself never uses data.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..heap import return_freed_memory
from ..ort_session import inference_session
from ..ir.graph import Graph, attr
from ..patterns.chains import Chain
from ..numerics.covariance import cov_to_corr
from .model import AnalyticStatistics, Moments

log = logging.getLogger(__name__)

MAX_POSITIONS_PER_IMAGE = 1024
#: images per onnxruntime run (and per batch-statistics BN). 4 would save 100 MB at peak on MobileNetV2 but
#: loses at high ratios (ImageNet sample, prune 0.5 + W8 top-1 with 4 / with 8: MobileNetV2 0.178 / 0.204,
#: EfficientNet-Lite0 0.154 / 0.178; at prune 0.1 and 0.3 the two are within the sample's noise)
RUN_BATCH = 8


#: most onnxruntime threads the sampling probe uses (the machine's cores, up to this)
MAX_PROBE_THREADS = 4


def probe_threads() -> int:
    """Threads for the sampling probe: the cores this process may use, at most `MAX_PROBE_THREADS`.

    The thread count does not change the measured sums: onnxruntime splits convolutions, matrix products and
    reductions over their outputs, never inside one sum, and the statistics came out bit-identical with 1, 2
    and 4 threads on MobileNetV2 and EfficientNet-Lite0 (`test_probe_statistics_do_not_depend_on_threads`
    keeps checking it). MobileNetV2 prune 0.3: sampling 2.3 -> 1.5 s on 2 cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_PROBE_THREADS))


def position_step(positions: int) -> int:
    """Stride over a feature map's flattened positions so that at most about `MAX_POSITIONS_PER_IMAGE` are kept."""
    return max(1, positions // MAX_POSITIONS_PER_IMAGE)


def pink_noise(shape: Sequence[int], seed: int = 0, exponent: float = 1.0) -> np.ndarray:
    """(B, C, H, W) float32 noise with amplitude spectrum 1/f^exponent, standardised per image and channel."""
    return np.concatenate(list(pink_noise_batches(shape, seed=seed, exponent=exponent)))


def pink_noise_batches(shape: Sequence[int], seed: int = 0, exponent: float = 1.0,
                       batch: Optional[int] = None) -> Iterator[np.ndarray]:
    """`pink_noise` made `batch` images at a time (all B at once when None): the same images whichever the
    batch, since the white noise comes from one generator in order. Memory: one batch and its spectrum."""
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    amplitude = (1.0 / _frequency_radius(h, w) ** exponent).astype(np.float32)
    for start in range(0, b, batch or b):
        white = rng.standard_normal((min(batch or b, b - start), c, h, w), dtype=np.float32)
        yield _shaped_standardised(white, amplitude)


def _frequency_radius(h: int, w: int) -> np.ndarray:
    """(H, W // 2 + 1) radial frequency of the rfft2 bins, the zero bin set to the lowest frequency 1 / max(H, W)."""
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0 / max(h, w)
    return f


def _shaped_standardised(white: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """``irfft2(rfft2(white) * amplitude)`` standardised per image and channel: white (B, C, H, W) float32,
    amplitude float32 broadcastable to (B, C, H, W // 2 + 1); float32 (B, C, H, W).

    Standardised in the frequency domain, before the inverse transform: the zero-frequency bin is the mean
    (set to 0), and by Parseval the variance of an (H, W) image is ``sum_k |X_k|^2 / (H W)^2`` over the full
    spectrum, where the rfft half holds every column but the first (and, W even, the last) twice. One pass
    over the spectrum instead of two over the images (64 ImageNet-sized images, 3 runs each: 0.36-0.74 ->
    0.27-0.30 s, made 8 at a time).
    """
    import scipy.fft

    h, w = white.shape[2:]
    workers = probe_threads()  # each 2-D transform is computed whole by one worker: same values for any count
    spectrum = scipy.fft.rfft2(white, workers=workers)
    del white
    spectrum *= amplitude
    spectrum[:, :, 0, 0] = 0.0
    power = np.square(spectrum.real) + np.square(spectrum.imag)  # (B, C, H, W // 2 + 1) float32
    column_weight = np.full(power.shape[-1], 2.0)
    column_weight[0] = 1.0
    if w % 2 == 0:
        column_weight[-1] = 1.0
    variance = power.sum(axis=2, dtype=np.float64) @ column_weight / float(h * w) ** 2  # (B, C)
    spectrum *= (1.0 / (np.sqrt(variance) + 1e-12)).astype(np.float32)[:, :, None, None]
    return scipy.fft.irfft2(spectrum, s=(h, w), workers=workers).astype(np.float32, copy=False)


#: prior of `image_prior_noise`: amplitude-spectrum exponent and contrast (per-image std) drawn uniformly
#: per image, brightness offset normal per image (see the function for why and the measurements)
PRIOR_EXPONENTS = (1.0, 2.0)
PRIOR_CONTRAST = (0.3, 1.0)
PRIOR_OFFSET_SD = 0.3


def image_prior_noise(shape: Sequence[int], seed: int = 0, exponents: Tuple[float, float] = PRIOR_EXPONENTS,
                      contrast: Tuple[float, float] = PRIOR_CONTRAST, offset_sd: float = PRIOR_OFFSET_SD) -> np.ndarray:
    """(B, C, H, W) float32 synthetic images drawn from a broad prior over image statistics:

        e_b ~ U(exponents), c_b ~ U(contrast), o_b ~ N(0, offset_sd^2)   (one draw per image b)
        x[b, ch] = c_b * standardise(irfft2(rfft2(white[b, ch]) / f^e_b)) + o_b

    i.e. pink noise (`pink_noise`) whose spectral slope, contrast and brightness vary from image to image
    the way they do between real images (a normalised data set has unit variance over the whole set, split
    between within-image contrast and between-image brightness; object-centred images are smoother than
    amplitude ~ 1/f). Moments measured on these samples are the moments under that mixture: the statistics
    no longer bet on one spectrum and one contrast.

    Why: without BN in the model nothing re-normalises the samples layer by layer, and the chain statistics
    follow whatever regime the inputs put the network in. On the Fashion-MNIST models exported with BN
    folded, unit-contrast 1/f noise drives every output to one class and the measured channel means are
    uncorrelated with the real ones past the first layer (r ~ 0; std 1.6-1.8x too large); udfc at prune 0.3 +
    W6 then lost to Neuron Merging (VGG 0.753 vs 0.837). Under this prior: 0.896 (real-data statistics: 0.920).

    All draws come from one `default_rng(seed)`: deterministic for a given seed and shape.
    """
    return np.concatenate(list(image_prior_batches(shape, seed, exponents, contrast, offset_sd)))


def image_prior_batches(shape: Sequence[int], seed: int = 0, exponents: Tuple[float, float] = PRIOR_EXPONENTS,
                        contrast: Tuple[float, float] = PRIOR_CONTRAST, offset_sd: float = PRIOR_OFFSET_SD,
                        batch: Optional[int] = None) -> Iterator[np.ndarray]:
    """`image_prior_noise` made `batch` images at a time (all at once when None), the same images either way:
    the per-image draws come first, then the white noise in order."""
    b, c, h, w = shape
    rng = np.random.default_rng(seed)
    exponent = rng.uniform(exponents[0], exponents[1], size=b)
    scale = rng.uniform(contrast[0], contrast[1], size=b).astype(np.float32)
    offset = (rng.normal(0.0, offset_sd, size=b) if offset_sd > 0 else np.zeros(b)).astype(np.float32)
    log_f = np.log(_frequency_radius(h, w))
    for start in range(0, b, batch or b):
        images = slice(start, min(start + (batch or b), b))
        white = rng.standard_normal((images.stop - start, c, h, w), dtype=np.float32)
        filters = np.exp(-exponent[images, None, None] * log_f[None]).astype(np.float32)  # (b, H, W//2+1) = f^-e
        x = _shaped_standardised(white, filters[:, None])
        x *= scale[images, None, None, None]
        x += offset[images, None, None, None]
        yield x


#: synthetic images per probe when `Options.samples` is not given: `DEFAULT_SAMPLES`, or `SMALL_INPUT_SAMPLES`
#: for inputs of at most `SMALL_INPUT_PIXELS` pixels per image (`default_samples`)
DEFAULT_SAMPLES = 64
SMALL_INPUT_SAMPLES = 128
SMALL_INPUT_PIXELS = 128 * 128


def default_samples(input_shapes: Dict[str, tuple]) -> int:
    """Synthetic images of the probes when none are asked for: 64, or 128 where one image has at most
    128 x 128 pixels (the probe then costs little). The statistics' noise falls with the images; ImageNet
    inputs gained nothing from 128 (`Options.samples`), but 28 x 28 Fashion-MNIST models did at high prune
    ratios. udfc W6, mean of seeds 0-2, prune 0.1 / 0.3 / 0.5, 64 -> 128 images: BN folded VGG 0.923 / 0.888 /
    0.616 -> 0.923 / 0.897 / 0.663, small VGG 0.914 / 0.880 / 0.456 -> 0.914 / 0.875 / 0.476, hourglass 0.905 /
    0.877 / 0.502 -> 0.904 / 0.875 / 0.526, ResNet-20 0.919 / 0.880 / 0.624 -> 0.918 / 0.877 / 0.703; BN kept
    within 0.3 points at prune 0.1 / 0.3, at 0.5 -0.3 to +4.9 (small VGG 0.664 -> 0.713). Images of unknown
    size: 64."""
    shapes = list(input_shapes.values())
    if len(shapes) == 1 and len(shapes[0]) == 4:
        height, width = shapes[0][2], shapes[0][3]
        if isinstance(height, int) and isinstance(width, int) and 0 < height * width <= SMALL_INPUT_PIXELS:
            return SMALL_INPUT_SAMPLES
    return DEFAULT_SAMPLES


#: images of the saturation check (`pink_saturates`) and the mean top-class probability at or above which
#: the classifier is saturated by the noise. Measured on 16 pink images: the folded Fashion-MNIST exports
#: 0.945-1.000 (one or two classes), the folded ImageNet exports 0.19-0.45; the threshold sits between. It
#: once also asked for one class on every image, which a retrained small VGG missed (two classes at 0.945):
#: it then took `diverse` inputs, udfc W6 prune 0.1 / 0.3 / 0.5 0.902 / 0.851 / 0.417 against 0.914 / 0.880 /
#: 0.456 with `prior` (mean of seeds 0-2)
SATURATION_IMAGES = 16
SATURATION_CONFIDENCE = 0.8
#: image-prior candidates scored per probe image of the "diverse" inputs (`diverse_choice`)
DIVERSE_CANDIDATES = 2
#: per-image contrast range of the pruning probe's image-prior images (`prior`, and the `diverse` inputs'
#: candidates); the quantizer-input probe (`stats.layer_inputs`) keeps the prior's own `PRIOR_CONTRAST`.
#: Folded ImageNet exports (diverse), udfc prune 0.1 + W8, mean of seeds 0-2, contrast (0.3, 1) / (0.15, 0.6) /
#: (0.05, 0.4): MobileNetV2 0.680 / 0.735 / 0.740, EfficientNet-Lite0 0.793 / 0.815 / 0.802 ((0.3, 2): 0.659 /
#: 0.753); prune 0.3 0.091 / 0.101 and 0.179 / 0.189 with (0.15, 0.6). Folded Fashion-MNIST exports (prior),
#: udfc W6, mean of seeds 0-2, prune 0.1 / 0.3 / 0.5, contrast (0.3, 1) -> (0.15, 0.6): VGG 0.921 / 0.898 /
#: 0.582 -> 0.923 / 0.888 / 0.616, small VGG 0.913 / 0.879 / 0.396 -> 0.914 / 0.880 / 0.456, hourglass 0.908 /
#: 0.852 / 0.568 -> 0.905 / 0.877 / 0.502, ResNet-20 0.916 / 0.827 / 0.421 -> 0.919 / 0.880 / 0.624 (2.4
#: points more on average; (0.1, 0.4) and (0.05, 0.3) no better). The quantizer-input probe at (0.15, 0.6):
#: folded EfficientNet-Lite0 W4 0.841 -> 0.826 (seeds 0-2), so it keeps the prior's.
PROBE_CONTRAST = (0.15, 0.6)


class ClassifierAnswers:
    """The input model's answers on synthetic images: one onnxruntime session of `model`, kept for several
    calls (the saturation check, then the scoring of the diverse inputs' candidates)."""

    def __init__(self, model: onnx.ModelProto, input_name: str, input_shape: Sequence[int]):
        self.input_name = input_name
        self.input_shape = tuple(input_shape)
        self.run_batch = images_per_run(model, {input_name: self.input_shape}, RUN_BATCH, RUN_BATCH)[0]
        self._session = inference_session(model.SerializeToString(), _probe_options())
        self._output = self._session.get_outputs()[0].name

    def images(self, count: int) -> int:
        """`count` rounded down to whole runs (one run at least)."""
        return max(self.run_batch, count - count % self.run_batch)

    def probabilities(self, batches: Iterable[np.ndarray]) -> Optional[np.ndarray]:
        """(B, K) float64 class probabilities of the images in `batches` from the model's first output
        (its softmax, or the output itself when its rows already are probabilities), or None when that
        output is not (B, K) scores with K >= 2 (a detector, an embedding)."""
        scores = []
        for x in batches:
            y = self._session.run([self._output], {self.input_name: x})[0]
            if y.ndim != 2 or y.shape[1] < 2:
                return None
            scores.append(y)
        scores = np.concatenate(scores).astype(np.float64)
        if np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3):
            return scores
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def close(self) -> None:
        self._session = None


def saturated(probabilities: Optional[np.ndarray]) -> bool:
    """True when the mean top-class probability of (B, K) `probabilities` is at least `SATURATION_CONFIDENCE`:
    the images drive the classifier to confident answers (False for None: not a classifier)."""
    if probabilities is None:
        return False
    return bool(probabilities.max(axis=1).mean() >= SATURATION_CONFIDENCE)


def pink_saturates(model: onnx.ModelProto, input_name: str, input_shape: Sequence[int], seed: int = 0) -> bool:
    """True when unit-contrast pink noise saturates the classifier `model` (`saturated` on its answers to
    `SATURATION_IMAGES` seeded pink images). Any other output (a detector, an embedding) is never judged
    saturated.

    Why: statistics measured on inputs that drive every sample to a confident answer describe a regime the
    network is not in on data. On the four Fashion-MNIST models exported with BN folded, 64 pink images land
    in one class (a retrained small VGG: two) with top probability 0.95-1.00, while image-prior samples spread
    over 3-6 classes (confidence 0.70-0.90); on the folded ImageNet exports pink noise gives 3-5 classes at
    0.19-0.45. Prior images are much better on the former and worse on the latter (see `SampledStatistics`
    with `synthetic="auto"`).
    """
    answers = ClassifierAnswers(model, input_name, input_shape)
    return saturated(answers.probabilities(_pink_check_batches(answers, seed)))


def _pink_check_batches(answers: ClassifierAnswers, seed: int) -> Iterator[np.ndarray]:
    shape = (answers.images(SATURATION_IMAGES),) + answers.input_shape[1:]
    return synthetic_batches(shape, seed=seed, kind="pink", batch=answers.run_batch)


def diverse_choice(probabilities: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices of `count` rows of (B, K) `probabilities` (count <= B), taken round-robin over the
    predicted classes: round r takes each class's r-th most confident image, the classes in the order of
    their most confident image, until `count` are taken.

    Why: the folded ImageNet exports answer image-prior noise with a dozen of their 1000 classes, most
    images in one or two; probed on such a batch, the chain statistics describe those few classes'
    features. Spreading the probe over the answers gave folded MobileNetV2 prune 0.1 + W8 0.612 / 0.628 /
    0.606 -> 0.650 / 0.700 / 0.690 (seeds 0 / 1 / 2; 64 of 128 candidates at the prior's contrast; pink noise
    before), see `resolve_synthetic_inputs`.
    """
    classes = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    order = np.lexsort((-confidence, classes))  # by class, most confident first within each
    sorted_classes = classes[order]
    first = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])  # each class's first row
    sizes = np.diff(np.r_[first, len(order)])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(first, sizes)  # position within its class
    class_rank = np.empty(len(first), dtype=np.int64)
    class_rank[np.argsort(-confidence[order[first]], kind="stable")] = np.arange(len(first))
    row_class_rank = np.empty(len(order), dtype=np.int64)
    row_class_rank[order] = np.repeat(class_rank, sizes)
    taken = np.lexsort((row_class_rank, rank))[:count]
    return np.sort(taken)


def diverse_prior_images(answers: ClassifierAnswers, count: int, run_batch: int, seed: int = 0
                         ) -> Tuple[Optional[List[np.ndarray]], int, int]:
    """(the chosen images in runs of `run_batch`, candidates scored, classes answered among the chosen):
    `count` of `DIVERSE_CANDIDATES * count` seeded image-prior candidates (`image_prior_noise` with contrast
    drawn from `PROBE_CONTRAST`) chosen by `diverse_choice` on the model's answers; (None, candidates, 0)
    when the model is not a classifier. Memory: the candidates (128 ImageNet-sized images are 77 MB) until
    the choice, then the chosen."""
    shape = (answers.images(DIVERSE_CANDIDATES * count),) + answers.input_shape[1:]
    candidates = list(image_prior_batches(shape, seed=seed, contrast=PROBE_CONTRAST, batch=answers.run_batch))
    probabilities = answers.probabilities(candidates)
    if probabilities is None:
        return None, shape[0], 0
    chosen = diverse_choice(probabilities, count)
    starts = np.cumsum([0] + [len(c) for c in candidates])
    source = np.searchsorted(starts, chosen, side="right") - 1  # the candidate batch of each chosen image
    runs = [np.stack([candidates[b][i - starts[b]]
                      for b, i in zip(source[at:at + run_batch], chosen[at:at + run_batch])])
            for at in range(0, len(chosen), run_batch)]
    return runs, shape[0], len(np.unique(probabilities[chosen].argmax(axis=1)))


def resolve_synthetic_inputs(model: onnx.ModelProto, input_name: str, input_shape: Sequence[int], synthetic: str,
                             samples: int, run_batch: int, seed: int = 0
                             ) -> Tuple[str, str, Optional[List[np.ndarray]]]:
    """(the synthetic images used, why or how they were chosen (follows their description in the statistics'
    source), the images in runs of `run_batch` where they had to be made to choose them) for the requested
    `synthetic` inputs:

    - "pink", "prior": as asked;
    - "diverse": `samples` image-prior images chosen by the model's answers (`diverse_prior_images`), plain
      "prior" when its first output is not class scores;
    - "auto" (BN-folded models): "prior" when pink noise saturates the classifier (`saturated`: the
      Fashion-MNIST exports), else "diverse" for a classifier (the ImageNet exports), else "pink".

    Measured (udfc, mean of seeds 0-2; `benchmarks/README.md`): the folded ImageNet exports at prune 0.1 + W8
    with pink noise / diverse (contrast as the prior's) / diverse (`PROBE_CONTRAST`), MobileNetV2 0.615 /
    0.680 / 0.735, EfficientNet-Lite0 0.773 / 0.793 / 0.815, and at prune 0.3 0.035 / 0.091 / 0.101 and 0.175 /
    0.179 / 0.189; diverse in place of prior on the folded Fashion-MNIST exports, W6, both at `PROBE_CONTRAST`,
    prune 0.1 / 0.3 / 0.5: VGG -0.1 / -0.7 / -8.0 points, small VGG -1.3 / -3.0 / -3.9, hourglass +0.2 / -4.3 /
    -1.0, ResNet-20 -0.1 / -1.0 / +3.2, so those keep "prior".
    """
    if synthetic not in ("auto", "diverse"):
        return synthetic, "", None
    answers = ClassifierAnswers(model, input_name, input_shape)
    try:
        if synthetic == "auto":
            pink = answers.probabilities(_pink_check_batches(answers, seed))
            if pink is None:
                return "pink", "", None
            if saturated(pink):
                return "prior", ", as pink noise saturates the classifier (confident answers to every image),", None
        runs, candidates, classes = diverse_prior_images(answers, samples, run_batch, seed)
        if runs is None:
            return "prior", ", unchosen as the model's first output is not class scores,", None
        return "diverse", (f" chosen from {candidates} by the model's answers (one per predicted class in turn, "
                           f"most confident first: {classes} classes)"), runs
    finally:
        answers.close()


def _handed_out(runs: List[np.ndarray]) -> Iterator[np.ndarray]:
    """The runs of `runs` in order, each dropped from the list as it is handed out."""
    while runs:
        yield runs.pop(0)


def _probe_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = probe_threads()
    opts.log_severity_level = 3
    # without the arena the activations of a run go back to the system when it ends (same sums):
    # MobileNetV2 prune 0.3 peak 560 -> 454 MB
    opts.enable_cpu_mem_arena = False
    return opts


def images_per_run(model: onnx.ModelProto, input_shapes: Dict[str, tuple], samples: int, batch: int,
                   most: Optional[int] = None) -> Tuple[int, int]:
    """(images per onnxruntime run, images in all): `batch` per run where the model's batch dimension is
    dynamic (its static batch otherwise), and `samples` (at most `most`) rounded down to whole runs, one run
    at least."""
    from ..ir.shapes import with_batch

    run_batch = with_batch(model, input_shapes, min(batch, samples))[next(iter(input_shapes))][0]
    if most is not None:
        samples = min(samples, most)
    return run_batch, max(run_batch, samples - samples % run_batch)


def synthetic_batches(shape: Sequence[int], seed: int = 0, kind: str = "pink", batch: Optional[int] = None,
                      contrast: Tuple[float, float] = PRIOR_CONTRAST) -> Iterator[np.ndarray]:
    """The synthetic inputs of `SampledStatistics` and `stats.layer_inputs`, `batch` images at a time:
    `image_prior_noise` at per-image `contrast` ("prior") or unit-contrast 1/f `pink_noise` ("pink"). The
    "diverse" images are chosen by the model (`resolve_synthetic_inputs`)."""
    if kind == "pink":
        return pink_noise_batches(shape, seed=seed, batch=batch)
    if kind == "prior":
        return image_prior_batches(shape, seed=seed, contrast=contrast, batch=batch)
    raise ValueError(f"unknown synthetic input kind {kind!r}")


def batch_statistics_probe(model: onnx.ModelProto, outputs: List[str], shapes: Dict[str, tuple],
                           batch_norm: str = "batch", copy: bool = True) -> onnx.ModelProto:
    """Copy of `model` (`model` itself, edited, when not `copy`) whose outputs are `outputs`; with
    batch_norm="batch" every inference BN normalises by its input's batch statistics instead of its running
    ones:

        m = mean(x), v = max(sum(x^2) / n - m^2, 0)   per channel over batch and positions (n values each)
        y = BatchNormalization(x, gamma, beta, m, v)   = (x - m) / sqrt(v + eps) * gamma + beta

    Two reductions read x (ReduceMean, ReduceSumSquare) and the BN reads and writes it once: half the passes
    over the feature map of a spelled-out normalisation. ``v`` in float32 loses ``(m / sd)^2 * 1e-7`` of
    itself, negligible for BN inputs.
    """
    if copy:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
    else:
        probe = model
    g = probe.graph
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs)
    if batch_norm != "batch":
        return probe
    opset = next((i.version for i in probe.opset_import if i.domain in ("", "ai.onnx")), 13)
    graph = Graph(probe)
    for index in reversed(range(len(g.node))):
        node = g.node[index]
        if node.op_type != "BatchNormalization" or attr(node, "training_mode", 0):
            continue
        shape = shapes.get(node.input[0])
        if shape is None or graph.constant(node.input[1]) is None or graph.constant(node.input[2]) is None:
            log.warning("BatchNormalization %s keeps its running statistics in the probe (unknown shape)", node.name)
            continue
        new, inits = _batch_normalisation(node, f"udfc_bnstat{index}_", len(shape), opset)
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
        del g.node[index]
        for offset, n in enumerate(new):
            g.node.insert(index + offset, n)
    return probe


def _batch_normalisation(node: onnx.NodeProto, p: str, rank: int, opset: int):
    """Nodes and initializers that replace inference BN `node` by its batch-statistics form (prefix `p`)."""
    x = node.input[0]
    axes = [0] + list(range(2, rank))

    def reduce(op, inp, out):
        if opset >= 18:
            return helper.make_node(op, [inp, p + "axes"], [out], keepdims=0)
        return helper.make_node(op, [inp], [out], axes=axes, keepdims=0)

    inits = {p + "axes": np.array(axes, np.int64)} if opset >= 18 else {}
    nodes = [reduce("ReduceMean", x, p + "mean"),
             reduce("ReduceSumSquare", x, p + "sumsq"),
             helper.make_node("Size", [x], [p + "size"]),  # n = size / channels, whatever the batch
             helper.make_node("Size", [p + "mean"], [p + "c"]),
             helper.make_node("Div", [p + "size", p + "c"], [p + "count_int"]),
             helper.make_node("Cast", [p + "count_int"], [p + "count"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Div", [p + "sumsq", p + "count"], [p + "meansq"]),
             helper.make_node("Mul", [p + "mean", p + "mean"], [p + "mean2"]),
             helper.make_node("Sub", [p + "meansq", p + "mean2"], [p + "var_raw"]),
             helper.make_node("Relu", [p + "var_raw"], [p + "var"]),
             helper.make_node("BatchNormalization", [x, node.input[1], node.input[2], p + "mean", p + "var"],
                              list(node.output[:1]), epsilon=float(attr(node, "epsilon", 1e-5)))]
    return nodes, inits


def gram_outputs(probe: onnx.ModelProto, names: List[str], shapes: Dict[str, tuple],
                 diagonal: Iterable[str] = ()) -> Dict[str, Optional[tuple]]:
    """Make `probe` output, for each tensor in `names`, its per-channel sums over the probed positions
    instead of the feature map (in place). Returns name -> (sum output, Gram output, positions kept per image),
    or None where the shape is unknown (that tensor stays an output as it is); where only the channels are
    known (spatial dims None) every position is summed and the third item names an output holding the
    flattened tensor's shape (B, C, P). For the tensors in `diagonal` the second output is the Gram matrix's
    diagonal only, the per-channel sums of squares (C,).

    With ``X`` (B, C, P) the tensor's positions (every `position_step(P)`-th, as `_Accumulator.add`
    takes them) laid out as ``Y`` (C, B * P): ``sum = Y 1`` (C,) and ``gram = Y Y^T`` (C, C), both float32
    in onnxruntime. The feature maps never leave onnxruntime: no copy of them per run, and the outputs are
    C x C instead of B x C x H x W. One (C, B*P) x (B*P, C) product instead of B batched (C, P) x (P, C)
    ones and their sum: MobileNetV2 prune 0.3, 64 images, probe 1.97 -> 1.63 s (its Gram matrices take
    38 G multiply-adds, twice the network's own).
    """
    g = probe.graph
    opset = next((i.version for i in probe.opset_import if i.domain in ("", "ai.onnx")), 13)
    del g.output[:]
    plan: Dict[str, Optional[tuple]] = {}
    diagonal = set(diagonal)
    for index, name in enumerate(names):
        shape = shapes.get(name)
        if shape is None or len(shape) < 2 or opset < 13:
            g.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            plan[name] = None
            continue
        p = f"udfc_gram{index}_"
        channels = int(shape[1])
        inits = {p + "shape": np.array([0, channels, -1], np.int64), p + "rows": np.array([channels, -1], np.int64),
                 p + "axes1": np.array([1], np.int64)}
        nodes = [helper.make_node("Reshape", [name, p + "shape"], [p + "flat"])]
        flat = p + "flat"
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:]):
            # positions unknown (channels known): every position, counted by onnxruntime (B, C, P)
            nodes.append(helper.make_node("Shape", [flat], [p + "dims"]))
            g.output.append(helper.make_tensor_value_info(p + "dims", onnx.TensorProto.INT64, None))
            positions, step = None, 1
        else:
            positions = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            step = position_step(positions)
        if step > 1:
            inits.update({p + "start": np.array([0], np.int64), p + "end": np.array([positions], np.int64),
                          p + "axis": np.array([2], np.int64), p + "step": np.array([step], np.int64)})
            nodes.append(helper.make_node("Slice", [flat, p + "start", p + "end", p + "axis", p + "step"], [p + "sub"]))
            flat = p + "sub"
        if name in diagonal:  # sums and sums of squares over batch and positions, (C,) each
            inits[p + "axes02"] = np.array([0, 2], np.int64)
            nodes += [helper.make_node("Mul", [flat, flat], [p + "sq"]),
                      helper.make_node("ReduceSum", [p + "sq", p + "axes02"], [p + "gram"], keepdims=0),
                      helper.make_node("ReduceSum", [flat, p + "axes02"], [p + "sum"], keepdims=0)]
        else:
            nodes += [helper.make_node("Transpose", [flat], [p + "cbp"], perm=[1, 0, 2]),  # (C, B, P)
                      helper.make_node("Reshape", [p + "cbp", p + "rows"], [p + "y"]),  # Y (C, B * P)
                      helper.make_node("Transpose", [p + "y"], [p + "yt"], perm=[1, 0]),
                      helper.make_node("MatMul", [p + "y", p + "yt"], [p + "gram"]),
                      helper.make_node("ReduceSum", [p + "y", p + "axes1"], [p + "sum"], keepdims=0)]
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
        g.node.extend(nodes)
        g.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in (p + "sum", p + "gram"))
        plan[name] = (p + "sum", p + "gram", p + "dims" if positions is None else len(range(0, positions, step)))
    return plan


class _Accumulator:
    """Running sums for the mean and covariance of the channels (axis 1) of a tensor."""

    def __init__(self):
        self.n = 0
        self.total = None
        self.outer = None

    def add(self, t: np.ndarray) -> None:
        b, c = t.shape[:2]
        flat = t.reshape(b, c, -1)  # (B, C, positions)
        step = position_step(flat.shape[2])
        # positions subsampled before the transpose: only the rows kept are copied, (B * P, C)
        a = np.ascontiguousarray(flat[:, :, ::step].transpose(0, 2, 1), dtype=np.float32).reshape(-1, c)
        if self.total is None:
            self.total, self.outer = np.zeros(c), np.zeros((c, c))
        self.n += a.shape[0]
        # one batch's sums in float32 (at most batch * 1024 rows: relative error ~1e-6, far below the sampling
        # error of 32 images), accumulated over batches in float64; half the time of a float64 product
        self.total += a.sum(axis=0, dtype=np.float64)
        self.outer += a.T @ a

    def add_sums(self, total: np.ndarray, gram: np.ndarray, rows: int) -> None:
        """Sums computed elsewhere (`gram_outputs`): total (C,), gram (C, C) (or its diagonal (C,)) over `rows`
        rows."""
        if self.total is None:
            self.total, self.outer = np.zeros(total.shape[0]), np.zeros(gram.shape)
        self.n += int(rows)
        self.total += total
        self.outer += gram

    def result(self) -> Moments:
        """(mean (C,), covariance (C, C)), or (mean, variance (C,)) when only the diagonal was summed."""
        mean = self.total / self.n
        if self.outer.ndim == 1:
            return mean, np.maximum(self.outer / self.n - mean ** 2, 0.0)
        cov, self.outer = self.outer, None  # made in the sums' memory: the accumulator is done with
        cov /= self.n
        cov -= np.outer(mean, mean)
        cov += cov.T  # numpy buffers the overlapping transpose
        cov *= 0.5
        return mean, cov


def probed_shape(chain: Chain, shapes: Dict[str, tuple]) -> Optional[tuple]:
    """Static shape of the tensor probed for `chain` (its last stage's output), or None.

    Activations keep shapes, so where inference did not reach the stage output (shape inference records
    only some ops' outputs, `ir.shapes._SHAPE_NEEDED`) it is the shape of the stage's last pool, or of the
    layer the stage follows (the depthwise conv, else the producer).
    """
    stage = chain.last_stage
    if shapes.get(stage.output) is not None:
        return shapes[stage.output]
    if stage.pools:
        return shapes.get(stage.pools[-1].output[0])
    layer = chain.depthwise if chain.depthwise is not None else chain.producer
    return shapes.get(layer.output[0])


def measure_channel_moments(model: Union[onnx.ModelProto, List[onnx.ModelProto]], names: List[str], shapes: Dict[str, tuple],
                            gram_shapes: Dict[str, tuple], batches: Iterable[np.ndarray], input_name: str,
                            batch_norm: str = "batch", model_owned: bool = False,
                            diagonal: Iterable[str] = ()) -> Dict[str, Moments]:
    """Mean (C,) and covariance (C, C) of the channels of each tensor in `names` (for those in `diagonal` with a
    known shape: the variances (C,) only), over the images of `batches`
    (each (b, C, H, W), one onnxruntime run) pushed through `model` (`batch_statistics_probe` with
    `batch_norm`, every probed tensor reduced to its sums and Gram matrix by `gram_outputs` where
    `gram_shapes` knows its shape). `shapes`: the model's static shapes (ranks of the BN inputs).
    `model_owned`: `model` may be edited into the probe instead of copied (one model's size less in memory).
    `model` may come as a one-element list, which is emptied: the caller hands its reference over, and the
    model is freed as soon as the probe is serialised.
    """
    if isinstance(model, list):  # handed over (`[model]`, the caller keeps no other reference)
        model = model.pop()
    probe = batch_statistics_probe(model, names, shapes, batch_norm=batch_norm, copy=not model_owned)
    del model
    plan = gram_outputs(probe, names, gram_shapes, diagonal)
    fetch = [o for n in names for o in (tuple(x for x in plan[n] if isinstance(x, str)) if plan[n] else (n,))]
    opts = _probe_options()
    # the probe's protobuf goes before onnxruntime parses its bytes: with an owned, handed-over model that
    # was the last copy of the input in memory during the runs (ResNet-50-sized prune 0.3: 100 MB)
    serialized = probe.SerializeToString()
    del probe
    session = inference_session(serialized, opts)
    del serialized
    accumulators = {n: _Accumulator() for n in names}
    for batch_inputs in batches:
        values = dict(zip(fetch, session.run(fetch, {input_name: batch_inputs})))
        for name in names:
            if plan[name] is None:
                accumulators[name].add(values[name])
            else:
                total, gram, kept = plan[name]
                rows = int(values[kept][0] * values[kept][2]) if isinstance(kept, str) else len(batch_inputs) * kept
                accumulators[name].add_sums(values[total], values[gram], rows)
        # this run's outputs and images go before the next run allocates its feature maps (MobileNetV2: 24 MB
        # of Gram matrices and 5 MB of images less at the probe's peak)
        del values, batch_inputs
    return {n: acc.result() for n, acc in accumulators.items()}


def pooled_tensor(graph: Graph, chain: Chain) -> Optional[str]:
    """The output of the GlobalAveragePool (or spatial ReduceMean) on `chain`'s path before its consumer
    (GAP -> Flatten -> Gemm chains), or None."""
    for tensor, _ in chain.path:
        node = graph.producer_of(tensor)
        if node is not None and node.op_type in ("GlobalAveragePool", "ReduceMean"):
            return tensor
    return None


class SampledStatistics(AnalyticStatistics):
    """Chain covariances measured on synthetic (or, in benchmarks, real) inputs; moments analytic.

    `original`: the input model (before BN folding), run by the probe, or a function returning
    (that model, whether it is a fresh copy the probe may be made of in place) (`PassContext.input_model`:
    then no reference outlives the probe's serialisation); `original_owned`: with a model, whether it is
    such a copy.
    """

    label = ""
    #: whether chains through a global pool are priced on the pooled vectors (`selection_statistics`)
    pooled_selection = True
    #: whether chains through a depthwise conv are priced on the average of the analytic model and the samples
    #: (`selection_statistics`)
    averaged_depthwise_selection = True

    def __init__(self, graph: Graph, shapes: Dict[str, tuple], priors: Dict[str, tuple],
                 original: Union[onnx.ModelProto, Callable[[], Tuple[onnx.ModelProto, bool]]],
                 chains: List[Chain], input_shapes: Dict[str, tuple],
                 samples: int = 32, seed: int = 0, inputs: Optional[np.ndarray] = None,
                 batch_norm: str = "batch", batch: int = RUN_BATCH,
                 original_shapes: Optional[Dict[str, tuple]] = None, synthetic: str = "pink",
                 original_owned: bool = False):
        super().__init__(graph, shapes, priors)
        pooled = {c.last_stage.output: pooled_tensor(graph, c) for c in chains} if self.pooled_selection else {}
        pooled = {key: tensor for key, tensor in pooled.items() if tensor is not None}
        names = sorted({c.last_stage.output for c in chains} | set(pooled.values()))
        self._measured: Dict[str, Moments] = {}
        self._pooled: Dict[str, Moments] = {}
        self._kept: Dict[str, np.ndarray] = {}
        #: the synthetic images used: "pink", "prior" or "diverse" ("auto" resolved by `resolve_synthetic_inputs`)
        self.synthetic = "pink" if synthetic == "auto" else synthetic
        if not names:
            return
        input_name = next(iter(input_shapes))
        if callable(original):
            original, original_owned = original()
        # a static batch stays as it is; a dynamic one runs `batch` images at a time (memory: the probed
        # feature maps of one run are held at once; MobileNetV2 with 32 images at a time peaked at 940 MB)
        run_batch, samples = images_per_run(original, input_shapes, samples, batch)
        # batch-statistics BN wants the largest batch the model accepts; synthetic images are made one run's
        # batch at a time (64 ImageNet-sized images are 39 MB, their spectrum as much again)
        how, chosen = "", None
        if inputs is None:
            shape = (samples,) + tuple(input_shapes[input_name][1:])
            if len(shape) != 4:
                raise ValueError("synthetic inputs need one 4-D image input")
            self.synthetic, how, chosen = resolve_synthetic_inputs(original, input_name, input_shapes[input_name],
                                                                   synthetic, samples, run_batch, seed)
            if chosen is not None:
                batches = _handed_out(chosen)
            else:
                batches = synthetic_batches(shape, seed=seed, kind=self.synthetic, batch=run_batch,
                                            contrast=PROBE_CONTRAST)
        else:
            samples = len(inputs)
            batches = (inputs[start:start + run_batch] for start in range(0, samples, run_batch))
        from ..ir.shapes import infer_static_shapes

        # BN inputs vanished from the folded graph: the original's shapes (only their ranks are read)
        orig_shapes = original_shapes if original_shapes is not None else infer_static_shapes(original, input_shapes)
        # the probed tensors' channels and positions: where the original's shape inference stopped (TF-style
        # exports with computed pads: 17 of EfficientNet-Lite0's 19), from the folded graph's linear layers and
        # pools (`probed_shape`); otherwise their whole feature maps would come back from onnxruntime instead
        # of Gram matrices (EfficientNet-Lite0 prune 0.3: 0.5 s more and about 100 MB more at peak)
        gram_shapes = dict(orig_shapes)
        for chain in chains:
            name = chain.last_stage.output
            if gram_shapes.get(name) is None:
                gram_shapes[name] = probed_shape(chain, shapes)
        batch_statistics = batch_norm == "batch" and any(n.op_type == "BatchNormalization"
                                                         for n in original.graph.node)
        handed_over = [original]
        del original
        self._measured = measure_channel_moments(handed_over, names, orig_shapes, gram_shapes, batches, input_name,
                                                 batch_norm, model_owned=original_owned)
        return_freed_memory()
        self._pooled = {key: self._measured.pop(tensor) for key, tensor in pooled.items() if tensor in self._measured}
        analytic = self.source
        averaged = sum(1 for c in chains if c.last_stage.output not in self._pooled and self._selected_on_average(c))
        contrast = "contrast in [%g, %g]" % PROBE_CONTRAST
        images = ("synthetic pink-noise images" if self.synthetic == "pink" else
                  f"synthetic image-prior images (random spectral exponent, {contrast} and brightness per image)")
        normalising = " with every BN normalising by its batch statistics" if batch_statistics else ""
        self.source = (f"{self.label}channel covariances from {samples} {images}{how} pushed through the model"
                       f"{normalising} (seed {seed}); "
                       + (f"{len(self._pooled)} chain(s) read through a global pool selected on the pooled vectors' "
                          "covariance; " if self._pooled else "")
                       + (f"{averaged} chain(s) through a depthwise conv selected on the average with the analytic "
                          "model; " if averaged else "")
                       + analytic)

    def chain_statistics(self, chain: Chain) -> Optional[Moments]:
        name = chain.last_stage.output
        measured = self._measured.get(name)
        if measured is None or measured[0].shape[0] != chain.channels:
            return super().chain_statistics(chain)
        return measured

    def selection_statistics(self, chain: Chain) -> Optional[Moments]:
        """For a chain read through a global average pool, the moments of the pooled vectors (one row per
        image) instead of the feature map's positions: the consumer reads the pooled vector, whose covariance
        lacks the within-image variation the pool averages away. Compensation keeps the positions'
        statistics (many more rows: the pooled covariance of 64 images has rank 63, MobileNetV2's head
        chain has 1280 channels).

        Synthetic statistics only (BN folded at export), udfc top-1, W6, mean of seeds 0-2, prune 0.1 / 0.3 / 0.5,
        positions -> pooled: Fashion-MNIST VGG folded 0.914 / 0.843 / 0.416 -> 0.917 / 0.871 / 0.416, small VGG
        0.908 / 0.745 / 0.151 -> 0.910 / 0.769 / 0.142, hourglass 0.896 / 0.479 / 0.277 -> 0.896 / 0.498 / 0.258;
        ImageNet sample, prune 0.1 / 0.3 + W8: MobileNetV2 folded 0.544 / 0.028 -> 0.588 / 0.032,
        EfficientNet-Lite0 folded 0.766 / 0.156 -> 0.768 / 0.170. Not with BN kept (`CombinedStatistics`), where
        the pooled covariance would come from the samples alone while the other chains are priced on the average
        with the analytic model (prune 0.1 / 0.3 + W8): MobileNetV2 0.804 / 0.636 -> 0.804 / 0.624,
        EfficientNet-Lite0 0.846 / 0.584 -> 0.830 / 0.516; Fashion-MNIST VGG prune 0.5 0.850 -> 0.821 at
        0.39 -> 0.46x MACs.
        """
        pooled = self._pooled.get(chain.last_stage.output)
        if pooled is not None and pooled[0].shape[0] == chain.channels:
            return pooled
        if self._selected_on_average(chain):
            return self._averaged_with_analytic(chain)
        return self.chain_statistics(chain)

    def _selected_on_average(self, chain: Chain) -> bool:
        """Whether `selection_statistics` averages this chain (not read through a global pool): it runs through a
        depthwise conv and its samples were measured."""
        if not self.averaged_depthwise_selection or chain.depthwise is None:
            return False
        measured = self._measured.get(chain.last_stage.output)
        return measured is not None and measured[0].shape[0] == chain.channels

    def _averaged_with_analytic(self, chain: Chain) -> Optional[Moments]:
        """`averaged_moments` of the analytic model's and the samples' moments of a chain through a depthwise
        conv (weight `DEPTHWISE_SELECTION_ANALYTIC_WEIGHT` on the analytic half), made afresh on each call (once
        per chain in the allocation); the compensation keeps the samples.

        In a folded network the probe's images drive the deep layers far from photos (EfficientNet-Lite0,
        channel standard deviations against 100 real images, median ratio past block 12: 0.005-0.17), and the
        analytic model is no closer (its moment propagation collapses there); the average moves the
        selection's precision matrix toward the correlations propagated through the depthwise kernels
        (`depthwise_output_covariance`) and the analytic standard deviations (with the samples' deviations
        kept and only the correlations averaged, nothing was gained). Folded ImageNet exports, udfc + W8,
        prune 0.1 / 0.3, mean of seeds 0-2 (KL to the original), samples alone -> weight 0.5 -> 0.75:
        MobileNetV2 0.741 / 0.177 (0.494 / 3.89) -> 0.749 / 0.213 (0.434 / 3.63) -> 0.759 / 0.190 (0.387 /
        3.63); EfficientNet-Lite0 0.829 / 0.567 (0.140 / 1.33) -> 0.843 / 0.612 (0.124 / 1.04) -> 0.843 / 0.637
        (0.113 / 0.88). Seed 0, weight 0.25 / 0.9 / 1: MobileNetV2 KL 0.473 / 0.317 / 0.442 and 3.46 / 3.53 /
        3.70, EfficientNet-Lite0 0.132 / 0.122 / 0.188 and 1.11 / 0.85 / 0.92. The average in the compensation
        as well (`--statistics combined`, on pink noise) was worse on MobileNetV2 (0.711 / 0.159), and so was the
        average in the compensation alone (0.732 / 0.166, seed 0).
        """
        key = chain.last_stage.output
        measured = self._measured[key]  # `_selected_on_average`
        cached = key in self._cache
        analytic = AnalyticStatistics.chain_statistics(self, chain)
        if not cached:
            self._cache.pop(key, None)  # made for this average only: no (N, N) kept per chain
        if analytic is None or analytic[0].shape[0] != measured[0].shape[0]:
            return measured
        return averaged_moments(analytic, measured, DEPTHWISE_SELECTION_ANALYTIC_WEIGHT)

    def restrict(self, path, kept: np.ndarray) -> None:
        super().restrict(path, kept)
        restrict_chain_moments(self._measured, path, kept)
        restrict_chain_moments(self._pooled, path, kept)


#: weight of the analytic model in the selection statistics of a folded model's depthwise chains
#: (`SampledStatistics._averaged_with_analytic`)
DEPTHWISE_SELECTION_ANALYTIC_WEIGHT = 0.75


def averaged_moments(analytic: Moments, measured: Moments, weight: float = 0.5) -> Moments:
    """The weighted average of two (mean (N,), cov (N, N)) by parts, `weight` w on the analytic half:

        mean = w m_a + (1 - w) m_s,  std = w sd_a + (1 - w) sd_s,  corr = w R_a + (1 - w) R_s,
        cov = corr * std std^T

    An average of correlation matrices stays a correlation matrix (PSD). Formed in place (at w = 0.5 the
    same values as ``0.5 * (corr_a + corr_s) * outer(sd, sd)``), with no (N, N) temporary beyond the two
    correlations; the inputs are not modified.
    """
    (mean_a, cov_a), (mean_s, cov_s) = analytic, measured
    corr, sd_a = cov_to_corr(cov_a)
    corr_s, sd_s = cov_to_corr(cov_s)
    corr *= weight
    corr_s *= 1.0 - weight
    corr += corr_s  # at w = 0.5 bit for bit (a + b) / 2: halving is exact
    del corr_s
    sd = weight * sd_a + (1.0 - weight) * sd_s
    corr *= np.multiply.outer(sd, sd, out=np.empty_like(corr))
    return weight * mean_a + (1.0 - weight) * mean_s, corr


def restrict_chain_moments(store: Dict[str, Moments], path, kept: np.ndarray) -> None:
    """After pruning: keep channels `kept` of every (mean, cov) in `store` whose tensor is on the chain's `path`
    (per-channel tensors only; `path` as in `AnalyticStatistics.restrict`); a variance vector (C,) in place of
    the covariance is restricted alike."""
    for tensor, block in path:
        if tensor in store and block == 1:
            mean, second = store[tensor]
            if mean.shape[0] > kept.max(initial=0):
                store[tensor] = (mean[kept], second[kept] if second.ndim == 1 else second[np.ix_(kept, kept)])


class CombinedStatistics(SampledStatistics):
    """The average of the analytic model and the synthetic samples, per chain:

        mean = (m_a + m_s) / 2,  std = (sd_a + sd_s) / 2,  corr = (R_a + R_s) / 2,  cov = corr * std std^T

    Their errors are different (the analytic model assumes Gaussian pre-activations and a parametric
    spatial correlation; pink noise is not a photo), and the average beat both on every BN model measured,
    prune 0.3 on Fashion-MNIST (VGG 0.880 analytic / 0.827 synthetic / 0.894 combined; ResNet-20 0.900 /
    0.911 / 0.911) and prune 0.1 on ImageNet (MobileNetV2 agreement 0.828 analytic -> 0.844; EfficientNet-
    Lite0 0.862 -> 0.880). An average of correlation matrices stays a correlation matrix (PSD).
    """

    label = "average of the analytic chain statistics and "
    pooled_selection = False  # worse with BN kept, see `SampledStatistics.selection_statistics`
    averaged_depthwise_selection = False  # every chain is averaged already

    def __init__(self, *args, **kwargs):
        self._combined: Dict[str, Moments] = {}
        super().__init__(*args, **kwargs)

    def chain_statistics(self, chain: Chain) -> Optional[Moments]:
        """The average, computed once per chain and kept in place of its two halves: every chain's statistics
        are alive at once during the global allocation, and one (N, N) float64 matrix per chain less is
        50 MB on MobileNetV2. (Averaging commutes with `restrict`'s slicing, so the kept average is the
        average of the restricted halves.)"""
        key = chain.last_stage.output
        cached = self._combined.get(key)
        if cached is not None:
            return cached
        analytic = AnalyticStatistics.chain_statistics(self, chain)
        measured = self._measured.get(key)
        if analytic is None or measured is None or measured[0].shape[0] != analytic[0].shape[0]:
            return analytic if analytic is not None else measured
        # the halves are dropped from their stores before the average is made: four (N, N) arrays alive at
        # most (the halves and their correlations) instead of seven (MobileNetV2's 1280-channel chain: 13 MB
        # each; the process peak, at the end of the allocation, is the same: 353 MB prune 0.3 + W6)
        self._cache.pop(key, None)
        self._measured.pop(key)
        combined = averaged_moments(analytic, measured)
        self._combined[key] = combined
        return combined

    def restrict(self, path, kept: np.ndarray) -> None:
        super().restrict(path, kept)
        restrict_chain_moments(self._combined, path, kept)

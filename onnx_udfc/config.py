"""Compression options (what the CLI flags map to) with validation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

from .errors import UsageError
from .numerics.quantize import ROUNDINGS as QUANTIZER_ROUNDINGS

METHODS = ("none", "mean", "merge", "udfc")
SELECTIONS = ("expected-error", "norm")
GRIDS = ("asymmetric", "symmetric")
CLIPS = ("mse", "max")
ROUNDINGS = ("auto",) + QUANTIZER_ROUNDINGS  # auto: error-feedback at <= 5 bits, balanced above
ALLOCATIONS = ("global", "uniform")
STATISTICS = ("auto", "analytic", "synthetic", "combined")
SYNTHETIC_INPUTS = ("auto", "pink", "prior", "diverse")


@dataclass
class Options:
    """What to do to the model.

    prune: fraction of the prunable chains' channels removed.
    bits: weight bit-width, 2..8, or 32 for no quantization.
    method: compensation after pruning/quantization (`none`, `mean`, `merge`, `udfc`).
    select: which channels to remove (`expected-error`: backward greedy on the consumer's error after
        the best compensation; `norm`: smallest L1 filter norm).
    allocation: how the channel budget `floor(prune * sum N)` is split over chains (`global`: by the
        expected relative error of each chain's consumer, cheapest removals first; `uniform`: the same
        ratio in every chain). Global needs the expected-error selection; with `norm` it is uniform.
    channel_multiple: kept channel counts are rounded to a multiple of this (or left whole) so the pruned
        convs keep onnxruntime's blocked kernels; 1 turns it off.
    grid / clip / rounding / bias_correction: the quantization recipe (defaults = best measured; rounding
        `auto` is error feedback through the input covariance at 5 bits or fewer, balanced above).
    first_last_bits: bit-width of the first and last weight layers (None: same as `bits`).
    depthwise_bits: bit-width of depthwise convs (one 3x3 filter per channel: few bytes, and the most
        sensitive layers at low bit-widths; None: same as `bits`).
    ridge: shrinkage of the compensation solve, relative to the mean channel variance.
    selection_ridge: shrinkage used by the expected-error selection (None: 0.1, or 0.01 where the statistics
        come from `prior` images, whose samples spread the channel variances; see `StatisticsPass`).
    upstream_noise: treat the compensation residual left upstream as noise on the kept channels of the next
        solve (errors-in-variables shrinkage); off by default: no measurable gain on the Fashion-MNIST VGG.
    quantization_noise: treat the producer's (and depthwise conv's) weight quantization error as noise on
        the kept channels of a BN-kept chain's compensation (errors-in-variables shrinkage). Off by default:
        that error `dW x` is a function of the same input as the signal `W x`, not independent noise, and
        the shrinkage lost on the ImageNet sample (BN kept, udfc, prune 0.1 / 0.3 / 0.5 + W4, KL with ->
        without: MobileNetV2 0.244 / 0.985 / 2.981 -> 0.233 / 0.939 / 2.912, EfficientNet-Lite0 0.254 /
        0.739 / 2.050 -> 0.242 / 0.715 / 1.942; W8 unchanged, W6 / W5 mostly lower; Fashion-MNIST BN kept
        within 0.4 points; `benchmarks/README.md`, "Quantization noise after error feedback").
    merge_blend: in chains without a BN prior (BN folded at export) and without a depthwise conv, shrink udfc's
        prediction of each removed channel toward Neuron Merging's by the cosine of its merge partner
        (`blend_with_merge`). Fashion-MNIST models exported with BN folded, W6, top-1 averaged over
        seeds 0-2, prune 0.1 / 0.3: VGG 0.874 / 0.763
        -> 0.914 / 0.843, small VGG 0.841 / 0.571 -> 0.908 / 0.745, ResNet-20 0.892 / 0.772 -> 0.910 / 0.747
        (merge alone: 0.922 / 0.822, 0.909 / 0.726, 0.902 / 0.628); at prune 0.5 it costs (VGG 0.487 -> 0.416,
        ResNet-20 0.422 -> 0.285). Folded ImageNet exports, prune 0.1 + W8: EfficientNet-Lite0 0.738 -> 0.766
        (its head chain), MobileNetV2 (every pruned chain has a depthwise conv) unchanged. BN-kept chains are
        unchanged. Every removed channel with a positively correlated partner is blended (threshold 0, it was
        merge's 0.45): prune 0.5 VGG 0.416 -> 0.538, small VGG prune 0.3 0.769 -> 0.823, and by the square
        root of the cosine rather than the cosine: prune 0.3 / 0.5 VGG 0.881 / 0.538 -> 0.887 / 0.647, small
        VGG 0.823 / 0.173 -> 0.843 / 0.204, hourglass 0.498 / 0.318 -> 0.526 / 0.381, ResNet-20 0.741 / 0.291
        -> 0.726 / 0.287 (see `blend_with_merge`).
    residual_share: in the global allocation, price a chain whose consumer output is added into a residual
        sum by its error relative to that sum's variance instead of the output's own (`passes.allocate.
        residual_share`). ImageNet sample, udfc prune 0.1 / 0.3 / 0.5 + W8, top-1, without -> with: MobileNetV2
        0.804 / 0.636 / 0.224 -> 0.810 / 0.662 / 0.334, EfficientNet-Lite0 0.846 / 0.584 / 0.180 -> 0.856 /
        0.728 / 0.464; BN folded at export, prune 0.1 / 0.3: MobileNetV2 0.740 / 0.118 -> 0.758 / 0.196,
        EfficientNet-Lite0 0.806 / 0.208 -> 0.824 / 0.570. Fashion-MNIST ResNet-20 (a ReLU after each sum), W6
        prune 0.1 / 0.3 / 0.5: BN kept 0.924 / 0.917 / 0.853 -> 0.923 / 0.913 / 0.845, BN folded 0.919 / 0.801 /
        0.248 -> 0.921 / 0.744 / 0.312 (models without residual sums unchanged); with the error counted after
        the ReLU on the sum (retrained models, share before -> after the ReLU): BN kept 0.9232 / 0.9132 / 0.8331
        -> 0.9245 / 0.9178 / 0.8331, BN folded 0.9113 / 0.7599 / 0.4011 -> 0.9173 / 0.8099 / 0.4130.
    restore_variance: after udfc's compensation, scale each consumer output's deviation from its mean so that
        its modelled variance is the original output's (`numerics.compensation.variance_restoring_scale`;
        outputs whose prediction explains less than 60% of their variance are left as solved): the
        least-squares prediction is narrower than the signal it replaces by its expected error, and the
        shortfalls compound through the layers after it (a data-free stand-in for re-estimating BN statistics
        after pruning). Measurements: `benchmarks/README.md`, "Variance restoration".
    statistics: where chain covariances come from: `analytic` (BN prior and weights), `synthetic`
        (`samples` seeded synthetic images, see synthetic_inputs, pushed through the model, BNs on batch statistics), `combined`
        (the average of both), or `auto` (combined when the model kept its BN layers, synthetic when BN
        was folded at export; analytic for models without one 4-D image input). With `synthetic`, a chain
        through a depthwise conv is selected (not compensated) on the average of both
        (`SampledStatistics.selection_statistics`).
    samples: synthetic images pushed through the model (pruning, and the quantizer-input probe of BN-folded
        models at 5 bits or fewer, where inputs above 224 x 224 get fewer); None: 64, or 128 for inputs of at most
        128 x 128 pixels (`stats.sampled.default_samples`). 64: the sampled half of the statistics
        is noisy where feature maps are small (7 x 7 positions per image on MobileNetV2's widest chains);
        ImageNet sample, udfc prune 0.1 / 0.3 / 0.5 + W8 top-1 with 32 -> 64: MobileNetV2 0.786 / 0.610 /
        0.202 -> 0.804 / 0.636 / 0.224, EfficientNet-Lite0 0.844 / 0.560 / 0.162 -> 0.846 / 0.584 / 0.180
        (128: no better); MobileNetV2's statistics pass 1.9 -> 2.6 s.
    synthetic_inputs: the images `synthetic` / `combined` statistics push through the model: `pink`
        (unit-contrast 1/f noise), `prior` (1/f^e noise with per-image random exponent, contrast in
        `PROBE_CONTRAST` (0.15-0.6) and brightness, `image_prior_noise`), `diverse` (`samples` prior images chosen from twice as many
        by the model's answers, one per predicted class in turn, `diverse_prior_images`), or `auto` (default), where
        BN was folded at export: `prior` where pink noise saturates the classifier (mean top probability
        >= 0.8 over 16 pink images), `diverse` for any other classifier, `pink` for other
        models (`resolve_synthetic_inputs`). Fashion-MNIST models exported with BN folded (all four
        saturated), udfc W6, mean of seeds 0-2, prune 0.1 / 0.3 / 0.5, pink -> prior: VGG 0.920 / 0.887 / 0.647
        -> 0.923 / 0.897 / 0.661, small VGG 0.914 / 0.843 / 0.204 -> 0.916 / 0.870 / 0.490, hourglass 0.899 /
        0.526 / 0.381 -> 0.904 / 0.867 / 0.557, ResNet-20 0.913 / 0.726 / 0.287 -> 0.919 / 0.800 / 0.364
        (diverse there: within a point at prune 0.1 and 0.3, 1.6 points lower at 0.5 on average); prior images
        at the lower contrast of the diverse ones then (`PROBE_CONTRAST`, after the residual share counted past
        the ReLU on the sum): 2.4 points more on average over the 12 cells, ResNet-20 prune 0.3 / 0.5 0.827 /
        0.421 -> 0.880 / 0.624 (choosing among them by the answers as `diverse` does: 0.871 / 0.656 there, but
        up to 8 points lower on the three others). The folded
        ImageNet exports are not saturated (3-5 classes over 64 pink images, confidence 0.21-0.43); there plain
        prior images are worse than pink (prune 0.1 + W8: MobileNetV2 0.600 -> 0.512, EfficientNet-Lite0 0.768
        -> 0.736), which answer with a dozen of the 1000 classes, most images in one or two; chosen by the
        answers (diverse, at lower contrast) they are better: pink -> diverse, mean of seeds 0-2, prune 0.1 + W8
        MobileNetV2 0.615 -> 0.735, EfficientNet-Lite0 0.773 -> 0.815. With BN kept, batch-statistics BN re-normalises the
        samples at every layer: `auto` is `pink`. This choice is for the pruning statistics: the quantizer's
        input moments of a BN-folded model quantized at 5 bits or fewer are always measured on `prior` images at
        the prior's own contrast (`stats.layer_inputs`, better than pink there on both folded ImageNet exports,
        and than the lower contrast on EfficientNet-Lite0).
    """

    prune: float = 0.0
    bits: int = 32
    method: str = "udfc"
    select: str = "expected-error"
    allocation: str = "global"
    channel_multiple: int = 8
    grid: str = "asymmetric"
    clip: str = "mse"
    rounding: str = "auto"
    bias_correction: bool = True
    first_last_bits: Optional[int] = 8
    depthwise_bits: Optional[int] = 8
    ridge: float = 0.001
    selection_ridge: Optional[float] = None
    upstream_noise: bool = False
    quantization_noise: bool = False
    merge_blend: bool = True
    residual_share: bool = True
    restore_variance: bool = True
    statistics: str = "auto"
    samples: Optional[int] = None
    synthetic_inputs: str = "auto"
    seed: int = 0
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    debug: bool = False

    def validate(self) -> "Options":
        if not (0.0 <= float(self.prune) < 1.0):
            raise UsageError(f"--prune must be in [0, 1), got {self.prune}")
        if self.bits != 32 and not (2 <= int(self.bits) <= 8):
            raise UsageError(f"--bits must be 2..8 or 32, got {self.bits}")
        for flag, value in (("--first-last-bits", self.first_last_bits), ("--depthwise-bits", self.depthwise_bits)):
            if value is not None and value != 32 and not (2 <= value <= 8):
                raise UsageError(f"{flag} must be 2..8 or 32, got {value}")
        for name, value, allowed in (("method", self.method, METHODS), ("select", self.select, SELECTIONS),
                                     ("allocation", self.allocation, ALLOCATIONS),
                                     ("grid", self.grid, GRIDS), ("clip", self.clip, CLIPS),
                                     ("rounding", self.rounding, ROUNDINGS),
                                     ("statistics", self.statistics, STATISTICS),
                                     ("synthetic-inputs", self.synthetic_inputs, SYNTHETIC_INPUTS)):
            if value not in allowed:
                raise UsageError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 1 <= int(self.channel_multiple) <= 1024:
            raise UsageError(f"--channel-multiple must be 1..1024, got {self.channel_multiple}")
        if self.samples is not None and not 2 <= int(self.samples) <= 4096:
            raise UsageError(f"--samples must be 2..4096, got {self.samples}")
        if self.ridge < 0 or (self.selection_ridge is not None and self.selection_ridge < 0):
            raise UsageError("ridge values must be >= 0")
        return self

    @property
    def quantize(self) -> bool:
        return self.bits != 32

    def bits_for(self, is_first_or_last: bool, is_depthwise: bool = False) -> int:
        """Bit-width of a layer: `bits`, raised to `first_last_bits` for the first and last layers and to
        `depthwise_bits` for depthwise convs (32 where either applies and is 32)."""
        if not self.quantize:
            return 32
        bits = self.bits
        for applies, override in ((is_first_or_last, self.first_last_bits), (is_depthwise, self.depthwise_bits)):
            if applies and override is not None:
                bits = 32 if override == 32 else max(bits, override)
            if bits == 32:
                return 32
        return bits

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return d

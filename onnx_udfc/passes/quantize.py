"""Weight fake-quantization of one linear layer, per output channel, with bias correction.

    W~ = Q(W)                          per output channel, grid from QuantSpec (asymmetric by default)
    clip: argmin_alpha sum_{c,t} v_c (W - Q_alpha(W))^2   v_c = Var[x_c] (1 for grouped convs;
                                                         E[x_c^2] without bias correction)
    b' = b + sum_{c,t} (W - W~)[o, c, t] E[x_c]          (bias correction: the expected output shift)

Rounding (`options.rounding`; `auto`: error feedback for layers at `ERROR_FEEDBACK_MAX_BITS` or fewer,
balanced above): error feedback (`numerics._error_feedback`) through `H = Cov[x] + kappa E[x] E[x]^T`
(`_rounding_hessian`), the input channel covariance from `stats.tensor_covariance` and the AR(1) taps
correlation; balanced rounding where no covariance is known (the report's `rounding` says which).

The input moments (E[x_c], Var[x_c]) come from the statistics model; without them the clipping is
unweighted and there is no bias correction (the report says so). The per-channel noise variance
`sum_c v_c sum_{t,t'} dW[o,c,t] dW[o,c,t'] rho^|t-t'|` is kept for the joint compensation of the consumer
when `Options.quantization_noise` asks for it (off by default); after error feedback, whose rounding errors
follow the input correlations, the same form with the whole input covariance (`_correlated_noise_variance`).

ConvTranspose (rows (Cout, Cin/g, kh, kw), see `ir.layers`): an output pixel sees only the taps of its
stride phase, about prod(kernel)/prod(strides) of them, so summing the shift over every tap would
over-correct about prod(strides) times. The bias is one number per channel: the best one removes the
shift averaged over the output pixels,

    b' = b + sum_{c,t} cov_t (W - W~)[o, c, t] E[x_c]

with `cov_t` the fraction of output pixels tap t writes to (`ir.layers.tap_coverage`: ~1/prod(strides),
exact with pads, output_padding and borders when the shapes are known). The noise variance is the
phase-averaged one of `stats.propagate.transposed_linear_moments`.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import attr
from ..ir.layers import read_layer, write_layer
from ..numerics._error_feedback import kronecker_times
from ..numerics.quantize import (MAX_COLUMNS, QuantSpec, bias_correction, bias_shift, fake_quantize,
                                uses_error_feedback)
from ..stats.propagate import linear_moments, spatial_correlation, transposed_linear_moments
from .base import PassContext

#: `--rounding auto` uses error feedback up to this bit-width and balanced rounding above it. Error feedback
#: needs the input covariance of every layer: quantization-only runs take about 2-3x as long (MobileNetV2
#: W6 1 -> 2 s, the ResNet-50-sized model 4.5 -> 8 s). ImageNet sample, top-1 / agreement / KL, balanced ->
#: error feedback: W8 no change (KL 0.0006 -> 0.0005 / 0.0004); W6 MobileNetV2 0.830 / 0.972 / 0.0083 ->
#: 0.832 / 0.976 / 0.0076, EfficientNet-Lite0 0.888 / 0.980 / 0.0073 -> 0.886 / 0.978 / 0.0059 (within a few
#: images: not worth the time by default); W5 0.832 / 0.940 / 0.033 -> 0.834 / 0.940 / 0.026 and 0.890 /
#: 0.964 / 0.024 -> 0.892 / 0.974 / 0.025; W4 0.794 / 0.890 / 0.172 -> 0.808 / 0.902 / 0.121 and 0.840 /
#: 0.906 / 0.141 -> 0.860 / 0.914 / 0.108.
ERROR_FEEDBACK_MAX_BITS = 5
#: relative error of the predicted input means that the rounding hedges against (see `_rounding_hessian`):
#: after ReLU the Gaussian model overestimates means by up to half (Fashion-MNIST VGG: 0.27 vs 0.17).
#: ImageNet sample, W4 (top-1 / agreement / KL): covariance only (0) MobileNetV2 0.782 / 0.882 / 0.117,
#: EfficientNet-Lite0 0.852 / 0.914 / 0.101; 0.5: 0.808 / 0.902 / 0.121 and 0.860 / 0.914 / 0.108;
#: 1: 0.790 / 0.870 / 0.130 and 0.856 / 0.912 / 0.119.
MEAN_UNCERTAINTY = 0.5


def quant_spec(options, bits: int) -> QuantSpec:
    """The recipe for one layer at `bits`; `--rounding auto` becomes error-feedback at
    `ERROR_FEEDBACK_MAX_BITS` or fewer, else balanced."""
    rounding = options.rounding
    if rounding == "auto":
        rounding = "error-feedback" if bits <= ERROR_FEEDBACK_MAX_BITS else "balanced"
    return QuantSpec(bits=bits, symmetric=options.grid == "symmetric", clip=options.clip, rounding=rounding)


def quantize_layer(ctx: PassContext, node, bits: int) -> None:
    """Fake-quantize `node`'s weight to `bits` in place and record what was done in the report."""
    graph = ctx.graph
    record = ctx.layer(node)
    layer = read_layer(graph, node)
    if layer is None:
        record.setdefault("skipped", []).append("quantization: weight is not a constant float32 tensor")
        return
    rows = layer.rows
    n, c = rows.shape[0], rows.shape[1]
    moments = ctx.stats.input_moments(node) if ctx.stats is not None else None
    grouped = layer.group > 1
    if moments is not None and (grouped and moments[0].shape[0] != c * layer.group
                                or not grouped and moments[0].shape[0] != c):
        moments = None
    tap_weight = None
    if moments is not None and not grouped:
        tap_weight = np.maximum(_error_weight(moments, ctx.options.bias_correction), 1e-12)
        tap_weight = tap_weight.reshape((c,) + (1,) * (rows.ndim - 2))
    spec = quant_spec(ctx.options, bits)
    covariance = tap_correlation = input_covariance = None
    if spec.rounding == "error-feedback" and not grouped and node.op_type != "ConvTranspose" and ctx.stats is not None:
        input_covariance = ctx.stats.input_covariance(node)
        covariance = _rounding_hessian(input_covariance, moments, ctx.options.bias_correction)
        if rows.ndim == 4:  # 1-D and 3-D kernels: taps taken as uncorrelated
            tap_correlation = spatial_correlation(*rows.shape[2:4])
    if uses_error_feedback(rows.shape, spec, covariance):
        record["rounding"] = "error-feedback"
    else:
        covariance = None
        if spec.rounding == "error-feedback":
            record["rounding"] = "balanced (" + _why_no_feedback(node, grouped, rows, ctx) + ")"
    wq, _, _ = fake_quantize(rows, spec, tap_weight=tap_weight, input_covariance=covariance,
                             tap_correlation=tap_correlation)
    bias = layer.bias
    coverage = ctx.tap_coverage(node, rows.shape[2:]) if node.op_type == "ConvTranspose" else None
    dw = None  # the weight change, float64 (exact: both float32), made once for its two readers
    if ctx.options.bias_correction and moments is not None:
        if coverage is None:
            dw = np.subtract(rows, wq, dtype=np.float64)
            delta = bias_shift(dw, moments[0], group=layer.group)
        else:
            delta = bias_correction(rows * coverage, wq * coverage, moments[0], group=layer.group)
        bias = (np.zeros(n) if bias is None else bias) + delta
        record["bias_correction"] = True
    elif moments is None:
        record["statistics"] = "none for this layer: unweighted clipping, no bias correction"
    if ctx.options.prune > 0 and ctx.options.quantization_noise:  # read by the compensation (errors in variables)
        if dw is None:
            dw = np.subtract(rows, wq, dtype=np.float64)
        if covariance is not None:  # error feedback: the rounding errors follow the input correlations
            noise = _correlated_noise_variance(dw, input_covariance, tap_correlation)
        else:
            var_in = moments[1] if moments is not None else np.ones(c * layer.group)
            noise = _noise_variance(node, dw, var_in, layer.group, coverage)
        ctx.quant_noise[node.output[0]] = noise
    write_layer(graph, layer, wq, bias)
    record["bits"] = bits


def _rounding_hessian(covariance, moments, bias_corrected: bool):
    """(C, C) matrix H whose quadratic form `dW H dW^T` the error-feedback rounding minimises.

        H = Cov[x] + kappa E[x] E[x]^T,   kappa = MEAN_UNCERTAINTY^2 with bias correction, else 1

    The output error `dW x` has second moment `dW Cov dW^T + (dW E[x])^2`. The bias correction removes the
    second term only as far as the predicted means are right; with a relative error eps of the means,
    `(eps dW E[x])^2` is left. Without bias correction all of it is left.
    """
    if covariance is None or moments is None or moments[0].shape[0] != covariance.shape[0]:
        return covariance
    mean = np.asarray(moments[0], np.float64)
    kappa = MEAN_UNCERTAINTY ** 2 if bias_corrected else 1.0
    return covariance + kappa * np.outer(mean, mean)


def _why_no_feedback(node, grouped: bool, rows: np.ndarray, ctx: PassContext) -> str:
    """Why a layer keeps the balanced rounding although error feedback was asked for (for the report)."""
    if grouped:
        return "grouped conv: no cross-channel covariance"
    if node.op_type == "ConvTranspose":
        return "ConvTranspose: not modelled"
    if rows[0].size > MAX_COLUMNS:
        return f"{rows[0].size} weights per output channel, over {MAX_COLUMNS}"
    return "input covariance unknown"


def _error_weight(moments, bias_corrected: bool) -> np.ndarray:
    """(C,) weight of input channel c in the clipping error: the output error is `sum_c dW_c x_c`, whose
    mean `sum_c dW_c E[x_c]` the bias correction removes; what is left weighs `Var[x_c]`. Without the
    correction the mean stays too and the weight is `E[x_c^2] = Var[x_c] + E[x_c]^2`."""
    mean, var = (np.asarray(m, np.float64) for m in moments)
    return var if bias_corrected else var + mean ** 2


def _correlated_noise_variance(dw: np.ndarray, covariance: np.ndarray, tap_correlation) -> np.ndarray:
    """(N,) variance of the output error `(W - W~) * x` with the input channels' covariance, for weights
    rounded with error feedback:

        noise[o] = sum_{c,c',t,t'} dW[o,c,t] dW[o,c',t'] Cov[c,c'] R[t,t']      dW (N, C, T), R (T, T)

    the quadratic form the rounding minimised (without its mean term, which bias correction removes).
    Error feedback pushes each row's rounding error into directions the inputs hardly vary in, so the
    diagonal form (`_noise_variance`, independent channels) overstates it."""
    d = dw.reshape(dw.shape[0], dw.shape[1], -1)
    return np.maximum(np.einsum("nct,nct->n", kronecker_times(d, covariance, tap_correlation), d), 0.0)


def _noise_variance(node, dw: np.ndarray, var_in: np.ndarray, group: int, coverage) -> np.ndarray:
    """(N,) variance of the output error `(W - W~) * x` for zero-mean inputs of variance `var_in`."""
    zeros = np.zeros_like(var_in)
    if node.op_type != "ConvTranspose":
        return linear_moments(dw, None, zeros, var_in, group=group)[1]
    if dw.ndim == 4:
        return transposed_linear_moments(dw, None, zeros, var_in, group=group,
                                         strides=attr(node, "strides", None) or (1, 1),
                                         dilations=attr(node, "dilations", None) or (1, 1), coverage=coverage)[1]
    # 1-D / 3-D kernels: spatially white inputs, sum_c v_c sum_t cov_t dW[o,c,t]^2
    n, cg = dw.shape[:2]
    per_in = (dw.reshape(n, cg, -1) ** 2 * np.asarray(coverage, np.float64).reshape(1, 1, -1)).sum(axis=2)
    in_index = (np.arange(n) // (n // group))[:, None] * cg + np.arange(cg)[None, :]
    return (per_in * var_in[in_index]).sum(axis=1)

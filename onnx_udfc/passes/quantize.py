"""Weight fake-quantization of one linear layer, per output channel, with bias correction.

    W~ = Q(W)                          per output channel, grid from QuantSpec (asymmetric by default)
    clip: argmin_alpha sum_{c,t} v_c (W - Q_alpha(W))^2   v_c = Var[x_c] (1 for grouped convs)
    b' = b + sum_{c,t} (W - W~)[o, c, t] E[x_c]          (bias correction: the expected output shift)

The input moments (E[x_c], Var[x_c]) come from the statistics model; without them the clipping is
unweighted and there is no bias correction (the report says so). The per-channel noise variance
`sum_c v_c sum_{t,t'} dW[o,c,t] dW[o,c,t'] rho^|t-t'|` is kept for the joint compensation of the consumer.
"""
from __future__ import annotations

import numpy as np

from ..ir.layers import read_layer, write_layer
from ..numerics.quantize import QuantSpec, bias_correction, fake_quantize
from ..stats.propagate import linear_moments
from .base import PassContext


def quant_spec(options, bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=options.grid == "symmetric", clip=options.clip,
                     rounding=options.rounding)


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
        tap_weight = np.maximum(moments[1], 1e-12).reshape((c,) + (1,) * (rows.ndim - 2))
    wq, _, _ = fake_quantize(rows, quant_spec(ctx.options, bits), tap_weight=tap_weight)
    bias = layer.bias
    if ctx.options.bias_correction and moments is not None:
        delta = bias_correction(rows, wq, moments[0], group=layer.group)
        bias = (np.zeros(n) if bias is None else bias) + delta
        record["bias_correction"] = True
    elif moments is None:
        record["statistics"] = "none for this layer: unweighted clipping, no bias correction"
    var_in = moments[1] if moments is not None else np.ones(c * layer.group)
    dw = np.asarray(rows, np.float64) - wq
    ctx.quant_noise[node.output[0]] = linear_moments(dw, None, np.zeros_like(var_in), var_in, group=layer.group)[1]
    write_layer(graph, layer, wq, bias)
    record["bits"] = bits

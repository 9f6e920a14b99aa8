"""The passes that turn a model into a compressed one.

StatisticsPass: shapes (with concrete inputs), per-tensor moments, the statistics model.
CompressLayersPass: one walk in topological order; for each linear layer, first prune the chain it
    consumes (the producer was already quantized, so the compensation sees its quantization noise),
    then fake-quantize the layer itself. Chains are matched once, read-only, before any edit.
CleanupPass: unused initializers and dead Constant nodes removed, value_info re-inferred.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Set

import onnx

from ..ir.layers import LINEAR_OPS, read_layer
from ..ir.shapes import graph_view, infer_static_shapes, refresh_value_info
from ..ir.graph import attr
from ..patterns.chains import ChainFinder, is_depthwise
from ..patterns.groups import coupled_groups
from ..stats.layer_inputs import MIN_LAYERS, MeasuredInputs, measure_layer_inputs
from ..stats.model import AnalyticStatistics
from ..stats.sampled import CombinedStatistics, SampledStatistics, default_samples
from .allocate import plan_global_allocation
from .base import Pass, PassContext, PassResult
from .prune import prune_chain
from .quantize import ERROR_FEEDBACK_MAX_BITS, quantize_layer

log = logging.getLogger(__name__)


class StatisticsPass(Pass):
    """Shapes, chains (read-only) and the statistics model chosen by `options.statistics`."""

    name = "statistics"

    def run(self, ctx: PassContext) -> PassResult:
        ctx.shapes = infer_static_shapes(graph_view(ctx.graph), ctx.input_shapes, known=ctx.original_shapes,
                                         runnable=lambda: ctx.graph.model)
        ctx.chains, ctx.rejections = ChainFinder(ctx.graph, ctx.shapes).find()
        ctx.coupled_groups = coupled_groups(ctx.graph)
        if ctx.options.samples is None:
            ctx.options.samples = default_samples(ctx.input_shapes)
        kind = ctx.options.statistics
        if kind == "auto":
            kind = "combined" if _mostly_bn_priors(ctx) else "synthetic"
        inputs = ctx.options.synthetic_inputs
        if inputs == "auto" and (kind != "synthetic" or _mostly_bn_priors(ctx)):
            inputs = "pink"  # with BN kept, batch-statistics BN re-normalises the samples at every layer
        sampled = {"synthetic": SampledStatistics, "combined": CombinedStatistics}.get(kind)
        if sampled is not None and ctx.options.prune > 0 and ctx.chains and _single_image_input(ctx):
            # the input model is loaded by the statistics themselves and freed once the probe is serialised
            ctx.stats = sampled(ctx.graph, ctx.shapes, ctx.priors, ctx.input_model, ctx.chains,
                                ctx.input_shapes, samples=ctx.options.samples, seed=ctx.options.seed,
                                original_shapes=ctx.original_shapes, synthetic=inputs)
            inputs = ctx.stats.synthetic  # "auto" resolved
        else:
            if sampled is not None and ctx.options.prune > 0 and ctx.chains:
                ctx.notes.append(f"{kind} statistics need one 4-D image input: analytic statistics used")
            ctx.stats = AnalyticStatistics(ctx.graph, ctx.shapes, ctx.priors)
        if ctx.options.selection_ridge is None:
            # Samples from the image prior spread the channel variances, and a ridge of 0.1 of their mean
            # over-shrinks the low-variance channels: exactly redundant channels looked costly to remove (see
            # test_global_allocation_takes_the_redundant_channels_first). Folded Fashion-MNIST, prune 0.1 / 0.3
            # + W6, udfc top-1 with 0.1 / 0.01 (prior inputs): VGG 0.922 / 0.923, 0.867 / 0.896; VGG-small
            # 0.906 / 0.915, 0.848 / 0.848; ResNet-20 0.918 / 0.922, 0.903 / 0.889
            ctx.options.selection_ridge = 0.01 if inputs == "prior" else 0.1
        if (kind == "synthetic" and not _mostly_bn_priors(ctx) and _low_bit_quantization(ctx)
                and _single_image_input(ctx)):
            # no BN priors, error-feedback bit widths: the quantizer's input moments are measured (a second
            # probe on a pruning run: its chain statistics come from pink noise, these from the image prior)
            _measure_quantizer_inputs(ctx)
        ctx.stats.register_chains(ctx.chains)
        unknown = dict(sorted(ctx.stats.unknown_ops.items()))
        return PassResult(False, {"source": ctx.stats.source, "ops_without_moments": unknown})


def _mostly_bn_priors(ctx: PassContext) -> bool:
    """True when at least half of the chain producers (of the linear layers, in a model without chains) have a
    BN prior (BN kept in the model).

    With BN the analytic prior is informative and `combined` (analytic and synthetic averaged) is best;
    with BN folded at export, moment propagation alone collapses (ResNet-20 at prune 0.3: 0.14) where
    synthetic samples keep it usable (0.74), so the analytic half is left out.
    """
    producers = [c.producer for c in ctx.chains] or [n for n in ctx.graph.topological_nodes() if n.op_type in LINEAR_OPS]
    if not producers:
        return True
    with_prior = sum(1 for node in producers if node.output[0] in ctx.priors)
    return 2 * with_prior >= len(producers)


def _measure_quantizer_inputs(ctx: PassContext) -> None:
    """Wrap `ctx.stats` in `MeasuredInputs` for models with at least `MIN_LAYERS` linear layers. MatMul inputs
    are left to the analytic model unless 2-D: their features are on the last axis, the probe sums axis 1."""
    layers = [read_layer(ctx.graph, n) for n in ctx.graph.topological_nodes() if n.op_type in LINEAR_OPS]
    layers = [layer for layer in layers if layer is not None]
    if len(layers) < MIN_LAYERS:
        return
    measurable = [layer for layer in layers
                  if layer.node.op_type != "MatMul" or len(ctx.shapes.get(layer.node.input[0]) or ()) == 2]
    measured, samples = measure_layer_inputs(
        ctx.input_model, {layer.node.input[0]: layer.rows.shape[1] * layer.group for layer in measurable},
        ctx.input_shapes, ctx.shapes, covariance=_error_feedback_inputs(ctx, [layer.node for layer in layers]),
        samples=ctx.options.samples, seed=ctx.options.seed, original_shapes=ctx.original_shapes)
    if measured:
        ctx.stats = MeasuredInputs(ctx.stats, measured, samples, seed=ctx.options.seed)


def _low_bit_quantization(ctx: PassContext) -> bool:
    """Quantization at `ERROR_FEEDBACK_MAX_BITS` or fewer: where the input moments decide most (see
    `stats.layer_inputs`). At 6 bits the measured moments were no better on the folded ImageNet exports
    (MobileNetV2 top-1 / agreement 0.832 / 0.962 analytic, 0.820 / 0.952 measured; KL 0.019 -> 0.013) and
    the probe would cost more than the rest of a quantization-only run."""
    options = ctx.options
    return options.quantize and options.bits <= ERROR_FEEDBACK_MAX_BITS


def _error_feedback_inputs(ctx: PassContext, layers) -> Set[str]:
    """Inputs of the layers the quantizer may round with error feedback (it reads their channel covariance):
    ungrouped Conv / Gemm / MatMul at `ERROR_FEEDBACK_MAX_BITS` or fewer."""
    boundary = boundary_layers(ctx.graph)
    return {n.input[0] for n in layers
            if n.op_type != "ConvTranspose" and int(attr(n, "group", 1)) == 1
            and ctx.options.bits_for(id(n) in boundary) <= ERROR_FEEDBACK_MAX_BITS}


def _single_image_input(ctx: PassContext) -> bool:
    shapes = list(ctx.input_shapes.values())
    return len(shapes) == 1 and len(shapes[0]) == 4


def boundary_layers(graph) -> Set[int]:
    """ids of the first and the last linear layers: those with no linear layer before / after them."""
    nodes = graph.topological_nodes()
    is_linear = [n.op_type in LINEAR_OPS and read_layer(graph, n) is not None for n in nodes]
    after_linear: Dict[str, bool] = {}
    first: Set[int] = set()
    for node, lin in zip(nodes, is_linear):
        upstream = any(after_linear.get(i, False) for i in node.input)
        if lin and not upstream:
            first.add(id(node))
        for out in node.output:
            after_linear[out] = upstream or lin
    before_linear: Dict[str, bool] = {}
    last: Set[int] = set()
    for node, lin in zip(reversed(nodes), reversed(is_linear)):
        downstream = any(before_linear.get(o, False) for o in node.output)
        if lin and not downstream:
            last.add(id(node))
        for inp in node.input:
            before_linear[inp] = before_linear.get(inp, False) or downstream or lin
    return first | last


class CompressLayersPass(Pass):
    name = "prune-quantize-compensate"

    def run(self, ctx: PassContext) -> PassResult:
        graph, options = ctx.graph, ctx.options
        chains, rejections = ctx.chains, ctx.rejections
        for rejection in rejections:
            ctx.layer(rejection.node).setdefault("skipped", []).append("pruning: " + rejection.reason)
        for chain in chains:
            ctx.layer(chain.producer)["chain"] = True
        by_consumer = {id(c.consumer): c for c in chains}
        boundary = boundary_layers(graph) if options.quantize else set()
        plans = {}
        if options.prune > 0 and options.allocation == "global" and options.select == "expected-error":
            plans = plan_global_allocation(ctx, chains)
        pruned = quantized = 0
        for node in graph.topological_nodes():
            if node.op_type not in LINEAR_OPS:
                continue
            chain = by_consumer.get(id(node))
            if chain is not None and options.prune > 0:
                prune_chain(ctx, chain, plans.get(id(node)))
                record = ctx.layer(chain.producer)
                pruned += record["channels_before"] - record["channels_after"]
            if options.quantize:
                group = int(attr(node, "group", 1))
                bits = options.bits_for(id(node) in boundary, group > 1 and is_depthwise(graph, node, group))
                if bits < 32:
                    quantize_layer(ctx, node, bits)
                    quantized += 1
                else:
                    ctx.layer(node)["bits"] = 32
        return PassResult(pruned > 0 or quantized > 0,
                          {"chains": len(chains), "channels_removed": pruned, "layers_quantized": quantized})


class CleanupPass(Pass):
    name = "cleanup"

    def run(self, ctx: PassContext) -> PassResult:
        graph = ctx.graph
        dead = self._dead_constants(graph)
        if dead:
            graph.remove_nodes(dead)
        removed = graph.remove_unused_initializers()
        refresh_value_info(graph.model)
        return PassResult(bool(dead or removed), {"initializers_removed": removed, "constants_removed": len(dead)})

    @staticmethod
    def _dead_constants(graph) -> List[onnx.NodeProto]:
        graph.refresh()
        return [n for n in graph.topological_nodes()
                if n.op_type == "Constant" and graph.use_count(n.output[0]) == 0]

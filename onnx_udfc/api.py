"""Python API: `compress(model, prune=..., bits=..., method=...) -> (compressed ModelProto, Report)`."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import onnx

from .config import Options
from .errors import PassError, UsageError, ValidationFailed
from .ir.graph import Graph
from .ir.io import check_supported, needs_external_data, write_serialized
from .ir.layers import LINEAR_OPS, read_layer
from .ir.shapes import infer_static_shapes, resolve_input_shapes
from .passes.base import PassContext, PassManager
from .passes.compress import CleanupPass, CompressLayersPass, StatisticsPass
from .passes.fold_bn import FoldBatchNormPass
from .passes.normalize import NormalizeGraphPass
from .passes.prune import has_bn_prior
from .report.metrics import at_batch_one, count_macs, count_params
from .report.report import ModelSize, Report

log = logging.getLogger(__name__)


def compress(model: onnx.ModelProto, prune: float = 0.0, bits: int = 32, method: str = "udfc",
             input_shapes: Optional[Dict[str, tuple]] = None, validate: bool = True,
             max_rel_error: Optional[float] = None, **options) -> Tuple[onnx.ModelProto, Report]:
    """Compress `model` (not modified) and return the new model and its report.

    prune: fraction of channels removed per prunable chain; bits: 2..8 or 32 (off); method: none, mean,
    merge or udfc. Other keywords are `Options` fields (select, grid, clip, rounding, bias_correction,
    first_last_bits, ridge, selection_ridge, debug). With `validate`, both models run in onnxruntime on
    seeded synthetic inputs and the metrics go into `report.validation`; `max_rel_error` turns a larger
    relative L2 error on any output into `ValidationFailed`. When `prune > 0` removes no channel (no
    prunable chain, or a ratio too small for every chain) the model is still compressed; the reason goes
    to `report.notes` and to one logged warning.
    Raises UsageError / BadModelError / PassError / ValidationFailed (all `UdfcError`).
    """
    out, report, _ = compress_serialized(model, prune=prune, bits=bits, method=method, input_shapes=input_shapes,
                                         validate=validate, max_rel_error=max_rel_error, **options)
    return out, report


def compress_serialized(model: onnx.ModelProto, prune: float = 0.0, bits: int = 32, method: str = "udfc",
                        input_shapes: Optional[Dict[str, tuple]] = None, validate: bool = True,
                        max_rel_error: Optional[float] = None, checked_input_bytes: Optional[int] = None,
                        reload_input: Optional[Callable[[], onnx.ModelProto]] = None,
                        output_file: Optional[str] = None,
                        **options) -> Tuple[onnx.ModelProto, Report, Optional[bytes]]:
    """`compress`, also returning the compressed model serialised (deterministic bytes, as checked by
    onnx.checker): a caller that writes the model saves serialising it again.

    `checked_input_bytes`: the input's serialised size when the caller already ran `check_supported` on
    its bytes (read from a file): neither the check nor the size needs the model serialised again.
    `reload_input`: a function returning a fresh copy of the input (the CLI re-reads its file). With it,
    `model` itself is compressed (and returned) instead of a copy, and the untouched input is re-read where
    it is needed, by the statistics probe and the validation: one copy of the model less in memory while it
    runs (100 MB on the ResNet-50-sized model).
    `output_file`: a path the compressed model is written to (the CLI's temporary file) instead of being
    serialised in memory; the checker and the validation then read that file, and the bytes returned are
    None. Serialising in memory holds the bytes and the encoder's buffer, about twice the model's size
    (ResNet-50-sized W6: peak 550 -> 454 MB in process). Models near the protobuf limit are serialised as
    before.
    """
    start = time.perf_counter()
    opts = Options(prune=prune, bits=bits, method=method, input_shapes=dict(input_shapes or {}), **options).validate()
    _check_run_flags(opts, max_rel_error)
    if checked_input_bytes is None:
        check_supported(model)
    shapes = resolve_input_shapes(model, opts.input_shapes)
    input_bytes = checked_input_bytes if checked_input_bytes is not None else model.ByteSize()
    # the input's shapes at batch 1, inferred once: the MACs before and after (pruning changes channels,
    # not positions) and, when the run is at batch 1 too, the shapes static inference cannot find later
    one = at_batch_one(shapes)
    shapes_one = infer_static_shapes(model, one)
    before = ModelSize(count_params(model), input_bytes, count_macs(model, shapes, shapes=shapes_one))

    if reload_input is None:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    graph = Graph(out)
    ctx = PassContext(graph=graph, options=opts, input_shapes=shapes,
                      original=model if reload_input is None else None, reload_original=reload_input,
                      original_shapes=shapes_one if one == shapes else None)
    del model
    records = []
    if opts.prune > 0 or opts.quantize:
        passes = [NormalizeGraphPass(), FoldBatchNormPass(), StatisticsPass(), CompressLayersPass(), CleanupPass()]
        records = PassManager(passes, debug=opts.debug).run(ctx)
        graph.flush()
        _note_pruning_without_effect(ctx)
        _note_pruning_without_bn_statistics(ctx)
    if output_file is not None and not needs_external_data(out):
        try:
            with open(output_file, "wb") as f:
                output_bytes = write_serialized(out, f)
        except OSError as exc:
            raise UsageError(f"cannot write the compressed model: {exc.strerror or exc}") from None
        serialized, written = None, output_file
    else:
        serialized = out.SerializeToString(deterministic=True)
        output_bytes, written = len(serialized), serialized
    try:
        onnx.checker.check_model(written, full_check=True)
    except Exception as exc:
        raise PassError(f"compressed model fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    compress_seconds = time.perf_counter() - start

    report = Report(
        options=opts.to_dict(),
        statistics_source=ctx.stats.source if ctx.stats is not None else "not needed",
        before=before,
        after=ModelSize(count_params(out), output_bytes, count_macs(out, shapes, shapes=shapes_one)),
        layers=_layer_records(ctx),
        coupled_groups=ctx.coupled_groups,
        passes=records,
        notes=list(ctx.notes),
    )
    report.seconds["compress"] = round(compress_seconds, 4)
    if validate:
        from .validate.compare import compare_models

        t0 = time.perf_counter()
        original, _ = ctx.input_model()
        metrics = compare_models(original, written, shapes, seed=opts.seed)
        del original
        report.validation = {"inputs": "seeded synthetic (pink-noise images, else standard normal), batch 8", "seed": opts.seed, "outputs": metrics}
        report.seconds["validate"] = round(time.perf_counter() - t0, 4)
        if max_rel_error is not None:
            worst = max((m["rel_l2_error"] for m in metrics.values()), default=0.0)
            report.validation["max_rel_error"] = max_rel_error
            report.validation["passed"] = bool(worst <= max_rel_error)
            if worst > max_rel_error:
                raise ValidationFailed(
                    f"relative L2 error {worst:.4g} exceeds --max-rel-error {max_rel_error}", report)
    return out, report, serialized


def _check_run_flags(opts: Options, max_rel_error: Optional[float]) -> None:
    """Flags `Options.validate` leaves to the run: the seed and the validation threshold."""
    if int(opts.seed) < 0:
        raise UsageError(f"--seed must be >= 0, got {opts.seed}")
    if max_rel_error is not None and not (math.isfinite(max_rel_error) and max_rel_error >= 0):
        raise UsageError(f"--max-rel-error must be a finite number >= 0, got {max_rel_error}")


def _channels_removed(record: dict) -> bool:
    """Whether a layer's report record says pruning removed some of its output channels."""
    return record.get("channels_after", 0) < record.get("channels_before", 0)


def _note_pruning_without_effect(ctx: PassContext) -> None:
    """Pruning was asked but removed nothing: say why in the report notes and as one warning line."""
    if ctx.options.prune <= 0:
        return
    if not ctx.chains:
        note = "no prunable chain; pruning skipped (" + _rejection_summary(ctx) + ")"
    elif not any(_channels_removed(r) for r in ctx.layers.values()):
        note = (f"--prune {ctx.options.prune} removed no channel from the {len(ctx.chains)} prunable chain(s); "
                "see each layer's 'skipped' reason")
    else:
        return
    ctx.notes.append(note)
    log.warning("%s", note)


def _note_pruning_without_bn_statistics(ctx: PassContext) -> None:
    """Channels were removed from chains whose BN was folded at export: say in the report notes (and as one
    warning line) that their compensation rests on synthetic images only, which the validation cannot expose.

    Why: the validation's synthetic inputs are the kind the compensation was fitted to. Folded MobileNetV2
    (ImageNet sample, prune 0.3 + W8): cosine of the logits 0.92-0.94 on held-out pink, prior and diverse
    images, 0.51 on the real images (top-1 agreement 0.12); the same model exported with BN kept keeps 0.67
    (`benchmarks/README.md`, "What the validation can tell").
    """
    pruned = [c for c in ctx.chains if _channels_removed(ctx.layers.get(c.producer.name or c.producer.output[0], {}))]
    without = [c for c in pruned if not has_bn_prior(ctx, c)]
    if not without:
        return
    note = (f"{len(without)} of {len(pruned)} pruned chain(s) have no BN statistics (BN folded at export): their "
            "compensation is fitted to synthetic images, and real data can lose much more accuracy than the "
            "validation on synthetic inputs shows; check on real data, or export with the BN layers kept "
            "(PyTorch: training=TrainingMode.PRESERVE, do_constant_folding=False)")
    ctx.notes.append(note)
    log.warning("%s", note)


def _rejection_summary(ctx: PassContext) -> str:
    """'layer: reason' of the first rejected layer and how many more, or why there was no candidate."""
    if not ctx.rejections:
        return "the model has no Conv or Gemm layer"
    first = ctx.rejections[0]
    text = f"{first.node.name or first.node.output[0]}: {first.reason}"
    more = len(ctx.rejections) - 1
    return text + (f"; {more} more layer(s), see each layer's 'skipped' reason" if more else "")


def _layer_records(ctx: PassContext):
    """Per-layer records in graph order, with the final weight count and bit-width of linear layers."""
    graph = ctx.graph.refresh()
    ordered = []
    seen = set()
    for node in graph.topological_nodes():
        key = node.name or (node.output[0] if node.output else "")
        if node.op_type in LINEAR_OPS:
            record = ctx.layer(node)
            layer = read_layer(graph, node)
            if layer is not None:
                record["weights"] = int(np.prod(layer.rows.shape))
                record.setdefault("bits", 32)
        if key in ctx.layers and key not in seen:
            ordered.append(ctx.layers[key])
            seen.add(key)
    ordered.extend(v for k, v in ctx.layers.items() if k not in seen)
    return ordered

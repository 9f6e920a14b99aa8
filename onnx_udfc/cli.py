"""`onnx-udfc IN OUT [flags]`: flags -> Options -> compress -> save -> report -> exit code.

Exit codes: 0 done; 1 validation above --max-rel-error (output not written); 2 usage error (bad flag or
path, output not writable); 3 bad input model; 4 internal error (a pass failed; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

# The math works on small matrices: one BLAS thread is as fast and avoids oversubscribing the cores
# (measured: a 960x960 inverse took 4.4 s with two busy cores and threaded OpenBLAS, 0.06 s with one).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from . import __version__
from .config import ALLOCATIONS, CLIPS, GRIDS, METHODS, ROUNDINGS, SELECTIONS, STATISTICS, SYNTHETIC_INPUTS
from .errors import UdfcError, UsageError, ValidationFailed
from .heap import fix_mmap_threshold

log = logging.getLogger("onnx_udfc")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other usage error
        self.exit(2, f"onnx-udfc: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-udfc", description="Data-free structured pruning and weight quantization of ONNX "
                "CNNs with closed-form compensation from BatchNorm statistics.")
    p.add_argument("input", help="input .onnx model (never modified)")
    p.add_argument("output", help="output .onnx model (written atomically)")
    p.add_argument("--prune", type=float, default=0.0, metavar="R",
                   help="fraction of the prunable chains' channels to remove, 0 <= R < 1 (default 0)")
    p.add_argument("--bits", type=int, default=32, metavar="B", help="weight bits 2..8, or 32 for none (default 32)")
    p.add_argument("--method", choices=METHODS, default="udfc", help="compensation (default udfc)")
    p.add_argument("--select", choices=SELECTIONS, default="expected-error",
                   help="which channels to remove (default expected-error)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="global",
                   help="how the channel budget is split over chains: global (where the expected error is lowest; "
                        "needs --select expected-error) or uniform (the same ratio in every chain) (default global)")
    p.add_argument("--channel-multiple", type=int, default=8, metavar="M",
                   help="keep a multiple of M channels in every pruned chain (fast blocked kernels); 1 = off (default 8)")
    p.add_argument("--grid", choices=GRIDS, default="asymmetric", help="quantization grid (default asymmetric)")
    p.add_argument("--clip", choices=CLIPS, default="mse", help="range clipping (default mse, input-weighted)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="auto",
                   help="rounding: error-feedback (through the modelled input covariance; balanced where there is "
                        "none), balanced, nearest, or auto: error-feedback at 5 bits or fewer, balanced above "
                        "(default auto)")
    p.add_argument("--no-bias-correction", action="store_true", help="skip quantization bias correction")
    p.add_argument("--first-last-bits", type=int, default=8, metavar="B",
                   help="bits of the first and last layers (default 8; 0 = same as --bits)")
    p.add_argument("--depthwise-bits", type=int, default=8, metavar="B",
                   help="bits of depthwise convs (few bytes, sensitive at low bit-widths); 0 = same as --bits (default 8)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="shape of an input with dynamic dimensions (repeatable)")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison (checker still runs)")
    p.add_argument("--max-rel-error", type=float, default=None, metavar="E",
                   help="exit 1 (and write no model) when an output's relative L2 error exceeds E")
    p.add_argument("--statistics", choices=STATISTICS, default="auto",
                   help="source of the channel covariances used by udfc/mean and the selection: analytic (BN prior), "
                        "synthetic (synthetic images through the model, see --synthetic-inputs), combined (their average), "
                        "auto = combined if BN is kept, synthetic if folded; with BN folded, quantization at 5 bits or "
                        "fewer (10 or more layers) measures every layer's input moments on synthetic images "
                        "unless analytic "
                        "(default auto)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="synthetic images pushed through the model for synthetic / combined statistics and the "
                        "quantizer-input probe of BN-folded models at 5 bits or fewer (default 64; 128 for "
                        "inputs of at most 128 x 128 pixels)")
    p.add_argument("--synthetic-inputs", choices=SYNTHETIC_INPUTS, default="auto",
                   help="synthetic images for the pruning statistics: pink (unit-contrast 1/f noise), prior (1/f^e "
                        "noise with random exponent, low contrast and brightness per image), diverse (prior images chosen "
                        "from twice as many so that the model's answers spread over its classes), or auto: for a "
                        "BN-folded classifier prior if pink noise saturates it (confident answers to every "
                        "image), else diverse; pink otherwise (default auto)")
    p.add_argument("--no-merge-blend", action="store_true",
                   help="udfc on BN-folded chains: plain least squares, without shrinking each removed channel's "
                        "prediction toward its Neuron Merging partner")
    p.add_argument("--no-restore-variance", action="store_true",
                   help="udfc: keep the least-squares compensation as solved, without scaling each consumer "
                        "output back to its original variance")
    p.add_argument("--no-residual-share", action="store_true",
                   help="global allocation: price a chain whose consumer output is added into a residual sum by "
                        "the error relative to that output, not to the sum")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic and validation inputs (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary table on stderr")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress")
    p.add_argument("--debug", action="store_true", help="check the model after every pass; tracebacks on errors")
    p.add_argument("--version", action="version", version=f"onnx-udfc {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prune > 0:  # freed large arrays go back to the system (see onnx_udfc.heap)
        fix_mmap_threshold()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="onnx-udfc: %(levelname)s: %(message)s")
    try:
        return _run(args)
    except ValidationFailed as exc:
        return _validation_failed(args, exc)
    except UdfcError as exc:
        if args.debug:
            raise
        print(f"onnx-udfc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except MemoryError:
        print("onnx-udfc: error: out of memory", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("onnx-udfc: interrupted (output not written)", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for users; --debug shows it
        if args.debug:
            raise
        print(f"onnx-udfc: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with --debug for details)", file=sys.stderr)
        return 4


def _validation_failed(args, exc: ValidationFailed) -> int:
    """Exit 1: the report (when there is one) is still written, the model is not."""
    if exc.report is not None:
        try:
            _emit_report(args, exc.report)
        except UdfcError as report_error:
            print(f"onnx-udfc: error: {report_error}", file=sys.stderr)
    print(f"onnx-udfc: validation failed: {exc} (output not written)", file=sys.stderr)
    return exc.exit_code


def _run(args) -> int:
    from .ir.io import check_supported, read_model_bytes, temporary_file_beside
    from .ir.shapes import parse_input_shapes

    _check_paths(args)
    if args.first_last_bits < 0:
        raise UsageError("--first-last-bits must be >= 0")
    if args.depthwise_bits < 0:
        raise UsageError("--depthwise-bits must be >= 0")
    shapes = parse_input_shapes(args.input_shape)
    t0 = time.perf_counter()
    input_stamp = _file_stamp(args.input)
    model, data_files, serialized_input = read_model_bytes(args.input)
    _check_data_files_kept(args, data_files)
    checked_bytes = None
    if serialized_input is not None:  # checked on the bytes read, then dropped (the model's size in memory)
        check_supported(model, serialized_input)
        checked_bytes = len(serialized_input)
        del serialized_input
    load_seconds = time.perf_counter() - t0

    def reload_input():
        """The input again, for the statistics probe and the validation (no copy of it is kept meanwhile)."""
        if _file_stamp(args.input) != input_stamp:
            raise UsageError(f"the input file changed while it was being compressed: {args.input}")
        return read_model_bytes(args.input)[0]

    # the model is written straight into a temporary file beside the output, renamed over it once checked
    # and validated (see `compress_serialized`)
    staged = temporary_file_beside(args.output)
    try:
        written_data, save_seconds, report = _compress_to(staged, args, model, checked_bytes, reload_input, shapes)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    report.seconds["load"] = round(load_seconds, 4)
    report.seconds["save"] = round(save_seconds, 4)
    report.before.bytes = os.path.getsize(args.input) + sum(os.path.getsize(f) for f in data_files)
    report.after.bytes = os.path.getsize(args.output) + (os.path.getsize(written_data) if written_data else 0)
    _emit_report(args, report)
    return 0


def _compress_to(staged: str, args, model, checked_bytes, reload_input, shapes):
    """Compress into the file `staged`, then move it to `args.output` (or save the serialised model there
    when `compress_serialized` kept it in memory); (external data file or None, save seconds, report)."""
    from .api import compress_serialized
    from .ir.io import replace_file, save_model

    compressed, report, serialized = compress_serialized(
        model, checked_input_bytes=checked_bytes, reload_input=reload_input, output_file=staged,
        prune=args.prune, bits=args.bits, method=args.method,
        input_shapes=shapes,
        validate=not args.no_validate, max_rel_error=args.max_rel_error, seed=args.seed,
        statistics=args.statistics, samples=args.samples, synthetic_inputs=args.synthetic_inputs,
        select=args.select, allocation=args.allocation, channel_multiple=args.channel_multiple, grid=args.grid, clip=args.clip, rounding=args.rounding,
        bias_correction=not args.no_bias_correction, merge_blend=not args.no_merge_blend,
        residual_share=not args.no_residual_share, restore_variance=not args.no_restore_variance,
        first_last_bits=None if args.first_last_bits == 0 else args.first_last_bits,
        depthwise_bits=None if args.depthwise_bits == 0 else args.depthwise_bits, debug=args.debug)
    t1 = time.perf_counter()
    if serialized is None:
        replace_file(staged, args.output)
        written_data = None
    else:
        written_data = save_model(compressed, args.output, serialized=serialized)
    return written_data, time.perf_counter() - t1, report


def _file_stamp(path: str) -> tuple:
    """(size, modification time) of a file: whether it changed between two reads."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def _check_paths(args) -> None:
    """Before any work: the input is never overwritten, and every file to write has a writable folder."""
    from .ir.io import check_output_folder

    if _same_file(args.input, args.output):
        raise UsageError("output path is the input file; the input is never overwritten")
    if args.report and _same_file(args.report, args.input):
        raise UsageError("--report path is the input file; the input is never overwritten")
    if args.report and _same_file(args.report, args.output):
        raise UsageError("--report path is the output model path; give the report its own file")
    check_output_folder(args.output)
    if args.report:
        check_output_folder(args.report)


def _check_data_files_kept(args, data_files: List[str]) -> None:
    """The output's external data file (written for models near 2 GB) must not replace the input's."""
    from .ir.io import data_file_for

    target = data_file_for(args.output)
    if any(_same_file(target, f) for f in data_files):
        raise UsageError(f"the output would write its weights to {target}, the input's external data file; "
                         "choose another output name")


def _emit_report(args, report) -> None:
    if args.report:
        from .ir.io import write_text_atomic

        write_text_atomic(args.report, report.to_json() + "\n")
    if not args.quiet:
        print(report.summary(), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

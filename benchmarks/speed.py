"""Compression time and peak memory of the CLI as whole processes, against a load-and-save floor.

    python benchmarks/speed.py [MODEL.onnx ...] [--repeat 3] [--prune 0.3] [--bits 6] [--cli module|script]
        [--out benchmarks/results] [--tag speed]

Default models: the cached `~/.cache/onnx-udfc/models/{mobilenetv2_bn,efficientnet_lite0_bn,vgg_bn,resnet20_bn}.onnx`
that exist, plus the generated ResNet-50-sized `resnet50_synthetic.onnx` (written by `synthetic_models.py`
when missing). For each model, each command runs as its own process (best wall clock of --repeat runs;
peak RSS is the largest `ru_maxrss` of that process tree, read per run from `os.wait4` in a small
launcher process, `LAUNCHER`):

- floor: `python -c "import onnx; m = onnx.load(IN); onnx.save(m, OUT)"`, the least any ONNX-to-ONNX tool does;
- `onnx-udfc IN OUT --prune 0.3 --bits 6 --no-validate -q` (prune + quantize) and `--bits 6` (quantize only);
- validation: one more prune + quantize run with validation and `--report`; its `seconds.validate` is reported.

The memory limit checked is 3 x the model file size + 200 MB. `--cli module` (default) runs
`python -m onnx_udfc` from this repository (the working-tree code); `--cli script` runs the installed
`onnx-udfc` console script. BLAS is pinned to one thread in every child. Writes `<tag>.md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import machine_settings, write_json_and_table  # noqa: E402
from synthetic_models import DEFAULT_FOLDER, write_resnet50  # noqa: E402

CACHED_NAMES = ("mobilenetv2_bn", "efficientnet_lite0_bn", "vgg_bn", "resnet20_bn")
FLOOR_CODE = "import sys, onnx; m = onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])"
MB = 1e6
RSS_FACTOR, RSS_OFFSET_MB = 3.0, 200.0


def default_models(folder: str = DEFAULT_FOLDER) -> List[str]:
    """The cached models that exist, then the synthetic ResNet-50 (generated if missing)."""
    paths = [os.path.join(folder, n + ".onnx") for n in CACHED_NAMES]
    return [p for p in paths if os.path.exists(p)] + [write_resnet50(folder)]


def child_env() -> Dict[str, str]:
    """Environment of every child: one BLAS thread, and this repository first on the import path."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


#: runs the command as its own child and prints "<exit code> <seconds> <ru_maxrss KiB>" of that child. Why a
#: launcher: Linux counts the memory a process had before `exec` in its `ru_maxrss`, and a child forked from
#: this benchmark starts as a copy of it (after building the ResNet-50-sized model, 573 MB: every command then
#: "peaked" at 573 MB); the launcher is a small fresh interpreter, so its child starts small
LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stdout.write("%d %.6f %d\\n" % (os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss))
"""


def run_measured(cmd: Sequence[str], env: Dict[str, str]) -> Dict[str, float]:
    """Run `cmd` once as a fresh process (through `LAUNCHER`); wall seconds and peak RSS (MB) of its
    process tree (`os.wait4` in the launcher: the rusage of exactly that child, with its own waited-for
    children)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER] + list(cmd), stdout=subprocess.PIPE, stderr=err,
                              env=env, cwd=REPO)
        fields = proc.stdout.decode().split()
        code = int(fields[0]) if proc.returncode == 0 and len(fields) == 3 else proc.returncode or 1
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"exit code {code}: {' '.join(cmd)}\n{tail}")
    return {"seconds": float(fields[1]), "rss_mb": int(fields[2]) * 1024 / MB}  # ru_maxrss is in KiB on Linux


def best_of(cmd: Sequence[str], env: Dict[str, str], repeat: int) -> Dict[str, float]:
    """Best wall clock and the peak RSS of the run(s) over `repeat` fresh processes."""
    runs = [run_measured(cmd, env) for _ in range(repeat)]
    return {"seconds": min(r["seconds"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs),
            "all_seconds": [round(r["seconds"], 3) for r in runs]}


def udfc_command(cli: str, src: str, dst: str, flags: Sequence[str]) -> List[str]:
    """The CLI invocation: `python -m onnx_udfc` (this repository) or the installed `onnx-udfc` script."""
    if cli == "script":
        exe = shutil.which("onnx-udfc")
        if exe is None:
            raise SystemExit("onnx-udfc console script not found (pip install .)")
        return [exe, src, dst, *flags]
    return [sys.executable, "-m", "onnx_udfc", src, dst, *flags]


def validation_run(cli: str, src: str, tmp: str, flags: Sequence[str], env: Dict[str, str]) -> dict:
    """One run with validation and --report; returns the JSON report."""
    report_path = os.path.join(tmp, "report.json")
    run_measured(udfc_command(cli, src, os.path.join(tmp, "validated.onnx"), [*flags, "--report", report_path]), env)
    with open(report_path) as f:
        return json.load(f)


def measure_model(path: str, args, env: Dict[str, str]) -> List[dict]:
    """Rows for one model: the floor, then prune + quantize and quantize-only runs of the CLI."""
    name = os.path.splitext(os.path.basename(path))[0]
    file_mb = os.path.getsize(path) / MB
    limit_mb = RSS_FACTOR * file_mb + RSS_OFFSET_MB
    configs = {f"prune {args.prune} bits {args.bits}": ["--prune", str(args.prune), "--bits", str(args.bits)],
               f"bits {args.bits}": ["--bits", str(args.bits)]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="udfc-speed-") as tmp:
        floor = best_of([sys.executable, "-c", FLOOR_CODE, path, os.path.join(tmp, "floor.onnx")], env, args.repeat)
        report = validation_run(args.cli, path, tmp, next(iter(configs.values())) + ["-q"], env)
        for config, flags in configs.items():
            cmd = udfc_command(args.cli, path, os.path.join(tmp, "out.onnx"), [*flags, "--no-validate", "-q"])
            run = best_of(cmd, env, args.repeat)
            first = config == next(iter(configs))
            rows.append(dict(
                model=name, params=report["before"]["params"], file_mb=round(file_mb, 2),
                floor_s=round(floor["seconds"], 3), floor_rss_mb=round(floor["rss_mb"], 1), config=config,
                udfc_s=round(run["seconds"], 3), udfc_runs_s=run["all_seconds"],
                ratio_to_floor=round(run["seconds"] / floor["seconds"], 2), rss_mb=round(run["rss_mb"], 1),
                rss_limit_mb=round(limit_mb, 1), rss_met=bool(run["rss_mb"] <= limit_mb),
                validate_s=report["seconds"].get("validate") if first else None,
                compress_s_in_report=report["seconds"].get("compress") if first else None))
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


HEADER = ("| model | params | file MB | config | floor s | udfc s | ratio to floor | peak RSS MB | RSS limit MB "
          "| RSS | validate s |")


def format_row(r: dict) -> str:
    """One markdown table row."""
    validate = "-" if r["validate_s"] is None else f"{r['validate_s']:.2f}"
    return (f"| {r['model']} | {r['params']:,} | {r['file_mb']:.1f} | {r['config']} | {r['floor_s']:.2f} | "
            f"{r['udfc_s']:.2f} | {r['ratio_to_floor']:.1f}x | {r['rss_mb']:.0f} | {r['rss_limit_mb']:.0f} | "
            f"{'met' if r['rss_met'] else 'missed'} | {validate} |")


def write_results(rows: List[dict], args, out_dir: str, tag: str) -> None:
    """`<tag>.json` (rows and settings) and `<tag>.md` (the table)."""
    settings = dict(repeat=args.repeat, prune=args.prune, bits=args.bits, cli=args.cli, python=sys.version.split()[0],
                    **machine_settings())
    preamble = (f"Compression as whole processes: best wall clock of {args.repeat} runs, peak RSS of the process tree; "
                f"floor = a process that loads and saves the model with `onnx`; all udfc runs `--no-validate -q`; "
                f"'validate s' is `seconds.validate` of one extra run with validation. RSS limit = "
                f"{RSS_FACTOR:g} x file size + {RSS_OFFSET_MB:g} MB. {settings['cpus']} CPUs, load average "
                f"{settings['load_average'][0]} at the end (timings on a busy machine are noisy).")
    footer = "\nFloor peak RSS MB: " + ", ".join(
        f"{r['model']} {r['floor_rss_mb']:.0f}" for r in rows if r["validate_s"] is not None) + "\n"
    write_json_and_table(out_dir, tag, settings, rows, preamble, HEADER, format_row, footer)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="ONNX files (default: cached models + synthetic ResNet-50)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per command; best wall clock (3)")
    ap.add_argument("--prune", type=float, default=0.3)
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--cli", choices=("module", "script"), default="module",
                    help="module: python -m onnx_udfc from this repository; script: installed onnx-udfc")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="speed")
    args = ap.parse_args(argv)

    env = child_env()
    print(HEADER, file=sys.stderr)
    rows = []
    for path in args.models or default_models():
        rows.extend(measure_model(os.path.abspath(path), args, env))
    write_results(rows, args, args.out, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plots of the accuracy benchmarks: accuracy against MACs ratio and bytes ratio, per model and method.

    python benchmarks/plot_results.py [--results benchmarks/results] [--out benchmarks/results/plots]

Reads every JSON file in --results whose rows follow the schema of `fmnist_accuracy.py` and
`imagenet_accuracy.py` (a list of rows with model, method, prune, bits, top1, agreement, macs_ratio,
bytes_ratio; `imagenet_*.json`, `fmnist_*.json`); other files (speed, latency) are skipped, and so are rows
with an error. Identical cells found in several files are drawn once (the first file's) in the per-model
plots, the grids of the current code (`CURRENT_SOURCES`) first; the headline takes its cells from the files the
README's tables cite (`HEADLINE_*_SOURCES`).

Writes `<model>.png` for every model: a 2 x 2 grid, top-1 and top-1 agreement with the original against
the MACs ratio and the file bytes ratio, one colour and marker per method (points of one method and bit
width joined in order of the ratio, each labelled with its setting, e.g. p0.3 W6), the original as a black
star. And `headline.png`: Fashion-MNIST top-1 per method and model, and ImageNet-sample top-1 agreement
per setting and model. Needs matplotlib (`pip install .[benchmarks]`); uses the Agg backend.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED = ("model", "method", "prune", "bits", "top1", "agreement", "macs_ratio", "bytes_ratio")
METHOD_ORDER = ("none", "mean", "merge", "udfc", "ort-int8")
MARKERS = {"none": "v", "mean": "s", "merge": "D", "udfc": "o", "ort-int8": "^"}
COLORS = {"none": "tab:gray", "mean": "tab:orange", "merge": "tab:green", "udfc": "tab:blue", "ort-int8": "tab:red"}
METRICS = (("top1", "top-1"), ("agreement", "top-1 agreement with original"))
RATIOS = (("macs_ratio", "MACs ratio (compressed / original)"),
          ("bytes_ratio", "file bytes ratio (compressed / original)"))


def is_accuracy_row(row) -> bool:
    return isinstance(row, dict) and all(k in row for k in REQUIRED)


def dataset_of(path: str) -> str:
    """'fmnist' or 'imagenet' (the file name's prefix)."""
    return os.path.basename(path).split("_")[0]


def load_rows(results_dir: str) -> List[dict]:
    """Accuracy rows of every matching JSON file (with their `source` file), errors dropped."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, list) or not data or not all(is_accuracy_row(r) for r in data):
            continue
        for row in data:
            if row.get("error") or row["top1"] is None:
                continue
            rows.append(dict(row, dataset=dataset_of(path), source=os.path.basename(path), method=series_name(row)))
    return rows


#: grids run with the current code: in the per-model plots their rows win a cell over older files' rows
#: (the first listed first); cells they do not hold come from the other files, the first file by name winning
CURRENT_SOURCES = ("imagenet_bn_restore_variance.json", "imagenet_folded_restore_variance.json",
                   "fmnist_restore_variance.json", "imagenet_bn_w5_refit.json", "imagenet_bn_w4_refit.json", "imagenet_scale_refit.json", "fmnist_scale_refit.json",
                   "imagenet_bn_no_quant_noise_w4.json", "imagenet_bn_no_quant_noise.json",
                   "fmnist_bn_no_quant_noise.json", "imagenet_bn_lowbit_noise.json", "fmnist_bn_lowbit_noise.json",
                   "imagenet_grid_current_bn.json", "imagenet_folded_lowbit_share.json",
                   "imagenet_grid_folded_dwavg.json", "imagenet_grid_current_folded.json", "fmnist_grid_samples128.json", "fmnist_grid_probe_contrast.json",
                   "fmnist_grid_residual_share.json", "imagenet_residual_share.json",
                   "imagenet_residual_share_p24.json")


def unique_cells(rows: Sequence[dict], current: Sequence[str] = CURRENT_SOURCES) -> List[dict]:
    """Duplicates (same cell and options, from several files) once: the row of the first file of `current`
    that has the cell, else the first file's by name."""
    rank = {name: k for k, name in enumerate(current)}
    seen: Dict[tuple, dict] = OrderedDict()
    for row in sorted(rows, key=lambda r: rank.get(r["source"], len(rank))):  # stable: file order otherwise
        key = (row["model"], row["method"], float(row["prune"]), int(row["bits"]), row.get("select", ""),
               json.dumps(row.get("options", {}), sort_keys=True))
        seen.setdefault(key, row)
    return list(seen.values())


def series_name(row: dict) -> str:
    """The method, with the options that differ from the defaults: 'udfc', 'udfc allocation=uniform'."""
    if row["method"] == "original":
        return "original"
    options = dict(row.get("options") or {})
    if row.get("select") and row["select"] != "expected-error":
        options["select"] = row["select"]
    extra = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{row['method']} {extra}".strip()


def setting_label(row: dict) -> str:
    """Compact setting: p0.3 W6, p0.1, W8."""
    parts = []
    if float(row["prune"]) > 0:
        parts.append(f"p{float(row['prune']):g}")
    if int(row["bits"]) < 32:
        parts.append(f"W{int(row['bits'])}")
    return " ".join(parts) or "fp32"


def methods_of(rows: Sequence[dict]) -> List[str]:
    """Compressing methods present, in a fixed order (unknown names last)."""
    present = {r["method"] for r in rows if r["method"] != "original"}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def draw_panel(ax, rows: Sequence[dict], metric: str, ratio: str) -> None:
    """One panel: `metric` against `ratio`, one series per method, joined per bit width."""
    for method in methods_of(rows):
        cells = [r for r in rows if r["method"] == method and r[ratio] is not None]
        for i, bits in enumerate(sorted({int(r["bits"]) for r in cells})):
            pts = sorted((r for r in cells if int(r["bits"]) == bits), key=lambda r: r[ratio])
            ax.plot([r[ratio] for r in pts], [r[metric] for r in pts], marker=MARKERS.get(method, "x"),
                    color=COLORS.get(method), linestyle="-", alpha=0.85, label=method if i == 0 else None)
            for r in pts:
                ax.annotate(setting_label(r), (r[ratio], r[metric]), textcoords="offset points",
                            xytext=(4, 3 - 9 * (i % 3)),  # bit widths at the same point: staggered labels
                            fontsize=7, color=COLORS.get(method, "black"))
    for r in rows:
        if r["method"] == "original":
            ax.plot([1.0], [r[metric]], marker="*", markersize=12, color="black", linestyle="none", label="original")
    ax.grid(alpha=0.3)


def plot_model(rows: Sequence[dict], model: str, out_dir: str) -> str:
    """`<model>.png`: top-1 and agreement against MACs and bytes ratios."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for i, (metric, metric_label) in enumerate(METRICS):
        for j, (ratio, ratio_label) in enumerate(RATIOS):
            ax = axes[i][j]
            draw_panel(ax, rows, metric, ratio)
            ax.set_xlabel(ratio_label)
            if j == 0:
                ax.set_ylabel(metric_label)
    handles = OrderedDict()
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=9)
    sources = ", ".join(sorted({r["source"] for r in rows}))
    fig.suptitle(f"{model} ({sources})", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = os.path.join(out_dir, f"{model}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(ax, rows: Sequence[dict], group_of, series_of, metric: str, reference: Optional[dict] = None) -> None:
    """Bars of `metric`: one group per group_of(row), one bar per series_of(row); `reference` maps a group to
    a value drawn as a black tick across the group (e.g. the original's top-1)."""
    groups = list(OrderedDict.fromkeys(group_of(r) for r in rows))
    series = list(OrderedDict.fromkeys(series_of(r) for r in rows))
    width = 0.8 / max(len(series), 1)
    for k, name in enumerate(series):
        xs, ys = [], []
        for g, group in enumerate(groups):
            cell = [r for r in rows if group_of(r) == group and series_of(r) == name]
            if cell:
                xs.append(g - 0.4 + width * (k + 0.5))
                ys.append(cell[0][metric])
        bars = ax.bar(xs, ys, width=width * 0.95, label=name, color=COLORS.get(name))
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    for g, group in enumerate(groups):
        if reference and group in reference:
            ax.hlines(reference[group], g - 0.42, g + 0.42, colors="black", linewidth=1.5,
                      label="original" if g == 0 else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)


#: the cells of the headline figure: Fashion-MNIST at prune 0.3 / W6 per method; ImageNet per setting
HEADLINE_FMNIST = (0.3, 6)
HEADLINE_IMAGENET = ((0.0, 8), (0.0, 6), (0.0, 4), (0.1, 8), (0.3, 8))
HEADLINE_IMAGENET_MODELS = ("mobilenetv2_bn", "efficientnet_lite0_bn")
#: result files of the Fashion-MNIST headline, the ones the README's table cites, later ones winning a cell
#: (file names do not sort by date: fmnist_samples64_methods.json holds the folded rows before the merge blend)
HEADLINE_FMNIST_SOURCES = ("fmnist_samples64_methods.json", "fmnist_merge_blend.json", "fmnist_hourglass.json",
                           "fmnist_grid_folded_pooled.json", "fmnist_grid_folded_current.json",
                           "fmnist_grid_folded_sqrt.json", "fmnist_grid_residual_share.json",
                           "fmnist_grid_probe_contrast.json", "fmnist_grid_samples128.json",
                           "fmnist_restore_variance.json")
#: the same for the ImageNet panel (quantization rows, then pruning rows with 64 synthetic images)
HEADLINE_IMAGENET_SOURCES = ("imagenet_final_quant.json", "imagenet_samples64.json", "imagenet_grid_current_bn.json",
                             "imagenet_bn_restore_variance.json")


def _latest(rows: Sequence[dict], sources: Sequence[str] = ()) -> List[dict]:
    """One row per (model, method, prune, bits): the one from the file sorted last (final runs win), or, when
    some rows come from `sources`, only those rows, the later source in `sources` winning."""
    preferred = [r for r in rows if r["source"] in sources]
    if preferred:
        rows, key = preferred, (lambda r: list(sources).index(r["source"]))
    else:
        key = (lambda r: r["source"])
    cells: Dict[tuple, dict] = OrderedDict()
    for r in sorted(rows, key=key):
        cells[(r["model"], r["method"], float(r["prune"]), int(r["bits"]))] = r
    return list(cells.values())


def plot_headline(rows: Sequence[dict], out_dir: str) -> Optional[str]:
    """`headline.png`: Fashion-MNIST top-1 per method at prune 0.3 / W6 (default options), and ImageNet-sample
    agreement of udfc (default options) and onnxruntime int8 at a few settings."""
    default = [r for r in rows if r["method"] in METHOD_ORDER]  # option variants have longer series names
    fmnist = _latest([r for r in default if r["dataset"] == "fmnist"
                      and (float(r["prune"]), int(r["bits"])) == HEADLINE_FMNIST], HEADLINE_FMNIST_SOURCES)
    imagenet = _latest([r for r in default if r["dataset"] == "imagenet" and r["model"] in HEADLINE_IMAGENET_MODELS
                        and (float(r["prune"]), int(r["bits"])) in HEADLINE_IMAGENET
                        and r["method"] in ("udfc", "ort-int8")], HEADLINE_IMAGENET_SOURCES)
    panels = [p for p in (fmnist, imagenet) if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), squeeze=False)
    ax_iter = iter(axes[0])
    if fmnist:
        ax = next(ax_iter)
        originals = {r["model"]: r["top1"] for r in rows if r["dataset"] == "fmnist" and r["method"] == "original"}
        fmnist = sorted(fmnist, key=lambda r: methods_of(fmnist).index(r["method"]))
        grouped_bars(ax, fmnist, lambda r: r["model"], lambda r: r["method"], "top1", originals)
        ax.tick_params(axis="x", labelrotation=25)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
        ax.set_title("Fashion-MNIST test set, prune 0.3 + W6: top-1 per compensation method", fontsize=10)
        ax.set_ylabel("top-1")
        ax.legend(fontsize=8, ncol=3, loc="lower left")
    if imagenet:
        ax = next(ax_iter)
        imagenet = sorted(imagenet, key=lambda r: (float(r["prune"]), -int(r["bits"]), r["method"] != "udfc"))
        grouped_bars(ax, imagenet, lambda r: setting_label(r) + ("" if r["method"] == "udfc" else f"\n{r['method']}"),
                     lambda r: r["model"], "agreement")
        ax.set_title("ImageNet sample: top-1 agreement with the original (udfc unless named)", fontsize=10)
        ax.set_ylabel("top-1 agreement")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = os.path.join(out_dir, "headline.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--out", default=None, help="default: <results>/plots")
    args = ap.parse_args(argv)
    out_dir = args.out or os.path.join(args.results, "plots")
    rows = load_rows(args.results)
    if not rows:
        print(f"no accuracy results in {args.results}", file=sys.stderr)
        return 1
    os.makedirs(out_dir, exist_ok=True)
    cells = unique_cells(rows)
    for model in OrderedDict.fromkeys(r["model"] for r in cells):
        print(plot_model([r for r in cells if r["model"] == model], model, out_dir), file=sys.stderr)
    headline = plot_headline(rows, out_dir)
    if headline:
        print(headline, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

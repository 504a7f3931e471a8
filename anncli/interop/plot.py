"""`ann plot`: training curves from run directories, per-class IoU bars from `ann eval --json` files.

Headless (matplotlib's Agg backend). Curves come from each run's events.jsonl: the logged steps (loss,
aux loss, learning rate, img/s) and the validation passes (mIoU). A resumed run logs some steps twice;
the record written last wins.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from anncli.errors import UserError

CURVES = (("loss", "loss"), ("aux_loss", "aux loss"), ("lr", "learning rate"), ("img_per_s", "img/s"),
          ("mIoU", "validation mIoU (%)"))


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("pictures need matplotlib: pip install 'anncli[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_events(run: Path) -> dict[str, dict[int, float]]:
    """{field: {step: value}} for the CURVES fields of a run directory (or an events.jsonl file)."""
    path = run / "events.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise UserError(f"{run}: no events.jsonl (expected a run directory written by `ann train`)")
    series: dict[str, dict[int, float]] = {name: {} for name, _ in CURVES}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line)") from None
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        if record.get("event") not in ("step", "val"):
            continue
        for name, _ in CURVES:
            if isinstance(record.get(name), (int, float)):
                value = float(record[name]) * (100.0 if name == "mIoU" else 1.0)
                series[name][int(record["step"])] = value
    if not any(series.values()):  # an empty chart says nothing; one line says why
        what = "is empty" if path.stat().st_size == 0 else "holds no logged step or validation yet"
        raise UserError(f"{path}: {what}; nothing to plot")
    return series


def _label(path: Path) -> str:
    return path.name if path.is_dir() else path.parent.name


def plot_curves(runs: list[Path], out: Path) -> dict[str, dict[str, int]]:
    """One panel per curve, every run overlaid with its directory name in the legend.

    Returns what was drawn: {curve: {run label: number of points}}.
    """
    plt = pyplot()
    data = {_label(run): read_events(run) for run in runs}
    if len(data) != len(runs):
        raise UserError("two runs have the same directory name; the legend could not tell them apart")
    fig, grid = plt.subplots(2, 3, figsize=(13.0, 6.8))
    axes, legend_ax = grid.ravel()[: len(CURVES)], grid.ravel()[-1]
    for ax, (name, title) in zip(axes, CURVES):
        for label, series in data.items():
            points = sorted(series[name].items())
            if points:
                ax.plot(*zip(*points), marker="o" if name == "mIoU" else None, markersize=3, label=label)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged" + (" (train.val_every)" if name == "mIoU" else ""),
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        if name in ("loss", "aux_loss") and ax.lines and all(min(l.get_ydata()) > 0 for l in ax.lines):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend_ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", title="run", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out, plt)
    return {name: {label: len(series[name]) for label, series in data.items()} for name, _ in CURVES}


def read_metrics(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        valid = bool(report["per_class"]) and all("name" in r and "IoU" in r for r in report["per_class"])
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UserError(f"{path}: not a metrics file written by `ann eval --json`")
    return report


def plot_classes(files: list[Path], out: Path) -> dict[str, list[float]]:
    """Per-class IoU (%) bars, one colour per metrics file, side by side; mIoU in the legend.

    Returns what was drawn: {legend label: IoU per class}.
    """
    plt = pyplot()
    reports = [read_metrics(f) for f in files]
    names = [row["name"] for row in reports[0]["per_class"]]
    for f, report in zip(files, reports):
        if [row["name"] for row in report["per_class"]] != names:
            raise UserError(f"{f}: its classes differ from those of {files[0]}; bars need the same classes")
    drawn: dict[str, list[float]] = {}
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) * max(1, len(reports) / 2) + 2), 4.0))
    for i, (f, report) in enumerate(zip(files, reports)):
        ious = [_pct(row["IoU"]) for row in report["per_class"]]
        label = f"{report.get('recipe') or f.stem} (mIoU {_pct(report.get('mIoU')):.2f})"
        xs = [c + (i - (len(reports) - 1) / 2) * width for c in range(len(names))]
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in ious], width, label=label)
        drawn[label] = ious
    crowded = sum(len(n) for n in names) > 6 * len(names)
    ax.set_xticks(range(len(names)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(reports), 3), frameon=False)
    fig.tight_layout()
    save_figure(fig, out, plt)
    return drawn


def _pct(value) -> float:
    return math.nan if value is None else float(value) * 100.0


def save_figure(fig, out: Path, plt) -> None:
    """The picture written whole (paths.replaced_whole), in the format its suffix names."""
    from anncli.paths import replaced_whole

    try:
        with replaced_whole(out) as tmp:
            fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=110)
    finally:
        plt.close(fig)


def run_plot(inputs: list[Path], out: Path) -> dict:
    """Curves when every input is a run directory (or events.jsonl), class bars when every one is a JSON."""
    missing = [p for p in inputs if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]}: no such file or directory")
    metrics = [p for p in inputs if p.is_file() and p.suffix == ".json"]
    if metrics and len(metrics) != len(inputs):
        raise UserError("give either run directories (curves) or metrics JSON files (class bars), not both")
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg"):
        raise UserError(f"--out {out}: expected a .png, .pdf, .svg or .jpg file")
    drawn = (plot_classes if metrics else plot_curves)(list(inputs), out)
    print(f"wrote {out}")
    return drawn

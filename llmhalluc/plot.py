"""Loss plots from metrics.jsonl: `python -m llmhalluc.plot OUTPUT_DIR [OUTPUT_DIR ...] [-o FILE]`.

One run, or several on the same axes for comparison (labelled by run name): train loss (raw and smoothed), eval
loss (for GRPO runs, which have none, the mean reward), learning rate and grad norm against the optimizer step.
Training writes output_dir/loss.png at checkpoints (at most once a minute) and at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

SMOOTHING = 0.6  # exponential moving average weight of the smoothed train loss (debiased, as TensorBoard's)
PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"))


def read_series(output_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, values) per metric of a run's metrics.jsonl, plus the smoothed train loss."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    series: dict[str, tuple[list[int], list[float]]] = {}
    for key in [k for k, _ in PANELS] + ["reward"]:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        series[key] = ([s for s, _ in points], [v for _, v in points])
    steps, losses = series["loss"]
    smoothed, average = [], 0.0
    for count, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed.append(average / (1 - SMOOTHING**count))
    series["loss_smoothed"] = (steps, smoothed)
    return series


def run_name(output_dir: Path) -> str:
    """A run's label: run_name from its config.yaml, else the folder name."""
    import yaml

    config_file = output_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    return (config or {}).get("run_name") or output_dir.resolve().name


def plot_runs(output_dirs: list[Path], out_file: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Draw the runs into out_file (PNG); returns the data drawn, per run label and metric."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display, Agg to a file

    drawn = {}
    for folder in output_dirs:
        label = run_name(folder)
        drawn[label if label not in drawn else str(folder)] = read_series(folder)  # two runs named alike
    figure = Figure(figsize=(11, 7))
    axes = figure.subplots(2, 2)
    # Fixed margins: an automatic layout engine doubles the time of a plot written at every checkpoint.
    figure.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.07, hspace=0.3, wspace=0.2)
    panels = list(PANELS)
    if not any(series["eval_loss"][0] for series in drawn.values()) and any(s["reward"][0] for s in drawn.values()):
        panels[1] = ("reward", "mean reward")
    for axis, (key, title) in zip(axes.flat, panels):
        for label, series in drawn.items():
            steps, values = series[key]
            if key == "loss":
                line = axis.plot(steps, values, alpha=0.3, linewidth=1)[0]
                axis.plot(*series["loss_smoothed"], color=line.get_color(), label=f"{label} (smoothed)")
            elif steps:
                axis.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
        if key == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # short labels inside the margin
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=100)
    return drawn


def write_loss_plot(output_dir: Path) -> dict[str, Any] | None:
    """output_dir/loss.png for one run; a failure to plot is reported, never raised (training goes on)."""
    try:
        return plot_runs([output_dir], output_dir / "loss.png")
    except Exception as err:
        print(f"warning: could not write {output_dir / 'loss.png'}: {err}", flush=True)
        return None


class LossPlot:
    """A run's loss.png, redrawn at checkpoints at most every `interval_seconds` (a redraw takes ~0.3 s of a CPU
    core on the main process, which the other processes wait for); the run's end draws it too, crashed or not
    (RunRecord.finish). Only a run killed outright (SIGKILL) keeps the plot of its last redraw, or none."""

    def __init__(self, output_dir: Path, interval_seconds: float = 60.0) -> None:
        self.output_dir, self.interval_seconds = output_dir, interval_seconds
        self.drawn_at = time.monotonic()  # a run shorter than the interval is drawn once, at its end

    def refresh(self) -> None:
        """Redraw, unless the last drawing is recent."""
        if time.monotonic() - self.drawn_at >= self.interval_seconds:
            write_loss_plot(self.output_dir)
            self.drawn_at = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    """Command line: compare runs in one figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: OUTPUT_DIR/loss.png, or compare.png)")
    args = parser.parse_args(argv)
    for folder in args.output_dirs:
        if not (folder / "metrics.jsonl").is_file():
            print(f"error: {folder / 'metrics.jsonl'} not found", file=sys.stderr)
            return 2
    out = args.output or (args.output_dirs[0] / "loss.png" if len(args.output_dirs) == 1 else Path("compare.png"))
    drawn = plot_runs(args.output_dirs, out)
    points = ", ".join(f"{label}: {len(series['loss'][0])} train rows" for label, series in drawn.items())
    print(f"wrote {out} ({points})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

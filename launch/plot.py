"""Loss curves from `metrics.jsonl`: train loss (raw and smoothed), eval loss, learning rate and tokens/s against
steps, with the supervised tokens seen on a second axis. One run, or several overlaid.

    python -m launch.plot RUN_DIR [RUN_DIR ...] [--out curves.png]

Rank 0 redraws `<run>/loss.png` at every evaluation and at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = ("train loss", "eval loss", "learning rate", "tokens/s")


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records); a resumed run's re-logged steps keep their last values."""
    steps, evals = {}, {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        (evals if "eval_loss" in record else steps)[record["step"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_runs(run_dirs: list[Path], out: Path):
    """Draw the four panels for every run into `out` (PNG); returns the figure. Steps on the bottom axes, supervised
    tokens (of the first run) on the top ones. No pyplot and a fixed layout: a redraw costs well under a second."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    figure = Figure(figsize=(12, 7.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.85, hspace=0.42, wspace=0.16)
    panels = dict(zip(PANELS, axes.flat))
    for index, (title, axis) in enumerate(panels.items()):
        axis.set_title(title, pad=30 if index < 2 else 6)  # the top row's titles sit above its token axes
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    first_tokens = None
    for index, run_dir in enumerate(run_dirs):
        steps, evals = read_records(Path(run_dir))
        if not steps:
            continue
        color, name = f"C{index}", Path(run_dir).name
        x = [r["step"] for r in steps]
        loss = [r["loss"] for r in steps]
        panels["train loss"].plot(x, loss, color=color, alpha=0.25, linewidth=0.8)
        panels["train loss"].plot(x, smooth(loss), color=color, label=name)
        if evals:
            panels["eval loss"].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=color,
                                     label=name)  # fmt: skip
        panels["learning rate"].plot(x, [r["lr"] for r in steps], color=color, label=name)
        panels["tokens/s"].plot(x, [r["tokens_per_s"] for r in steps], color=color, alpha=0.8, label=name)
        if first_tokens is None:
            tokens = np.cumsum([r["tokens"] for r in steps], dtype=float)
            first_tokens = (np.array([0, *x], dtype=float), np.concatenate([[0.0], tokens]))  # step 0: no tokens yet
    if first_tokens is not None:
        step_axis, token_axis = first_tokens

        def to_tokens(s):
            return np.interp(s, step_axis, token_axis)

        def to_steps(t):
            return np.interp(t, token_axis, step_axis)

        for axis in axes[0]:
            axis.set_xlim(step_axis[0], step_axis[-1])
            top = axis.secondary_xaxis("top", functions=(to_tokens, to_steps))
            top.set_xlabel("supervised tokens")
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
            top.xaxis.set_major_locator(MaxNLocator(5))
    for axis in panels.values():
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp, dpi=90)
    tmp.replace(out)  # a reader never sees half a PNG
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/loss.png for one run, runs.png else")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        print(f"shardtune plot: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or (args.run_dirs[0] / "loss.png" if len(args.run_dirs) == 1 else Path("runs.png"))
    plot_runs(args.run_dirs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

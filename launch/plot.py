"""Loss curves from `metrics.jsonl`: train loss (raw and smoothed), eval loss (with the generation evals' exact match
on a right axis), learning rate and tokens/s against steps, with the supervised tokens seen on a second axis. One
run, or several overlaid.

    python -m launch.plot RUN_DIR [RUN_DIR ...] [--out curves.png]   (default: RUN_DIR/loss.png, or runs.png beside
                                                                     the first of several)

Rank 0 redraws `<run>/loss.png` at every evaluation and at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from launch.secrets import redact

log = logging.getLogger(__name__)
PANELS = ("train loss", "eval loss", "learning rate", "tokens/s")


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every readable record of a JSON-lines run record. A kill mid-write can cut the last line
    short: such a line (or any that does not parse) is dropped with a warning naming the file and line, never fatal."""
    out = []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a step record")
        except ValueError as error:
            cut = " (cut short: the run was stopped while writing it)" if number == len(lines) else ""
            log.warning("%s:%d: dropped an unreadable record%s: %s", path, number, cut, str(error).splitlines()[0])
            continue
        out.append((line, record))
    return out


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records: eval loss and generation scores, one per step); a resumed run's re-logged
    steps keep their last values."""
    steps, evals = {}, {}
    for _, record in read_jsonl(run_dir / "metrics.jsonl"):
        if "loss" in record:
            steps[record["step"]] = record
        elif "eval_loss" in record or "gen_exact_match" in record:
            evals[record["step"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold `key` (an older or hand-written file may lack some fields)."""
    kept = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in kept], [r[key] for r in kept]


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
    first_tokens, gen_axis = None, None
    for index, run_dir in enumerate(run_dirs):
        steps, evals = read_records(Path(run_dir))
        if not steps:
            continue
        color, name = f"C{index}", redact(Path(run_dir).name)
        x, loss = series(steps, "loss")
        panels["train loss"].plot(x, loss, color=color, alpha=0.25, linewidth=0.8)
        panels["train loss"].plot(x, smooth(loss), color=color, label=name)
        if evals:
            panels["eval loss"].plot(*series(evals, "eval_loss"), "o-", color=color, label=name)
            steps_scored, exact = series(evals, "gen_exact_match")
            if steps_scored:  # the generation evals' exact match, on the eval panel's right axis
                if gen_axis is None:
                    gen_axis = panels["eval loss"].twinx()
                    gen_axis.set_ylabel("generation exact match")
                    gen_axis.set_ylim(-0.02, 1.02)
                gen_axis.plot(steps_scored, exact, "s--", color=color, alpha=0.8, label=f"{name} exact match")
        panels["learning rate"].plot(*series(steps, "lr"), color=color, label=name)
        panels["tokens/s"].plot(*series(steps, "tokens_per_s"), color=color, alpha=0.8, label=name)
        if first_tokens is None:
            x = [r["step"] for r in steps]
            tokens = np.cumsum([r.get("tokens", 0) for r in steps], dtype=float)
            first_tokens = (np.array([0, *x], dtype=float), np.concatenate([[0.0], tokens]))  # step 0: no tokens yet
    if first_tokens is not None:
        step_axis, token_axis = first_tokens

        def to_tokens(s):
            return np.interp(s, step_axis, token_axis)

        def to_steps(t):
            return np.interp(t, token_axis, step_axis)

        for axis in axes[0] if token_axis[-1] > 0 else ():  # no token counts: no token axis
            axis.set_xlim(step_axis[0], step_axis[-1])
            top = axis.secondary_xaxis("top", functions=(to_tokens, to_steps))
            top.set_xlabel("supervised tokens")
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
            top.xaxis.set_major_locator(MaxNLocator(5))
    for axis in panels.values():
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    if gen_axis is not None:
        gen_axis.legend(fontsize="small", loc="center right")
        figure.subplots_adjust(right=0.94, wspace=0.22)  # room for the right axis's ticks and label
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(tmp, dpi=90)
    tmp.replace(out)  # a reader never sees half a PNG
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: RUN_DIR/loss.png for one run, else runs.png beside the first run directory",
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        print(f"shardtune plot: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    first = args.run_dirs[0]
    out = args.out or (first / "loss.png" if len(args.run_dirs) == 1 else first.resolve().parent / "runs.png")
    plot_runs(args.run_dirs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

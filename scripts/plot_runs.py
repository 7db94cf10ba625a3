"""Plot the loss curves of training runs from their out_dir/metrics.jsonl into a PNG.

    python -m scripts.plot_runs out-sophiag out-adamw --output=runs.png
    python -m scripts.plot_runs out-a/metrics.jsonl out-b --labels=Sophia-G,AdamW --x=tokens --ylim=2.8,3.6

One line per run, in one colour: validation loss (solid, from the evaluations) and the
training loss of the log lines (thin, faint). The x axis is the step, or with --x=tokens the
tokens seen (step x tokens per step, from the run's config.json). Below the losses, one
panel per statistic that some run logged: Sophia's win rate (fraction of coordinates not
clipped) and Hessian norm, and the fraction of steps where gradient-norm clipping fired.
A resumed run appends to metrics.jsonl; for a step logged twice the later record wins.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on compute nodes
import matplotlib.pyplot as plt
from matplotlib.ticker import EngFormatter, MaxNLocator


from errors import UserError, exit_on_user_error
from metrics import read_metrics as read_records
from paths import writable_file

# The field each kind of record must have: it is plotted.
PLOTTED = {"train": ("loss",), "eval": ("val_loss",)}
# (field of the train records, panel title, log scale)
STAT_PANELS = (("win_rate", "Sophia win rate (not clipped)", False),
               ("hessian_norm", "Sophia Hessian norm", True),
               ("clip_frac", "grad-norm clipping frequency", False))


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """The run's records by kind ("train", "eval", ...), each sorted by step, one per step;
    a record without the value this script plots is a UserError."""
    by_kind = read_records(path)
    for kind, fields in PLOTTED.items():
        for record in by_kind.get(kind, []):
            if not all(isinstance(record.get(f), (int, float)) for f in fields):
                raise UserError(f"{path}: the {kind} record of step {record['iter']} has no "
                                f"{' or '.join(fields)}; is it a metrics.jsonl of train.py?")
    if not by_kind:
        raise UserError(f"{path} holds no records; the run has not logged anything yet")
    return by_kind


def tokens_per_step(metrics_file: Path) -> int:
    """gradient_accumulation_steps x batch_size x block_size, from the run's config.json."""
    config_file = metrics_file.parent / "config.json"
    if not config_file.is_file():
        raise UserError(f"--x=tokens needs {config_file} (written by train.py) to count tokens per step; "
                        f"use --x=step")
    cfg = json.loads(config_file.read_text())
    return cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]


def make_figure(paths: list[str | Path], labels: list[str] | None = None, x: str = "step", title: str = "",
                ylim: tuple[float, float] | None = None) -> plt.Figure:
    """The figure for the runs at `paths` (out_dirs or metrics.jsonl files)."""
    if x not in ("step", "tokens"):
        raise UserError(f"--x={x!r}: use 'step' or 'tokens'")
    files = [Path(p) / "metrics.jsonl" if Path(p).is_dir() else Path(p) for p in paths]
    if labels is None:
        labels = [f.parent.name for f in files]
    if len(labels) != len(files):
        raise UserError(f"{len(labels)} labels for {len(files)} runs; give one label per run")
    runs = [read_metrics(f) for f in files]
    scales = [tokens_per_step(f) if x == "tokens" else 1 for f in files]
    stats = [p for p in STAT_PANELS if any(p[0] in r for run in runs for r in run.get("train", []))]

    columns = max(1, len(stats))
    fig = plt.figure(figsize=(4.2 * max(columns, 2), 4.8 + 2.8 * bool(stats)), layout="constrained")
    grid = fig.add_gridspec(2 if stats else 1, columns, height_ratios=[1.7, 1] if stats else None)
    ax = fig.add_subplot(grid[0, :])
    xlabel = "tokens" if x == "tokens" else "step"
    for i, (run, label, scale) in enumerate(zip(runs, labels, scales)):
        color = f"C{i % 10}"
        train_records = run.get("train", [])
        if train_records:
            ax.plot([r["iter"] * scale for r in train_records], [r["loss"] for r in train_records],
                    color=color, alpha=0.35, linewidth=0.8, marker="." if len(train_records) == 1 else None)
        evals = run.get("eval", [])
        if evals:
            ax.plot([r["iter"] * scale for r in evals], [r["val_loss"] for r in evals], color=color,
                    linewidth=2, marker="o" if len(evals) < 30 else None, markersize=3, label=f"{label} (val)")
        else:  # a run too short for an evaluation still gets a legend entry
            ax.plot([], [], color=color, linewidth=2, label=f"{label} (no evaluation yet)")
    ax.plot([], [], color="grey", alpha=0.35, linewidth=0.8, label="train loss (log lines)")
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens: no "500m" ticks on short runs
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 20k, 4.9G: short enough for the small panels
    ax.set_ylabel("loss")
    if ylim:
        ax.set_ylim(*ylim)  # zoom on the end of training, where runs differ
    ax.set_title(title or "validation loss (solid) and training loss (faint)")
    ax.grid(alpha=0.3)
    ax.legend()

    for col, (field, panel_title, log) in enumerate(stats):
        sub = fig.add_subplot(grid[1, col], sharex=ax)
        for i, (run, label, scale) in enumerate(zip(runs, labels, scales)):
            points = [(r["iter"] * scale, r[field]) for r in run.get("train", []) if r.get(field) is not None]
            if points:
                sub.plot(*zip(*points), color=f"C{i % 10}", linewidth=1.2, label=label)
        sub.set_title(panel_title, fontsize=10)
        sub.set_xlabel(xlabel)
        if log:
            sub.set_yscale("log")
        sub.grid(alpha=0.3)
    return fig


def plot_runs(paths: list[str | Path], output: str | Path, labels: list[str] | None = None,
              x: str = "step", title: str = "", ylim: tuple[float, float] | None = None) -> Path:
    """Write make_figure(...) to the PNG `output`; returns its path."""
    output = writable_file(output, "--output")
    fig = make_figure(paths, labels, x, title, ylim)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, write the PNG; returns its path."""
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="out_dirs or metrics.jsonl files")
    parser.add_argument("--labels", help="comma-separated legend labels, one per run (default: the out_dir names)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="the x axis")
    parser.add_argument("--output", default="runs.png", help="the PNG to write")
    parser.add_argument("--title", default="", help="title of the loss panel")
    parser.add_argument("--ylim", help="LOW,HIGH: the loss axis range (default: everything)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    ylim = None
    if args.ylim:
        try:
            low, high = (float(v) for v in args.ylim.split(","))
        except ValueError:
            raise UserError(f"--ylim={args.ylim!r}: write two numbers, LOW,HIGH (e.g. --ylim=2.8,3.6)") from None
        ylim = (low, high)
    path = plot_runs(args.runs, args.output, labels, args.x, args.title, ylim)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()

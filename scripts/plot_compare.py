"""Plots of an optimizer comparison (scripts/compare.py), from its results.json alone.

    python -m scripts.plot_compare out-compare      # re-plot without rerunning anything

Writes PNGs into the runs folder, each only when it has something to show:
  val_loss.png     validation loss against steps per optimizer at its best LR (mean over
                   seeds, band = min..max), full run and the end zoomed, with the
                   tuned baseline's final loss as the target line (paper Figs. 1, 3, 4);
  lr_sweep.png     final validation loss against peak LR per optimizer (mean ± std);
  sophia_stats.png Sophia's fraction of clipped coordinates (1 - win rate) and the norm of
                   its Hessian EMA over training (paper Fig. 8), when a Sophia run is there;
  grad_clip.png    fraction of steps where gradient-norm clipping fired, over training and
                   overall, per optimizer (paper Fig. 6a).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402


def name(row: dict) -> str:
    """The group's label: its optimizer, or a variant's name (older results have no label)."""
    return row.get("label", row["optimizer"])


def label(row: dict) -> str:
    lr = "" if row["best_lr"] is None else f", lr {row['best_lr']:.3g}"
    return f"{name(row)} ({row['steps']} steps{lr})"


def tuned(results: dict) -> list[tuple[str, dict]]:
    """(color, group) for every group with a usable best LR; colors fixed by group order."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [(colors[i % len(colors)], row) for i, row in enumerate(results["groups"]) if row["best_lr"] is not None]


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss(results: dict, path: Path) -> Path | None:
    rows = tuned(results)
    if not rows:  # no curve, and no target either: it is the tuned baseline's loss
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    T, target = results["T"], results["target_val_loss"]
    # Zoom on the end of the runs: from half the shortest budget on.
    start = min(row["steps"] for _, row in rows) / 2
    zoom = []  # every plotted value from `start` on, to fit the zoomed panel's y range
    for color, row in rows:
        c = row["curve"]
        for ax in axes:
            ax.plot(c["iters"], c["val_loss"], color=color, marker=".", label=label(row))
            if len(results["seeds"]) > 1:
                ax.fill_between(c["iters"], c["val_loss_min"], c["val_loss_max"], color=color, alpha=0.2)
        zoom += [v for key in ("val_loss_min", "val_loss_max") for i, v in zip(c["iters"], c[key]) if i >= start]
    for ax, title in zip(axes, ("validation loss", f"from step {start:.0f} on (zoom)")):
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
            zoom.append(target)
        ax.set(xlabel="steps", ylabel="validation loss", title=title)
        ax.grid(alpha=0.3)
    pad = 0.1 * (max(zoom) - min(zoom)) + 1e-3
    axes[1].set_xlim(start, T * 1.02)
    axes[1].set_ylim(min(zoom) - pad, max(zoom) + pad)
    axes[0].legend(fontsize=8)
    return save(fig, path)


def plot_lr_sweep(results: dict, path: Path) -> Path | None:
    rows = tuned(results)  # a group has a best LR when, and only when, an LR of it has a mean loss
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for color, row in rows:
        lrs, means, stds = zip(*[(r["lr"], r["val_loss_mean"], r["val_loss_std"]) for r in row["lrs"]
                                 if r["val_loss_mean"] is not None])
        ax.errorbar(lrs, means, yerr=stds, color=color, marker="o", capsize=3,
                    label=f"{name(row)} ({row['steps']} steps)")
        ax.plot(row["best_lr"], row["val_loss_mean"], marker="*", markersize=14, color=color)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
           title="learning-rate sweep (star: best LR)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_sophia_stats(results: dict, path: Path) -> Path | None:
    rows = [(c, r) for c, r in tuned(results) if "win_rate" in r["train_stats"]]
    if not rows:
        return None
    fig, (ax_clip, ax_h) = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, row in rows:
        s = row["train_stats"]
        ax_clip.plot(s["iters"], [1 - w for w in s["win_rate"]], color=color, marker=".", label=label(row))
        ax_h.plot(s["iters"], s["hessian_norm"], color=color, marker=".", label=label(row))
    ax_clip.set(xlabel="steps", ylabel="fraction of coordinates clipped", ylim=(0, 1.02),
                title="(a) clipped coordinates, 1 - win rate")
    ax_h.set(xlabel="steps", ylabel="||h||_2", title="(b) norm of the Hessian EMA h")
    for ax in (ax_clip, ax_h):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_grad_clip(results: dict, path: Path) -> Path | None:
    rows = [(c, r) for c, r in tuned(results) if "clip_frac" in r["train_stats"]]
    if not rows:
        return None
    fig, (ax_t, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names, fractions, colors = [], [], []
    for color, row in rows:
        s = row["train_stats"]
        ax_t.plot(s["iters"], s["clip_frac"], color=color, marker=".", label=label(row))
        names.append(f"{name(row)}\n{row['steps']} steps")
        fractions.append(row["clip_frac_overall"])
        colors.append(color)
    ax_t.set(xlabel="steps", ylabel="fraction of steps clipped (per log interval)", ylim=(-0.02, 1.02),
             title="gradient clipping over training")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_bar.bar(names, fractions, color=colors)
    for x, f in enumerate(fractions):
        ax_bar.text(x, f, f"{f:.1%}", ha="center", va="bottom", fontsize=8)
    ax_bar.set(ylabel="fraction of all steps clipped", ylim=(0, 1.05), title="overall")
    ax_bar.tick_params(axis="x", labelsize=8, labelrotation=30)
    return save(fig, path)


def plot_all(results: dict, runs_dir: Path) -> list[Path]:
    """Write every plot into runs_dir; returns the files written: none for a plot that would
    be empty (no group with a finished LR yet, no Sophia run, no clipping statistics)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_val_loss(results, runs_dir / "val_loss.png"),
             plot_lr_sweep(results, runs_dir / "lr_sweep.png"),
             plot_sophia_stats(results, runs_dir / "sophia_stats.png"),
             plot_grad_clip(results, runs_dir / "grad_clip.png")]
    return [p for p in paths if p is not None]


def main(argv: list[str] | None = None) -> list[Path]:
    """Re-plot a comparison folder from its results.json."""
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", help="folder holding results.json (scripts/compare.py --runs_dir)")
    runs_dir = Path(parser.parse_args(sys.argv[1:] if argv is None else argv).runs_dir)
    results_file = runs_dir / "results.json"
    if not results_file.exists():
        parser.error(f"{results_file} not found; run scripts/compare.py first")
    paths = plot_all(json.loads(results_file.read_text()), runs_dir)
    print("wrote " + (", ".join(str(p) for p in paths) or "no plots: no group has a finished LR yet"))
    return paths


if __name__ == "__main__":
    main()

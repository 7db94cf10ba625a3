"""The report of an optimizer comparison (scripts/compare.py): its results record (results.json)
from the finished runs' metrics, and results.md.

Speed-up: the steps an optimizer needs, at its best LR (validation curve averaged over
seeds, linear interpolation between evaluations), to reach the tuned baseline's final
validation loss; the ratio is T / those steps ("2.0x" is the paper's claim for Sophia at T/2).

Significance (--alpha, default 0.05), per group against the baseline, both at their best LR,
over the seeds' final val losses (n = the seeds of each side; n = 1 on a side: no test):
"lower than the baseline" is a one-sided Welch t-test of H1: the group's mean final val loss <
the baseline's; "reaches the target" is a one-sided one-sample t-test of H1: the group's mean
final val loss < the target (the baseline's mean, taken as exact, as the speed-up takes it),
which ignores the baseline's own seed noise and so is the less strict of the two. Each test is
at alpha on its own (no correction for several groups), and the best LR is picked on the same
runs. Per seed, the steps its own val curve needs to reach the target are reported too.

The record is the dataclasses below; results.json is its JSON form (dataclasses.asdict), which
the downstream scores (scripts/downstream_scores.py), the plots (scripts/plot_compare.py),
results.md and scripts/ablations.py read.
"""

import argparse
import math
import shlex
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from configurator import comma_list
from scripts.compare_plan import Group, Run, read_metrics
from scripts.compare_run import waiting
from scripts.downstream_scores import downstream_lines
from scripts.significance import mean_std, target_test, welch_test


@dataclass
class RunResult:
    seed: int
    out_dir: str  # relative to runs_dir
    val_loss: float | None  # the final evaluation's; None: not finished, or not finite
    state: str  # "done" (finished before), "ok", "failed (...)", "not run", "queued (job N)", "running (job N)"


@dataclass
class LRResult:
    lr: float
    val_loss_mean: float | None  # over the seeds; None unless every seed finished with a finite loss
    val_loss_std: float | None  # sample std; None for one seed
    runs: list[RunResult]


@dataclass
class SeedResult:
    """One seed at its group's best LR."""
    seed: int
    val_loss: float
    steps_to_target: float | None  # on its own val curve; None: not reached


@dataclass
class Curve:
    """The validation curve at the best LR: mean, min and max over the seeds per evaluation."""
    iters: list[int]
    val_loss: list[float]
    val_loss_min: list[float]
    val_loss_max: list[float]


@dataclass
class GroupResult:
    """One optimizer or variant at one budget: every LR's losses, the best LR and what follows."""
    label: str
    optimizer: str
    overrides: list[str]  # a variant's own train.py overrides
    fraction: float  # of T
    steps: int
    config: str
    warmup_iters: int
    min_lr_ratio: float
    lrs: list[LRResult]
    best_lr: float | None = None  # None: no LR had every seed finish with a finite loss
    best_at_edge: bool = False  # the best LR is the grid's smallest or largest
    val_loss_mean: float | None = None  # at the best LR
    val_loss_std: float | None = None
    curve: Curve | None = None
    # training records at the best LR, means over seeds per iter: iters, clip_frac, loss, and
    # for Sophia win_rate and hessian_norm
    train_stats: dict[str, list[float]] | None = None
    clip_frac_overall: float | None = None  # fraction of all steps that clipped the gradient
    steps_to_target: float | None = None  # of the mean curve; None: not reached
    speedup: float | None = None  # T / steps_to_target
    per_seed: list[SeedResult] = field(default_factory=list)  # at the best LR
    # scripts.significance's tests against the baseline (None: the baseline, or no best LR on a side):
    # vs_baseline {test, n, n_baseline, diff_mean, diff_std_err, diff_upper_bound, t, df, p_one_sided,
    # significant, no_test}; reaches_target {test, target, n, seeds_reaching, diff_mean, ...}
    vs_baseline: dict | None = None
    reaches_target: dict | None = None
    downstream: dict | None = None  # scripts.downstream_scores.add_downstream's, per benchmark


@dataclass
class Results:
    baseline: str  # the baseline group's label
    T: int  # its steps
    seeds: list[int]
    lr_grid: list[float]
    alpha: float
    train_args: list[str]  # the base config and the overrides every run got
    target_val_loss: float | None  # the baseline's final val loss at its best LR
    groups: list[GroupResult]  # the baseline first
    downstream: dict | None = None  # what was scored (data, sha256, limit, ...) per benchmark

    def to_json(self) -> dict:
        return asdict(self)


def steps_to_reach(iters: list[float], losses: list[float], target: float) -> float | None:
    """The first step at which the piecewise-linear loss curve through (iters, losses)
    falls to `target`; None if it never does."""
    for i, (x, y) in enumerate(zip(iters, losses)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = iters[i - 1], losses[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


def final_val_loss(run: Run) -> float:
    evals, _ = read_metrics(run.out_dir / "metrics.jsonl")
    last = [e["val_loss"] for e in evals if e["iter"] == run.group.steps]
    return float(last[0]) if last else math.nan


def run_steps_to_target(run: Run, target: float) -> float | None:
    """steps_to_reach on one run's own validation curve."""
    evals, _ = read_metrics(run.out_dir / "metrics.jsonl")
    return steps_to_reach([e["iter"] for e in evals], [e["val_loss"] for e in evals], target)


def seed_mean_series(series: list[list[dict]], keys: tuple[str, ...]) -> dict[str, list[float]]:
    """Records of several seeds averaged per iter (iters all seeds have), per key present."""
    common = set.intersection(*({r["iter"] for r in records} for records in series))
    iters = sorted(common)
    out: dict[str, list[float]] = {"iters": iters}
    by_iter = [{r["iter"]: r for r in records} for records in series]
    for key in keys:
        if all(key in s[i] for s in by_iter for i in iters) and iters:
            out[key] = [statistics.fmean(s[i][key] for s in by_iter) for i in iters]
    return out



def curves(runs: list[Run]) -> tuple[Curve, dict[str, list[float]]]:
    """Validation curve (mean, min, max over seeds) and training statistics of some runs."""
    metrics = [read_metrics(r.out_dir / "metrics.jsonl") for r in runs]
    val = seed_mean_series([m[0] for m in metrics], ("val_loss",))
    per_iter = [{e["iter"]: e["val_loss"] for e in m[0]} for m in metrics]
    curve = Curve(val["iters"], val["val_loss"], [min(p[i] for p in per_iter) for i in val["iters"]],
                  [max(p[i] for p in per_iter) for i in val["iters"]])
    return curve, seed_mean_series([m[1] for m in metrics], ("clip_frac", "win_rate", "hessian_norm", "loss"))


def run_mean(stats: dict, key: str) -> float | None:
    """A training statistic averaged over the whole run: each record covers the steps since the
    previous one, so each counts by its span (the clip fraction: the fraction of all steps that
    clipped the gradient)."""
    if key not in stats or not stats["iters"]:
        return None
    spans = [b - a for a, b in zip([0] + stats["iters"][:-1], stats["iters"])]
    return sum(s * f for s, f in zip(spans, stats[key])) / sum(spans)


def at_fraction(stats: dict, key: str, steps: int, fraction: float) -> float | None:
    """The record of `key` covering step fraction * steps (the first logged at or after it)."""
    step = fraction * steps
    return next((v for i, v in zip(stats["iters"], stats.get(key, [])) if i >= step), None)


def summarize(groups: list[Group], runs: list[Run], states: dict[Run, str], args: argparse.Namespace,
              overrides: list[str]) -> Results:
    """The results record: per group every LR's losses, the best LR, its curves, the speed-up and the tests."""
    runs_dir = Path(args.runs_dir)
    rows, at_best = [], []
    for group in groups:
        lr_rows, best = [], None
        for lr in group.lrs:
            mine = [r for r in runs if r.group == group and r.lr == lr]
            losses = [final_val_loss(r) for r in mine]
            mean, std = mean_std(losses)
            lr_rows.append(LRResult(lr, mean, std, [
                RunResult(r.seed, str(r.out_dir.relative_to(runs_dir)), v if math.isfinite(v) else None,
                          states.get(r, "not run")) for r, v in zip(mine, losses)]))
            if mean is not None and (best is None or mean < best[1]):
                best = (lr, mean, std, mine)
        row = GroupResult(group.label, group.optimizer, list(group.overrides), group.fraction, group.steps,
                          group.config, group.warmup_iters, group.min_lr_ratio, lr_rows)
        if best is not None:
            row.best_lr, row.val_loss_mean, row.val_loss_std = best[:3]
            row.best_at_edge = len(group.lrs) > 1 and row.best_lr in (min(group.lrs), max(group.lrs))
            row.curve, row.train_stats = curves(best[3])
            row.clip_frac_overall = run_mean(row.train_stats, "clip_frac")
        rows.append(row)
        at_best.append(best[3] if best is not None else [])

    baseline = rows[0]
    target = baseline.val_loss_mean
    for row, best_runs in zip(rows, at_best):
        if target is not None and row.curve is not None:
            row.steps_to_target = steps_to_reach(row.curve.iters, row.curve.val_loss, target)
        row.speedup = baseline.steps / row.steps_to_target if row.steps_to_target else None
        row.per_seed = [SeedResult(r.seed, final_val_loss(r), None if target is None else run_steps_to_target(r, target))
                        for r in best_runs]
    baseline_losses = [s.val_loss for s in baseline.per_seed]
    for row in rows[1:]:
        losses = [s.val_loss for s in row.per_seed]
        if losses and baseline_losses:
            reaching = sum(s.steps_to_target is not None for s in row.per_seed)
            row.vs_baseline = welch_test(losses, baseline_losses, args.alpha)
            row.reaches_target = target_test(losses, target, reaching, args.alpha)
    return Results(baseline.label, baseline.steps, comma_list(args.seeds, int, "--seeds"),
                   comma_list(args.lr_grid, float, "--lr_grid"), args.alpha, [args.config, *overrides], target, rows)


def fmt_loss(mean: float | None, std: float | None, runs: list[dict]) -> str:
    """A final val loss cell: mean ± std over the seeds, or why there is none, from `runs`
    (results.json's, of one LR or a whole group): "failed" if one failed or diverged, else
    "not run" if none has finished (--no_train, or still training elsewhere; "not finished" when some
    are queued or running under SLURM), else "K of N not run"."""
    if mean is not None:  # every run of `runs` finished; one seed has no spread to show
        return f"{mean:.4f}" if len(runs) == 1 else f"{mean:.4f} ± {std:.4f}"
    if any(r["state"].startswith("failed") or r["state"] in ("ok", "done") and r["val_loss"] is None for r in runs):
        return "failed"
    pending = [r["state"] for r in runs if waiting(r["state"])]
    word = "not run" if set(pending) == {"not run"} else "not finished"  # else queued or running under SLURM
    return word if len(pending) == len(runs) else f"{len(pending)} of {len(runs)} {word}"


def group_loss(row: dict) -> str:
    """A group's final val loss cell: at its best LR, or why no LR has one, over all its runs."""
    at_best = [lr_row["runs"] for lr_row in row["lrs"] if lr_row["lr"] == row["best_lr"]]
    runs = at_best[0] if at_best else [r for lr_row in row["lrs"] for r in lr_row["runs"]]
    return fmt_loss(row["val_loss_mean"], row["val_loss_std"], runs)


def fmt_speedup(row: dict) -> tuple[str, str]:
    """(steps to target, speed-up) cells."""
    if row["best_lr"] is None:
        return "—", "—"
    if row["steps_to_target"] is None:
        return "not reached", "not reached"
    speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}x"  # None: reached at step 0
    return f"{row['steps_to_target']:.1f}", speedup


def fmt_verdict(test: dict) -> str:
    """A test's table cell: its p-value and verdict, or why there is none."""
    if test["no_test"]:
        return test["no_test"]
    return f"{test['p_one_sided']:.3g}, " + ("significant" if test["significant"] else "not significant")


def verdict_words(test: dict, statistic: str, alpha: float) -> str:
    """A test's verdict in words with its numbers, or why there is none."""
    if test["no_test"]:
        return f"{test['no_test']} (Δ = {test['diff_mean']:+.4f})"
    sig = test["significant"]
    return (f"{'**significant**' if sig else 'not significant'} (Δ = {test['diff_mean']:+.4f} ± "
            f"{test['diff_std_err']:.4f} s.e., one-sided {100 * (1 - alpha):g}% upper bound "
            f"{test['diff_upper_bound']:+.4f}; {statistic} t = {test['t']:.2f}, df = {test['df']:.3g}, "
            f"p = {test['p_one_sided']:.3g} {'<' if sig else '≥'} {alpha:g})")


def significance_lines(results: dict) -> list[str]:
    """results.md's significance section: the tests against the baseline in a table and in words."""
    alpha, groups = results["alpha"], results["groups"]
    base = groups[0]
    lines = ["", "## Significance", ""]
    if not base["per_seed"]:
        return lines + [f"No test: the baseline {base['label']} has no LR at which every seed finished."]
    k = len(groups) - 1
    lines += [
        (f"Each optimizer at its best LR against the baseline **{base['label']}** at T = {base['steps']} steps, over "
         f"the seeds' final val losses (n = the seeds of each side); each test is one-sided at α = {alpha:g} on its "
         "own" + (f" (for {k} comparisons together, Bonferroni's level is α/{k} = {alpha / k:.3g})" if k > 1 else "")
         + ". *Lower than the baseline*: Welch's t-test (unequal variances, Welch-Satterthwaite df) of H1: the "
         "optimizer's mean final val loss < the baseline's; Δ = optimizer − baseline, with its one-sided "
         f"{100 * (1 - alpha):g}% upper confidence bound. *Reaches the target*: one-sample t-test of H1: the "
         f"optimizer's mean final val loss < the target {results['target_val_loss']:.4f}, the baseline's mean taken "
         "as exact (as the speed-up takes it); it ignores the baseline's seed-to-seed spread, so it is the less "
         "strict of the two. The best LRs are picked on these same runs. With n = 1 on a side there is no test."),
        "",
        f"| optimizer | steps | n | final val loss (mean ± std) | Δ vs {base['label']} (upper bound) | "
        f"lower than {base['label']}: p | reaches target: p | seeds reaching target |",
        "|---|---:|---:|---|---:|---|---|---:|",
    ]
    for row in groups:
        n = len(row["per_seed"])
        reaching = f"{sum(s['steps_to_target'] is not None for s in row['per_seed'])} of {n}" if n else "—"
        test, target = row["vs_baseline"], row["reaches_target"]
        if test is None:
            name = f"{row['label']} (baseline)" if row is base else row["label"]
            diff_cell = test_cell = target_cell = "—"
        else:
            name, test_cell, target_cell = row["label"], fmt_verdict(test), fmt_verdict(target)
            bound = "" if test["diff_upper_bound"] is None else f" ({test['diff_upper_bound']:+.4f})"
            diff_cell = f"{test['diff_mean']:+.4f}{bound}"
        lines.append(f"| {name} | {row['steps']} | {n} | {group_loss(row)} | "
                     f"{diff_cell} | {test_cell} | {target_cell} | {reaching} |")
    lines += ["", "Per seed, at the best LR: final val loss (steps its own val curve needs to reach the target).", "",
              "| optimizer | steps | best LR | per seed |", "|---|---:|---:|---|"]
    for row in groups:
        seeds = ", ".join(f"s{s['seed']}: {s['val_loss']:.4f} ("
                          + ("not reached" if s["steps_to_target"] is None else f"{s['steps_to_target']:.1f}") + ")"
                          for s in row["per_seed"])
        best = "—" if row["best_lr"] is None else f"{row['best_lr']:.3g}"
        lines.append(f"| {row['label']} | {row['steps']} | {best} | {seeds or group_loss(row)} |")
    lines += ["", "In words:", ""]
    for row in groups[1:]:
        head = f"- **{row['label']}** at {row['steps']} steps ({row['fraction']:g}T)"
        if row["vs_baseline"] is None:
            lines.append(f"{head}: no LR at which every seed finished: no test.")
            continue
        n = len(row["per_seed"])
        target = row["reaches_target"]
        lines.append(
            f"{head}, n = {n}, vs **{base['label']}** at {base['steps']} steps, n = {len(base['per_seed'])}. "
            f"Lower final val loss than {base['label']}: {verdict_words(row['vs_baseline'], 'Welch', alpha)}. "
            f"Reaches the target {target['target']:.4f}: {verdict_words(target, 'one-sample', alpha)}; "
            f"{target['seeds_reaching']} of {n} seeds reach it within {row['steps']} steps.")
    return lines


def tuning_lines(results: dict) -> list[str]:
    """results.md's tuning section, for an optimizer with several groups at one budget (a grid
    over its own knobs as variants): the settings finished, the best and the spread over them."""
    grids: dict[tuple[str, int], list[dict]] = {}
    for row in results["groups"]:
        grids.setdefault((row["optimizer"], row["steps"]), []).append(row)
    grids = {key: rows for key, rows in grids.items() if len(rows) > 1}
    if not grids:
        return []
    lines = ["", "## Tuning grids", "",
             ("Per optimizer, over its groups at one budget and their LRs (a setting: one group at one LR, its "
              "final val loss the mean over the seeds): the best setting and the spread (worst − best) over the "
              "settings finished so far, a measure of how much its knobs matter."), "",
             "| optimizer | steps | settings finished | best setting | best | worst | spread |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for (optimizer, steps), rows in grids.items():
        done = [(lr_row["val_loss_mean"], row["label"], lr_row["lr"]) for row in rows for lr_row in row["lrs"]
                if lr_row["val_loss_mean"] is not None]
        total = sum(len(row["lrs"]) for row in rows)
        if not done:
            lines.append(f"| {optimizer} | {steps} | 0 of {total} | — | — | — | — |")
            continue
        (best, label, lr), worst = min(done), max(done)[0]
        lines.append(f"| {optimizer} | {steps} | {len(done)} of {total} | {label} at LR {lr:.3g} | {best:.4f} | "
                     f"{worst:.4f} | {worst - best:.4f} |")
    return lines


SOPHIA_FRACTIONS = (0.05, 0.25, 0.5, 1.0)


def sophia_lines(results: dict) -> list[str]:
    """results.md's section on the groups that log Sophia's statistics, at their best LR: the win
    rate and ‖h‖ at a few points of the run and the win rate over the whole run."""
    rows = [row for row in results["groups"] if row["train_stats"] and "win_rate" in row["train_stats"]]
    if not rows:
        return []
    lines = ["", "## Sophia's statistics", "",
             ("At each group's best LR, means over its seeds. Win rate: the fraction of coordinate updates "
              "not clipped (|m| < max(ρ·h, ε); the others move by lr·sign(m)), counted every stats_every-th step: in "
              "the logged window that covers each point of the run (as a fraction of its steps), and over the "
              "whole run; ‖h‖: the l2 norm of the Hessian EMA."), "",
             "| group | steps | best LR | " + " | ".join(f"win rate {f:.0%}" for f in SOPHIA_FRACTIONS)
             + " | win rate over the run | " + " | ".join(f"‖h‖ {f:.0%}" for f in SOPHIA_FRACTIONS) + " |",
             "|---|---:|---:|" + "---:|" * (2 * len(SOPHIA_FRACTIONS) + 1)]

    def cells(row: dict, key: str, fmt: str) -> str:
        values = [at_fraction(row["train_stats"], key, row["steps"], f) for f in SOPHIA_FRACTIONS]
        return " | ".join("—" if v is None else format(v, fmt) for v in values)

    for row in rows:
        overall = run_mean(row["train_stats"], "win_rate")
        lines.append(f"| {row['label']} | {row['steps']} | {row['best_lr']:.3g} | {cells(row, 'win_rate', '.3f')} | "
                     f"{overall:.3f} | {cells(row, 'hessian_norm', '.3g')} |")
    return lines


def markdown(results: dict, plots: list[Path]) -> str:
    """results.md: the summary table, the tests against the baseline, every LR's losses and the plots."""
    seeds = ", ".join(map(str, results["seeds"]))
    target = "—" if results["target_val_loss"] is None else f"{results['target_val_loss']:.4f}"
    lines = [
        "# Optimizer comparison", "",
        f"Baseline **{results['baseline']}** at T = {results['T']} steps; seeds {seeds}; "
        + f"train.py {shlex.join(results['train_args'])}.",
        f"Target: the tuned baseline's final validation loss, {target} (mean over {len(results['seeds'])} seed(s)).",
        "",
        "| optimizer | steps | best LR | final val loss (mean ± std) | steps to target | speed-up |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for row in results["groups"]:
        edge = " *" if row.get("best_at_edge") else ""
        best = "—" if row["best_lr"] is None else f"{row['best_lr']:.3g}{edge}"
        steps_cell, speed_cell = fmt_speedup(row)
        lines.append(f"| {row['label']} | {row['steps']} | {best} | {group_loss(row)} | {steps_cell} | {speed_cell} |")
    lines += [
        "",
        ("Speed-up = T / the steps the optimizer needs, at its best LR, to reach the target (validation curve "
         "averaged over seeds, linear between evaluations); 2.00x is the paper's claim for Sophia at T/2. "
         "Std is the sample standard deviation over seeds (none for one seed). * = best LR at the edge of the grid: extend the grid."),
    ]
    variants = [row for row in results["groups"] if row["overrides"]]
    if variants:
        lines += ["", "Variants: " + "; ".join(f"{row['label']} = {shlex.join([row['optimizer'], *row['overrides']])}"
                                                for row in variants) + "."]
    lines += tuning_lines(results)
    lines += sophia_lines(results)
    lines += significance_lines(results)
    lines += downstream_lines(results)
    lines += [
        "", "## Every learning rate", "",
        "| optimizer | steps | LR | final val loss (mean ± std) | per seed |", "|---|---:|---:|---|---|",
    ]
    for row in results["groups"]:
        for lr_row in row["lrs"]:
            seeds = ", ".join(f"s{r['seed']}: " + ("—" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
                              + ("" if r["state"] in ("ok", "done") else f" ({r['state']})") for r in lr_row["runs"])
            lines.append(f"| {row['label']} | {row['steps']} | {lr_row['lr']:.3g} | "
                         f"{fmt_loss(lr_row['val_loss_mean'], lr_row['val_loss_std'], lr_row['runs'])} | {seeds} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"

"""Fair optimizer comparison, following the Sophia paper's methodology (Sec. 3.2).

    python -m scripts.compare config/train_shakespeare_char.py --hess_batch_size=6 \\
        --optimizers adamw,sophiag,lion --steps 2000 --lr_grid 0.5,1,2 --seeds 1,2,3 \\
        --runs_dir out-compare --jobs 2

The baseline (--baseline, default adamw) runs T = --steps steps; every other optimizer runs
its budget, a fraction of T (`sophiag:0.5`, or the defaults: Sophia T/2, Lion and AdamW T).
Every run has its own cosine schedule (lr_decay_iters = max_iters = its budget, min_lr at
the configured min_lr / learning_rate ratio) and a peak-LR sweep with the same grid
density for every optimizer: --lr_grid multiplies each optimizer's configured LR, or
--lrs OPT=a,b,c gives explicit lists (all of the same length). The warmup is the same
number of steps in every run: T x the baseline config's warmup_iters / max_iters (or
--warmup_iters), unless a variant tunes it (below). Everything else comes from the config and
is checked to be identical across optimizers (data, batch, model, clipping, evaluation);
weight decay and betas are each optimizer's own. Seeds (--seeds) change init, data order and
estimator draws.

Variants (--variant, repeatable) are further groups for ablations: "LABEL=OPT[:FRACTION]
--key=value ..." runs OPT under the name LABEL with its own train.py overrides, at FRACTION of
T (default 1), e.g. --variant "k1=sophiag --hess_interval=1"; --baseline may name one. A
variant may not change the settings that keep the comparison fair (below), but may set its own
--warmup_iters: a tuning grid over an optimizer's own knobs is variants of it (e.g. "adamw_b95_w20=adamw
--beta2=0.95 --warmup_iters=4000"), each with the same number of LRs.

The config for optimizer OPT is --config_for OPT=FILE, else the variant <family>_OPT.py
next to the base config (train_gpt2_small_adamw.py -> train_gpt2_small_sophiag.py,
train_shakespeare_char.py -> train_shakespeare_char_sophiag.py) when it exists, else
<family>.py, else the base config; --optimizer_name=OPT is always passed. Extra
--key=value arguments go to every run, after the config file.

Each run is a subprocess `python train.py CONFIG --key=value ...` (the commands are
printed) with out_dir <runs_dir>/<label>_T<steps>_lr<lr>_s<seed> (label: the optimizer or the
variant) and its console output in train.log there; --jobs N runs N at a time, each with
--threads / N OpenMP threads. Runs start round-robin over the groups (every group's first run,
then every group's second, ...), so a study stopped half-way has every group's grid filled to
the same depth. A run whose metrics.jsonl has an evaluation at max_iters is
finished and not rerun; any other (unfinished, crashed, failed) is started again with
--init_from=auto, which resumes from its latest checkpoint. A reused out_dir whose
config.json differs is refused.

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

--no_train starts no run: the finished ones are summarized (and scored, below), the others
count as "not run" (e.g. while they still train elsewhere).

Downstream scores (optional): --hellaswag PATH (hellaswag_val.jsonl; --hellaswag_limit N: its
first N examples) scores HellaSwag acc_norm and acc with scripts/eval_hellaswag.py, and
--superglue DIR (--superglue_tasks, --superglue_limit N: the first N validation examples of each
task) the paper's 2-shot SuperGLUE accuracies and their average with scripts/eval_downstream.py,
on --eval_device (default auto). Scored are the runs at each group's best LR (every seed
finished there), each run's latest checkpoint, by the eval script in a subprocess (printed;
its output appended to the run's downstream.log; its report in hellaswag.json or
superglue.json/.md there); results: mean ± std over the seeds in results.md's Downstream table.
Each result is kept in the run's downstream.json under what it depends on (the data's sha256,
limit, tasks, protocol, and the checkpoint's file, step, size and mtime), so a rerun scores only
what is new or changed; a failed scoring is tried again next time. A run without a checkpoint
is "no checkpoint"; a model that cannot take the data is "n/a (tokenizer)" (a character the
vocabulary lacks: the character-level Shakespeare runs) or "n/a (block_size)" (a HellaSwag
ending longer than the context): reported, not fatal. The latest checkpoint is the final one
unless the config sets always_save_checkpoint=False and the last evaluation did not improve the
val loss (then the best one): the table shows the step scored.

Writes into --results_dir (default: runs_dir; several comparisons can share one runs_dir and
so reuse each other's finished runs): results.md (tables), the plots of
scripts/plot_compare.py, and
results.json = {baseline, T, seeds, lr_grid, alpha, train_args, target_val_loss, downstream (null
without --hellaswag/--superglue, else {hellaswag: {data, sha256, limit, examples}, superglue:
{data, sha256, tasks, limit, num_fewshot, num_draws, seed}}, each only when asked for), groups: [one per
optimizer or variant and budget: {label, optimizer, overrides, fraction, steps, config, warmup_iters, min_lr_ratio,
best_lr, best_at_edge, val_loss_mean, val_loss_std (final val loss at the best LR over
seeds; null if no LR had every seed finish with a finite loss), steps_to_target, speedup (null:
not reached), lrs: [{lr, val_loss_mean, val_loss_std, runs: [{seed, out_dir, val_loss, state ("done":
finished before, "ok", "failed (exit N)" or "not run")}]}],
curve: {iters, val_loss, val_loss_min, val_loss_max}, train_stats: {iters, clip_frac,
loss, and for Sophia win_rate, hessian_norm} (means over seeds at the best LR),
clip_frac_overall, per_seed: [{seed, val_loss, steps_to_target}] (at the best LR; [] if none),
vs_baseline: {test, n, n_baseline, diff_mean (group - baseline), diff_std_err (null: n = 1),
diff_upper_bound (one-sided 1 - alpha confidence bound), t, df, p_one_sided, significant,
no_test (why there is none, else null; then diff_upper_bound ... significant are null)},
reaches_target: {test, target, n, seeds_reaching (seeds whose own curve reaches the target),
diff_mean (group - target), diff_std_err, diff_upper_bound, t, df, p_one_sided, significant,
no_test} (both null for the baseline and for a group or baseline without a finished LR),
downstream (null without --hellaswag/--superglue): {hellaswag: {n (seeds scored), n_runs (seeds
at the best LR; 0: none finished), status (why the others were not: "no checkpoint", "n/a
(tokenizer)", "n/a (block_size)", "failed", comma-joined; null: all scored), steps (checkpoint
steps scored), acc_norm_mean, acc_norm_std, acc_mean, acc_std (sample std over the seeds scored;
null: none), per_seed: [{seed, out_dir, status, step, cached, and when ok acc_norm, acc, examples,
truncated; else error}]}, superglue: {n, n_runs, status, steps, average_mean, average_std
(accuracy as a fraction, the mean over the tasks), tasks: {task: {mean, std}}, per_seed: [{seed,
out_dir, status, step, cached, and when ok average, tasks: {task: accuracy}, truncated: {task:
fraction of prompts cut}}]}}}]}.
"""

import argparse
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import configurator
from dataset import prepare_dataset
from metrics import read_metrics as read_records
from runtime import ROOT, UserError, comma_list, exit_on_user_error, shown
from scripts.downstream_scores import add_downstream, benchmarks, downstream_lines
from scripts.plot_compare import plot_all
from scripts.significance import mean_std, target_test, welch_test

TRAIN = ROOT / "train.py"
# train.py's defaults and optimizers, read from its source: planning runs imports no training code.
DEFAULTS = configurator.read_defaults(TRAIN)
OPTIMIZERS: tuple[str, ...] = configurator.read_literals(TRAIN)["OPTIMIZERS"]

DEFAULT_FRACTIONS = {"adamw": 1.0, "lion": 1.0, "sophiag": 0.5, "sophiah": 0.5}
# Keys the runner sets per run; an override of them would be silently replaced. A variant may set
# its own warmup (a tuned knob); the runner then uses it for that variant's runs.
RUNNER_KEYS = {"max_iters": "--steps", "lr_decay_iters": "--steps", "warmup_iters": "--warmup_iters",
               "learning_rate": "--lr_grid or --lrs", "min_lr": "the config's min_lr/learning_rate ratio",
               "seed": "--seeds", "out_dir": "--runs_dir", "init_from": "the runner (auto on resume)",
               "optimizer_name": "--optimizers"}
# Settings that must be the same for every optimizer for the comparison to be fair.
FAIR_KEYS = ("dataset", "batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
             "dropout", "bias", "scale_attn_by_inverse_layer_idx", "grad_clip", "decay_lr", "eval_interval",
             "eval_iters", "dtype")


@dataclass(frozen=True)
class Budget:
    """An optimizer, or a variant of one (its own label and overrides), at a fraction of T."""
    label: str
    optimizer: str
    fraction: float
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """One optimizer or variant at one step budget, with its LR sweep."""
    label: str
    optimizer: str
    fraction: float
    steps: int
    config: str  # config file as passed to train.py (relative to the repository when inside it)
    lrs: tuple[float, ...]
    min_lr_ratio: float
    warmup_iters: int
    overrides: tuple[str, ...] = ()  # a variant's own train.py overrides


@dataclass(frozen=True)
class Run:
    group: Group
    lr: float
    seed: int
    out_dir: Path
    args: tuple[str, ...]  # train.py's arguments, config file first


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The runner's options and the --key=value overrides passed on to every run."""
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", usage="%(prog)s CONFIG [options] [--key=value ...]", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # else --seed=1 would silently mean --seeds
    p.add_argument("config", help="base config file, e.g. config/train_shakespeare_char.py")
    p.add_argument("--optimizers", default="adamw,sophiag",
                   help="comma list of OPT or OPT:FRACTION of T (default fractions: sophia 0.5, others 1)")
    p.add_argument("--variant", action="append", default=[], metavar='"LABEL=OPT[:FRACTION] --key=value ..."',
                   help="an extra group: OPT with its own overrides, named LABEL (repeatable)")
    p.add_argument("--baseline", default="adamw",
                   help="the optimizer or variant whose tuned T-step loss is the target")
    p.add_argument("--steps", type=int, help="T, the baseline's steps (default: the config's max_iters)")
    p.add_argument("--lr_grid", default="0.5,1,2", help="multipliers of each optimizer's configured learning_rate")
    p.add_argument("--lrs", action="append", default=[], metavar="OPT=LR,LR,...",
                   help="explicit peak LRs for one optimizer (repeatable); as many as the grid")
    p.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the one-sided tests against the baseline (default 0.05)")
    p.add_argument("--warmup_iters", type=int,
                   help="warmup steps of every run (default: the config's warmup fraction of T)")
    p.add_argument("--config_for", action="append", default=[], metavar="OPT=FILE",
                   help="config file for one optimizer (repeatable)")
    p.add_argument("--runs_dir", default="out-compare", help="folder of the runs, results and plots")
    p.add_argument("--results_dir", default=None, help="folder of the results and plots (default: --runs_dir)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared out over the parallel runs (default: all cores)")
    p.add_argument("--no_train", action="store_true",
                   help="start no training run: summarize (and score) the finished runs; others count as not run")
    d = p.add_argument_group("downstream scores of each group's best-LR runs (cached in each run's downstream.json)")
    d.add_argument("--hellaswag", metavar="PATH", help="HellaSwag jsonl (hellaswag_val.jsonl): acc_norm and acc")
    d.add_argument("--hellaswag_limit", type=int, default=0, metavar="N",
                   help="score only the first N HellaSwag examples (default 0: all)")
    d.add_argument("--superglue", metavar="DIR",
                   help="SuperGLUE folder of scripts/eval_downstream.py: 2-shot accuracy per task and the average")
    d.add_argument("--superglue_tasks", default="boolq,rte,cb,copa", help="comma list (default: the paper's four)")
    d.add_argument("--superglue_limit", type=int, default=0, metavar="N",
                   help="score only the first N validation examples of each task (default 0: all)")
    d.add_argument("--eval_device", default="auto", help="device of the scoring: auto, cpu, cuda, cuda:N or mps")
    args, extra = p.parse_known_args(argv)
    check_overrides(extra, "expected a runner option (see --help) or a train.py override --key=value")
    if args.jobs < 1 or args.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    if args.hellaswag_limit < 0 or args.superglue_limit < 0:
        raise UserError("--hellaswag_limit and --superglue_limit must be at least 0 (0: all)")
    if not 0 < args.alpha < 0.5:
        raise UserError(f"--alpha={args.alpha:g}: a one-sided significance level needs 0 < alpha < 0.5")
    return args, extra


def check_overrides(items: list[str], expected: str, allowed: tuple[str, ...] = ()) -> None:
    for arg in items:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"{arg}: {expected}")
        key = arg[2:].split("=", 1)[0]
        if key in RUNNER_KEYS and key not in allowed:
            raise UserError(f"{arg}: the runner sets {key} for every run; use {RUNNER_KEYS[key]} instead")


def key_values(items: list[str], what: str, names: tuple[str, ...] = OPTIMIZERS) -> dict[str, str]:
    """NAME=VALUE pairs of a repeatable option, NAME one of `names`."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise UserError(f"{what} {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        pairs[key] = value
    return pairs


def optimizer_fraction(item: str, default: float, what: str) -> tuple[str, float]:
    """OPT[:FRACTION] -> (OPT, fraction of T)."""
    name, _, fraction = item.strip().partition(":")
    if name not in OPTIMIZERS:
        raise UserError(f"{what}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    try:
        value = float(fraction) if fraction else default
    except ValueError:
        value = math.nan
    if not value > 0:
        raise UserError(f"{what}: {item!r} needs a positive fraction of T")
    return name, value


def parse_variant(text: str) -> Budget:
    """'LABEL=OPT[:FRACTION] --key=value ...' -> Budget."""
    try:
        words = shlex.split(text)
    except ValueError as e:  # an unclosed quote
        raise UserError(f"--variant {text!r}: {e}") from None
    label, sep, spec = words[0].partition("=") if words else ("", "", "")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise UserError(f"--variant {text!r}: expected LABEL=OPT[:FRACTION] --key=value ..., with a label of "
                        "letters, digits, '_', '-' or '.'")
    if label in OPTIMIZERS:
        raise UserError(f"--variant {text!r}: the label {label!r} is an optimizer's name; pick another")
    check_overrides(words[1:], f"in --variant {text!r}: expected train.py overrides --key=value", ("warmup_iters",))
    name, fraction = optimizer_fraction(spec, 1.0, f"--variant {text!r}")
    return Budget(label, name, fraction, tuple(words[1:]))


def optimizer_budgets(text: str, baseline: str, variant_specs: list[str] = ()) -> list[Budget]:
    """The groups to run: the baseline at T first, then --optimizers (duplicates dropped), then
    the variants."""
    variants = [parse_variant(v) for v in variant_specs]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise UserError(f"--variant: a label is used twice ({', '.join(labels)})")
    by_label = {v.label: v for v in variants}
    if baseline in by_label:
        budgets = [Budget(baseline, by_label[baseline].optimizer, 1.0, by_label[baseline].overrides)]
    elif baseline in OPTIMIZERS:
        budgets = [Budget(baseline, baseline, 1.0)]
    else:
        raise UserError(f"--baseline={baseline!r} is neither an optimizer ({', '.join(OPTIMIZERS)}) "
                        f"nor a --variant label")
    for item in comma_list(text, str, "--optimizers") if text else []:
        name = item.strip().partition(":")[0]
        default = 1.0 if name == baseline else DEFAULT_FRACTIONS.get(name, 1.0)
        name, fraction = optimizer_fraction(item, default, "--optimizers")
        if Budget(name, name, fraction) not in budgets:
            budgets.append(Budget(name, name, fraction))
    return budgets + [v for v in variants if v.label != baseline]


# ----------------------------------------------------------------------------- the plan

def optimizer_config(base: Path, optimizer: str, explicit: dict[str, str]) -> Path:
    """The config file for one optimizer: explicit, else the <family>_<opt>.py variant, else
    <family>.py (so another optimizer's variant is not used for this one), else the base."""
    if optimizer in explicit:
        return Path(explicit[optimizer])
    family = base.stem
    for name in OPTIMIZERS:
        family = family.removesuffix(f"_{name}")
    for candidate in (base.with_name(f"{family}_{optimizer}.py"), base.with_name(f"{family}.py")):
        if candidate.is_file():
            return candidate
    return base


def resolve(train_args: list[str] | tuple[str, ...]) -> dict:
    """The config train.py would run with these arguments (config paths relative to ROOT)."""
    absolute = [a if a.startswith("--") else str(ROOT / a) for a in train_args]
    return configurator.parse(DEFAULTS, absolute)


def check_with_train(train_args: dict[str, list[str]], configs: dict[str, str]) -> None:
    """train.py's own checks of every group's config (`train.py --check`, one start-up for
    all), before any run starts."""
    proc = subprocess.run([sys.executable, str(TRAIN), "--check"], input=json.dumps(list(train_args.values())),
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"train.py --check failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    for label, checked in zip(train_args, json.loads(proc.stdout)):
        if "error" in checked:
            raise UserError(f"{label} ({configs[label]}): {checked['error']}")


def plan(args: argparse.Namespace, overrides: list[str]) -> tuple[list[Group], list[Run]]:
    """Every group (optimizer x budget) and run (x LR x seed), checked before anything starts."""
    base = Path(args.config)
    if not base.is_file():
        raise UserError(f"config file {args.config} not found")
    budgets = optimizer_budgets(args.optimizers, args.baseline, args.variant)
    labels = tuple(dict.fromkeys((*OPTIMIZERS, *(b.label for b in budgets))))
    explicit_configs = key_values(args.config_for, "--config_for")
    explicit_lrs = {k: comma_list(v, float, f"--lrs {k}") for k, v in key_values(args.lrs, "--lrs", labels).items()}
    grid = comma_list(args.lr_grid, float, "--lr_grid")
    seeds = comma_list(args.seeds, int, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds={args.seeds}: a seed is listed twice")

    def explicit(b: Budget) -> list[float] | None:
        return explicit_lrs.get(b.label) or explicit_lrs.get(b.optimizer)

    lengths = {len(explicit(b)) if explicit(b) else len(grid) for b in budgets}
    if len(lengths) > 1:
        raise UserError(f"every optimizer needs the same number of LRs (grid density); got {sorted(lengths)} "
                        f"from --lr_grid and --lrs")

    configs = {b.label: shown(optimizer_config(base, b.optimizer, explicit_configs)) for b in budgets}
    train_args = {b.label: [configs[b.label], *overrides, *b.overrides, f"--optimizer_name={b.optimizer}"]
                  for b in budgets}
    resolved = {label: resolve(a) for label, a in train_args.items()}
    baseline_cfg = resolved[budgets[0].label]
    for label, cfg in resolved.items():
        if not cfg["learning_rate"] > 0 or cfg["max_iters"] <= 0:
            raise UserError(f"{configs[label]}: learning_rate and max_iters must be positive to scale the sweep")
        unfair = [k for k in FAIR_KEYS if cfg[k] != baseline_cfg[k]]
        if unfair:
            k = unfair[0]
            raise UserError(f"{label} ({configs[label]}) sets {k}={cfg[k]!r} but the baseline has "
                            f"{baseline_cfg[k]!r}; the comparison needs the same {', '.join(unfair)} "
                            f"for every optimizer: pass --{k}=... to set it for all")
    T = args.steps if args.steps is not None else baseline_cfg["max_iters"]
    if T < 1:
        raise UserError("--steps must be at least 1")
    # The same warmup in steps for every run, as in the paper (2K steps for 100K-400K runs):
    # the baseline config's warmup fraction of T.
    warmup = args.warmup_iters
    if warmup is None:
        warmup = round(T * baseline_cfg["warmup_iters"] / baseline_cfg["max_iters"])

    groups, runs = [], []
    for b in budgets:
        cfg = resolved[b.label]
        lrs = tuple(explicit(b) or [m * cfg["learning_rate"] for m in grid])
        if len(set(lrs)) != len(lrs) or min(lrs) <= 0:
            raise UserError(f"{b.label}: the LRs {', '.join(map(str, lrs))} must be positive and distinct")
        own_warmup = any(o.startswith("--warmup_iters=") for o in b.overrides)
        group = Group(b.label, b.optimizer, b.fraction, max(1, round(b.fraction * T)), configs[b.label], lrs,
                      cfg["min_lr"] / cfg["learning_rate"], cfg["warmup_iters"] if own_warmup else warmup,
                      b.overrides)
        groups.append(group)
        runs += [make_run(group, lr, seed, Path(args.runs_dir), overrides) for lr in lrs for seed in seeds]
    # Checked as each group's runs will run (its steps and warmup), its first run standing for all.
    check_with_train({g.label: list(next(r for r in runs if r.group == g).args) for g in groups}, configs)
    return groups, runs


def make_run(group: Group, lr: float, seed: int, runs_dir: Path, overrides: list[str]) -> Run:
    out_dir = runs_dir / f"{group.label}_T{group.steps}_lr{lr:.4g}_s{seed}"
    args = (group.config, *overrides, *group.overrides, f"--optimizer_name={group.optimizer}", f"--max_iters={group.steps}",
            f"--lr_decay_iters={group.steps}", f"--warmup_iters={group.warmup_iters}", f"--learning_rate={lr!r}",
            f"--min_lr={lr * group.min_lr_ratio!r}", f"--seed={seed}", f"--out_dir={shown(out_dir)}")
    return Run(group, lr, seed, out_dir, args)


# ----------------------------------------------------------------------------- running

def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(eval records, train records) of a run's metrics.jsonl, by iter; none before it starts."""
    records = read_records(path) if path.exists() else {}
    return records.get("eval", []), records.get("train", [])


def is_finished(run: Run) -> bool:
    evals, _ = read_metrics(run.out_dir / "metrics.jsonl")
    return any(e["iter"] == run.group.steps for e in evals)


def check_reused(run: Run) -> None:
    """Refuse to count or resume a run in out_dir that was started with other settings."""
    saved_path = run.out_dir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    wanted = json.loads(json.dumps(resolve(run.args)))
    changed = [k for k in wanted if k in saved and k != "init_from" and saved[k] != wanted[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{run.out_dir} holds a run with {k}={saved[k]!r}, not {wanted[k]!r}; use a new "
                        f"--runs_dir or delete that folder")


def command(run: Run, threads: int, resume: bool) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "train.py", *run.args] + (["--init_from=auto"] if resume else [])
    # Torch sizes its intra-op pool from OMP_NUM_THREADS: parallel runs must not oversubscribe.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return args, env


def round_robin(runs: list[Run]) -> list[Run]:
    """The runs reordered: every group's first run, then every group's second, ..."""
    by_group: dict[Group, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    return [run for turn in itertools.zip_longest(*by_group.values()) for run in turn if run is not None]


def execute(runs: list[Run], jobs: int, threads: int, train: bool = True) -> dict[Run, str]:
    """Run what is not finished (`jobs` at a time); returns each run's state: 'done'
    (finished before), 'ok', 'failed (exit N)', or with train=False 'not run'."""
    states: dict[Run, str] = {}
    todo = []
    for run in runs:
        check_reused(run)
        if is_finished(run):
            states[run] = "done"
            print(f"finished, not rerun: {shown(run.out_dir)}")
        elif not train:
            states[run] = "not run"
            print(f"not finished, not run (--no_train): {shown(run.out_dir)}")
        else:
            todo.append(run)
    if not todo:
        return states
    todo = round_robin(todo)
    print(f"{len(todo)} run(s) to do, {jobs} at a time, commands run in {ROOT}:")
    lock = threading.Lock()
    per_job = max(1, threads // jobs)

    def one(run: Run) -> None:
        resume = (run.out_dir / "metrics.jsonl").exists()
        argv, env = command(run, per_job, resume)
        line = " ".join(f"{k}={v}" for k, v in env.items()) + " python " + shlex.join(argv[1:])
        with lock:
            print(("$ (resume) " if resume else "$ ") + line, flush=True)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run.out_dir / "train.log", "a") as log:
            # check=False: a failed run is reported and the others go on.
            code = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT, check=False).returncode
        states[run] = "ok" if code == 0 and is_finished(run) else f"failed (exit {code})"
        with lock:
            print(f"  {shown(run.out_dir)}: {states[run]} in {time.perf_counter() - t0:.1f}s"
                  + ("" if states[run] == "ok" else f", see {shown(run.out_dir / 'train.log')}"), flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))  # list() re-raises a worker's exception
    return states


# ----------------------------------------------------------------------------- results

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


def curves(runs: list[Run]) -> dict:
    """Validation curve (mean, min, max over seeds) and training statistics of some runs."""
    metrics = [read_metrics(r.out_dir / "metrics.jsonl") for r in runs]
    val = seed_mean_series([m[0] for m in metrics], ("val_loss",))
    per_iter = [{e["iter"]: e["val_loss"] for e in m[0]} for m in metrics]
    val["val_loss_min"] = [min(p[i] for p in per_iter) for i in val["iters"]]
    val["val_loss_max"] = [max(p[i] for p in per_iter) for i in val["iters"]]
    stats = seed_mean_series([m[1] for m in metrics], ("clip_frac", "win_rate", "hessian_norm", "loss"))
    return {"curve": val, "train_stats": stats, "clip_frac_overall": overall_clip_fraction(stats)}


def overall_clip_fraction(stats: dict) -> float | None:
    """Fraction of all steps with gradient clipping: each record covers the steps since the previous one."""
    if "clip_frac" not in stats or not stats["iters"]:
        return None
    spans = [b - a for a, b in zip([0] + stats["iters"][:-1], stats["iters"])]
    return sum(s * f for s, f in zip(spans, stats["clip_frac"])) / sum(spans)


def summarize(groups: list[Group], runs: list[Run], states: dict[Run, str], args: argparse.Namespace,
              overrides: list[str]) -> dict:
    """results.json's content: per group every LR's losses, the best LR, its curves and the speed-up."""
    runs_dir = Path(args.runs_dir)
    out_groups, at_best = [], []
    for group in groups:
        lr_rows, best = [], None
        for lr in group.lrs:
            mine = [r for r in runs if r.group == group and r.lr == lr]
            losses = [final_val_loss(r) for r in mine]
            mean, std = mean_std(losses)
            lr_rows.append({"lr": lr, "val_loss_mean": mean, "val_loss_std": std,
                            "runs": [{"seed": r.seed, "out_dir": str(r.out_dir.relative_to(runs_dir)),
                                      "val_loss": v if math.isfinite(v) else None, "state": states.get(r, "not run")}
                                     for r, v in zip(mine, losses)]})
            if mean is not None and (best is None or mean < best[1]):
                best = (lr, mean, std, mine)
        row = {"label": group.label, "optimizer": group.optimizer, "overrides": list(group.overrides),
               "fraction": group.fraction, "steps": group.steps,
               "config": group.config, "warmup_iters": group.warmup_iters, "min_lr_ratio": group.min_lr_ratio,
               "best_lr": None, "best_at_edge": False, "val_loss_mean": None, "val_loss_std": None,
               "lrs": lr_rows}
        if best is not None:
            lr, mean, std, best_runs = best
            row.update(best_lr=lr, val_loss_mean=mean, val_loss_std=std,
                       best_at_edge=len(group.lrs) > 1 and lr in (min(group.lrs), max(group.lrs)), **curves(best_runs))
        out_groups.append(row)
        at_best.append(best[3] if best is not None else [])

    baseline = out_groups[0]
    target = baseline["val_loss_mean"]
    for row in out_groups:
        steps = None
        if target is not None and row["best_lr"] is not None:
            steps = steps_to_reach(row["curve"]["iters"], row["curve"]["val_loss"], target)
        row["steps_to_target"] = steps
        row["speedup"] = baseline["steps"] / steps if steps else None
    for row, best_runs in zip(out_groups, at_best):
        row["per_seed"] = [{"seed": r.seed, "val_loss": final_val_loss(r),
                            "steps_to_target": None if target is None else run_steps_to_target(r, target)}
                           for r in best_runs]
    baseline_losses = [s["val_loss"] for s in baseline["per_seed"]]
    for i, row in enumerate(out_groups):
        losses = [s["val_loss"] for s in row["per_seed"]]
        tested = i > 0 and bool(losses) and bool(baseline_losses)
        reaching = sum(s["steps_to_target"] is not None for s in row["per_seed"])
        row["vs_baseline"] = welch_test(losses, baseline_losses, args.alpha) if tested else None
        row["reaches_target"] = target_test(losses, target, reaching, args.alpha) if tested else None
    return {"baseline": baseline["label"], "T": baseline["steps"], "seeds": comma_list(args.seeds, int, "--seeds"),
            "lr_grid": comma_list(args.lr_grid, float, "--lr_grid"), "alpha": args.alpha,
            "train_args": [args.config, *overrides], "target_val_loss": target, "groups": out_groups}


# ----------------------------------------------------------------------------- results.md

def fmt_loss(mean: float | None, std: float | None, runs: list[dict]) -> str:
    """A final val loss cell: mean ± std over the seeds, or why there is none, from `runs`
    (results.json's, of one LR or a whole group): "failed" if one failed or diverged, else
    "not run" if none has finished (--no_train, or still training elsewhere), else "K of N not run"."""
    if mean is not None:  # every run of `runs` finished; one seed has no spread to show
        return f"{mean:.4f}" if len(runs) == 1 else f"{mean:.4f} ± {std:.4f}"
    if any(r["state"].startswith("failed") or r["state"] in ("ok", "done") and r["val_loss"] is None for r in runs):
        return "failed"
    waiting = sum(r["state"] == "not run" for r in runs)
    return "not run" if waiting == len(runs) else f"{waiting} of {len(runs)} not run"


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


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the comparison, write results.json, results.md and the plots; returns the results."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    benches = benchmarks(args)  # the downstream data read and checked before anything runs
    groups, runs = plan(args, overrides)
    for g in groups:
        definition = f" = {shlex.join([g.optimizer, *g.overrides])}" if g.overrides else ""
        print(f"{g.label}{definition} x {g.fraction:g}T = {g.steps} steps, warmup {g.warmup_iters}, {g.config}, "
              f"LRs {', '.join(f'{lr:.3g}' for lr in g.lrs)}")
    if not args.no_train:
        dataset = resolve([groups[0].config, *overrides])["dataset"]
        prepare_dataset(ROOT / "data" / dataset)  # once, not racing in parallel runs
    states = execute(runs, args.jobs, args.threads, train=not args.no_train)
    out = Path(args.results_dir or args.runs_dir)
    results = summarize(groups, runs, states, args, overrides)
    add_downstream(results, benches, args)
    plots = plot_all(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results, plots))
    print((out / "results.md").read_text().split("\n## Every")[0])
    print(f"wrote {shown(out / 'results.md')}, {shown(out / 'results.json')} and {len(plots)} plots")
    return results


if __name__ == "__main__":
    main()

"""The plan of an optimizer comparison (scripts/compare.py): its groups and runs, checked before
anything runs, following the Sophia paper's methodology (Sec. 3.2).

The baseline (--baseline, default adamw) runs T = --steps steps; every other optimizer runs
its budget, a fraction of T (`sophiag:0.5`, or the defaults: Sophia T/2, Lion and AdamW T).
Every run has its own schedule, cosine or WSD (lr_schedule; lr_decay_iters = max_iters = its
budget, so each run ends its own decay; min_lr at the configured min_lr / learning_rate ratio) and a peak-LR sweep with the same grid
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
variant may not change the settings that keep the comparison fair (FAIR_KEYS), but may set its
own --warmup_iters: a tuning grid over an optimizer's own knobs is variants of it (e.g.
"adamw_b95_w20=adamw --beta2=0.95 --warmup_iters=4000"), each with the same number of LRs.

The config for optimizer OPT is --config_for OPT=FILE, else the variant <family>_OPT.py
next to the base config (train_gpt2_small_adamw.py -> train_gpt2_small_sophiag.py,
train_shakespeare_char.py -> train_shakespeare_char_sophiag.py) when it exists, else
<family>.py, else the base config; --optimizer_name=OPT is always passed. Extra
--key=value arguments go to every run, after the config file.

Each run's out_dir is <runs_dir>/<label>_T<steps>_lr<lr>_s<seed> (label: the optimizer or the
variant). A run whose metrics.jsonl has an evaluation at max_iters is finished; a reused
out_dir whose config.json differs is refused.
"""

import argparse
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import settings
from configurator import comma_list
from errors import UserError
from metrics import read_metrics as read_records
from optimizers import REGISTRY
from paths import ROOT, shown

OPTIMIZERS = tuple(REGISTRY)

DEFAULT_FRACTIONS = {"adamw": 1.0, "lion": 1.0, "sophiag": 0.5, "sophiah": 0.5}
# Keys the runner sets per run; an override of them would be silently replaced. A variant may set
# its own warmup (a tuned knob); the runner then uses it for that variant's runs.
RUNNER_KEYS = {"max_iters": "--steps", "lr_decay_iters": "--steps", "warmup_iters": "--warmup_iters",
               "learning_rate": "--lr_grid or --lrs", "min_lr": "the config's min_lr/learning_rate ratio",
               "seed": "--seeds", "out_dir": "--runs_dir", "init_from": "the runner (auto on resume)",
               "optimizer_name": "--optimizers"}
# Settings that must be the same for every optimizer for the comparison to be fair.
FAIR_KEYS = ("dataset", "batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
             "dropout", "bias", "scale_attn_by_inverse_layer_idx", "grad_clip", "decay_lr", "lr_schedule", "decay_fraction", "eval_interval",
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
    """One training run of a group: an LR and a seed."""
    group: Group
    lr: float
    seed: int
    out_dir: Path
    args: tuple[str, ...]  # train.py's arguments, config file first


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


def resolve(train_args: list[str] | tuple[str, ...]) -> settings.Config:
    """The config train.py would run with these arguments (config paths relative to ROOT), not
    yet checked: the runner adds its own keys (check_with_train checks the runs' arguments)."""
    return settings.parse(list(train_args), root=ROOT)


def check_with_train(train_args: dict[str, list[str]], configs: dict[str, str], world_size: int) -> None:
    """train.py's own checks (settings.resolve) of every group's arguments on `world_size` ranks,
    before any run starts."""
    for label, args in train_args.items():
        try:
            settings.resolve(args, world_size, root=ROOT)
        except UserError as e:
            raise UserError(f"{label} ({configs[label]}): {e}") from None


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
    # Under SLURM each run is one process per GPU on every node of its job.
    world_size = args.nodes * max(1, args.gpus_per_node) if args.launcher == "slurm" else 1
    check_with_train({g.label: list(next(r for r in runs if r.group == g).args) for g in groups}, configs, world_size)
    return groups, runs


def make_run(group: Group, lr: float, seed: int, runs_dir: Path, overrides: list[str]) -> Run:
    out_dir = runs_dir / f"{group.label}_T{group.steps}_lr{lr:.4g}_s{seed}"
    args = (group.config, *overrides, *group.overrides, f"--optimizer_name={group.optimizer}", f"--max_iters={group.steps}",
            f"--lr_decay_iters={group.steps}", f"--warmup_iters={group.warmup_iters}", f"--learning_rate={lr!r}",
            f"--min_lr={lr * group.min_lr_ratio!r}", f"--seed={seed}", f"--out_dir={shown(out_dir)}")
    return Run(group, lr, seed, out_dir, args)


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
    wanted = json.loads(json.dumps(resolve(run.args)))
    # A key newer than the run's config.json counts as its default (what the older code ran with).
    ran = {**json.loads(json.dumps(settings.DEFAULTS)), **json.loads(saved_path.read_text())}
    # out_dir: a run folder copied elsewhere (e.g. from the repository's results) holds the same run.
    changed = [k for k in wanted if k not in ("init_from", "out_dir") and ran.get(k) != wanted[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{run.out_dir} holds a run with {k}={ran.get(k)!r}, not {wanted[k]!r}; use a new "
                        f"--runs_dir or delete that folder")

"""The GPU benchmark (`--what gpu` of scripts/bench_optimizer.py): three train.py
runs of GPT-2 small (AdamW, Sophia-G, Sophia-H with train.py's finite-difference Hessian-vector
product through the compiled model; compile, bf16) on synthetic tokens and the
optimizer step on GPT-2 small and medium shapes, within one time budget, written up as a
Markdown report that marks each of the GPU targets met or missed.

    python -m scripts.bench_optimizer --what gpu [--rehearse] [--budget_s S] [--only ...] [--output FILE]

No entry point of its own, so the command has one parser: scripts/bench_optimizer.py parses the
arguments and calls bench_gpu(); the runs (train.py, bench_optimizer.py's step worker) go through
benchmarking.py's subprocess helpers.
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import settings
from errors import UserError, one_line
from benchmarking import SHAPES, RunFailed, cpu_model, output_tail, run_worker, spawn
from paths import ROOT

GPU_TRAIN = (("adamw", "AdamW"), ("sophiag", "Sophia-G"), ("sophiah", "Sophia-H"))  # train.py's optimizer_name
GPU_STEP = ("adamw_fused", "sophiag_compiled_s10", "sophiag_compiled", "sophiag_foreach")  # in run order
SYNTHETIC_PREFIX = "_bench_synthetic"  # data/<prefix>_<pid>/, deleted after the run
GPT2_VOCAB = 50257
MIN_RUN_S = 15  # a run is started only with at least this much of the budget left


@dataclass(frozen=True)
class GpuPlan:
    """What `--what gpu` runs. The estimates (seconds) are for the plan printed at the start."""
    rehearse: bool
    device: str
    train_label: str
    train_overrides: tuple[str, ...]  # train.py arguments beyond the GPT-2 small configs' own
    compile: bool
    dtype: str
    block_size: int
    batch_size: int
    accum: int
    max_iters: int
    log_interval: int
    skip_windows: int  # windows left out of the medians: compilation, first Hessian refresh
    train_tokens: int
    val_tokens: int
    step_models: tuple[str, ...]
    step_iters: int
    step_warmup: int
    budget_s: float
    threads: int  # torch threads of every subprocess (0: torch's default)
    train_cap_s: float  # the most one training run may take
    step_cap_s: float
    est_train_s: dict[str, float]
    est_step_s: dict[str, float]  # per worker, by optimizer; the medium shapes take est_medium_factor times as long
    est_medium_factor: float = 1.0

    @property
    def sequences(self) -> int:
        return self.batch_size * self.accum

    @property
    def tokens_per_iter(self) -> int:
        return self.sequences * self.block_size


def gpu_plan(rehearse: bool, budget_s: float | None) -> GpuPlan:
    if rehearse:  # the same path on the CPU, small enough for a test: compile=False, 128 tokens a step, 1 thread
        return GpuPlan(
            rehearse=True, device="cpu", train_label="tiny GPT (2 layers x 64, GPT-2's vocabulary)",
            train_overrides=("--n_layer=2", "--n_head=2", "--n_embd=64"),
            compile=False, dtype="bfloat16", block_size=32, batch_size=2, accum=2, max_iters=40, log_interval=10,
            skip_windows=2, train_tokens=1 << 20, val_tokens=1 << 16, step_models=("tiny", "tiny2"),
            step_iters=10, step_warmup=10, budget_s=budget_s or 900, threads=1, train_cap_s=300, step_cap_s=300,
            est_train_s={"adamw": 8, "sophiag": 9, "sophiah": 9},
            est_step_s={"adamw_fused": 4, "sophiag_compiled_s10": 20, "sophiag_compiled": 8, "sophiag_foreach": 4})
    # One H100/H200: GPT-2 small at ~45% MFU takes ~0.13 s per 65K-token iteration, so compiling
    # (about a minute for the model's first graphs; inductor's on-disk cache serves later processes)
    # dominates: the estimates below are that, not measurements.
    return GpuPlan(
        rehearse=False, device="cuda", train_label="GPT-2 small (124M)", train_overrides=(),
        compile=True, dtype="bfloat16", block_size=1024, batch_size=16, accum=4, max_iters=60, log_interval=10,
        skip_windows=2, train_tokens=64 << 20, val_tokens=1 << 20, step_models=("small", "medium"),
        step_iters=50, step_warmup=10, budget_s=budget_s or 480, threads=0, train_cap_s=300, step_cap_s=120,
        est_train_s={"adamw": 100, "sophiag": 110, "sophiah": 70},
        est_step_s={"adamw_fused": 10, "sophiag_compiled_s10": 40, "sophiag_compiled": 15, "sophiag_foreach": 12},
        est_medium_factor=1.25)


def paper_estimator_batches() -> dict[str, tuple[int, int]]:
    """{optimizer: (hess_batch_size, sequences per step)} of the paper's GPT-2 small configs."""
    configs = {name: settings.resolve([f"config/train_gpt2_small_{name}.py"], root=ROOT) for name in ("sophiag", "sophiah")}
    return {name: (cfg.hess_batch_size, cfg.batch_size * cfg.gradient_accumulation_steps) for name, cfg in configs.items()}


def scaled_hess_batches(sequences: int) -> dict[str, tuple[int, str]]:
    """The paper's estimator batch as the same fraction of a `sequences`-sequence step (rounded,
    at least 1): {optimizer: (hess_batch_size, how it was derived)}."""
    out = {}
    for name, (paper, step) in paper_estimator_batches().items():
        exact = paper * sequences / step
        n = max(1, min(sequences, round(exact)))
        out[name] = (n, f"{paper}/{step} x {sequences} = {exact:.3g}" + ("" if n == exact else f", rounded to {n}"))
    return out


def gpu_train_argv(plan: GpuPlan, name: str, hess_batch_size: int, dataset: str, out_dir: Path) -> list[str]:
    argv = [f"config/train_gpt2_small_{name}.py", *plan.train_overrides,
            f"--dataset={dataset}", f"--out_dir={out_dir}", f"--device={plan.device}",
            f"--compile={plan.compile}", f"--dtype={plan.dtype}", f"--block_size={plan.block_size}",
            f"--batch_size={plan.batch_size}", f"--gradient_accumulation_steps={plan.accum}",
            f"--max_iters={plan.max_iters}", f"--eval_interval={plan.max_iters}", "--eval_iters=1",
            f"--log_interval={plan.log_interval}", "--wandb_log=False", "--always_save_checkpoint=False",
            "--keep_checkpoints=1"]
    if name.startswith("sophia"):
        argv += ["--hess_interval=10", f"--hess_batch_size={hess_batch_size}"]
    return argv


def check_train_argvs(argvs: dict[str, list[str]]) -> None:
    """Before anything is written, train.py accepts every run's arguments (settings.resolve)
    and starts here (`train.py --help` imports what a run imports): a mistyped key, an invalid
    value or a missing package fails in seconds, not after minutes of GPU time."""
    for name, argv in argvs.items():
        try:
            settings.resolve(argv, root=ROOT)
        except UserError as e:
            raise UserError(f"train.py refuses the {name} run of --what gpu: {one_line(str(e))}") from None
    proc = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        hint = "; install the missing package (requirements.txt)" if "ModuleNotFoundError" in last else ""
        raise UserError(f"train.py cannot start here (train.py --help, exit {proc.returncode}): {last}{hint}")


def write_synthetic(data_dir: Path, train_tokens: int, val_tokens: int) -> None:
    """A dataset folder as the prepare scripts write one: uniform random GPT-2 token ids."""
    import numpy as np

    from dataset import write_bins

    rng = np.random.default_rng(0)
    write_bins(data_dir, rng.integers(0, GPT2_VOCAB, train_tokens, dtype=np.uint16),
               rng.integers(0, GPT2_VOCAB, val_tokens, dtype=np.uint16),
               {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB})


def remove_stale_synthetic() -> None:
    """Synthetic datasets of earlier runs that were killed before their cleanup (their process is gone)."""
    for path in (ROOT / "data").glob(f"{SYNTHETIC_PREFIX}_*"):
        try:
            pid = int(path.name.rsplit("_", 1)[1])
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def summarize_train(records: list[dict], skip: int) -> dict:
    """The medians of the logged windows after the first `skip` (fields a device does not log,
    e.g. mfu and memory_gib off CUDA, come back as None)."""
    windows = [r for r in records if r.get("kind") == "train"]
    if not windows:
        raise RunFailed("train.py logged no train records in metrics.jsonl")
    steady = windows[skip:] or windows[-1:]

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if finite_number(r.get(key))]
        return statistics.median(values) if values else None

    memory = [r["memory_gib"] for r in windows if finite_number(r.get("memory_gib"))]
    return {"time_ms": median("time_ms"), "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
            "estimator_ms": median("estimator_ms"), "memory_gib": max(memory) if memory else None,
            "windows_ms": [r.get("time_ms") for r in windows], "steady_windows": len(steady),
            "loss": windows[-1].get("loss"), "skipped_steps": windows[-1].get("skipped_steps")}


def gpu_train_run(plan: GpuPlan, name: str, hess_batch_size: int, dataset: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        out_dir = Path(tmp) / "out"
        argv = gpu_train_argv(plan, name, hess_batch_size, dataset, out_dir)
        t0 = time.perf_counter()
        peak_rss = spawn([sys.executable, "train.py", *argv], Path(tmp) / "train.log", timeout, plan.threads)
        wall = time.perf_counter() - t0
        metrics = out_dir / "metrics.jsonl"
        if not metrics.exists():
            raise RunFailed(f"train.py wrote no {metrics.name}", output_tail(Path(tmp) / "train.log"))
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result = summarize_train(records, plan.skip_windows)
    return {**result, "wall_s": wall, "peak_rss_gib": peak_rss / 1024, "hess_batch_size": hess_batch_size}


def gpu_machine(device: str) -> str:
    import torch

    parts = []
    if device == "cuda":
        try:
            props = torch.cuda.get_device_properties(0)
            parts.append(f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                         f"{props.major}.{props.minor}, {props.multi_processor_count} SMs, bf16 "
                         f"{'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'})")
        except Exception as e:  # a description is not worth a failed benchmark
            parts.append(f"{torch.cuda.get_device_name(0)} (properties unreadable: {type(e).__name__})")
        driver = ""
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
        parts.append(f"CUDA {torch.version.cuda}" + (f", driver {driver}" if driver else ""))
    else:
        parts.append(f"CPU: {cpu_model()}")
    parts.append(f"torch {torch.__version__}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:  # no triton: torch.compile cannot run on CUDA
        parts.append("no triton")
    parts.append(f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    return ", ".join(parts)


def shape_label(model: str) -> str:
    shape = SHAPES[model]
    name = f"GPT-2 {model}" if model in ("small", "medium") else model
    return f"{name} ({shape['n_layer']} layers x {shape['n_embd']}, {shape['n_head']} heads)"


def fmt(x, spec: str = ".1f", missing: str = "n/a") -> str:
    return format(x, spec) if finite_number(x) else missing


def ratio(a, b) -> float | None:
    return a / b if finite_number(a) and finite_number(b) and b else None


def gpu_report(plan: GpuPlan, results: dict, hess: dict, header: dict) -> str:
    train, step = results["train"], results["step"]
    rehearsal = " (rehearsal: not a measurement)" if plan.rehearse else ""
    lines = ["# GPU benchmark: Sophia against AdamW", ""]
    if plan.rehearse:
        lines += ["**Rehearsal on the CPU at a tiny size, compile=False, "
                  f"{plan.threads or 'the default number of'} torch thread(s) per process: it runs the GPU "
                  "benchmark's whole path (synthetic data, train.py runs, step workers, this report) to catch "
                  "mistakes before a GPU is spent on them. Its numbers say nothing about the targets.**", ""]
    lines += [f"- Machine: {header['machine']}", f"- Command: `{header['command']}`",
              f"- Date: {header['date']}", f"- {header['progress']}", ""]

    # --- training
    base = train.get("adamw", {})
    memory_key = "memory_gib" if plan.device == "cuda" else "peak_rss_gib"
    how_memory = ("torch.cuda.max_memory_allocated over the whole run (train.py's memory_gib)" if plan.device == "cuda"
                  else "peak RSS of the train.py process (the interpreter and torch included)")
    lines += ["## Training iteration", "",
              (f"{plan.train_label} with the paper's hyperparameters (config/train_gpt2_small_<optimizer>.py) on "
               f"synthetic tokens (uniform random GPT-2 ids: time and memory do not depend on them), "
               f"compile={plan.compile}, dtype {plan.dtype}, block {plan.block_size}, {plan.batch_size} sequences x "
               f"{plan.accum} accumulation steps = {plan.sequences} sequences ({plan.tokens_per_iter:,} tokens) per "
               f"iteration, {plan.max_iters} iterations. Sophia refreshes h every k = 10 iterations on "
               f"hess_batch_size sequences of the step's batch, the paper's fraction of its batch: Sophia-G "
               f"{hess['sophiag'][0]} ({hess['sophiag'][1]}), Sophia-H {hess['sophiah'][0]} "
               f"({hess['sophiah'][1]}). Iteration ms, tokens/s, MFU and estimator ms: medians of the logged "
               f"{plan.log_interval}-iteration windows (out_dir/metrics.jsonl) after the first {plan.skip_windows} "
               f"(compilation, the first Hessian refreshes, the first counted win rate); the estimator's time is "
               f"inside the iteration's. MFU is train.py's (the estimator's FLOPs counted, against the GPU's bf16 "
               f"peak in model.PEAK_FLOPS; logged on CUDA only). Peak memory: {how_memory}. Windows: every "
               f"window's ms per iteration, the first ones holding compilation."), "",
              "| optimizer | Hessian batch | iteration ms | vs AdamW | tokens/s | MFU % | peak memory GiB | vs AdamW "
              "| estimator ms per iteration | run s | windows ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, label in GPU_TRAIN:
        r = train.get(name)
        if r is None:
            continue
        if r.get("status") != "ok":
            lines.append(f"| {label} | | {r.get('status', 'pending')} | | | | | | | | |")
            continue
        mfu = r["mfu"] * 100 if finite_number(r.get("mfu")) else None
        windows = " / ".join(fmt(w, ".0f", "?") for w in r["windows_ms"])
        lines.append(f"| {label} | {r['hess_batch_size'] if name != 'adamw' else '-'} | {fmt(r['time_ms'])} | "
                     f"{fmt(ratio(r['time_ms'], base.get('time_ms')), '.3f')}x | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{fmt(mfu)} | {fmt(r.get(memory_key), '.2f')} | "
                     f"{fmt(ratio(r.get(memory_key), base.get(memory_key)), '.3f')}x | "
                     f"{fmt(r['estimator_ms'], '.1f', '-')} | {r['wall_s']:.0f} | {windows} |")

    # --- optimizer step
    peak_key = "cuda_peak_mib" if plan.device == "cuda" else "peak_rss_mib"
    how_peak = ("torch.cuda.max_memory_allocated while stepping" if plan.device == "cuda"
                else "peak RSS of the worker while stepping (the interpreter and torch included)")
    lines += ["", "## Optimizer step", "",
              (f"The optimizer step alone on the parameter shapes of "
               f"{' and '.join(shape_label(m) for m in plan.step_models)} (model.GPTConfig, biases included; fp32, "
               f"random gradients, a positive random Hessian EMA), device "
               f"{plan.device}, a fresh process per "
               f"row: {plan.step_iters} timed steps after {plan.step_warmup} warm-up steps (which hold "
               f"torch.compile's compilation and the first counted win rate), each between two device "
               f"synchronizations. sophiag_<impl> is SophiaG(impl=<impl>); _s10 adds stats_every=10, what train.py "
               f"runs: the win rate is counted on 1 step in 10, so the mean holds that cost and the median does not. "
               f"update_hessian: folding one estimate into h (once every k steps in training). Peak: {how_peak}."), "",
              "| shape | optimizer | median ms | mean ms | vs fused AdamW (median) | vs fused AdamW (mean) "
              "| update_hessian ms | peak MiB | vs fused AdamW |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in plan.step_models:
        rows = step.get(model, {})
        ref = rows.get("adamw_fused", {})
        for name in GPU_STEP:
            r = rows.get(name)
            if r is None:
                continue
            shape = f"{model} ({r['n_params'] / 1e6:.1f}M)" if "n_params" in r else model
            if r.get("status") != "ok":
                lines.append(f"| {shape} | {name} | {r.get('status', 'pending')} | | | | | | |")
                continue
            lines.append(f"| {shape} | {name} | {fmt(r['step_ms'], '.2f')} | {fmt(r['step_ms_mean'], '.2f')} | "
                         f"{fmt(ratio(r['step_ms'], ref.get('step_ms')), '.3f')}x | "
                         f"{fmt(ratio(r['step_ms_mean'], ref.get('step_ms_mean')), '.3f')}x | "
                         f"{fmt(r.get('hessian_ms'), '.2f', '-')} | {fmt(r.get(peak_key), '.0f')} | "
                         f"{fmt(ratio(r.get(peak_key), ref.get(peak_key)), '.3f')}x |")

    # --- targets
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    for target, measured, verdict in gpu_targets(plan, results, header.get("gpu_name", "")):
        lines.append(f"| {target} | {measured} | {verdict}{rehearsal if verdict not in ('not measured',) else ''} |")
    return "\n".join(lines) + "\n"


def verdict(checks: list[tuple[str, bool]]) -> str:
    """'met' / 'missed', or per label when they differ."""
    if not checks:
        return "not measured"
    if all(ok for _, ok in checks):
        return "met"
    if not any(ok for _, ok in checks):
        return "missed"
    return ("met by " + ", ".join(lab for lab, ok in checks if ok) + "; missed by "
            + ", ".join(lab for lab, ok in checks if not ok))


def gpu_targets(plan: GpuPlan, results: dict, gpu_name: str) -> list[tuple[str, str, str]]:
    train, step = results["train"], results["step"]
    ok = {name: r for name, r in train.items() if r.get("status") == "ok"}
    labels = dict(GPU_TRAIN)
    rows = []

    # 1. Sophia-G iteration
    target = f"Sophia-G training iteration <= 1.03x AdamW ({plan.train_label}, k = 10)"
    q = ratio(ok.get("sophiag", {}).get("time_ms"), ok.get("adamw", {}).get("time_ms"))
    rows.append((target, f"{q:.3f}x ({ok['sophiag']['time_ms']:.1f} vs {ok['adamw']['time_ms']:.1f} ms)"
                 if q is not None else "-", verdict([("Sophia-G", q <= 1.03)] if q is not None else [])))

    # 2. step
    target = ("Sophia step <= 0.9x fused AdamW (sophiag_compiled_s10, the update train.py runs; mean over the "
              "timed steps, the win rate's count included)")
    measured, checks = [], []
    for model in plan.step_models:
        rows_m = {n: r for n, r in step.get(model, {}).items() if r.get("status") == "ok"}
        if "adamw_fused" in rows_m and "sophiag_compiled_s10" in rows_m:
            mean = ratio(rows_m["sophiag_compiled_s10"]["step_ms_mean"], rows_m["adamw_fused"]["step_ms_mean"])
            med = ratio(rows_m["sophiag_compiled_s10"]["step_ms"], rows_m["adamw_fused"]["step_ms"])
            measured.append(f"{model} {mean:.3f}x (median {med:.3f}x)")
            checks.append((model, mean <= 0.9))
    rows.append((target, "; ".join(measured) or "-", verdict(checks)))

    # 3. MFU
    target = "MFU >= 45% for GPT-2 small on an H100/H200, bf16, compile=True"
    mfus = [(labels[n], r["mfu"]) for n, r in ok.items() if finite_number(r.get("mfu"))]
    measured = ", ".join(f"{lab} {m * 100:.1f}%" for lab, m in mfus) or "-"
    if not mfus:
        rows.append((target, measured, "n/a: no mfu logged (train.py logs it on CUDA GPUs only)"
                     if ok else "not measured"))
    elif plan.rehearse or not any(k in gpu_name for k in ("H100", "H200")):
        rows.append((target, measured, f"n/a: not an H100/H200 ({gpu_name or plan.device})"))
    else:
        rows.append((target, measured, verdict([(lab, m >= 0.45) for lab, m in mfus])))

    # 4. memory
    key = "memory_gib" if plan.device == "cuda" else "peak_rss_gib"
    target = "Peak memory within 3% of AdamW's (training run" + (")" if plan.device == "cuda" else "; here peak RSS)")
    checks, measured = [], []
    for name in ("sophiag", "sophiah"):
        q = ratio(ok.get(name, {}).get(key), ok.get("adamw", {}).get(key))
        if q is not None:
            measured.append(f"{labels[name]} {q:.3f}x")
            checks.append((labels[name], q <= 1.03))
    rows.append((target, ", ".join(measured) or "-", verdict(checks)))
    return rows


def bench_gpu(args: argparse.Namespace) -> int:
    """--what gpu: the plan, the synthetic data, the runs within the budget, the report."""
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        raise UserError("--what gpu needs a CUDA GPU and torch.cuda.is_available() is False here; "
                        "add --rehearse to run the same path on the CPU at a tiny size")
    if not args.rehearse:  # what would otherwise fail minutes later, inside a train.py run
        import importlib.util
        if importlib.util.find_spec("triton") is None:
            raise UserError("--what gpu runs train.py with compile=True, which needs triton on CUDA, and triton is not "
                            "installed here; install the triton that matches this torch")
        if not torch.cuda.is_bf16_supported():
            raise UserError(f"--what gpu measures bf16 training and {torch.cuda.get_device_name(0)} has no bf16; "
                            "run it on an Ampere or newer GPU")
    plan = gpu_plan(args.rehearse, args.budget_s)
    if args.threads > 0:
        plan = dataclasses.replace(plan, threads=args.threads)
    only = set(args.only.split(",")) | {"adamw", "adamw_fused"} if args.only else None
    train_names = [n for n, _ in GPU_TRAIN if only is None or n in only]
    step_names = [n for n in GPU_STEP if only is None or n in only]
    hess = scaled_hess_batches(plan.sequences)
    # By priority, so that a deadline cuts the least wanted: the runs three targets need first.
    first, second = plan.step_models
    order = [("train", "", "adamw"), ("train", "", "sophiag"), ("step", first, "adamw_fused"),
             ("step", first, "sophiag_compiled_s10"), ("train", "", "sophiah"), ("step", first, "sophiag_compiled"),
             ("step", first, "sophiag_foreach"), *(("step", second, n) for n in GPU_STEP)]
    runs = [r for r in order if r[2] in (train_names if r[0] == "train" else step_names)]
    estimate = sum(plan.est_train_s[n] for n in train_names) + sum(
        plan.est_step_s[n] * (plan.est_medium_factor if m == plan.step_models[-1] else 1.0)
        for m in plan.step_models for n in step_names)
    gpu_name = torch.cuda.get_device_name(0) if plan.device == "cuda" else ""
    header = {"machine": gpu_machine(plan.device), "gpu_name": gpu_name,
              "command": "python -m scripts.bench_optimizer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results: dict = {"train": {}, "step": {m: {} for m in plan.step_models}}
    for kind, model, name in runs:
        (results["train"] if kind == "train" else results["step"][model])[name] = {"status": "pending"}

    def log(message: str) -> None:
        print(f"[{time.monotonic() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    start = time.monotonic()
    where = "" if plan.rehearse else " on one H100/H200, mostly compilation (a guess, not a measurement)"
    print(f"--what gpu{' --rehearse' if plan.rehearse else ''}: {len(runs)} runs ({len(train_names)} train.py runs of "
          f"{plan.train_label}, {plan.max_iters} iterations of {plan.tokens_per_iter:,} tokens each; "
          f"{len(step_names)} optimizers x {len(plan.step_models)} shapes in the step benchmark). Estimated "
          f"{estimate / 60:.1f} min{where}; "
          f"deadline {plan.budget_s / 60:.1f} min (--budget_s): runs that would pass it are stopped and reported "
          f"as such.", file=sys.stderr, flush=True)
    for name in ("sophiag", "sophiah"):
        print(f"  {name}: hess_batch_size {hess[name][0]} ({hess[name][1]})", file=sys.stderr)

    def report(final: bool) -> str:
        done = sum(1 for kind, model, name in runs
                   if (results["train"] if kind == "train" else results["step"][model])[name]["status"] != "pending")
        elapsed = time.monotonic() - start
        header["progress"] = (f"Wall time: {elapsed:.0f} s of the {plan.budget_s:.0f} s budget "
                              f"(estimated {estimate:.0f} s at the start)" if final else
                              f"In progress: {done} of {len(runs)} runs done after {elapsed:.0f} s")
        text = gpu_report(plan, results, hess, header)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        if args.raw is not None:
            args.raw.write_text(json.dumps({"plan": dataclasses.asdict(plan), "results": results}, indent=1,
                                           default=str))
        return text

    dataset = f"{SYNTHETIC_PREFIX}_{os.getpid()}"
    data_dir = ROOT / "data" / dataset
    if train_names:
        check_train_argvs({n: gpu_train_argv(plan, n, hess.get(n, (1, ""))[0], dataset, Path("out-bench-check"))
                           for n in train_names})
    remove_stale_synthetic()
    failed = 0
    try:
        write_synthetic(data_dir, plan.train_tokens, plan.val_tokens)
        log(f"synthetic dataset: {data_dir.relative_to(ROOT)} ({plan.train_tokens:,} train / "
            f"{plan.val_tokens:,} val tokens)")
        report(final=False)
        for kind, model, name in runs:
            remaining = plan.budget_s - (time.monotonic() - start)
            slot = results["train"] if kind == "train" else results["step"][model]
            if remaining < MIN_RUN_S:
                slot[name] = {"status": "not run: the --budget_s deadline had passed"}
                log(f"{kind} {model} {name}: not run, over the budget")
                continue
            what = f"train {name}" if kind == "train" else f"step {model} {name}"
            log(f"{what} ...")
            timeout = min(remaining, plan.train_cap_s if kind == "train" else plan.step_cap_s)
            try:
                if kind == "train":
                    r = gpu_train_run(plan, name, hess.get(name, (0, ""))[0], dataset, timeout)
                    summary = f"{fmt(r['time_ms'])} ms/iteration, {r['wall_s']:.0f} s"
                else:
                    r = run_worker(["step", name, str(plan.step_iters), str(plan.step_warmup), "0", model,
                                    plan.device], timeout, plan.threads)
                    summary = f"{r['step_ms']:.2f} ms/step (mean {r['step_ms_mean']:.2f})"
                slot[name] = {**r, "status": "ok"}
                log(f"{what}: {summary}")
            except Exception as e:  # one run's failure costs that row, never the others or the report
                failed += 1
                deadline = isinstance(e, RunFailed) and str(e).endswith(f"timed out after {timeout:.0f} s") \
                    and timeout == remaining
                status = (f"stopped by the --budget_s deadline after {timeout:.0f} s" if deadline else
                          f"failed: {e if isinstance(e, RunFailed) else f'{type(e).__name__}: {e}'}")
                slot[name] = {"status": status.replace("|", "/").replace("\n", " ")}
                log(f"{what} FAILED: {status}\n{getattr(e, 'tail', '')}")
            report(final=False)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(report(final=True))
    return 1 if failed else 0

"""Benchmark Sophia against AdamW and Lion: optimizer step time, training-iteration time and
peak memory, printed as Markdown tables.

    python -m scripts.bench_optimizer                                  # everything, printed
    python -m scripts.bench_optimizer --what step --iters 20 --threads 1
    python -m scripts.bench_optimizer --what train --train-iters 100 --repeats 2 --out bench.md

--what step    Optimizer step time on GPT-2-small-shaped parameters (the real
               model.GPT(GPTConfig()) shapes, 124M fp32 parameters split into the decay /
               no-decay groups train.py uses, random gradients): SophiaG with impl reference /
               compiled (and compiled with stats_every=10, the "_s10" row: what train.py and
               a sampled win rate cost) against torch.optim.AdamW fused=True and foreach=True, and Lion (lion_pytorch).
               --iters timed steps after --warmup steps (the warmup holds torch.compile's
               compilation): the median, the fastest step and its CPU time; ratios against
               fused AdamW. Sophia's update_hessian (once every k steps in training) is timed
               separately. Each optimizer runs in a fresh subprocess.
--what train   Mean training-iteration time of a short train.py run per optimizer, same
               settings for all: config/train_shakespeare_char.py, --train-iters steps,
               hess_interval=10 with a half-batch estimator (hess_batch_size = batch_size / 2),
               log_interval=10 (so every logged window holds exactly one estimator call).
               time_ms comes from out_dir/metrics.jsonl: the median of the 10-iteration windows
               after the first (warmup, compilation), robust to other jobs' bursts. Each run is a fresh
               `python train.py` subprocess.
--what memory  Peak memory per optimizer. Step benchmark: torch.cuda.max_memory_allocated
               while stepping, or on the CPU the peak RSS while stepping (Linux VmHWM, reset
               just before the first step: parameters, gradients, optimizer state, temporaries,
               plus the interpreter and torch); the optimizer state's size is exact. Training
               runs: the peak of the whole subprocess (CPU: resource.getrusage, which includes
               the interpreter, torch and the data; the RSS after imports is shown so the growth
               can be compared). "memory" runs the step and train benchmarks for this.
--what all     All of the above (the default).
--what gpu     The GPU benchmark of issue #11, on synthetic tokens (no dataset needed), within
               --budget-s seconds (default 480: 8 minutes on one H100/H200, compilation
               included; a run that would pass the deadline is stopped and reported as such):
               (1) three real `python train.py` runs of config/train_gpt2_small_{adamw,sophiag,
               sophiah}.py with compile=True, bf16, block 1024, batch 16 x 4 sequences, k = 10 and
               the paper's estimator fractions of the batch (Sophia-G 240/480 -> 32, Sophia-H
               32/480 -> 4): iteration time, tokens/s, MFU, peak memory, estimator time; (2) the
               step benchmark on GPT-2 small and medium shapes for fused AdamW and SophiaG's impls.
               Writes a Markdown report (also to --out, rewritten after every run) ending with the
               issue's GPU targets, each measured and marked met or missed. Needs CUDA; --rehearse
               runs the same path on the CPU at a tiny size (about a minute) to catch mistakes
               before a GPU is spent on them.

The device is CUDA when available, else the CPU. On a CPU shared with other jobs, use
--threads 1: with 2 intra-op threads every parallel region waits for a descheduled thread
(fused AdamW measured 1.2 s a step with 2 threads vs 0.12 s with 1 on a busy 2-core machine).
--repeats runs every measurement several times, the optimizers interleaved. --only picks a
subset, --out writes the Markdown to a file as well as printing it, --raw every number as JSON.

--model picks the step benchmark's parameter shapes: GPT-2 small (default) or medium.

The issue's targets, which the tables are read against: Sophia step time <= 0.8x fused
AdamW; Sophia-G training iteration <= 1.05x AdamW at k=10 with a half-batch estimator;
Sophia-H <= 1.10x; peak memory within 5% of AdamW. --what gpu states its own (issue #11).
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runtime import ROOT, UserError, exit_on_user_error

MARK = "BENCH_RESULT "

# The step benchmark's parameter shapes (model.GPTConfig arguments; GPTConfig's defaults, biases
# included, for the rest). tiny and tiny2 stand in for small and medium in the --rehearse run.
SHAPES = {
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
}
SHAPES["tiny2"] = SHAPES["tiny"]  # the same graphs: the rehearsal's second shape reuses inductor's cache

# sophiag_<impl>[_s<n>]: SophiaG(impl=<impl>, stats_every=<n>)
STEP_OPTIMIZERS = ("adamw_fused", "adamw_foreach", "lion", "muon", "sophiag_reference", "sophiag_compiled",
                   "sophiag_compiled_s10")
# (label, optimizer_name, optimizer_impl) for train.py
TRAIN_RUNS = (("adamw", "adamw", "auto"), ("lion", "lion", "auto"), ("sophiag", "sophiag", "auto"),
              ("sophiah", "sophiah", "auto"), ("sophiag_compiled", "sophiag", "compiled"))


# ----------------------------------------------------------------------------- workers (subprocesses)

def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def proc_status_mib(key: str) -> float | None:
    """VmRSS (current) or VmHWM (peak since the last reset_peak_rss) from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later peak covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker_step(name: str, iters: int, warmup: int, seed: int, model: str = "small", device: str = "auto") -> dict:
    import torch

    from model import GPT, GPTConfig

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline_rss = rss_mib()
    with torch.device("meta"):
        shapes_model = GPT(GPTConfig(**SHAPES[model]))
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = []
    for group in shapes_model.param_groups(weight_decay=0.1):
        params = []
        for p in group["params"]:
            q = torch.nn.Parameter(torch.randn(p.shape, generator=gen, device=device) * 0.02)
            q.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
            params.append(q)
        groups.append({"params": params, "weight_decay": group["weight_decay"]})
    del shapes_model
    n_params = sum(p.numel() for g in groups for p in g["params"])
    opt = make_optimizer(name, groups)

    all_params = [p for g in groups for p in g["params"]]
    sophia = name.startswith("sophia")
    if sophia:  # a positive Hessian EMA in place, without update_hessian's temporaries
        for p in all_params:
            opt._state(p)["hessian"].uniform_(0.0, 1e-4, generator=gen)
    # Peak while stepping: parameters, gradients, optimizer state and the step's temporaries.
    can_reset = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for i in range(warmup + iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    step_peak = proc_status_mib("VmHWM") if can_reset else None
    cuda_peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None

    hessian_ms = hessian_peak = None
    if sophia:
        h_hat = [torch.rand(p.shape, generator=gen, device=device) * 1e-2 for p in all_params]
        hessian_times = []
        for i in range(3):
            if i == 2:  # the peak of one call beyond the state and the estimate
                before, can_reset = proc_status_mib("VmRSS"), reset_peak_rss()
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated() / 2 ** 20
            sync(device)
            t0 = time.perf_counter()
            opt.update_hessian(h_hat)
            sync(device)
            hessian_times.append(time.perf_counter() - t0)
        if device == "cuda":
            hessian_peak = torch.cuda.max_memory_allocated() / 2 ** 20 - before
        elif can_reset and before is not None:
            hessian_peak = proc_status_mib("VmHWM") - before
        hessian_ms = statistics.median(hessian_times) * 1000
        del h_hat
    state_mib = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t)) / 2 ** 20
    stats = opt.stats() if sophia else {}
    return {
        "name": name, "model": model, "device": device, "n_params": n_params,
        "step_ms": statistics.median(times) * 1000, "step_ms_mean": statistics.mean(times) * 1000,
        "step_ms_all": [t * 1000 for t in times], "step_cpu_ms_all": [t * 1000 for t in cpu_times],
        "hessian_ms": hessian_ms, "hessian_peak_mib": hessian_peak, "threads": torch.get_num_threads(),
        "peak_rss_mib": step_peak if step_peak is not None else rss_mib(), "baseline_rss_mib": baseline_rss,
        "state_mib": state_mib, "params_mib": n_params * 4 / 2 ** 20,
        "cuda_peak_mib": cuda_peak, "win_rate": stats.get("win_rate"),
    }


def make_optimizer(name: str, groups: list[dict]):
    import torch

    if name == "adamw_fused":
        return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    if name == "adamw_foreach":
        return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), foreach=True)
    if name == "lion":
        from lion_pytorch import Lion
        return Lion(groups, lr=1e-4, betas=(0.9, 0.99))
    if name == "muon":
        from optimizers import MuonAdamW
        matrices = groups[0]["params"]  # the decay group in model order: wte, wpe, then the blocks' matrices
        return MuonAdamW(matrices[2:], groups, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.95,
                         fused=True)
    from sophia import SophiaG
    parts = name.split("_")
    kwargs = {"stats_every": int(parts[2][1:])} if len(parts) > 2 else {}
    return SophiaG(groups, lr=6e-4, betas=(0.96, 0.99), rho=0.05, impl=parts[1], **kwargs)


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def run_measured(cmd: list[str]) -> float:
    """Run a command to completion; its peak RSS in MiB (Linux reports KiB, macOS bytes)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024


def worker_train(optimizer_name: str, impl: str, iters: int, out_dir: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = 12  # the config's
    argv = [
        "config/train_shakespeare_char.py", f"--out_dir={out_dir}", f"--optimizer_name={optimizer_name}",
        # lr_decay_iters stays the config's: train.py wants it >= warmup_iters
        f"--optimizer_impl={impl}", f"--max_iters={iters}",
        f"--eval_interval={iters}", "--eval_iters=1", "--log_interval=10", "--hess_interval=10",
        f"--batch_size={batch_size}", f"--hess_batch_size={batch_size // 2}", f"--device={device}",
        "--wandb_log=False", "--always_save_checkpoint=False",
    ]
    # train.py --help imports everything a run imports and stops: the baseline of the memory table.
    baseline_rss = run_measured([sys.executable, "train.py", "--help"])
    peak_rss = run_measured([sys.executable, "train.py", *argv])
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"]
    steady = windows[1:] or windows  # the first window holds warmup and compilation
    return {
        "optimizer": optimizer_name, "impl": impl, "device": device, "threads": torch.get_num_threads(),
        "time_ms": statistics.median(r["time_ms"] for r in steady),
        "time_ms_mean": statistics.mean(r["time_ms"] for r in steady),
        "windows_ms": [r["time_ms"] for r in windows],
        "estimator_ms": statistics.mean(r["estimator_ms"] for r in steady) if "estimator_ms" in steady[0] else None,
        "peak_rss_mib": peak_rss, "baseline_rss_mib": baseline_rss,
        "cuda_peak_mib": max(r["memory_gib"] for r in windows) * 1024 if device == "cuda" else None,
    }


# ----------------------------------------------------------------------------- orchestration

class RunFailed(RuntimeError):
    """A subprocess of the benchmark failed or outlived its time; str() is one line, `tail` the
    end of its output."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def output_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_bytes()[-chars:].decode(errors="replace")
    except OSError:
        return ""


def spawn(cmd: list[str], log_path: Path, timeout: float, threads: int = 0) -> float:
    """Run `cmd` from the repository root with stdout and stderr in `log_path`, in a process
    group of its own, so that a timeout also stops the compile workers torch.compile starts.
    Returns its peak RSS in MiB; raises RunFailed on a non-zero exit or after `timeout` seconds.
    threads > 0 sets OMP_NUM_THREADS, which torch's intra-op pool follows."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads > 0 else None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + timeout
    exited = timed_out = False
    peek = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")
    try:
        while not exited:
            if peek:  # exited, but not reaped: its group id cannot be reused yet
                try:
                    exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
                except OSError:
                    peek = False
            if not peek:
                exited = proc.poll() is not None
            if not exited and time.monotonic() > deadline:
                timed_out = True
                break
            if not exited:
                time.sleep(0.1)
    finally:  # also on KeyboardInterrupt / SIGTERM: leave no process of ours behind
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else usage.ru_maxrss / 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # poll() reaped it
    if timed_out:
        raise RunFailed(f"timed out after {timeout:.0f} s", output_tail(log_path))
    if proc.returncode != 0:
        tail = output_tail(log_path)
        last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        raise RunFailed(f"exit {proc.returncode}: {last.strip()[:300]}", tail)
    return peak


def run_worker(args: list[str], timeout: float, threads: int = 0) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench_optimizer", "--worker", str(threads), *args]
    with tempfile.TemporaryDirectory(prefix="bench_opt_") as tmp:
        log = Path(tmp) / "worker.log"
        try:
            spawn(cmd, log, timeout)
        except RunFailed as e:
            raise RunFailed(f"worker {' '.join(args)}: {e}", e.tail) from None
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RunFailed(f"worker {' '.join(args)} printed no result", output_tail(log))


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = f"CUDA: {torch.cuda.get_device_name()}"
    else:
        dev = f"CPU: {cpu_model()}"
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f} at start"
    return f"torch {torch.__version__}, {dev}, {os.cpu_count()} CPUs, Python {platform.python_version()}{load}"


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def bench_step(iters: int, warmup: int, repeats: int, threads: int = 0,
               names: tuple[str, ...] = STEP_OPTIMIZERS, model: str = "small") -> tuple[str, str, dict]:
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names:
            print(f"step: {name} (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
            results[name].append(run_worker(["step", name, str(iters), str(warmup), str(r), model], 3600, threads))
    base = statistics.median(x["step_ms"] for x in results["adamw_fused"])
    first = results["adamw_fused"][0]
    base_min = min(t for x in results["adamw_fused"] for t in x["step_ms_all"])
    base_cpu = min(t for x in results["adamw_fused"] for t in x["step_cpu_ms_all"])
    lines = [(f"Optimizer step, GPT-2-{model} parameter shapes ({first['n_params'] / 1e6:.1f}M fp32 parameters, "
             f"random gradients), device {first['device']}, {first['threads']} torch thread(s); {iters} timed "
             f"steps after {warmup} warmup, {repeats} run(s). Median: median per run, then the median (min-max) "
             "over runs; min: the fastest step of all runs; CPU: process time of the fastest step (all "
             "threads), the least disturbed by other jobs on a shared machine. sophiag_*_s10: "
             "stats_every=10."), "",
             ("| optimizer | median ms | vs fused AdamW | min ms | vs fused AdamW | CPU ms (min) | vs fused AdamW "
              "| update_hessian ms (every k steps) |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        ms = [x["step_ms"] for x in results[name]]
        fastest = min(t for x in results[name] for t in x["step_ms_all"])
        cpu = min(t for x in results[name] for t in x["step_cpu_ms_all"])
        hess = [x["hessian_ms"] for x in results[name] if x["hessian_ms"] is not None]
        lines.append(f"| {name} | {spread(ms)} | {statistics.median(ms) / base:.2f}x | {fastest:.1f} | "
                     f"{fastest / base_min:.2f}x | {cpu:.1f} | {cpu / base_cpu:.2f}x | "
                     f"{spread(hess) if hess else '-'} |")
    mem = step_memory_table(results)
    return "\n".join(lines), mem, results


def bench_train(iters: int, repeats: int, threads: int = 0,
                runs: tuple[tuple[str, str, str], ...] = TRAIN_RUNS) -> tuple[str, str, dict]:
    results: dict[str, list[dict]] = {label: [] for label, _, _ in runs}
    for r in range(repeats):
        for label, name, impl in runs:
            print(f"train: {label} (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="bench_opt_") as out_dir:
                results[label].append(run_worker(["train", name, impl, str(iters), out_dir], 3600, threads))
    base = statistics.median(x["time_ms"] for x in results["adamw"])
    device = results["adamw"][0]["device"]
    threads = results["adamw"][0]["threads"]
    lines = [(f"Training iteration, config/train_shakespeare_char.py ({iters} iterations, batch 12 x 64, "
             f"hess_interval=10, hess_batch_size=6), device {device}, {threads} torch thread(s); median time_ms "
             f"of the logged 10-iteration windows after the first, {repeats} run(s): median (min-max over runs)."), "",
             "| optimizer | impl | iteration ms | vs AdamW | estimator ms per iteration |", "|---|---|---:|---:|---:|"]
    for label, _, impl in runs:
        ms = [x["time_ms"] for x in results[label]]
        est = [x["estimator_ms"] for x in results[label] if x["estimator_ms"] is not None]
        lines.append(f"| {label} | {impl} | {spread(ms)} | {statistics.median(ms) / base:.3f}x | "
                     f"{spread(est) if est else '-'} |")
    mem = train_memory_table(results)
    return "\n".join(lines), mem, results


def step_memory_table(results: dict[str, list[dict]]) -> str:
    first = results["adamw_fused"][0]
    cuda = first["cuda_peak_mib"] is not None
    key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    base = statistics.median(x[key] for x in results["adamw_fused"])
    how = ("torch.cuda.max_memory_allocated while stepping" if cuda else
           "peak RSS of the subprocess while stepping (VmHWM reset just before the first step), which "
           f"includes the interpreter and torch (about {first['baseline_rss_mib']:.0f} MiB after imports)")
    lines = [(f"Peak memory, step benchmark ({first['params_mib']:.0f} MiB of parameters and as much of "
             f"gradients): {how}. update_hessian: the peak beyond the state and the estimate, of one call."), "",
             "| optimizer | optimizer state MiB | peak MiB | vs fused AdamW | update_hessian extra MiB |",
             "|---|---:|---:|---:|---:|"]
    for label, runs in results.items():
        peak = statistics.median(x[key] for x in runs)
        extra = [x["hessian_peak_mib"] for x in runs if x["hessian_peak_mib"] is not None]
        lines.append(f"| {label} | {statistics.median(x['state_mib'] for x in runs):.0f} | {peak:.0f} | "
                     f"{peak / base:.3f}x | {f'{statistics.median(extra):.0f}' if extra else '-'} |")
    return "\n".join(lines)


def train_memory_table(results: dict[str, list[dict]]) -> str:
    first = results["adamw"][0]
    cuda = first["cuda_peak_mib"] is not None
    key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    base = statistics.median(x[key] for x in results["adamw"])
    if cuda:
        lines = ["Peak memory, training runs: torch.cuda.max_memory_allocated (MiB).", "",
                 "| optimizer | peak MiB | vs AdamW |", "|---|---:|---:|"]
    else:
        lines = [("Peak memory, training runs: peak RSS of each subprocess (MiB), which includes the "
                 "interpreter, torch and everything train.py imports; the RSS after imports is shown, and "
                 "the growth beyond it (model, optimizer, data, activations) compared with AdamW's."), "",
                 "| optimizer | peak RSS MiB | vs AdamW | RSS after imports MiB | growth MiB | growth vs AdamW |",
                 "|---|---:|---:|---:|---:|---:|"]
    base_growth = statistics.median(x[key] - x["baseline_rss_mib"] for x in results["adamw"])
    for label, runs in results.items():
        peak = statistics.median(x[key] for x in runs)
        if cuda:
            lines.append(f"| {label} | {peak:.0f} | {peak / base:.3f}x |")
        else:
            after = statistics.median(x["baseline_rss_mib"] for x in runs)
            growth = statistics.median(x[key] - x["baseline_rss_mib"] for x in runs)
            lines.append(f"| {label} | {peak:.0f} | {peak / base:.3f}x | {after:.0f} | {growth:.0f} | "
                         f"{growth / base_growth:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --what gpu

GPU_TRAIN = (("adamw", "AdamW"), ("sophiag", "Sophia-G"), ("sophiah", "Sophia-H"))  # train.py's optimizer_name
GPU_STEP = ("adamw_fused", "sophiag_compiled_s10", "sophiag_compiled", "sophiag_reference")  # in run order
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
            est_step_s={"adamw_fused": 4, "sophiag_compiled_s10": 20, "sophiag_compiled": 8, "sophiag_reference": 4})
    # One H100/H200: GPT-2 small at ~45% MFU takes ~0.13 s per 65K-token iteration, so compiling
    # (about a minute for the model's first graphs; inductor's on-disk cache serves later processes)
    # dominates: the estimates below are that, not measurements.
    return GpuPlan(
        rehearse=False, device="cuda", train_label="GPT-2 small (124M)", train_overrides=(),
        compile=True, dtype="bfloat16", block_size=1024, batch_size=16, accum=4, max_iters=60, log_interval=10,
        skip_windows=2, train_tokens=64 << 20, val_tokens=1 << 20, step_models=("small", "medium"),
        step_iters=50, step_warmup=10, budget_s=budget_s or 480, threads=0, train_cap_s=300, step_cap_s=120,
        est_train_s={"adamw": 100, "sophiag": 110, "sophiah": 70},
        est_step_s={"adamw_fused": 10, "sophiag_compiled_s10": 40, "sophiag_compiled": 15, "sophiag_reference": 12},
        est_medium_factor=1.25)


def paper_estimator_batches() -> dict[str, tuple[int, int]]:
    """{optimizer: (hess_batch_size, sequences per step)} of the paper's GPT-2 small configs."""
    from configurator import read_literals

    small = read_literals(ROOT / "config" / "_gpt2_small.py")
    step = small["batch_size"] * small["gradient_accumulation_steps"]
    return {name: (read_literals(ROOT / "config" / f"_optimizer_{name}.py")["hess_batch_size"], step)
            for name in ("sophiag", "sophiah")}


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
    """train.py --check on every run before anything is written: a mistyped key or an invalid
    value fails here in seconds, not after minutes of GPU time."""
    proc = subprocess.run([sys.executable, "train.py", "--check"], input=json.dumps(list(argvs.values())),
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    try:
        checked = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        hint = "; install the missing package (requirements.txt)" if "ModuleNotFoundError" in last else ""
        raise UserError(f"train.py cannot start here (train.py --check, exit {proc.returncode}): "
                        f"{last}{hint}") from None
    for name, result in zip(argvs, checked):
        if "error" in result:
            raise UserError(f"train.py refuses the {name} run of --what gpu: {result['error']}")


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
    lines = ["# GPU benchmark: Sophia against AdamW (issue #11)", ""]
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
    lines += ["", "## Targets (issue #11)", "", "| target | measured | |", "|---|---|---|"]
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
             ("step", first, "sophiag_reference"), *(("step", second, n) for n in GPU_STEP)]
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
          f"deadline {plan.budget_s / 60:.1f} min (--budget-s): runs that would pass it are stopped and reported "
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
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
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
                slot[name] = {"status": "not run: the --budget-s deadline had passed"}
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
                status = (f"stopped by the --budget-s deadline after {timeout:.0f} s" if deadline else
                          f"failed: {e if isinstance(e, RunFailed) else f'{type(e).__name__}: {e}'}")
                slot[name] = {"status": status.replace("|", "/").replace("\n", " ")}
                log(f"{what} FAILED: {status}\n{getattr(e, 'tail', '')}")
            report(final=False)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(report(final=True))
    return 1 if failed else 0


@exit_on_user_error
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        threads, kind, *rest = sys.argv[2:]
        if int(threads) > 0:
            import torch
            torch.set_num_threads(int(threads))
        if kind == "step":
            name, iters, warmup, seed, *where = rest  # where: [model[, device]]
            result = worker_step(name, int(iters), int(warmup), int(seed), *where)
        else:
            name, impl, iters, out_dir = rest
            result = worker_train(name, impl, int(iters), out_dir)
        print(MARK + json.dumps(result), flush=True)
        return

    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--what", choices=("step", "train", "memory", "all", "gpu"), default="all")
    parser.add_argument("--rehearse", action="store_true",
                        help="with --what gpu: run its whole path on the CPU at a tiny size (about a minute)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="with --what gpu: the deadline in seconds (default 480; 900 with --rehearse)")
    parser.add_argument("--model", choices=("small", "medium"), default="small",
                        help="parameter shapes of the step benchmark: GPT-2 small or medium")
    parser.add_argument("--iters", type=int, default=10, help="timed optimizer steps per run (step)")
    parser.add_argument("--train-iters", type=int, default=80, help="iterations of each training run (train)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing (step)")
    parser.add_argument("--repeats", type=int, default=1, help="run every measurement this many times")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of the runs, e.g. adamw_fused,sophiag_compiled,adamw,sophiag "
                             f"(step: {', '.join(STEP_OPTIMIZERS)}; train: {', '.join(r[0] for r in TRAIN_RUNS)}); "
                             "the baselines adamw_fused and adamw are always run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every run (default: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown to this file")
    parser.add_argument("--raw", type=Path, default=None, help="write every measurement as JSON to this file")
    args = parser.parse_args()
    if args.rehearse and args.what != "gpu":
        raise UserError(f"--rehearse goes with --what gpu, not --what {args.what}; drop it or use --what gpu")
    if args.what == "gpu":
        # A SIGTERM (a job's time limit) unwinds like Ctrl-C: the runs are stopped, the synthetic
        # data deleted; the report written after every run stays.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        sys.exit(bench_gpu(args))

    sections, raw = [f"Machine: {machine()}"], {}
    only = set(args.only.split(",")) | {"adamw_fused", "adamw"} if args.only else None
    step_names = tuple(n for n in STEP_OPTIMIZERS if only is None or n in only)
    train_runs = tuple(r for r in TRAIN_RUNS if only is None or r[0] in only)
    if args.what in ("step", "memory", "all"):
        table, mem, raw["step"] = bench_step(args.iters, args.warmup, args.repeats, args.threads, step_names,
                                             args.model)
        if args.what != "memory":
            sections.append(table)
        if args.what in ("memory", "all"):
            sections.append(mem)
    if args.what in ("train", "memory", "all"):
        if args.train_iters < 20:
            parser.error("--train-iters must be >= 20 (the first 10-iteration window is left out)")
        table, mem, raw["train"] = bench_train(args.train_iters, args.repeats, args.threads, train_runs)
        if args.what != "memory":
            sections.append(table)
        if args.what in ("memory", "all"):
            sections.append(mem)
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.raw is not None:
        args.raw.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()

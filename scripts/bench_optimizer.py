"""Benchmark Sophia against AdamW and Lion: optimizer step time, training-iteration time and
peak memory, printed as Markdown tables.

    python -m scripts.bench_optimizer                                  # everything, printed
    python -m scripts.bench_optimizer --what=step --iters=20 --threads=1
    python -m scripts.bench_optimizer --what=train --train_iters=100 --repeats=2 --output=bench.md

--what step    Optimizer step time on GPT-2-small-shaped parameters (the real
               model.GPT(GPTConfig()) shapes, 124M fp32 parameters split into the decay /
               no-decay groups train.py uses, random gradients): SophiaG with impl foreach /
               compiled (and compiled with stats_every=10, the "_s10" row: what train.py and
               a sampled win rate cost) against AdamW fused and unfused (adamw_foreach: as train.py
               builds it where torch has no fused kernels, torch's default foreach or for-loop
               path), Lion and Muon, each built by optimizers.build from its config/_optimizer_*.py.
               --iters timed steps after --warmup steps (the warmup holds torch.compile's
               compilation): the median, the fastest step and its CPU time; ratios against
               fused AdamW. Sophia's update_hessian (once every k steps in training) is timed
               separately. Each optimizer runs in a fresh subprocess.
--what train   Mean training-iteration time of a short train.py run per optimizer (sophiah_exact:
               Sophia-H with --hessian_vector_product=exact), same
               settings for all: config/train_shakespeare_char.py, --train_iters steps,
               compile=False, or compile=True with --compile=True (--compile=both: each
               optimizer both ways, its ratio against AdamW run the same way),
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
--what gpu     The GPU benchmark, on synthetic tokens (no dataset needed), within
               --budget_s seconds (default 480: 8 minutes on one H100/H200, compilation
               included; a run that would pass the deadline is stopped and reported as such):
               (1) three real `python train.py` runs of config/train_gpt2_small_{adamw,sophiag,
               sophiah}.py with compile=True, bf16, block 1024, batch 16 x 4 sequences, k = 10 and
               the paper's estimator fractions of the batch (Sophia-G 240/480 -> 32, Sophia-H
               32/480 -> 4): iteration time, tokens/s, MFU, peak memory, estimator time; (2) the
               step benchmark on GPT-2 small and medium shapes for fused AdamW and SophiaG's impls.
               Writes a Markdown report (also to --output, rewritten after every run) ending with the
               GPU targets, each measured and marked met or missed. Needs CUDA; --rehearse
               runs the same path on the CPU at a tiny size (about a minute) to catch mistakes
               before a GPU is spent on them.

The device is CUDA when available, else the CPU. On a CPU shared with other jobs, use
--threads 1: with 2 intra-op threads every parallel region waits for a descheduled thread
(fused AdamW measured 1.2 s a step with 2 threads vs 0.12 s with 1 on a busy 2-core machine).
--repeats runs every measurement several times, the optimizers interleaved. --only picks a
subset, --output writes the Markdown to a file as well as printing it, --raw every number as JSON.

--model picks the step benchmark's parameter shapes: GPT-2 small (default) or medium.

The targets the tables are read against: Sophia step time <= 0.8x fused
AdamW; Sophia-G training iteration <= 1.05x AdamW at k=10 with a half-batch estimator;
Sophia-H <= 1.10x; peak memory within 5% of AdamW. --what gpu states its own.
"""

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarking import MARK, SHAPES, cpu_model, run_worker
from errors import UserError, exit_on_user_error
from paths import ROOT
from scripts.bench_gpu import bench_gpu

# <optimizer_name>[_fused | _foreach] and sophiag_<impl>[_s<n>]: the optimizer as train.py builds it
# (optimizers.build, its config/_optimizer_<name>.py), AdamW fused or not, SophiaG with
# impl=<impl> and win-rate counting every <n> steps (none without _s<n>)
STEP_OPTIMIZERS = ("adamw_fused", "adamw_foreach", "lion", "muon", "sophiag_foreach", "sophiag_compiled",
                   "sophiag_compiled_s10")
# (label, optimizer_name, optimizer_impl, hessian_vector_product) for train.py
TRAIN_RUNS = (("adamw", "adamw", "auto", "finite_difference"), ("lion", "lion", "auto", "finite_difference"),
              ("sophiag", "sophiag", "auto", "finite_difference"), ("sophiah", "sophiah", "auto", "finite_difference"),
              ("sophiah_exact", "sophiah", "auto", "exact"), ("sophiag_compiled", "sophiag", "compiled", "finite_difference"))


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
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        shapes_model = GPT(GPTConfig(**SHAPES[model]))
    groups = shapes_model.param_groups(weight_decay=0.1)
    with torch.no_grad():
        for p in (p for g in groups for p in g["params"]):
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
            p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    n_params = sum(p.numel() for g in groups for p in g["params"])
    opt = step_optimizer(name, shapes_model, device, steps=warmup + iters)

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


def step_optimizer(name: str, model, device: str, steps: int):
    """The optimizer of a STEP_OPTIMIZERS row, built by the registry as train.py builds it."""
    import optimizers
    import settings

    optimizer_name, _, variant = name.partition("_")
    impl, _, stats = variant.partition("_s")
    argv = [f"config/_optimizer_{optimizer_name}.py", f"--optimizer_name={optimizer_name}",
            f"--log_interval={int(stats) if stats else steps + 1}"]  # log_interval: Sophia's stats_every
    if optimizer_name.startswith("sophia"):
        argv.append(f"--optimizer_impl={impl}")
    # The device type decides only whether AdamW is fused: "mps" stands for a device without fused kernels.
    device_type = "mps" if name == "adamw_foreach" else device
    return optimizers.build(settings.resolve(argv, root=ROOT), model, device_type)


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


def worker_train(optimizer_name: str, impl: str, hvp: str, compile_model: bool, iters: int, out_dir: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = 12  # the config's
    argv = [
        "config/train_shakespeare_char.py", f"--out_dir={out_dir}", f"--optimizer_name={optimizer_name}",
        # lr_decay_iters stays the config's: train.py wants it >= warmup_iters
        f"--optimizer_impl={impl}", f"--hessian_vector_product={hvp}", f"--max_iters={iters}",
        f"--eval_interval={iters}", "--eval_iters=1", "--log_interval=10", "--hess_interval=10",
        f"--batch_size={batch_size}", f"--hess_batch_size={batch_size // 2}", f"--device={device}",
        f"--compile={compile_model}", "--wandb_log=False", "--always_save_checkpoint=False",
    ]
    # train.py --help imports everything a run imports and stops: the baseline of the memory table.
    baseline_rss = run_measured([sys.executable, "train.py", "--help"])
    peak_rss = run_measured([sys.executable, "train.py", *argv])
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"]
    # The first window holds warmup and compilation; a compiled run compiles the estimator's
    # half batch in the second (the first refresh).
    steady = windows[1 + compile_model:] or windows
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


def train_key(label: str, compile_model: bool) -> str:
    """A training run's key in the results: '<label>', or '<label>+compile' for compile=True."""
    return label + "+compile" * compile_model


def bench_train(iters: int, repeats: int, threads: int = 0,
                runs: tuple[tuple[str, str, str, str], ...] = TRAIN_RUNS,
                compile_modes: tuple[bool, ...] = (False,)) -> tuple[str, str, dict]:
    """Each run once per compile mode and repeat, interleaved; results keyed by train_key."""
    results: dict[str, list[dict]] = {train_key(r[0], c): [] for c in compile_modes for r in runs}
    for r in range(repeats):
        for compile_model in compile_modes:
            for label, name, impl, hvp in runs:
                print(f"train: {train_key(label, compile_model)} (repeat {r + 1}/{repeats})", file=sys.stderr, flush=True)
                with tempfile.TemporaryDirectory(prefix="bench_opt_") as out_dir:
                    argv = ["train", name, impl, hvp, str(compile_model), str(iters), out_dir]
                    results[train_key(label, compile_model)].append(run_worker(argv, 3600, threads))
    first = results[train_key("adamw", compile_modes[0])][0]
    lines = [(f"Training iteration, config/train_shakespeare_char.py ({iters} iterations, batch 12 x 64, "
             f"hess_interval=10, hess_batch_size=6), device {first['device']}, {first['threads']} torch "
             "thread(s); median time_ms of the logged 10-iteration windows after the first (compile=True: "
             f"after the second), {repeats} run(s): median (min-max over runs); vs AdamW: against AdamW "
             "with the same compile setting."), "",
             "| optimizer | impl | compile | iteration ms | vs AdamW | estimator ms per iteration |",
             "|---|---|---|---:|---:|---:|"]
    for compile_model in compile_modes:
        base = statistics.median(x["time_ms"] for x in results[train_key("adamw", compile_model)])
        for label, _, impl, _ in runs:
            found = results[train_key(label, compile_model)]
            ms = [x["time_ms"] for x in found]
            est = [x["estimator_ms"] for x in found if x["estimator_ms"] is not None]
            lines.append(f"| {label} | {impl} | {compile_model} | {spread(ms)} | "
                         f"{statistics.median(ms) / base:.3f}x | {spread(est) if est else '-'} |")
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
    """Each run against AdamW run the same way (compiled or not)."""
    def adamw(label: str) -> list[dict]:
        return results[train_key("adamw", label.endswith("+compile"))]

    cuda = next(iter(results.values()))[0]["cuda_peak_mib"] is not None
    key = "cuda_peak_mib" if cuda else "peak_rss_mib"
    if cuda:
        lines = ["Peak memory, training runs: torch.cuda.max_memory_allocated (MiB).", "",
                 "| optimizer | peak MiB | vs AdamW |", "|---|---:|---:|"]
    else:
        lines = [("Peak memory, training runs: peak RSS of each subprocess (MiB), which includes the "
                 "interpreter, torch and everything train.py imports; the RSS after imports is shown, and "
                 "the growth beyond it (model, optimizer, data, activations) compared with AdamW's."), "",
                 "| optimizer | peak RSS MiB | vs AdamW | RSS after imports MiB | growth MiB | growth vs AdamW |",
                 "|---|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        base = statistics.median(x[key] for x in adamw(label))
        base_growth = statistics.median(x[key] - x["baseline_rss_mib"] for x in adamw(label))
        peak = statistics.median(x[key] for x in runs)
        if cuda:
            lines.append(f"| {label} | {peak:.0f} | {peak / base:.3f}x |")
        else:
            after = statistics.median(x["baseline_rss_mib"] for x in runs)
            growth = statistics.median(x[key] - x["baseline_rss_mib"] for x in runs)
            lines.append(f"| {label} | {peak:.0f} | {peak / base:.3f}x | {after:.0f} | {growth:.0f} | "
                         f"{growth / base_growth:.2f}x |")
    return "\n".join(lines)


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
            name, impl, hvp, compile_model, iters, out_dir = rest
            result = worker_train(name, impl, hvp, compile_model == "True", int(iters), out_dir)
        print(MARK + json.dumps(result), flush=True)
        return

    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--what", choices=("step", "train", "memory", "all", "gpu"), default="all")
    parser.add_argument("--rehearse", action="store_true",
                        help="with --what gpu: run its whole path on the CPU at a tiny size (about a minute)")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="with --what gpu: the deadline in seconds (default 480; 900 with --rehearse)")
    parser.add_argument("--model", choices=("small", "medium"), default="small",
                        help="parameter shapes of the step benchmark: GPT-2 small or medium")
    parser.add_argument("--iters", type=int, default=10, help="timed optimizer steps per run (step)")
    parser.add_argument("--train_iters", type=int, default=80, help="iterations of each training run (train)")
    parser.add_argument("--compile", choices=("False", "True", "both"), default="False",
                        help="train.py's compile setting in the training runs (train); both: each run both ways")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing (step)")
    parser.add_argument("--repeats", type=int, default=1, help="run every measurement this many times")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of the runs, e.g. adamw_fused,sophiag_compiled,adamw,sophiag "
                             f"(step: {', '.join(STEP_OPTIMIZERS)}; train: {', '.join(r[0] for r in TRAIN_RUNS)}); "
                             "the baselines adamw_fused and adamw are always run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in every run (default: torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown to this file")
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
            parser.error("--train_iters must be >= 20 (the first 10-iteration window is left out)")
        compile_modes = {"False": (False,), "True": (True,), "both": (False, True)}[args.compile]
        table, mem, raw["train"] = bench_train(args.train_iters, args.repeats, args.threads, train_runs,
                                               compile_modes)
        if args.what != "memory":
            sections.append(table)
        if args.what in ("memory", "all"):
            sections.append(mem)
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    if args.raw is not None:
        args.raw.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()

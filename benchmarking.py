"""What the benchmark scripts share (scripts/bench_optimizer.py, scripts/bench_gpu.py): the step
benchmark's model shapes, and running a benchmark worker or a train.py run in a process of its
own (a timeout that stops its compile workers too, its peak RSS, its output's tail on failure)."""

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import ROOT

MARK = "BENCH_RESULT "

# The step benchmark's parameter shapes (model.GPTConfig arguments; GPTConfig's defaults, biases
# included, for the rest). tiny and tiny2 stand in for small and medium in the --rehearse run.
SHAPES = {
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
}
SHAPES["tiny2"] = SHAPES["tiny"]  # the same graphs: the rehearsal's second shape reuses inductor's cache


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

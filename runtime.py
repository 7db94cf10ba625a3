"""What the entry points share: comma-list options, paths as the
subprocesses they start in the repository get them, device and dtype choice, output folders,
and the process plumbing of distributed runs (gradient sync, FSDP2 sharding, stop requests).

train.py, sample.py and the scripts import this; none of it is configuration.
"""

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from errors import NO_SPACE, UserError, exit_on_user_error, first_rank, one_line  # noqa: F401 (importers of runtime)

ROOT = Path(__file__).resolve().parent  # the repository: data/, config/ and the entry points


def comma_list(text: str, kind: type, what: str) -> list:
    """The values of a comma list option (`what`, e.g. "--seeds") as `kind`; empty items skipped."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}={text!r}: expected a comma list of {kind.__name__}s") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def shown(path: Path) -> str:
    """A path as a subprocess run in the repository (train.py, an eval script) gets it, and as
    printed: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


PROBE_BYTES = 1 << 16  # what writable_dir writes: a full disk still creates empty files


def no_space(error: BaseException, folder: Path, what: str, needed: int) -> UserError | None:
    """The one line for a write of `what` (about `needed` bytes) into `folder` that failed for
    lack of space or quota, or on a read-only file system (an OSError that is `error` or its
    cause: torch.save reports one as a RuntimeError of its zip writer); None otherwise."""
    e = error
    while e is not None and not (isinstance(e, OSError) and e.errno in NO_SPACE):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {what} to {folder}: the file system is read-only; choose a writable folder")
    try:
        free = f", {shutil.disk_usage(folder).free / 2 ** 20:,.1f} MiB free"
    except OSError:
        free = ""
    return UserError(f"cannot write {what} to {folder}: {e.strerror} (it needs about {needed / 2 ** 20:,.1f} MiB"
                     f"{free}); free some space there or choose another folder")


def writable_dir(path: str | Path, option: str) -> Path:
    """Create the directory `path` if needed and check that files can be written in it (a
    real write of PROBE_BYTES, flushed to the file system), before any work is done; a
    UserError naming the command-line `option` to change otherwise."""
    if not str(path).strip():  # checked before Path(), which turns "" into "."
        raise UserError(f"{option} is empty; give a folder name")
    path = Path(path)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {str(path)!r} ({e.strerror}); choose another {option}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """Check, before any work is done, that `path` can be written as a file: not a folder, and
    in a folder that takes a write (writable_dir) or, when it does not exist yet, under one
    that lets it be created; nothing is created here (write_output creates the folder). An
    existing file is left as it is. A UserError naming `option` otherwise."""
    if not str(path).strip():
        raise UserError(f"{option} is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option}={str(path)!r} is a folder; give a file name, e.g. {path / 'results.json'}")
    if path.parent.is_dir():
        writable_dir(path.parent, option)
    else:
        existing = next(p for p in path.absolute().parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{option}={str(path)!r}: its folder cannot be created under {existing}; choose "
                            f"another {option}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option}={str(path)!r} exists and is not writable; choose another {option}")
    return path


def write_output(path: Path, text: str) -> None:
    """Write an output file that writable_file checked, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class RunLock:
    """An exclusive lock on out_dir for a run's lifetime (rank 0 holds it for the whole job):
    a second run into the same folder stops at once with a line naming the holder. It is an
    flock, which the kernel drops when its process dies, so a run killed with kill -9 never
    blocks its own restart."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"out_dir={str(out_dir)!r} is in use by another run ({holder}); wait for it to end, "
                            f"or choose another --out_dir") from None
        holder = f"host {socket.gethostname()}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.write(holder)
            self.file.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # close flushes again
                self.file.close()
            raise no_space(e, out_dir, "its lock file", len(holder)) or e from None

    def release(self) -> None:
        self.file.close()


def pick_device(requested: str) -> str:
    """'auto' is cuda > mps > cpu; an explicit device must exist here."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={requested!r} but this machine has no CUDA GPU; use --device=cpu or --device=auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("device='mps' but MPS is not available here; use --device=cpu or --device=auto")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise UserError(f"device={requested!r} is unknown; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return requested


def free_memory(device: str) -> int | None:
    """Bytes free for a run: the GPU's free memory, or on the CPU the RAM Linux counts as
    available; None where neither is known (MPS, a CPU without /proc/meminfo)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device == "cpu" and Path("/proc/meminfo").is_file():
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        if "MemAvailable" in fields:
            return int(fields["MemAvailable"].split()[0]) * 1024
    return None


def device_type(device: str) -> str:
    """'cuda' for 'cuda:N', else the device itself: what torch.autocast and GradScaler take."""
    return "cuda" if device.startswith("cuda") else device


def pick_dtype(requested: str, device_type: str) -> str:
    """'auto' is bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere."""
    if requested == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={requested!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    if requested == "float16" and device_type != "cuda":
        raise UserError("dtype='float16' needs a CUDA GPU (it trains with a GradScaler); use bfloat16 or float32")
    return requested


def autocast(device_type: str, dtype_name: str) -> AbstractContextManager:
    """Mixed precision for the forward pass; nothing for float32."""
    if dtype_name == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype_name))


def placement(device: str, dtype: str) -> tuple[str, AbstractContextManager]:
    """The device and mixed-precision context of an entry point that runs a model without
    training it (sampling, evaluation), from its --device and --dtype."""
    dev = pick_device(device)
    return dev, autocast(device_type(dev), pick_dtype(dtype, device_type(dev)))


class DeviceTimer:
    """Time spent in a block of code that launches device work, summed until read: CUDA events
    on a GPU (a host clock would time the kernel launches only), the host clock elsewhere.
    Reading it (take_seconds) waits for the device: log steps only."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.seconds, self.events = 0.0, []

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        else:
            self.seconds += time.perf_counter() - t0

    def take_seconds(self) -> float:
        """Seconds since the last call."""
        seconds = self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000
        self.seconds, self.events = 0.0, []
        return seconds


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the gradient all-reduce of a DDP or FSDP2 module on or off, so that only the
    last of several backward passes pays for it; a plain module is left alone."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(enabled)


def shard_model(model: torch.nn.Module, device_type: str, world_size: int, compile_blocks: bool = False) -> None:
    """FSDP2 for a model.GPT, in place: each transformer block is one unit and the root holds
    the rest. The tied wte/lm_head weight is one tensor, so it belongs to the root's unit (with
    wpe and ln_f). The parameters become DTensor shards over a 1-D mesh of all ranks; build the
    optimizer afterwards. With compile_blocks, each block is compiled before it is sharded
    (the pattern torch documents for FSDP2: FSDP2's all-gathers stay between the compiled
    graphs); the root is then not compiled."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


class StopRequests:
    """Preemption (SLURM sends SIGTERM or SIGUSR1) and Ctrl-C (SIGINT): the loop finishes its
    step, checkpoints and exits 0; a second Ctrl-C aborts at once (KeyboardInterrupt). Under torchrun, also when the launcher is gone (killed by a signal it does not
    handle): its workers would otherwise train on unsupervised. Ranks agree on the reason,
    so every rank stops at the same step and rank 0 prints a reason some rank really had."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    REASONS = ("", "received SIGTERM", "received SIGUSR1", "received SIGINT (Ctrl-C)", "the torchrun launcher is gone")

    def __init__(self):
        self.signals: list[int] = []
        self.launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self.previous = {sig: signal.signal(sig, self._received) for sig in self.SIGNALS}

    def _received(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.signals:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and first_rank():  # every rank gets the Ctrl-C
            print("Ctrl-C: finishing the step and saving a checkpoint (Ctrl-C again aborts without one)",
                  file=sys.stderr)
        self.signals.append(signum)

    def local(self) -> int:
        """This rank's reason, as an index into REASONS (0: none)."""
        if self.signals:
            return 1 + self.SIGNALS.index(self.signals[0])
        if self.launcher is not None and os.getppid() != self.launcher:
            return 4
        return 0

    def agreed(self, device: str) -> str:
        """The reason to stop now, the same on every rank (a collective under torchrun)."""
        code = self.local()
        if dist.is_initialized():
            flag = torch.tensor(code, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return self.REASONS[code]

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

"""The device a process runs on, its dtype and mixed-precision context, and a timer of device work."""

import contextlib
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from errors import UserError


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

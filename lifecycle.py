"""A run's hold on its folder and process: the lock on out_dir for the run's lifetime, and stop
requests (preemption signals, Ctrl-C, a vanished torchrun launcher) that end it with a checkpoint."""

import contextlib
import fcntl
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from errors import UserError, first_rank
from paths import no_space


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

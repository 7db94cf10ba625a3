"""The run's records: out_dir/metrics.jsonl (one JSON object per line) and, optionally, wandb.

Each record has "kind" ("train", "eval" or "skipped") and "iter". A resumed run appends the
steps after its checkpoint again: readers keep the later record of a step. A value that is
not finite (a diverged loss, a NaN gradient norm) is written as null, so every line stays
valid JSON; a train record's loss is null when every step since the last line was skipped.
"""

import contextlib
import json
import math
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from runtime import UserError, no_space


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl and to a wandb run when one is given. Only rank 0
    has one. Each record is one write of one whole line, so a killed run loses nothing it
    logged and leaves at most a torn last line, which the next start cuts off (repair); a
    write that fails (a full disk) is undone and becomes a UserError."""

    def __init__(self, out_dir: Path, wandb_run=None):
        self.path = out_dir / "metrics.jsonl"
        repair(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.wandb_run = wandb_run

    def __call__(self, record: dict) -> None:
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            written = 0
            while written < len(line):
                written += os.write(self.fd, line[written:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise no_space(e, self.path.parent, "a metrics record", len(line)) or e from None
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["iter"])

    def close(self) -> None:
        os.close(self.fd)
        if self.wandb_run is not None:
            self.wandb_run.finish()


def repair(path: Path) -> None:
    """Cut a torn last line (one without its newline: a write cut by a kill or a full disk) off
    a metrics.jsonl before appending to it, saying so in one line; a complete record that only
    lacks its newline gets it instead."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        tail = data[data.rfind(b"\n") + 1:]
        if record_of(tail.decode("utf-8", "replace")) is not None:
            f.write(b"\n")
            return
        f.truncate(len(data) - len(tail))
    print(f"{path}: cut off a torn last line ({len(tail)} bytes, a record cut short by an interrupted write)")


class StepWindow:
    """The steps since the last log line, summed on the device as they happen (the loop never
    waits for them) and read once, at the log line."""

    def __init__(self, device: str, grad_clip: float):
        self.device, self.grad_clip = device, grad_clip
        self.bad_in_a_row = 0  # consecutive skipped steps, carried across windows
        self.skipped_total = 0
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.clipped = torch.zeros((), device=self.device)
        self.applied: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, norm: torch.Tensor, applied: torch.Tensor) -> None:
        """One step's results from train_step; `applied` is 1.0 or 0.0 (skipped)."""
        self.applied.append(applied)
        self.loss_sum += torch.where(applied > 0, loss, 0.0)
        if self.grad_clip > 0:
            self.clipped += (norm > self.grad_clip).float() * applied
        self.norm = norm

    def close(self, last_iter: int, distributed: bool) -> dict:
        """Read the window (the host sync) and start the next: the mean loss over the applied
        steps (None when all were skipped; averaged over ranks), the last gradient norm, the
        clipping frequency, and each skipped step as (iter, how many in a row up to it)."""
        if distributed:
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.AVG)
        flags = torch.stack(self.applied).tolist()
        applied = sum(flags)
        skipped = []
        for it, flag in enumerate(flags, last_iter - len(flags) + 1):
            self.bad_in_a_row = 0 if flag else self.bad_in_a_row + 1
            if not flag:
                skipped.append((it, self.bad_in_a_row))
        self.skipped_total += len(skipped)
        summary = dict(loss=self.loss_sum.item() / applied if applied else None, grad_norm=self.norm.item(),
                       clip_frac=self.clipped.item() / max(1, applied), steps=len(flags), skipped=skipped)
        self._reset()
        return summary


def record_of(line: str) -> dict | None:
    """The record a metrics.jsonl line holds (JSON with kind and iter), else None."""
    try:
        record = json.loads(line)
        int(record["iter"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return record if "kind" in record else None


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """The records of a metrics.jsonl by kind, each list sorted by step with one record per
    step (the later one). A torn last line (no newline: a kill or a full disk cut the write)
    is ignored, and so is the torn record that runs of earlier versions, which did not cut it
    off (MetricsLog), glued to the start of the next one; any other line that is not a record
    is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run's out_dir or its metrics.jsonl")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    by_kind: dict[str, dict[int, dict]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = record_of(line)
        if record is None and "{" in line[1:]:
            record = record_of(line[line.rindex("{", 1):])  # the tail of a fragment + record line
        if record is None:
            if n == len(lines) and not text.endswith("\n"):  # every record ends with one
                continue
            raise UserError(f"{path} line {n} is not a metrics record (JSON with kind and iter)")
        by_kind.setdefault(record["kind"], {})[int(record["iter"])] = record
    return {kind: [records[i] for i in sorted(records)] for kind, records in by_kind.items()}


def wandb_has_credentials() -> bool:
    """Whether wandb will find an API key: WANDB_API_KEY or a ~/.netrc entry for its host (a
    cluster's ~/.netrc often holds other hosts only)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(project: str, name: str, config: dict, out_dir: Path):
    """A wandb run that never stops a batch job: offline without credentials, and offline
    when going online fails (a bad key, a compute node without network). The run's id is kept
    in out_dir, so a resumed training run continues the same wandb run."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but wandb is not installed; `pip install wandb` or drop --wandb_log") from None
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        print(f"wandb: no API key found, logging offline to {out_dir / 'wandb'} (upload later with `wandb sync`)")
    id_file = out_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    settings = dict(project=project, name=name, config=config, dir=str(out_dir), id=run_id, resume="allow")
    try:
        return wandb.init(**settings)
    except wandb.errors.Error as e:
        print(f"wandb: could not log online ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
              f"logging offline to {out_dir / 'wandb'} instead")
        return wandb.init(mode="offline", **settings)

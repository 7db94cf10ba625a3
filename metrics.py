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

from errors import UserError
from paths import no_space


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


def log_window(log: MetricsLog | None, record: dict, window: dict) -> None:
    """Rank 0 (the rank with a log): a "skipped" record and console line per skipped step of
    the window (StepWindow.close's summary), then its train record and console line, which
    shows the record's fields it has (mfu, Sophia's win rate and |h|)."""
    if log is None:
        return
    for it, in_a_row in window["skipped"]:
        print(f"iter {it}: non-finite loss or gradient, step skipped ({in_a_row} in a row)")
        log({"kind": "skipped", "iter": it, "in_a_row": in_a_row})
    loss = f"{record['loss']:.4f}" if record["loss"] is not None else f"n/a (all {window['steps']} steps skipped)"
    line = f"iter {record['iter']}: loss {loss}, time {record['time_ms']:.2f}ms"
    if "mfu" in record:
        line += f", mfu {record['mfu'] * 100:.2f}%"
    line += f", lr {record['lr']:.2e}, tok/s {record['tokens_per_s']:,.0f}"
    if "win_rate" in record:
        line += f", win {record['win_rate']:.3f}"
    if "hessian_norm" in record:
        line += f", |h| {record['hessian_norm']:.3g}"
    print(line)
    log(record)


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


def record_of(line: str) -> dict | None:
    """The record a metrics.jsonl line holds (JSON with kind and iter), else None."""
    try:
        record = json.loads(line)
        int(record["iter"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return record if "kind" in record else None


def logged_evaluation(path: Path, step: int) -> bool:
    """Whether a metrics.jsonl holds an evaluation of `step` (a line that is not a record is
    passed over: this only decides whether a resumed run scores its first step again)."""
    if not path.is_file():
        return False
    for line in path.read_text(errors="replace").splitlines():
        record = record_of(line)
        if record is not None and record["kind"] == "eval" and int(record["iter"]) == step:
            return True
    return False


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

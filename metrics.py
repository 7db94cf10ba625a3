"""The run's records: out_dir/metrics.jsonl (one JSON object per line) and, optionally, wandb.

Each record has "kind" ("train", "eval" or "skipped") and "iter". A resumed run appends the
steps after its checkpoint again: readers keep the later record of a step.
"""

import json
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from runtime import UserError


class MetricsLog:
    """Appends records to out_dir/metrics.jsonl (flushed: a killed run loses nothing it logged)
    and to a wandb run when one is given. Only rank 0 has one."""

    def __init__(self, out_dir: Path, wandb_run=None):
        self.file = open(out_dir / "metrics.jsonl", "a")
        self.wandb_run = wandb_run

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["iter"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(path: Path) -> dict[str, list[dict]]:
    """The records of a metrics.jsonl by kind, each list sorted by step with one record per
    step (the later one). A last line cut short by a kill (no newline) is ignored; any other
    line that is not a record is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path} not found; pass a run's out_dir or its metrics.jsonl")
    text = path.read_text()
    lines = text.splitlines()
    by_kind: dict[str, dict[int, dict]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_kind.setdefault(record["kind"], {})[int(record["iter"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == len(lines) and not text.endswith("\n"):  # every record ends with one
                continue
            raise UserError(f"{path} line {n} is not a metrics record (JSON with kind and iter)") from None
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

"""One rank of a multi-process training launch, for tests/test_distributed.py.

    RANK=r LOCAL_RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/distributed_worker.py RUNS.json

(the environment torchrun gives each rank, less MASTER_PORT). RUNS.json lists runs, {"dump":
folder, "argv": [train.py arguments]}, trained one after the other in the same processes, so
the interpreters and torch start once for all of them. train.main sets up and tears down its
process group each time; each run has a port of its own, so a new group never meets the keys
an earlier one left in a store (gloo's rendezvous can hang on them). Rank 0 picks each port
just before its run and passes it to the others in <dump>/port: a port picked minutes ahead
can meanwhile be taken by one of the earlier runs' own connections.

After each run every rank writes <dump>/rank<r>.pt: its model's and its optimizer's state
dicts with each tensor as this rank holds it (its own shard under FSDP2), and what
train.main returned. The model and the optimizer are caught where train.py builds the
optimizer, so train.py needs no test hook.
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

import optimizers
import train


def local(value):
    """Tensors as this rank holds them (a DTensor's local shard), copied to the CPU."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "to_local"):
            value = value.to_local()
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local(v) for v in value)
    return value


def free_port() -> int:
    """A port nothing listens on now (the tests' rendezvous ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agree_on_port(dump: Path, rank: int, timeout: float = 120) -> str:
    """A free port for this run's rendezvous: rank 0 picks it, the others read it."""
    path = dump / "port"
    if rank == 0:
        dump.mkdir(parents=True, exist_ok=True)
        tmp = dump / "port.tmp"
        tmp.write_text(str(free_port()))
        tmp.rename(path)  # atomic: a reader never sees a half-written number
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 never wrote {path}")
        time.sleep(0.05)
    return path.read_text()


def main() -> None:
    torch.set_num_threads(1)  # speed only: the ranks share a small machine
    runs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    built = {}
    build_optimizer = optimizers.build

    def catching_build_optimizer(cfg, model, *args, **kwargs):
        built["model"] = model
        built["optimizer"] = build_optimizer(cfg, model, *args, **kwargs)
        return built["optimizer"]

    optimizers.build = catching_build_optimizer
    for run in runs:
        built.clear()
        dump = Path(run["dump"])
        os.environ["MASTER_PORT"] = agree_on_port(dump, rank)
        result = train.main(run["argv"])
        state = {"model": local(built["model"].state_dict()), "optimizer": local(built["optimizer"].state_dict()),
                 "result": result}
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(state, dump / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

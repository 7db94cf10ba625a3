"""One rank of a multi-process training launch, for tests/test_distributed.py.

    RANK=r LOCAL_RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/distributed_worker.py RUNS.json

(the environment torchrun gives each rank). RUNS.json lists runs, {"dump": folder, "port":
MASTER_PORT, "argv": [train.py arguments]}, trained one after the other in the same
processes, so the interpreters and torch start once for all of them. train.main sets up and
tears down its process group each time; each run has a port of its own, so a new group never
meets the keys an earlier one left in a store (gloo's rendezvous can hang on them).

After each run every rank writes <dump>/rank<r>.pt: its model's and its optimizer's state
dicts with each tensor as this rank holds it (its own shard under FSDP2), and what
train.main returned. The model and the optimizer are caught where train.py builds the
optimizer, so train.py needs no test hook.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train

torch.set_num_threads(1)  # speed only: the ranks share a small machine


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


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    built = {}
    build_optimizer = train.build_optimizer

    def catching_build_optimizer(cfg, model, *args, **kwargs):
        built["model"] = model
        built["optimizer"] = build_optimizer(cfg, model, *args, **kwargs)
        return built["optimizer"]

    train.build_optimizer = catching_build_optimizer
    for run in runs:
        built.clear()
        os.environ["MASTER_PORT"] = str(run["port"])
        result = train.main(run["argv"])
        state = {"model": local(built["model"].state_dict()), "optimizer": local(built["optimizer"].state_dict()),
                 "result": result}
        dump = Path(run["dump"])
        dump.mkdir(parents=True, exist_ok=True)
        torch.save(state, dump / f"rank{rank}.pt")


if __name__ == "__main__":
    main()

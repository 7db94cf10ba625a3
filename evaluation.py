"""Model evaluation: the mean loss over fixed windows of each split, the same windows for every
run, seed, optimizer and number of ranks."""

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset import eval_offsets, read_split, windows


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data_dir: Path, block_size: int, batch_size: int, eval_iters: int,
                  autocast: AbstractContextManager, device: str, rank: int = 0, world_size: int = 1,
                  stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
    """Mean loss of `model(x, y)[1]` over eval_iters batches of batch_size windows per split. The windows depend on
    the data alone (eval_offsets), so every evaluation of every run, whatever its seed,
    optimizer or number of ranks, scores the same windows: rank r scores batches r,
    r + world_size, ..., and the per-batch losses are summed over ranks (each slot is filled
    by one rank, the others add 0). Every rank runs the same number of forwards (FSDP2
    all-gathers in each), the last ones scoring a batch again with weight 0 when eval_iters
    is not a multiple of the world size. `stop` is asked before every batch (a collective under
    torchrun: every rank asks as often); when it says so, the evaluation ends there: None."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        data = read_split(data_dir, split)  # its .bin file or its llm.c shards
        ix = eval_offsets(data, block_size, eval_iters, batch_size)
        losses = torch.zeros(eval_iters, device=device)
        rounds = -(-eval_iters // world_size)
        # A transient bar (a terminal only, rank 0): logs keep one line per evaluation.
        for k in tqdm(range(rank, rounds * world_size, world_size), desc=f"evaluating {split}", leave=False,
                      disable=rank != 0 or not sys.stderr.isatty()):
            if stop():
                model.train()
                return None
            x, y = windows(data, ix[k % eval_iters].tolist(), block_size, device)
            with autocast:
                loss = model(x, y)[1]
            if k < eval_iters:
                losses[k] = loss
        if dist.is_initialized():
            dist.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train()
    return out

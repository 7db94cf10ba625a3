"""What checksums cost a GPT-2-small checkpoint: time to save and to load it, plain and verified.

    python -m scripts.bench_checkpoint --dir=/tmp/bench_ckpt --repeats=3

The checkpoint is train.py's for GPT-2 small (124M parameters) with AdamW's state (two moments
per parameter): about 1.5 GB. "plain" is what save and load did before checksums (torch.save,
fsync, rename; torch.load memory-mapped), "verified" is checkpoint.py's save_checkpoint
(checksums, write, read back and verify, rename) and read_checkpoint (load and verify). Both
loads then copy the state into the model and optimizer, as a resume does. The file is read
back from the page cache (it was just written), as on a machine with memory to spare.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from checkpoint import checksums, read_checkpoint, rng_state, save_checkpoint
from model import GPT, GPTConfig


def gpt2_small_state() -> tuple[GPT, torch.optim.Optimizer, dict]:
    """GPT-2 small, an AdamW that has taken one step (so it holds both moments), and the
    checkpoint dict train.py would save of them."""
    args = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False, dropout=0.0)
    model = GPT(GPTConfig(**args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": {}, "model_args": args,
             "iter_num": 1000, "tokens": 0, "best_val_loss": 3.0, "config": {"dataset": "openwebtext"},
             "rng": [rng_state({})], "world_size": 1, "meta": {"tokenizer": "gpt2", "vocab_size": 50257}}
    return model, optimizer, state


def plain_save(out_dir: Path, state: dict) -> None:
    path = out_dir / f"ckpt_{state['iter_num']:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="a folder to write the checkpoints in (emptied)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model, optimizer, state = gpt2_small_state()
    path = args.dir / "ckpt_00001000.pt"

    def resume(checkpoint: dict) -> None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in (("save, plain", lambda: plain_save(args.dir, state)),
                         ("load, plain", lambda: resume(torch.load(path, map_location="cpu", weights_only=True,
                                                                   mmap=True))),
                         ("checksums alone", lambda: checksums(state)),
                         ("save, verified", lambda: save_checkpoint(args.dir, state, keep=1)),
                         ("load, verified", lambda: resume(read_checkpoint(path)))):
            times.setdefault(name, []).append(timed(fn))
    size = path.stat().st_size
    print(f"GPT-2 small + AdamW state: {size / 1e9:.2f} GB, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, seconds in times.items():
        print(f"{name:16s} {statistics.median(seconds):6.2f} s  ({', '.join(f'{s:.2f}' for s in seconds)})")
    path.unlink()


if __name__ == "__main__":
    main()

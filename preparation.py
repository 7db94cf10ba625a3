"""What the corpus preparations (data/openwebtext, data/fineweb_edu) share: their output folder
(checked, locked, cleared of a killed run's temporary files), local input files, GPT-2
tokenizing, and datasets' logging and progress bars kept out of logs. Their errors are errors.UserError: one line, exit status 2.
"""

import glob
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets

from dataset import TEMPORARY_NAME
from errors import UserError
from lifecycle import RunLock
from paths import writable_dir
from tokenizer import gpt2_encoding

DEFAULT_NUM_PROC = max(1, min(8, (os.cpu_count() or 2) // 2))
LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def local_files(pattern: str) -> tuple[str, list[str]]:
    """(datasets loader name, sorted matching files) for a --data_files glob."""
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(
            f"--data_files {pattern!r} matched no files; pass an existing path or a quoted "
            "glob relative to the current directory, e.g. 'corpus/*.jsonl'"
        )
    suffixes = {Path(f).suffix.lower() for f in files}
    loaders = {LOADERS.get(suffix) for suffix in suffixes}
    if len(loaders) > 1 or None in loaders:
        raise UserError(
            f"--data_files {pattern!r} matched files ending in {sorted(suffixes)}; "
            "use a glob that matches only .txt, only .json/.jsonl or only .parquet files"
        )
    return loaders.pop(), files


def tokenize(batch: dict, text_column: str) -> dict:
    """GPT-2 ids of each document, end-of-text token appended, and their lengths."""
    enc = gpt2_encoding()  # cached per worker process, so each loads the BPE files once
    ids = [enc.encode_ordinary(text) + [enc.eot_token] for text in batch[text_column]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def quiet_datasets() -> Callable[[], None]:
    """Turn datasets' logging off (a read error is told once, by the error line) and its progress
    bars too unless stderr is a terminal, so a log file gets no bars; returns the undo."""
    verbosity, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()

    def restore() -> None:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    return restore


@contextmanager
def output_dir(path: str | Path, option: str = "--out_dir") -> Iterator[Path]:
    """The folder `path` for the block: created if needed and checked writable (writable_dir),
    locked (a second preparation into it stops with a line naming the holder), and cleared of
    the temporary files a killed earlier preparation left, saying so; the lock file goes with
    the lock. A folder created here is removed again when the block leaves it empty (it
    failed), so a failed first preparation leaves nothing behind."""
    created = not Path(path).exists()
    path = writable_dir(path, option)
    lock = None
    try:
        lock = RunLock(path)
        remove_stale_temporaries(path)
        yield path
    finally:
        if lock is not None:  # a prepared folder holds the dataset alone
            lock.path.unlink(missing_ok=True)
            lock.release()
        if created and not any(path.iterdir()):
            path.rmdir()


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files (dataset.atomic_path's) of a preparation that was killed;
    call it holding the folder's lock, so none of them is another preparation's."""
    for path in sorted(folder.iterdir()):
        if TEMPORARY_NAME.fullmatch(path.name) and path.is_file():
            size = path.stat().st_size
            path.unlink()
            print(f"removed {path / ''} ({size / 2 ** 20:,.1f} MiB), a temporary file left by a preparation that "
                  f"was killed")

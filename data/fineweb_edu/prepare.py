"""FineWeb-Edu as GPT-2 tokens: train.bin, val.bin and meta.json, streamed.

    python -m data.fineweb_edu.prepare                                  # sample-10BT from the Hub
    python -m data.fineweb_edu.prepare --max_tokens=100000000           # its first ~100M tokens
    python -m data.fineweb_edu.prepare --data_files 'fw/*.parquet' --out_dir=data/fw_local  # no network

The default source is the Hub's HuggingFaceFW/fineweb-edu, subset sample-10BT (~10B GPT-2
tokens, ~9.7M documents), read with `datasets`' streaming mode: documents are tokenized as
they arrive (in num_threads threads: tiktoken releases the GIL while it encodes; on 2 busy
cores one thread was as fast) and their ids appended to the
output files, so the corpus is never held in memory nor stored twice (no Hub cache, no
tokenized copy). Each document gets the end-of-text token appended, as in
data/openwebtext/prepare.py; both share preparation.py (tokenizer, local files, output folder).

The split follows the stream's order and needs no shuffle: document i (0, 1, 2, ...) goes to
val when i is a multiple of val_every (default 2000, nanoGPT's 0.05%), and so does every
document while val holds fewer than min_val_tokens (the leading ones; so a small
--max_tokens sample still has a usable val split). The same input thus always gives the
same files, with any number of threads, and a --max_tokens sample is a prefix of the full
preparation. Both files are written under temporary names and renamed at the end, then
meta.json: a failed or interrupted preparation leaves the previous dataset as it was.
"""

import argparse
import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
from tqdm import tqdm

from dataset import TOKEN_DTYPE, atomic_path, write_meta
from preparation import DEFAULT_NUM_PROC, local_files, output_dir, quiet_datasets, tokenize
from errors import UserError, one_line
from tokenizer import EOT, gpt2_encoding

HERE = Path(__file__).resolve().parent

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"
BATCH_DOCUMENTS = 1024  # documents per tokenizer task


def stream(dataset: str, name: str, data_files: str | None) -> tuple[str, list[tuple[str, Callable]]]:
    """(the source's description, [(what to name in an error, open() -> streaming dataset)]):
    one entry for a Hub dataset, one per file for local files, so a read error names its file."""
    if data_files:
        loader, files = local_files(data_files)
        empty = next((f for f in files if os.path.getsize(f) == 0), None)
        if empty:
            raise UserError(f"{empty} is empty (0 bytes); remove it or narrow --data_files")
        options = {"sample_by": "document"} if loader == "text" else {}
        return f"local files {data_files}", [
            (f, lambda f=f: datasets.load_dataset(loader, data_files=[f], split="train", streaming=True, **options))
            for f in files]
    hub = f"Hugging Face dataset {dataset}" + (f" ({name})" if name else "")
    return hub, [(hub, lambda: datasets.load_dataset(dataset, name=name or None, split="train", streaming=True))]


def text_batches(parts: list[tuple[str, Callable]], text_column: str) -> Iterator[list[str]]:
    """The documents of every part in order, BATCH_DOCUMENTS at a time. Whatever goes wrong
    while reading (a damaged file, a line that is not JSON, the network) is a UserError
    that names the part."""
    for where, open_part in parts:
        try:
            for batch in open_part().iter(batch_size=BATCH_DOCUMENTS):
                if text_column not in batch:
                    raise UserError(f"no column {text_column!r} in {where} (columns: {sorted(batch)}); "
                                    "pick one with --text_column")
                texts = batch[text_column]
                bad = [t for t in texts if not isinstance(t, str)]
                if bad:
                    raise UserError(f"{where}: column {text_column!r} holds a {type(bad[0]).__name__}, not text")
                yield texts
        except UserError:
            raise
        except Exception as e:  # datasets, pyarrow and the network raise many types; all are fatal here
            raise UserError(f"cannot read {where} ({type(e).__name__}: {one_line(str(e))[:300]})") from e


def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the documents' ids, each followed by the end-of-text token, as one array; their lengths)."""
    out = tokenize({"text": texts}, "text")
    lengths = np.asarray(out["len"], dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(out["ids"]), TOKEN_DTYPE, count=int(lengths.sum())), lengths


def ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """map(fn, items) on `threads` threads, in order, with at most 2 * threads items in flight
    (Executor.map would read a streamed corpus ahead without bound)."""
    if threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def split_documents(lengths: np.ndarray, first: int, val_tokens: int, val_every: int, min_val_tokens: int) -> np.ndarray:
    """Which of the documents first, first + 1, ... (of these lengths) go to val, given that
    val holds val_tokens so far: every val_every-th, and all while val is under min_val_tokens."""
    to_val = (first + np.arange(len(lengths))) % val_every == 0
    for i, length in enumerate(lengths.tolist()):
        if val_tokens >= min_val_tokens:
            break
        to_val[i] = True
        val_tokens += length
    return to_val


def prepare(
    out_dir: Path = HERE,
    dataset: str = DEFAULT_DATASET,
    name: str = DEFAULT_NAME,
    data_files: str | None = None,
    text_column: str = "text",
    max_tokens: int = 0,
    val_every: int = 2000,
    min_val_tokens: int = 1_000_000,
    num_threads: int = DEFAULT_NUM_PROC,
) -> dict:
    """Stream, tokenize and write the dataset into out_dir; returns the meta.json content."""
    if val_every < 2 or min_val_tokens < 0 or max_tokens < 0 or num_threads < 1:
        raise UserError(f"need --val_every >= 2, --num_threads >= 1 and --min_val_tokens, --max_tokens >= 0; "
                        f"got {val_every}, {num_threads}, {min_val_tokens}, {max_tokens}")
    if max_tokens and max_tokens <= min_val_tokens:
        raise UserError(f"--max_tokens={max_tokens} leaves nothing for train after --min_val_tokens={min_val_tokens}; "
                        "raise the one or lower the other")
    source, parts = stream(dataset, name, data_files)
    with output_dir(out_dir) as out_dir:  # checked and locked before the stream is read
        counts = {"train_tokens": 0, "train_documents": 0, "val_tokens": 0, "val_documents": 0}
        with (atomic_path(out_dir / "train.bin") as train_tmp, atomic_path(out_dir / "val.bin") as val_tmp,
              open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file,
              tqdm(total=max_tokens or None, unit="tok", unit_scale=True, desc="tokenizing",
                   disable=not sys.stderr.isatty()) as bar):
            for ids, lengths in ordered_map(encode, text_batches(parts, text_column), num_threads):
                written = counts["train_tokens"] + counts["val_tokens"]
                if max_tokens:  # keep the documents up to the one that reaches max_tokens
                    lengths = lengths[:np.searchsorted(np.cumsum(lengths), max_tokens - written) + 1]
                    ids = ids[:lengths.sum()]
                first = counts["train_documents"] + counts["val_documents"]
                to_val = split_documents(lengths, first, counts["val_tokens"], val_every, min_val_tokens)
                token_to_val = np.repeat(to_val, lengths)
                for split, f, mask in (("train", train_file, ~token_to_val), ("val", val_file, token_to_val)):
                    ids[mask].tofile(f)
                    counts[f"{split}_tokens"] += int(mask.sum())
                counts["val_documents"] += int(to_val.sum())
                counts["train_documents"] += int(len(to_val) - to_val.sum())
                bar.update(len(ids))
                if max_tokens and written + len(ids) >= max_tokens:
                    break
            if not counts["train_documents"]:
                n = counts["val_documents"]
                raise UserError(f"{source} holds no documents" if not n else
                                f"{source} gave {n} document(s), all held out for val; a train split needs more: "
                                f"lower --min_val_tokens={min_val_tokens}" + (" or raise --max_tokens" if max_tokens
                                                                             else " or give more documents"))
        meta = {"tokenizer": "gpt2", "vocab_size": gpt2_encoding().n_vocab, "end_of_text": EOT, **counts,
                "source": source, "max_tokens": max_tokens, "val_every": val_every, "min_val_tokens": min_val_tokens}
        write_meta(out_dir, meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data_files", help="glob of local .parquet or .json/.jsonl files (or .txt, one document each) "
                             "instead of --dataset; needs --out_dir")
    add("--out_dir", type=Path, help="where the .bin files go (default: this folder, data/fineweb_edu)")
    add("--dataset", default=DEFAULT_DATASET, help="Hugging Face dataset, streamed (default: %(default)s)")
    add("--name", default=DEFAULT_NAME, help="its subset / config name; '' for none (default: %(default)s)")
    add("--text_column", default="text", help="column holding the documents (default: %(default)s)")
    add("--max_tokens", type=int, default=0, help="stop after about this many tokens, train + val (default: all)")
    add("--val_every", type=int, default=2000, help="hold out every N-th document for val (default: %(default)s)")
    add("--min_val_tokens", type=int, default=1_000_000,
        help="hold out the leading documents until val has this many tokens (default: %(default)s)")
    add("--num_threads", type=int, default=DEFAULT_NUM_PROC, help="tokenizer threads (default: %(default)s)")
    args = parser.parse_args(argv)
    restore = quiet_datasets()
    try:
        if args.data_files and args.out_dir is None:
            raise UserError(f"--data_files needs --out_dir (the default {HERE} is for FineWeb-Edu itself); "
                            "name the folder to write, e.g. --out_dir=data/my_corpus")
        meta = prepare(**{**vars(args), "out_dir": args.out_dir or HERE})
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        restore()
    print(f"{meta['source']}: train {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
          f"val {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents) -> {args.out_dir or HERE}")
    return meta


if __name__ == "__main__":
    main()

"""OpenWebText (or any text corpus) as GPT-2 tokens: train.bin, val.bin and meta.json.

    python -m data.openwebtext.prepare                                   # OpenWebText from the Hub
    python -m data.openwebtext.prepare --data_files 'corpus/*.jsonl' --out_dir=data/my_corpus  # no network

The default --dataset is Skylion007/openwebtext, the Hub repository nanoGPT's plain
`openwebtext` name redirects to. The corpus was re-uploaded there as parquet shards under
data/ and its loading script deleted (Hub commit cf22a37, "Delete dataset script"), so
recent `datasets` (>= 4 no longer runs dataset scripts) loads it as plain parquet. Any
other script-free Hub dataset with a text column works the same way. This folder
(data/openwebtext) is for OpenWebText itself: --data_files, or another --dataset, needs
--out_dir, so that another corpus never lands here by default.

Like nanoGPT: every document gets the end-of-text token appended, a seeded
train_test_split holds out val_fraction of the documents, tokenizing runs in num_proc
processes, and the ids are written shard by shard into a uint16 memmap, so the whole
corpus (~9B tokens for OpenWebText) never has to fit in memory. The ids are tokenized
with the offline GPT-2 encoding of tokenizer.py.

Val holds at least min_val_tokens (default 1M, as in data/fineweb_edu/prepare.py): when
val_fraction gives fewer, the leading documents of the (shuffled) train split move to val
until it has them. OpenWebText's 0.05% is ~4M tokens, so its split is nanoGPT's. A corpus
too small for that plus a train split is an error that says how many tokens it has;
--min_val_tokens lowers the minimum (training needs block_size+1 tokens in each split,
1,025 for the GPT-2 configs, and evaluation is steadier with many more).

Bad input is one `error: ...` line (exit 2) and writes nothing: a local file that is empty
(0 bytes), not UTF-8 (.txt), not JSON (.json/.jsonl; the line is named) or not parquet is
named with the reason; with --skip_bad_files such files are left out instead, with one
`warning: ...` line each. A corpus without a single non-blank document is an error, not a
1-token dataset. train.bin and val.bin are written under temporary names and renamed only
when both are complete, then meta.json: a failed or interrupted preparation leaves the
previous dataset in out_dir as it was.
"""

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from dataset import TOKEN_DTYPE, atomic_path, write_meta
from preparation import DEFAULT_NUM_PROC, local_files, output_dir, quiet_datasets, tokenize
from errors import UserError, one_line
from tokenizer import gpt2_encoding

HERE = Path(__file__).resolve().parent

DEFAULT_DATASET = "Skylion007/openwebtext"
DEFAULT_MIN_VAL_TOKENS = 1_000_000
TOKENIZED_FEATURES = datasets.Features(
    # uint16 rather than the default int64 keeps the tokenized cache 4x smaller (~18 GB for OWT).
    {"ids": datasets.List(datasets.Value("uint16")), "len": datasets.Value("int64")}
)


def read_error(where: str, e: BaseException) -> str:
    """'cannot read WHERE (ExceptionType: its message)' on one line, the message cut at 300
    characters; for datasets' DatasetGenerationError, which says nothing, its cause's."""
    while isinstance(e, DatasetGenerationError) and e.__cause__ is not None:
        e = e.__cause__
    return f"cannot read {where} ({type(e).__name__}: {one_line(str(e))[:300]})"


def utf8_problem(lines: Iterable[bytes]) -> str | None:
    """'is not UTF-8 text (line n: ...)' for the first of these lines that does not decode, else
    None. Line by line is exact: a newline byte is never part of another UTF-8 character."""
    for n, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"is not UTF-8 text (line {n}: byte 0x{line[e.start]:02x} at column {e.start + 1})"
    return None


def json_problem(path: str) -> str | None:
    """Where a .json/.jsonl file stops being UTF-8 or JSON: the first line that does not parse
    when the file is JSON Lines (its first line parses alone), else the whole-file parse error."""
    with open(path, "rb") as f:
        problem = utf8_problem(f)
    if problem:
        return problem
    with open(path, encoding="utf-8") as f:
        parsed = False  # whether a line before this one parsed alone: the file is JSON Lines
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                if parsed:
                    return f"is not JSON Lines (line {n}, column {e.colno}: {e.msg})"
                break
            parsed = True
        else:
            return None
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return f"is not JSON (line {e.lineno}, column {e.colno}: {e.msg})"
    return None


def file_problem(path: str, loader: str, text_column: str = "text") -> str | None:
    """Why one local file cannot be read as `loader` ('is empty (0 bytes)', 'is not UTF-8 text
    (line 3: ...)', ...), or None when it reads. Reads the whole file: a damaged parquet page
    or a bad line near the end is found too. .json/.jsonl and .parquet are read by `datasets`
    itself, the reader of the preparation."""
    try:
        if os.path.getsize(path) == 0:
            return "is empty (0 bytes)"
        if loader == "text":  # the text loader decodes strict UTF-8
            with open(path, "rb") as f:
                return utf8_problem(f)
        try:
            part = datasets.load_dataset(loader, data_files=[path], split="train", streaming=True)
            for table in part.with_format("arrow").iter(batch_size=10_000):
                if text_column not in table.column_names:
                    return f"has no column {text_column!r} (columns: {table.column_names})"
                table.column(text_column).validate(full=True)  # pyarrow's JSON reader lets bad UTF-8 through
        except Exception as e:  # pyarrow and json raise many types; any of them makes the file unreadable
            located = json_problem(path) if loader == "json" else None
            return located or f"cannot be read as {loader} ({type(e).__name__}: {one_line(str(e))[:200]})"
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    return None


def readable_files(files: list[str], loader: str, text_column: str, skip_bad_files: bool) -> list[str]:
    """The files to load. With skip_bad_files every file is read once here and the bad ones are
    left out, each with a warning line; otherwise only empty files are looked for (a stat each):
    load_local names any other bad file when the load fails."""
    if not skip_bad_files:
        empty = next((f for f in files if os.path.getsize(f) == 0), None)
        if empty:
            raise UserError(bad_file_message(empty, "is empty (0 bytes)"))
        return files
    good = []
    for f in tqdm(files, desc="checking files", disable=not sys.stderr.isatty()):
        problem = file_problem(f, loader, text_column)
        if problem:
            print(f"warning: skipping {f}, which {problem}", file=sys.stderr)
        else:
            good.append(f)
    if not good:
        raise UserError(f"all {len(files)} file(s) of --data_files are unreadable (each named in a warning above)")
    return good


def bad_file_message(path: str, problem: str) -> str:
    return f"{path} {problem}; fix or remove it, narrow --data_files, or pass --skip_bad_files to leave such files out"


def load_local(loader: str, files: list[str], source: str, text_column: str, **options) -> datasets.Dataset:
    """All files as one dataset. When the load fails, the first file that cannot be read is named
    (the files are read again one by one, which costs a pass over them on this path only)."""
    try:
        docs = datasets.load_dataset(loader, data_files=files, split="train", **options)
        if text_column in docs.column_names:  # pyarrow's JSON reader lets bad UTF-8 through
            docs.data.column(text_column).validate(full=True)
        return docs
    except Exception as e:  # datasets wraps the reader's error without naming the file
        for f in files:
            problem = file_problem(f, loader, text_column)
            if problem:
                raise UserError(bad_file_message(f, problem)) from e
        raise UserError(read_error(source, e)) from e


def check_documents(docs: datasets.Dataset, text_column: str, source: str) -> None:
    """The text column is text, without nulls, and at least one document is not blank."""
    if text_column not in docs.column_names:
        raise UserError(
            f"no column {text_column!r} in {source} (columns: {docs.column_names}); pick one with --text_column"
        )
    feature = docs.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"column {text_column!r} of {source} holds {feature}, not text; pick one with --text_column")
    column = docs.data.column(text_column)
    if column.null_count:
        raise UserError(f"column {text_column!r} of {source} has {column.null_count} missing (null) value(s)")
    # Chunk by chunk, so that a corpus with text stops at its first chunk.
    if not any(pc.any(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(chunk)), 0)).as_py()
               for chunk in column.chunks):
        raise UserError(f"{source} holds no text ({len(docs)} document(s), all empty or whitespace)")
    if len(docs) < 2:
        raise UserError(f"{source} holds {len(docs)} document(s); a train and a val split need at least 2")


def lengths(dset: datasets.Dataset) -> np.ndarray:
    return dset.with_format("arrow")["len"].to_numpy()


def fill_val(splits: datasets.DatasetDict, min_val_tokens: int, source: str) -> datasets.DatasetDict:
    """Move the leading documents of train to val until val holds min_val_tokens; a UserError
    when train would be left without a document."""
    train, val = splits["train"], splits["val"]
    short = min_val_tokens - int(lengths(val).sum())
    if short <= 0:
        return splits
    train_lengths = np.cumsum(lengths(train))
    moved = int(np.searchsorted(train_lengths, short)) + 1  # the documents that reach `short`
    if moved >= len(train):
        total = int(train_lengths[-1]) + min_val_tokens - short
        raise UserError(
            f"{source} holds {total:,} tokens ({len(train) + len(val):,} documents), too few for a val split of "
            f"--min_val_tokens={min_val_tokens:,} tokens and a train split; add text or lower --min_val_tokens "
            "(training needs block_size+1 tokens in each split, 1,025 for the GPT-2 configs)"
        )
    return datasets.DatasetDict(
        train=train.select(range(moved, len(train))),
        val=datasets.concatenate_datasets([val, train.select(range(moved))]),
    )


def write_ids(dset: datasets.Dataset, path: Path, shards: int, name: str) -> int:
    """Concatenate the ids of all documents into `path` (a new file); returns the number of tokens."""
    n_tokens = int(lengths(dset).sum())
    shards = min(shards, len(dset))  # an empty shard would have nothing to concatenate
    arr = np.memmap(path, dtype=TOKEN_DTYPE, mode="w+", shape=(n_tokens,))
    idx = 0
    for i in tqdm(range(shards), desc=f"writing {name}", disable=not sys.stderr.isatty()):
        shard = dset.shard(num_shards=shards, index=i, contiguous=True).with_format("arrow")
        # Arrow keeps the stored uint16 (the numpy format would widen it to int64).
        ids = pc.list_flatten(shard[:]["ids"]).to_numpy()
        arr[idx : idx + len(ids)] = ids
        idx += len(ids)
    assert idx == n_tokens, f"wrote {idx} of {n_tokens} tokens"
    arr.flush()
    del arr  # unmap before the file is renamed
    return n_tokens


def prepare(
    out_dir: str | Path = HERE,
    dataset: str = DEFAULT_DATASET,
    data_files: str | None = None,
    text_column: str = "text",
    sample_by: str = "document",
    num_proc: int = DEFAULT_NUM_PROC,
    val_fraction: float = 0.0005,
    min_val_tokens: int = DEFAULT_MIN_VAL_TOKENS,
    seed: int = 2357,
    shards: int = 1024,
    cache_dir: Path | None = None,
    skip_bad_files: bool = False,
) -> dict:
    """Tokenize a Hub dataset (or local data_files) into out_dir; returns the meta.json content.

    sample_by applies to .txt files only: one document per file, per blank-line-separated
    paragraph, or per line. cache_dir defaults to the Hugging Face datasets cache.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if shards < 1 or num_proc < 1 or min_val_tokens < 0:
        raise UserError(f"need --shards >= 1, --num_proc >= 1 and --min_val_tokens >= 0; "
                        f"got {shards}, {num_proc} and {min_val_tokens}")
    if data_files:
        loader, files = local_files(data_files)
        files = readable_files(files, loader, text_column, skip_bad_files)
    with output_dir(out_dir) as out_dir:  # checked before hours of tokenizing, not after
        if data_files:
            source = f"local files {data_files}"
            options = {"sample_by": sample_by} if loader == "text" else {}
            docs = load_local(loader, files, source, text_column, cache_dir=cache_dir, **options)
        else:
            source = f"Hugging Face dataset {dataset}"
            try:
                docs = datasets.load_dataset(dataset, split="train", cache_dir=cache_dir, num_proc=num_proc)
            except Exception as e:  # the network, a missing repository, a damaged shard: all fatal here
                raise UserError(read_error(source, e)) from e
        check_documents(docs, text_column, source)
        try:
            split = docs.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        except ValueError as e:  # e.g. a val_fraction that leaves train empty
            raise UserError(f"--val_fraction={val_fraction} on {len(docs)} documents: {one_line(str(e))}") from e
        splits = datasets.DatasetDict(train=split["train"], val=split["test"])
        tokenized = splits.map(
            tokenize,
            batched=True,
            fn_kwargs={"text_column": text_column},
            remove_columns=docs.column_names,
            features=TOKENIZED_FEATURES,
            num_proc=num_proc,
            desc="tokenizing",
        )
        tokenized = fill_val(tokenized, min_val_tokens, source)

        meta = {"tokenizer": "gpt2", "vocab_size": gpt2_encoding().n_vocab}
        # Both bins complete under temporary names before either is renamed; meta.json after them.
        with atomic_path(out_dir / "train.bin") as train_tmp, atomic_path(out_dir / "val.bin") as val_tmp:
            for name, tmp in (("train", train_tmp), ("val", val_tmp)):
                meta[f"{name}_tokens"] = write_ids(tokenized[name], tmp, shards, f"{name}.bin")
                meta[f"{name}_documents"] = len(tokenized[name])
        meta.update(source=source, val_fraction=val_fraction, min_val_tokens=min_val_tokens, seed=seed)
        write_meta(out_dir, meta)
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--dataset", help=f"script-free Hugging Face dataset (default: {DEFAULT_DATASET}); "
                          "another one needs --out_dir")
    add("--data_files", help="glob of local .txt/.json/.jsonl/.parquet files instead of --dataset; needs --out_dir")
    add("--out_dir", help="where the .bin files go (default: this folder, data/openwebtext, "
                                     "for OpenWebText only)")
    add("--skip_bad_files", action="store_true",
        help="leave out local files that cannot be read, one warning each (default: refuse, naming the file); "
             "reads every file once more before loading")
    add("--text_column", default="text", help="column holding the documents (default: %(default)s)")
    add(
        "--sample_by",
        default="document",
        choices=["document", "paragraph", "line"],
        help="what one document is in .txt files (default: %(default)s, i.e. a whole file)",
    )
    add("--num_proc", type=int, default=DEFAULT_NUM_PROC, help="tokenizer processes (default: %(default)s)")
    add("--val_fraction", type=float, default=0.0005, help="share of documents held out (default: %(default)s)")
    add("--min_val_tokens", type=int, default=DEFAULT_MIN_VAL_TOKENS,
        help="move documents from train to val until val has this many tokens (default: %(default)s)")
    add("--seed", type=int, default=2357, help="train/val split seed (default: %(default)s)")
    add("--shards", type=int, default=1024, help="write in this many batches (default: %(default)s)")
    add("--cache_dir", type=Path, help="Hugging Face datasets cache (default: its usual location)")
    args = parser.parse_args(argv)
    restore = quiet_datasets()
    try:
        if args.data_files and args.dataset:
            raise UserError("give --dataset or --data_files, not both")
        if args.out_dir is not None and not args.out_dir.strip():  # "" would be "." as a Path
            raise UserError("--out_dir is empty; give a folder name")
        if args.out_dir is None and (args.data_files or args.dataset not in (None, DEFAULT_DATASET)):
            what = "--data_files" if args.data_files else f"--dataset {args.dataset}"
            raise UserError(f"{what} needs --out_dir (the default {HERE} is for OpenWebText itself); "
                            "name the folder to write, e.g. --out_dir=data/my_corpus")
        out_dir = HERE if args.out_dir is None else args.out_dir
        meta = prepare(**{**vars(args), "out_dir": out_dir, "dataset": args.dataset or DEFAULT_DATASET})
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        restore()
    print(
        f"{meta['source']}: train {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
        f"val {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents) -> {out_dir}"
    )
    return meta


if __name__ == "__main__":
    main()

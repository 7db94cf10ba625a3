"""OpenWebText (or any text corpus) as GPT-2 tokens: train.bin, val.bin and meta.json.

    python -m data.openwebtext.prepare                                   # OpenWebText from the Hub
    python -m data.openwebtext.prepare --data_files 'corpus/*.jsonl'     # local files, no network

The default --dataset is Skylion007/openwebtext, the Hub repository nanoGPT's plain
`openwebtext` name redirects to. The corpus was re-uploaded there as parquet shards under
data/ and its loading script deleted (Hub commit cf22a37, "Delete dataset script"), so
recent `datasets` (>= 4 no longer runs dataset scripts) loads it as plain parquet. Any
other script-free Hub dataset with a text column works the same way.

Like nanoGPT: every document gets the end-of-text token appended, a seeded
train_test_split holds out val_fraction of the documents, tokenizing runs in num_proc
processes, and the ids are written shard by shard into a uint16 memmap, so the whole
corpus (~9B tokens for OpenWebText) never has to fit in memory. The ids are tokenized
with the offline GPT-2 encoding of tokenizer.py.
"""

import argparse
import glob
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from dataset import TOKEN_DTYPE, atomic_path, write_meta
from tokenizer import gpt2_encoding

HERE = Path(__file__).resolve().parent

DEFAULT_DATASET = "Skylion007/openwebtext"
DEFAULT_NUM_PROC = max(1, min(8, (os.cpu_count() or 2) // 2))
LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TOKENIZED_FEATURES = datasets.Features(
    # uint16 rather than the default int64 keeps the tokenized cache 4x smaller (~18 GB for OWT).
    {"ids": datasets.List(datasets.Value("uint16")), "len": datasets.Value("int64")}
)


class UsageError(Exception):
    """The arguments cannot work; the message says what to change."""


def local_files(pattern: str) -> tuple[str, list[str]]:
    """(datasets loader name, sorted matching files) for a --data_files glob."""
    files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise UsageError(
            f"--data_files {pattern!r} matched no files; pass an existing path or a quoted "
            "glob relative to the current directory, e.g. 'corpus/*.jsonl'"
        )
    suffixes = {Path(f).suffix.lower() for f in files}
    loaders = {LOADERS.get(suffix) for suffix in suffixes}
    if len(loaders) > 1 or None in loaders:
        raise UsageError(
            f"--data_files {pattern!r} matched files ending in {sorted(suffixes)}; "
            "use a glob that matches only .txt, only .json/.jsonl or only .parquet files"
        )
    return loaders.pop(), files


def tokenize(batch: dict, text_column: str) -> dict:
    """GPT-2 ids of each document, end-of-text token appended, and their lengths."""
    enc = gpt2_encoding()  # cached per worker process, so each loads the BPE files once
    ids = [enc.encode_ordinary(text) + [enc.eot_token] for text in batch[text_column]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def write_split(dset: datasets.Dataset, path: Path, shards: int) -> int:
    """Concatenate the ids of all documents into `path`; returns the number of tokens."""
    n_tokens = pc.sum(dset.with_format("arrow")["len"]).as_py()
    shards = min(shards, len(dset))  # an empty shard would have nothing to concatenate
    with atomic_path(path) as tmp:
        arr = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="w+", shape=(n_tokens,))
        idx = 0
        for i in tqdm(range(shards), desc=f"writing {path.name}"):
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
    out_dir: Path = HERE,
    dataset: str = DEFAULT_DATASET,
    data_files: str | None = None,
    text_column: str = "text",
    sample_by: str = "document",
    num_proc: int = DEFAULT_NUM_PROC,
    val_fraction: float = 0.0005,
    seed: int = 2357,
    shards: int = 1024,
    cache_dir: Path | None = None,
) -> dict:
    """Tokenize a Hub dataset (or local data_files) into out_dir; returns the meta.json content.

    sample_by applies to .txt files only: one document per file, per blank-line-separated
    paragraph, or per line. cache_dir defaults to the Hugging Face datasets cache.
    """
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if shards < 1 or num_proc < 1:
        raise UsageError(f"--shards and --num_proc must be at least 1, got {shards} and {num_proc}")
    if data_files:
        loader, files = local_files(data_files)
        options = {"sample_by": sample_by} if loader == "text" else {}
        docs = datasets.load_dataset(loader, data_files=files, split="train", cache_dir=cache_dir, **options)
        source = f"local files {data_files}"
    else:
        docs = datasets.load_dataset(dataset, split="train", cache_dir=cache_dir, num_proc=num_proc)
        source = f"Hugging Face dataset {dataset}"
    if text_column not in docs.column_names:
        raise UsageError(
            f"no column {text_column!r} in {source} (columns: {docs.column_names}); pick one with --text_column"
        )
    if len(docs) < 2:
        raise UsageError(f"{source} holds {len(docs)} document(s); a train and a val split need at least 2")

    split = docs.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer": "gpt2", "vocab_size": gpt2_encoding().n_vocab}
    for name, dset in tokenized.items():
        meta[f"{name}_tokens"] = write_split(dset, out_dir / f"{name}.bin", shards)
        meta[f"{name}_documents"] = len(dset)
    meta.update(source=source, val_fraction=val_fraction, seed=seed)
    write_meta(out_dir, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--dataset", default=DEFAULT_DATASET, help="script-free Hugging Face dataset (default: %(default)s)")
    add("--data_files", help="glob of local .txt/.json/.jsonl/.parquet files; replaces --dataset")
    add("--text_column", default="text", help="column holding the documents (default: %(default)s)")
    add(
        "--sample_by",
        default="document",
        choices=["document", "paragraph", "line"],
        help="what one document is in .txt files (default: %(default)s, i.e. a whole file)",
    )
    add("--num_proc", type=int, default=DEFAULT_NUM_PROC, help="tokenizer processes (default: %(default)s)")
    add("--val_fraction", type=float, default=0.0005, help="share of documents held out (default: %(default)s)")
    add("--seed", type=int, default=2357, help="train/val split seed (default: %(default)s)")
    add("--out_dir", type=Path, default=HERE, help="where the .bin files go (default: this folder)")
    add("--shards", type=int, default=1024, help="write in this many batches (default: %(default)s)")
    add("--cache_dir", type=Path, help="Hugging Face datasets cache (default: its usual location)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(**vars(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"{meta['source']}: train {meta['train_tokens']:,} tokens ({meta['train_documents']:,} documents), "
        f"val {meta['val_tokens']:,} tokens ({meta['val_documents']:,} documents) -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()

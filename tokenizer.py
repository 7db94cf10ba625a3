"""Tokenizers for the prepared datasets: character level and an offline GPT-2 BPE.

Every data/<name>/prepare.py writes a meta.json next to its train.bin/val.bin;
load_tokenizer(read_meta(data_dir)) gives back the encode/decode pair that matches
those token ids, e.g. for sampling prompts and printing generations.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

GPT2_DIR = Path(__file__).resolve().parent / "data" / "gpt2"
# The sha256 sums tiktoken itself pins for OpenAI's copies of these two files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 BPE, built from the files shipped in data/gpt2.

    tiktoken.get_encoding("gpt2") would download these files on first use, which
    fails or hangs on compute nodes without internet. tiktoken reads paths that
    have no "://" straight from disk (keeping a copy in its cache folder) and
    still verifies them against the pinned hashes.
    """
    mergeable_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(GPT2_DIR / "vocab.bpe"),
        encoder_json_file=str(GPT2_DIR / "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


def load_tokenizer(meta: dict) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) for the tokenizer a dataset's meta.json names."""
    if meta["tokenizer"] == "char":
        chars = meta["chars"]
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(s: str) -> list[int]:
            unknown = sorted(set(s) - stoi.keys())
            if unknown:
                raise ValueError(f"characters not in this dataset's vocabulary: {unknown!r}")
            return [stoi[c] for c in s]

        def decode(ids: list[int]) -> str:
            return "".join(chars[i] for i in ids)

        return encode, decode
    if meta["tokenizer"] == "gpt2":
        enc = gpt2_encoding()
        # Prompts may contain the document separator on purpose, e.g. to start a fresh document.
        return (lambda s: enc.encode(s, allowed_special={EOT})), enc.decode
    raise ValueError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json (expected 'char' or 'gpt2')")


def read_meta(data_dir: str | Path) -> dict:
    """The meta.json that data_dir's prepare.py wrote."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python {Path(data_dir) / 'prepare.py'}` first")
    return json.loads(path.read_text())

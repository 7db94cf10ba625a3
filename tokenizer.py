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

from errors import UserError

GPT2_DIR = Path(__file__).resolve().parent / "data" / "gpt2"
# The sha256 sums tiktoken itself pins for OpenAI's copies of these two files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"
GPT2_VOCAB = 50257  # GPT-2's tokens: 50,000 merges, 256 bytes and EOT


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


def check_meta(meta, source: str) -> dict:
    """`meta` (a dataset's meta.json, or what a checkpoint saved of it) if it describes a
    tokenizer this repository has: 'char' with vocab_size equal to the number of distinct
    characters it lists, or 'gpt2' with GPT-2's vocabulary. A UserError naming `source`
    otherwise. train.py, sample.py and the evaluation scripts all check it here."""
    if not isinstance(meta, dict):
        raise UserError(f"{source} is not a JSON object; rerun the dataset's prepare.py")
    tokenizer, vocab_size = meta.get("tokenizer"), meta.get("vocab_size")
    if tokenizer not in ("char", "gpt2"):
        raise UserError(f"{source} names the tokenizer {tokenizer!r}, which is unknown here (expected 'char' or "
                        f"'gpt2'); rerun the dataset's prepare.py")
    if tokenizer == "gpt2" and vocab_size != GPT2_VOCAB:
        raise UserError(f"{source} has vocab_size {vocab_size!r} for the GPT-2 tokenizer, whose vocabulary is "
                        f"{GPT2_VOCAB}; rerun the dataset's prepare.py")
    if tokenizer == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise UserError(f"{source} does not list its characters (\"chars\": a string of distinct characters); "
                            f"rerun the dataset's prepare.py")
        if vocab_size != len(chars):
            raise UserError(f"{source} has vocab_size {vocab_size!r} but lists {len(chars)} characters; rerun the "
                            f"dataset's prepare.py")
    return meta


def load_tokenizer(meta: dict, source: str = "meta.json") -> tuple[Callable[[str], list[int]],
                                                                  Callable[[list[int]], str]]:
    """(encode, decode) for the tokenizer a dataset's meta.json names (checked: check_meta)."""
    check_meta(meta, source)
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
    enc = gpt2_encoding()
    # Prompts may contain the document separator on purpose, e.g. to start a fresh document.
    return (lambda s: enc.encode(s, allowed_special={EOT})), enc.decode


def read_meta(data_dir: str | Path) -> dict:
    """The meta.json that data_dir's prepare.py wrote, checked (check_meta); FileNotFoundError
    when there is none, a UserError when it does not parse or is not ours."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python {Path(data_dir) / 'prepare.py'}` first")
    try:
        meta = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): it was cut short or edited; rerun the dataset's "
                        f"prepare.py") from None
    return check_meta(meta, str(path))

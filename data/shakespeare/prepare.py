"""GPT-2 BPE Shakespeare: train.bin, val.bin and meta.json in this folder.

Run from anywhere: python data/shakespeare/prepare.py
Uses the offline GPT-2 encoding from tokenizer.py, so it needs no network.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# As a script only this folder is on sys.path; the shared helpers live at the repo root.
sys.path.insert(0, str(HERE.parents[1]))

from dataprep import SHAKESPEARE_SOURCE, read_shakespeare, split_text, write_bins  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402


def prepare(out_dir: Path = HERE) -> dict:
    """Write the GPT-2 token splits into out_dir and return their meta.json content."""
    enc = gpt2_encoding()
    # Split the text, not the tokens, so the cut is at the same character as shakespeare_char.
    train_text, val_text = split_text(read_shakespeare())
    meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "source": SHAKESPEARE_SOURCE}
    return write_bins(Path(out_dir), enc.encode_ordinary(train_text), enc.encode_ordinary(val_text), meta)


if __name__ == "__main__":
    meta = prepare()
    print(
        f"shakespeare (gpt2): vocab_size {meta['vocab_size']}, "
        f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {HERE}"
    )

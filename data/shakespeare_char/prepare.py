"""Character-level Shakespeare: train.bin, val.bin and meta.json in this folder.

Run from anywhere: python data/shakespeare_char/prepare.py
The vocabulary is every character of the corpus, sorted; a token id is its index.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# As a script only this folder is on sys.path; the shared helpers live at the repo root.
sys.path.insert(0, str(HERE.parents[1]))

from dataprep import SHAKESPEARE_SOURCE, read_shakespeare, split_text, write_bins  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def prepare(out_dir: Path = HERE) -> dict:
    """Write the character-level splits into out_dir and return their meta.json content."""
    text = read_shakespeare()
    chars = "".join(sorted(set(text)))
    meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars, "source": SHAKESPEARE_SOURCE}
    encode, _ = load_tokenizer(meta)
    train_text, val_text = split_text(text)
    return write_bins(Path(out_dir), encode(train_text), encode(val_text), meta)


if __name__ == "__main__":
    meta = prepare()
    print(
        f"shakespeare_char: vocab_size {meta['vocab_size']}, "
        f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {HERE}"
    )

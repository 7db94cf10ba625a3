"""Character-level Shakespeare: train.bin, val.bin and meta.json in this folder.

Run from the repository root: python -m data.shakespeare_char.prepare
The vocabulary is every character of the corpus, sorted; a token id is its index.
"""

from pathlib import Path

from dataset import SHAKESPEARE_SOURCE, read_shakespeare, split_text, write_bins
from tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent


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

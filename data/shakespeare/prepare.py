"""GPT-2 BPE Shakespeare: train.bin, val.bin and meta.json in this folder.

Run from the repository root: python -m data.shakespeare.prepare
Uses the offline GPT-2 encoding from tokenizer.py, so it needs no network.
"""

from pathlib import Path

from dataset import SHAKESPEARE_SOURCE, read_shakespeare, split_text, write_bins
from tokenizer import gpt2_encoding

HERE = Path(__file__).resolve().parent


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

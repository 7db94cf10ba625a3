"""Export a training checkpoint as a Hugging Face GPT2LMHeadModel directory.

    python -m scripts.export_hf --out_dir=out-gpt2-small --hf_dir=hf-gpt2-small
    python -m scripts.export_hf --out_dir=out-x --hf_dir=hf-x --overwrite=True

The directory loads with `GPT2LMHeadModel.from_pretrained(hf_dir)` (and, for GPT-2 BPE
models, `AutoTokenizer.from_pretrained(hf_dir)`), offline. What it holds:

- config.json, generation_config.json and model.safetensors (float32, from
  save_pretrained(safe_serialization=True)). model.py is GPT-2 with nanoGPT's names, so
  the weights map one to one; the attention and MLP matrices are transposed into HF's
  Conv1D layout. activation_function is "gelu_new" (model.py's tanh GELU) and
  scale_attn_by_inverse_layer_idx comes from the checkpoint.
- Biases: GPT2LMHeadModel always has biases in its linear layers and LayerNorms. A model
  trained with bias=False (train.py's default) is exported with all those biases zero,
  LayerNorm biases included, which computes the same function.
- Vocabulary: train.py pads GPT-2's 50257 tokens to 50304 for speed. The export crops
  the embedding (tied with the output layer) back to 50257 rows, so config.vocab_size
  matches the tokenizer, as in OpenAI's gpt2, and generation can never emit an id the
  tokenizer cannot decode. The logits of the 50257 real tokens are unchanged; only the
  softmax loses the padded ids, which are never targets in training and end with
  negligible probability.
- Tokenizer: for GPT-2 BPE models, the tokenizer files (GPT2TokenizerFast built from
  data/gpt2: vocab.bpe is the merges file, encoder.json the vocabulary). Character-level
  models get no HF tokenizer; their vocabulary is written to char_vocab.json
  ({"tokenizer": "char", "chars": ..., "vocab_size": ...}; token id i is chars[i]).
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch


import configurator
from checkpoint import load_trained_model
from errors import UserError, exit_on_user_error
from model import GPT, GPTConfig, hf_progress_bars_on_terminal_only
from paths import writable_dir
from tokenizer import GPT2_DIR

if TYPE_CHECKING:  # transformers is imported where used: importing this module stays cheap
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

out_dir = "out"  # the training run whose latest checkpoint is exported
hf_dir = ""  # the Hugging Face model directory to write
overwrite = False  # replace an earlier export in a non-empty hf_dir
DEFAULTS = {k: globals()[k] for k in configurator.config_keys(dict(globals()))}

GPT2_VOCAB_SIZE = 50257
CHAR_VOCAB_FILE = "char_vocab.json"
# Conv1D layers of GPT2LMHeadModel store (in, out), nn.Linear (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Every file an export writes: --overwrite=True removes these (and nothing else) first, so
# a BPE export over a char-level one leaves no stale char_vocab.json, and the reverse.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", CHAR_VOCAB_FILE)


def hf_config(config: GPTConfig, vocab_size: int, bpe: bool) -> "GPT2Config":
    """The GPT2Config of an export of a model with this GPTConfig."""
    from transformers import GPT2Config
    eot = GPT2_VOCAB_SIZE - 1 if bpe else None  # char vocabularies have no end-of-text token
    return GPT2Config(
        vocab_size=vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
        activation_function="gelu_new", layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"])


def to_hf_model(model: GPT, bpe: bool) -> "GPT2LMHeadModel":
    """A GPT2LMHeadModel computing the same logits as `model` (float32). For BPE models the
    vocabulary is cropped to GPT-2's 50257 tokens (see the module docstring)."""
    from transformers import GPT2LMHeadModel
    vocab_size = min(model.config.vocab_size, GPT2_VOCAB_SIZE) if bpe else model.config.vocab_size
    hf = GPT2LMHeadModel(hf_config(model.config, vocab_size, bpe)).float().eval()
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    target = hf.state_dict()
    with torch.no_grad():
        for key, dest in target.items():
            if key == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            src = ours.pop(key, None)
            if src is None:
                if not key.endswith(".bias"):
                    raise ValueError(f"{key} has no counterpart in the checkpoint")
                dest.zero_()  # a bias=False model: zero biases compute the same function
                continue
            if key.endswith(CONV1D_WEIGHTS):
                src = src.t()
            if key == "transformer.wte.weight":
                src = src[:vocab_size]
            if src.shape != dest.shape:
                raise ValueError(f"shape mismatch for {key}: {tuple(src.shape)} here, {tuple(dest.shape)} in HF")
            dest.copy_(src)
    ours.pop("lm_head.weight", None)
    if ours:
        raise ValueError(f"checkpoint tensors without a place in GPT2LMHeadModel: {sorted(ours)}")
    hf.tie_weights()
    return hf


def gpt2_tokenizer(model_max_length: int) -> "GPT2TokenizerFast":
    """GPT-2's tokenizer as a GPT2TokenizerFast, from the files shipped in data/gpt2 (no
    network): under HF's file names, vocab.json is encoder.json and merges.txt is vocab.bpe."""
    from transformers import GPT2TokenizerFast
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(GPT2_DIR / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copyfile(GPT2_DIR / "vocab.bpe", Path(tmp) / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)


def export(model: GPT, meta: dict, hf_dir: str | Path) -> Path:
    """Write the HF directory of `model` (whose tokenizer meta.json says `meta`); returns it."""
    hf_dir = Path(hf_dir)
    bpe = meta["tokenizer"] == "gpt2"
    if not bpe and meta["tokenizer"] != "char":
        raise UserError(f"unknown tokenizer {meta['tokenizer']!r} in the dataset's meta.json")
    if not bpe and len(meta["chars"]) != model.config.vocab_size:
        raise UserError(f"meta.json lists {len(meta['chars'])} characters but the model has "
                        f"vocab_size={model.config.vocab_size}; the dataset was re-prepared since training")
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf_progress_bars_on_terminal_only()
    to_hf_model(model, bpe).save_pretrained(hf_dir, safe_serialization=True)
    if bpe:
        gpt2_tokenizer(model.config.block_size).save_pretrained(hf_dir)
    else:
        vocab = {"tokenizer": "char", "chars": meta["chars"], "vocab_size": len(meta["chars"])}
        (hf_dir / CHAR_VOCAB_FILE).write_text(json.dumps(vocab, indent=2) + "\n")
    # safetensors writes through a private temporary file (mode 0600): give every file the
    # permissions the umask allows, as any other written file gets (0644 under umask 022).
    umask = os.umask(0)
    os.umask(umask)
    for file in hf_dir.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)
    return hf_dir


def prepare_hf_dir(hf_dir: str, overwrite: bool) -> Path:
    """Check the destination; with overwrite, remove an earlier export's files from it."""
    if not hf_dir:
        raise UserError("no --hf_dir given; name the directory to write, e.g. --hf_dir=hf-model")
    path = Path(hf_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"hf_dir={hf_dir!r} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"hf_dir={hf_dir!r} is not empty; pass --overwrite=True to replace the export "
                            f"there, or choose another --hf_dir")
        for name in EXPORT_FILES:
            (path / name).unlink(missing_ok=True)
    return writable_dir(path, "--hf_dir")


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Export --out_dir's latest checkpoint to --hf_dir; returns hf_dir."""
    cfg = configurator.parse(DEFAULTS, sys.argv[1:] if argv is None else argv, help_source=__file__)
    model, meta = load_trained_model(cfg["out_dir"])
    path = prepare_hf_dir(cfg["hf_dir"], cfg["overwrite"])
    export(model, meta, path)
    kind = "GPT-2 BPE tokenizer" if meta["tokenizer"] == "gpt2" else f"character vocabulary in {CHAR_VOCAB_FILE}"
    print(f"exported {cfg['out_dir']} ({model.get_num_params() / 1e6:.2f}M parameters) to {path} with the {kind}")
    return path


if __name__ == "__main__":
    main()

"""Specification of scripts/export_hf.py: the exported GPT2LMHeadModel computes our logits
(float32, atol 1e-5) with and without biases, with scale_attn_by_inverse_layer_idx and with
the padded BPE vocabulary cropped to GPT-2's 50257 tokens; the BPE tokenizer files load
offline and encode "Hello world" as GPT-2 does; char-level exports carry char_vocab.json;
bad destinations and missing checkpoints are one `error: ...` line with exit status 2.

Checkpoints come from 4-step `train.main` runs of a 2-layer, width-32 model; the conversion
itself is also checked on random models whose biases and LayerNorm gains are far from
their initial zeros and ones, so a misplaced tensor cannot go unnoticed.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch
import transformers

import train
from checkpoint import load_trained_model
from model import GPT, GPTConfig

from scripts import export_hf
from tests.helpers import BPE, CHAR, expect_one_line_error

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4",
        "--eval_interval=4", "--eval_iters=1", "--gradient_accumulation_steps=1", "--device=cpu",
        "--compile=False", "--learning_rate=1e-2", "--warmup_iters=0"]


def train_tiny(out_dir: Path, *args: str) -> Path:
    train.main([*TINY, f"--out_dir={out_dir}", *args])
    return out_dir


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """GPT-2 BPE (vocab padded to 50304), with biases and inverse-layer-index scaling."""
    return train_tiny(tmp_path_factory.mktemp("bpe"), f"--dataset={BPE}", "--bias=True",
                      "--scale_attn_by_inverse_layer_idx=True")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """Character level, bias=False (train.py's default)."""
    return train_tiny(tmp_path_factory.mktemp("char"), f"--dataset={CHAR}")


def randomized(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = "ln_" in name and name.endswith("weight")
            p.normal_(1.0 if is_gain else 0.0, 0.1 if p.dim() == 1 else 0.05)
    return model


def assert_same_logits(ours: GPT, hf, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        expected = ours(tokens)[0]
        got = hf(input_ids=tokens).logits
    assert got.dtype == torch.float32
    # A cropped vocabulary keeps the first rows: the real tokens' logits are unchanged.
    torch.testing.assert_close(got, expected[..., :got.shape[-1]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias,scale,vocab_size,bpe", [
    (False, False, 84, False),
    (True, False, 84, False),
    (False, True, 84, False),
    (True, True, 50304, True),
])
def test_exported_model_computes_our_logits(bias, scale, vocab_size, bpe):
    config = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=12, vocab_size=vocab_size, bias=bias,
                       scale_attn_by_inverse_layer_idx=scale)
    ours = randomized(config)
    hf = export_hf.to_hf_model(ours, bpe=bpe)
    assert hf.config.vocab_size == (50257 if bpe else vocab_size)
    assert hf.config.scale_attn_by_inverse_layer_idx == scale
    assert hf.config.activation_function == "gelu_new"
    if not bias:
        hf_biases = [t for k, t in hf.state_dict().items() if k.endswith(".bias")]
        assert hf_biases and all(not t.any() for t in hf_biases)  # LayerNorm biases included
    tokens = torch.randint(0, min(vocab_size, 50257), (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_logits(ours, hf, tokens)


def test_bpe_checkpoint_exports_a_loadable_model_and_tokenizer(bpe_run, tmp_path, capsys):
    hf_dir = export_hf.main([f"--out_dir={bpe_run}", f"--hf_dir={tmp_path / 'hf'}"])
    assert "\r" not in capsys.readouterr().err  # no progress bar off a terminal
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / "config.json").is_file()
    assert not (hf_dir / export_hf.CHAR_VOCAB_FILE).exists()
    config = json.loads((hf_dir / "config.json").read_text())
    assert {k: config[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")} == {
        "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 50257}
    assert config["activation_function"] == "gelu_new" and config["scale_attn_by_inverse_layer_idx"] is True

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval()
    ours, meta = load_trained_model(bpe_run)
    assert meta["tokenizer"] == "gpt2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids = tokenizer("Hello world")["input_ids"]
    assert ids == [15496, 995]
    assert tokenizer.decode(ids) == "Hello world"
    text = tokenizer("To be, or not to be, that is the question:", return_tensors="pt")["input_ids"]
    assert_same_logits(ours, hf, text)


def test_char_checkpoint_exports_the_model_and_its_vocabulary(char_run, tmp_path):
    hf_dir = export_hf.main([f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'hf'}"])
    meta = json.loads((Path(CHAR) / "meta.json").read_text())
    vocab = json.loads((hf_dir / export_hf.CHAR_VOCAB_FILE).read_text())
    assert vocab == {"tokenizer": "char", "chars": meta["chars"], "vocab_size": len(meta["chars"])}
    assert not (hf_dir / "tokenizer.json").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True).eval()
    assert hf.config.vocab_size == len(meta["chars"])
    ours, _ = load_trained_model(char_run)
    assert_same_logits(ours, hf, torch.tensor([[vocab["chars"].index(c) for c in "ROMEO: Peace!"]]))


def test_overwrite_replaces_an_earlier_export_and_leaves_other_files(bpe_run, char_run, tmp_path):
    hf_dir = tmp_path / "hf"
    export_hf.main([f"--out_dir={char_run}", f"--hf_dir={hf_dir}"])
    (hf_dir / "NOTES.txt").write_text("mine")
    export_hf.main([f"--out_dir={bpe_run}", f"--hf_dir={hf_dir}", "--overwrite=True"])
    assert not (hf_dir / export_hf.CHAR_VOCAB_FILE).exists()  # no stale vocabulary of the char model
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "NOTES.txt").read_text() == "mine"
    assert json.loads((hf_dir / "config.json").read_text())["vocab_size"] == 50257


def test_missing_checkpoint_is_one_error_line(capsys, tmp_path):
    expect_one_line_error(capsys, export_hf.main, [f"--out_dir={tmp_path / 'never-trained'}", f"--hf_dir={tmp_path / 'hf'}"],
                          "holds no checkpoint")
    assert not (tmp_path / "hf").exists()


def test_non_empty_hf_dir_without_overwrite_is_one_error_line(capsys, char_run, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    expect_one_line_error(capsys, export_hf.main, [f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'hf'}"], "--overwrite=True")
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"


def test_missing_hf_dir_is_one_error_line(capsys, char_run):
    expect_one_line_error(capsys, export_hf.main, [f"--out_dir={char_run}"], "--hf_dir")


def test_unwritable_hf_dir_is_one_error_line(capsys, char_run, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    expect_one_line_error(capsys, export_hf.main, [f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'blocker' / 'hf'}"],
                          "choose another --hf_dir")


def test_exported_files_get_the_usual_permissions(char_run, tmp_path):
    old = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            export_hf.main([f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'hf'}"])
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes

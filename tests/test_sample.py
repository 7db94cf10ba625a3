"""Specification of sample.py on CPU, from checkpoints of 4-step `train.main` runs (a 2-layer,
width-32 model) on the character-level and the GPT-2 BPE Shakespeare datasets: the prompt
from --start or FILE:, num_samples and max_new_tokens, greedy decoding at temperature 0, and
bad input (characters outside the vocabulary, a missing checkpoint or prompt file) as one
`error: ...` line with exit status 2."""

import contextlib
import io
from pathlib import Path

import pytest
import torch

import sample
import train
from tests.helpers import BPE, CHAR, expect_one_line_error

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4",
        "--eval_interval=4", "--eval_iters=1", "--gradient_accumulation_steps=1", "--device=cpu",
        "--compile=False", "--learning_rate=1e-2", "--warmup_iters=0"]

def train_tiny(out_dir: Path, dataset: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--dataset={dataset}", f"--out_dir={out_dir}"])
    return out_dir


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("char"), CHAR)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("bpe"), BPE)


def run_sample(out_dir: Path, *args: str) -> tuple[list[str], str]:
    """sample.main's samples and what it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        samples = sample.main([f"--out_dir={out_dir}", "--device=cpu", *args])
    return samples, stdout.getvalue()


def greedy(out_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation, straight from the model."""
    model, encode, decode = sample.load_model({"init_from": "resume", "out_dir": str(out_dir)})
    x = torch.tensor([encode(prompt)])
    return decode(model.eval().generate(x, max_new_tokens, temperature=0.0)[0].tolist())


def test_start_prompt_num_samples_and_max_new_tokens(char_run):
    samples, stdout = run_sample(char_run, "--start=ROMEO:", "--num_samples=3", "--max_new_tokens=20")
    assert len(samples) == 3
    for s in samples:
        assert s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 20  # one character per token
        assert s in stdout


def test_prompt_from_file(char_run, tmp_path):
    prompt = "JULIET:\nO Romeo, Romeo!\n"
    (tmp_path / "prompt.txt").write_text(prompt)
    samples, _ = run_sample(char_run, f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=2",
                            "--max_new_tokens=7")
    assert [len(s) for s in samples] == [len(prompt) + 7] * 2
    assert all(s.startswith(prompt) for s in samples)


def test_temperature_zero_is_greedy_and_deterministic(char_run):
    args = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=15", "--temperature=0"]
    first, _ = run_sample(char_run, *args)
    again, _ = run_sample(char_run, *args, "--seed=7")
    assert first == again == [greedy(char_run, "ROMEO:", 15)] * 2


def test_sampling_is_reproducible_with_the_seed(char_run):
    args = ["--start=ROMEO:", "--num_samples=2", "--max_new_tokens=15", "--temperature=1.0"]
    assert run_sample(char_run, *args)[0] == run_sample(char_run, *args)[0]


def test_bpe_checkpoint_samples_with_the_gpt2_tokenizer(bpe_run):
    prompt = "To be, or not to be"
    samples, _ = run_sample(bpe_run, f"--start={prompt}", "--num_samples=2", "--max_new_tokens=5",
                            "--temperature=0")
    assert samples == [greedy(bpe_run, prompt, 5)] * 2
    assert samples[0].startswith(prompt)
    sampled, _ = run_sample(bpe_run, f"--start={prompt}", "--num_samples=3", "--max_new_tokens=4")
    assert len(sampled) == 3 and all(s.startswith(prompt) for s in sampled)


def expect_sample_error(capsys, out_dir: Path, args: list[str], *fragments: str) -> None:
    expect_one_line_error(capsys, sample.main, [f"--out_dir={out_dir}", "--device=cpu", *args], *fragments)


def test_characters_outside_the_vocabulary_are_one_error_line(capsys, char_run):
    expect_sample_error(capsys, char_run, ["--start=Caf\u00e9 \u2603"], "\u00e9", "\u2603", "--start")


def test_missing_checkpoint_is_one_error_line(capsys, tmp_path):
    expect_sample_error(capsys, tmp_path / "never-trained", ["--start=ROMEO:"], "never-trained")


def test_missing_prompt_file_is_one_error_line(capsys, char_run, tmp_path):
    expect_sample_error(capsys, char_run, [f"--start=FILE:{tmp_path / 'nope.txt'}"], "nope.txt")


@pytest.mark.parametrize("arg", ["--num_samples=0", "--max_new_tokens=0", "--temperature=-1.0", "--top_k=-3"])
def test_out_of_range_settings_are_one_error_line(capsys, char_run, arg):
    key = arg[2:].split("=")[0]
    expect_sample_error(capsys, char_run, [arg], key, "at least")


def test_a_directory_as_prompt_file_is_one_error_line(capsys, char_run, tmp_path):
    expect_sample_error(capsys, char_run, [f"--start=FILE:{tmp_path}"], str(tmp_path), "not a readable file")


def test_samples_from_openai_gpt2_weights_with_the_gpt2_tokenizer(gpt2_hub):
    samples, _ = run_sample(Path("unused"), "--init_from=gpt2", "--start=Hello world", "--num_samples=1",
                            "--max_new_tokens=5", "--temperature=0.0")
    assert samples[0].startswith("Hello world") and len(samples[0]) > len("Hello world")

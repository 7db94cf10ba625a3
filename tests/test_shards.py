"""Specification of llm.c token shards as a dataset (dataset.py): a folder of
<prefix>_train_<n>.bin / <prefix>_val_<n>.bin trains and evaluates directly, with the
sampler guarantees of train.bin (windows inside one shard, data order independent of the
world size, bitwise resume), a .bin dataset samples exactly as before, and every bad shard
is refused with one line naming it.

The shards are small ones the tests write into a temporary dataset folder (test_train's
make_dataset fixture), GPT-2 ids by definition: the model has the padded vocabulary 50304.
"""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
import evaluation
import train
from dataset import Batches, Split, read_split, write_shard
from tests.helpers import expect_one_line_error
from tests.test_train import (TINY, TWENTY_STEPS, assert_same_tensors, load_ckpt, make_dataset,  # noqa: F401
                              run_train)

BLOCK = 32  # TINY's block_size


def tokens(n: int, seed: int) -> np.ndarray:
    """A learnable GPT-2 token stream: a few ids in a repeating pattern with noise."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) * 7 % 50) + 100
    noise = rng.random(n) < 0.1
    ids[noise] = rng.integers(100, 150, noise.sum())
    return ids


def shard_folder(make_dataset, train: list, val: list, prefix: str = "fineweb", **extra) -> str:  # noqa: F811
    """A dataset of shards named as llm.c's FineWeb downloads: val 000000, train 000001, ..."""
    name = make_dataset(**extra)
    folder = Path(name)
    for i, ids in enumerate(val):
        write_shard(folder / f"{prefix}_val_{i:06d}.bin", ids)
    for i, ids in enumerate(train, start=1):
        write_shard(folder / f"{prefix}_train_{i:06d}.bin", ids)
    return name


@pytest.fixture
def shards(make_dataset) -> str:  # noqa: F811
    return shard_folder(make_dataset, [tokens(3000, 1), tokens(1500, 2), tokens(2000, 3)], [tokens(1200, 4)])


def marked_split(tmp_path, lengths: list[int]) -> Split:
    """Shards whose token at position j of shard k is 1000 k + j: a window tells where it came from."""
    for k, n in enumerate(lengths):
        write_shard(tmp_path / f"marked_train_{k:06d}.bin", 1000 * k + np.arange(n))
    return read_split(tmp_path, "train")


# ----------------------------------------------------------------------------- training

def test_training_on_shards_lowers_the_loss_and_needs_no_meta_json(shards, tmp_path, capsys):
    run = run_train(tmp_path, f"--dataset={shards}", "--max_iters=30", "--eval_interval=30",
                    "--lr_decay_iters=30", "--learning_rate=1e-2", "--min_lr=1e-3")
    first, last = run.records("eval")[0], run.result
    assert first["val_loss"] == pytest.approx(np.log(50304), abs=0.2)  # uniform over the padded vocabulary
    assert last["val_loss"] < first["val_loss"] - 3.0 and last["train_loss"] < first["train_loss"] - 3.0
    assert "meta.json" not in capsys.readouterr().err  # GPT-2 by definition: nothing to warn of
    assert load_ckpt(tmp_path)["meta"] == {"tokenizer": "gpt2", "vocab_size": 50257}


def test_resume_on_shards_is_bitwise_identical_to_an_uninterrupted_run(shards, tmp_path):
    args = [f"--dataset={shards}", *TWENTY_STEPS]
    full = run_train(tmp_path / "full", *args)
    run_train(tmp_path / "split", *args, "--max_iters=10")
    resumed = run_train(tmp_path / "split", *args, "--init_from=resume")
    assert resumed.result == full.result
    a, b = load_ckpt(tmp_path / "full"), load_ckpt(tmp_path / "split")
    for key in ("model", "optimizer", "rng"):
        assert_same_tensors(a[key], b[key], key)


def test_evaluation_scores_fixed_windows_of_the_val_shards(shards, tmp_path, monkeypatch):
    """estimate_loss reads the val split through its shards, the same windows for every seed."""
    scored = []
    windows = evaluation.windows
    monkeypatch.setattr(evaluation, "windows", lambda data, offsets, *rest: scored.append(
        ([f.path.name for f in data.files], list(offsets))) or windows(data, offsets, *rest))
    for seed in (1, 2):
        with contextlib.redirect_stdout(io.StringIO()):
            train.main([*TINY, f"--dataset={shards}", f"--out_dir={tmp_path / str(seed)}", "--max_iters=0",
                        f"--seed={seed}"])
    assert scored[:10] == scored[10:] and len(scored) == 20  # eval_iters=5, two splits, two runs
    assert {tuple(files) for files, _ in scored[5:10]} == {("fineweb_val_000000.bin",)}
    assert all(0 <= o < 1200 - BLOCK for _, offsets in scored[5:10] for o in offsets)


# ----------------------------------------------------------------------------- the sampler

def test_a_single_bin_file_samples_the_offsets_it_always_did(tmp_path):
    """One train.bin: window starts are token offsets drawn by torch.randint(n - block_size),
    so existing runs keep their data order and evaluation windows."""
    ids = np.random.default_rng(0).integers(0, 60000, 5000)
    ids.astype(np.uint16).tofile(tmp_path / "train.bin")
    data = read_split(tmp_path, "train")
    batches = Batches(data, BLOCK, 4, seed=7, device="cpu", micro_steps=3)
    generator = torch.Generator().manual_seed(7)
    for _ in range(4):
        starts = torch.randint(5000 - BLOCK, (1, 3, 4), generator=generator)[0]
        for (x, y), row in zip(batches.next(), starts):
            expected = torch.from_numpy(np.stack([ids[i:i + BLOCK + 1] for i in row.tolist()]))
            assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])
    assert torch.equal(dataset.eval_offsets(data, BLOCK, 5, 4),
                       torch.randint(5000 - BLOCK, (5, 4), generator=torch.Generator().manual_seed(dataset.EVAL_SEED)))


def test_windows_never_cross_a_shard_boundary_and_every_window_is_reachable(tmp_path):
    """Shards of 100, 20 (too short for a window), 33 (exactly one) and 50 tokens."""
    data = marked_split(tmp_path, [100, 20, 33, 50])
    assert data.n_tokens == 203 and data.n_starts(BLOCK) == 68 + 0 + 1 + 18
    read = data.read(range(data.n_starts(BLOCK)), BLOCK)
    assert read.shape == (87, BLOCK + 1)
    assert (np.diff(read.astype(np.int64), axis=1) == 1).all()  # consecutive tokens of one shard
    expected = {(k, j) for k, n in ((0, 100), (2, 33), (3, 50)) for j in range(n - BLOCK)}
    assert {(w[0] // 1000, w[0] % 1000) for w in read.tolist()} == expected
    for x, y in Batches(data, BLOCK, 8, seed=0, device="cpu", micro_steps=4).next():
        assert (x // 1000 == y // 1000).all() and (x // 1000 == x[:, :1] // 1000).all()


def test_ranks_take_blocks_of_one_global_batch_on_shards(tmp_path):
    """2 ranks with 2 micro-steps each read exactly the windows of 1 process with 4."""
    data = marked_split(tmp_path, [300, 200, 400])
    single = Batches(data, BLOCK, 3, seed=5, device="cpu", micro_steps=4)
    ranks = [Batches(data, BLOCK, 3, seed=5, device="cpu", micro_steps=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        alone = single.next()
        together = [batch for rank in ranks for batch in rank.next()]
        for (x, y), (xr, yr) in zip(alone, together, strict=True):
            assert torch.equal(x, xr) and torch.equal(y, yr)


def test_the_sampler_position_resumes_exactly_after_a_prefetch(tmp_path):
    data = marked_split(tmp_path, [300, 200, 400])
    batches = Batches(data, BLOCK, 3, seed=5, device="cpu", micro_steps=2)
    batches.next()
    batches.prefetch()
    state = batches.get_state()  # a checkpoint taken here must resume with the prefetched batches
    expected = [batches.next() for _ in range(3)]
    resumed = Batches(data, BLOCK, 3, seed=99, device="cpu", micro_steps=2)
    resumed.set_state(state)
    for want, got in zip(expected, (resumed.next() for _ in range(3))):
        for (x, y), (xr, yr) in zip(want, got):
            assert torch.equal(x, xr) and torch.equal(y, yr)


def test_shards_are_found_by_llm_c_names_in_name_order(tmp_path):
    for name in ("edufineweb_train_000002.bin", "edufineweb_train_000001.bin", "edufineweb_val_000000.bin",
                 "tiny_shakespeare_val.bin", "x_val_train_3.bin"):
        write_shard(tmp_path / name, np.arange(40))
    for name in ("train.bin.txt", ".edufineweb_train_000003.tmp123.bin", "meta.json", "notes_train.txt"):
        (tmp_path / name).write_bytes(b"")
    assert {split: [p.name for p in paths] for split, paths in dataset.find_shards(tmp_path).items()} == {
        "train": ["edufineweb_train_000001.bin", "edufineweb_train_000002.bin", "x_val_train_3.bin"],
        "val": ["edufineweb_val_000000.bin", "tiny_shakespeare_val.bin"]}


def test_a_large_split_is_checked_by_chunks_spread_over_its_shards(tmp_path, monkeypatch):
    """Beyond FULL_SCAN_TOKENS the id check samples chunks across the shards put end to end,
    and names the shard holding the largest id it saw."""
    monkeypatch.setattr(dataset, "FULL_SCAN_TOKENS", 100)
    monkeypatch.setattr(dataset, "SCAN_CHUNK", 10)
    monkeypatch.setattr(dataset, "SCAN_CHUNKS", 5)  # chunks at 0, 97, 195, 292, 390 of 400 tokens
    for k in range(4):
        write_shard(tmp_path / f"big_train_{k:06d}.bin", np.full(100, k))
    write_shard(tmp_path / "big_train_000002.bin", np.r_[np.full(95, 2), 60000, np.full(4, 2)])  # position 295
    assert dataset.max_token(read_split(tmp_path, "train")) == (60000, tmp_path / "big_train_000002.bin")


# ----------------------------------------------------------------------------- bad input

def header(magic: int = 20240520, version: int = 1, n_tokens: int = 2000) -> bytes:
    head = np.zeros(256, dtype="<i4")
    head[:3] = magic, version, n_tokens
    return head.tobytes()


def shard_bytes(ids, **fields) -> bytes:
    ids = np.asarray(ids)
    return header(**{"n_tokens": len(ids), **fields}) + ids.astype(np.uint16).tobytes()


GOOD = shard_bytes(tokens(2000, 0))
VAL = {"fineweb_val_000000.bin": shard_bytes(tokens(1000, 9))}
TOO_BIG = tokens(2000, 0)
TOO_BIG[1234] = 60000


@pytest.mark.parametrize("files, fragments", [
    pytest.param({"fineweb_train_000001.bin": tokens(2000, 0).astype(np.uint16).tobytes(), **VAL},
                 ["fineweb_train_000001.bin is not an llm.c GPT-2 token shard", "20240520"], id="no-header"),
    pytest.param({"fineweb_train_000001.bin": shard_bytes(tokens(2000, 0), magic=20240801), **VAL},
                 ["fineweb_train_000001.bin is an llm.c LLaMA-3 shard"], id="llama3-shard"),
    pytest.param({"fineweb_train_000001.bin": GOOD, "fineweb_train_000002.bin": shard_bytes(tokens(500, 0), version=2),
                  **VAL}, ["fineweb_train_000002.bin is an llm.c shard of version 2", "only version 1"],
                 id="mixed-versions"),
    pytest.param({"fineweb_train_000001.bin": GOOD, "fineweb_val_000000.bin": VAL["fineweb_val_000000.bin"][:-10]},
                 ["fineweb_val_000000.bin holds 1990 bytes of tokens but its header records 1000", "truncated"],
                 id="truncated"),
    pytest.param({"fineweb_train_000001.bin": GOOD[:100], **VAL},
                 ["fineweb_train_000001.bin is 100 bytes", "1024-byte header"], id="shorter-than-the-header"),
    pytest.param({"fineweb_train_000001.bin": GOOD, "fineweb_train_000002.bin": shard_bytes(TOO_BIG), **VAL},
                 ["fineweb_train_000002.bin holds token id 60000", "vocab_size is 50304"], id="id-beyond-vocabulary"),
    pytest.param({"fineweb_train_000001.bin": GOOD, "train.bin": b"\0\0" * 2000, **VAL},
                 ["holds both train.bin and llm.c shards (fineweb_train_000001.bin", "folder of its own"],
                 id="shards-and-train-bin"),
    pytest.param({"fineweb_train_000001.bin": GOOD}, ["holds llm.c shards but none of the val split"],
                 id="no-val-shard"),
    pytest.param({"fineweb_train_000001.bin": shard_bytes(tokens(20, 0)), "fineweb_train_000002.bin":
                  shard_bytes(tokens(30, 0)), **VAL},
                 ["no train shard", "block_size+1=33", "fineweb_train_000002.bin, holds 30"], id="shards-too-short"),
])
def test_a_bad_shard_dataset_is_refused_with_one_line_naming_the_file(
        capsys, tmp_path, make_dataset, files, fragments):  # noqa: F811
    name = make_dataset(raw=files)
    expect_one_line_error(capsys, train.main, [*TINY, f"--dataset={name}", f"--out_dir={tmp_path}", "--max_iters=2"],
                          *fragments)
    assert not list(tmp_path.glob("ckpt_*"))


def test_a_folder_with_neither_bins_nor_shards_names_both_ways(capsys, tmp_path, make_dataset):  # noqa: F811
    name = make_dataset(name="fineweb_edu")
    expect_one_line_error(capsys, train.main, [*TINY, f"--dataset={name}", f"--out_dir={tmp_path}"],
                          "holds no token files", f"python -m data.fineweb_edu.prepare --out_dir={name}",
                          "or put llm.c token shards")


def test_meta_json_token_counts_are_checked_against_the_shards(capsys, tmp_path, make_dataset):  # noqa: F811
    name = shard_folder(make_dataset, [tokens(2000, 1)], [tokens(1000, 2)],
                        meta={"tokenizer": "gpt2", "vocab_size": 50257, "train_tokens": 3000, "val_tokens": 1000})
    expect_one_line_error(capsys, train.main, [*TINY, f"--dataset={name}", f"--out_dir={tmp_path}"],
                          "train shards in", "hold 2000 tokens but meta.json records 3000")


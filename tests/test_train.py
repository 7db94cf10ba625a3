"""Specification of train.py: training lowers the loss, what a run writes (metrics.jsonl,
config.json, ckpt_<step>.pt, console lines), bitwise resume, and the catalogue of bad inputs,
each refused with one `error: ...` line, exit status 2 and nothing overwritten.

Runs are in-process (`train.main(argv)` returns the last evaluation) with a 2-layer,
width-32 model on the embedded shakespeare_char dataset, so the file takes seconds.
"""

import contextlib
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import settings
import train
from checkpoint import checkpoints
from tests.helpers import BPE, CHAR, expect_one_line_error
from tests.distributed_worker import free_port

ROOT = Path(__file__).resolve().parents[1]
CHAR_VOCAB = 84  # shakespeare_char's vocabulary size (meta.json)
TINY = [
    f"--dataset={CHAR}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
    "--batch_size=4", "--gradient_accumulation_steps=1", "--compile=False", "--device=cpu", "--dtype=auto",
    "--eval_iters=5", "--log_interval=5", "--warmup_iters=4", "--learning_rate=3e-3", "--min_lr=3e-4",
    "--hess_batch_size=4", "--hess_interval=3", "--wandb_log=False",
]
# A 20-step run that evaluates (and checkpoints) at step 10: the resume tests split it there.
# Two micro-steps per step exercise gradient accumulation; hess_interval=3 puts the Hessian
# estimates off the checkpoint boundary.
TWENTY_STEPS = ["--max_iters=20", "--eval_interval=10", "--lr_decay_iters=20", "--gradient_accumulation_steps=2"]
TRAIN_FIELDS = {"kind", "iter", "tokens", "loss", "lr", "time_ms", "tokens_per_s", "grad_norm", "clip_frac"}
SOPHIA_FIELDS = {"win_rate", "hessian_norm", "estimator_ms"}
EVAL_FIELDS = {"kind", "iter", "tokens", "train_loss", "val_loss"}
CHECKPOINT_KEYS = {"model", "optimizer", "scaler", "model_args", "iter_num", "best_val_loss", "config", "rng",
                   "world_size"}


@dataclass
class Run:
    out_dir: Path
    result: dict
    stdout: str

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out_dir / "metrics.jsonl").read_text().splitlines()]

    def records(self, kind: str) -> list[dict]:
        return [r for r in self.metrics() if r["kind"] == kind]


def run_train(out_dir: Path, *args: str) -> Run:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = train.main([*TINY, f"--out_dir={out_dir}", *args])
    return Run(Path(out_dir), result, stdout.getvalue())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, with its bytes."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def latest(out_dir: Path) -> Path:
    return checkpoints(out_dir)[-1]


def load_ckpt(out_dir: Path) -> dict:
    return torch.load(latest(out_dir), map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ----------------------------------------------------------------------------- training runs

RUNS = {  # name: extra arguments
    "adamw": ["--optimizer_name=adamw"],
    "adamw-dropout": ["--optimizer_name=adamw", "--dropout=0.1"],  # draws from the global torch RNG
    "lion": ["--optimizer_name=lion"],
    "sophiag": ["--optimizer_name=sophiag"],
    "sophiah": ["--optimizer_name=sophiah", "--rho=0.01"],
}


@pytest.fixture(scope="module", params=list(RUNS))
def twenty_step_run(request, tmp_path_factory) -> tuple[str, Run]:
    """One uninterrupted 20-step run per optimizer, shared by the tests below."""
    name = request.param
    out_dir = tmp_path_factory.mktemp(f"full-{name}")
    return name, run_train(out_dir, *TWENTY_STEPS, *RUNS[name])


def test_adamw_training_lowers_val_loss_clearly_below_the_initial_loss(tmp_path):
    run = run_train(tmp_path, "--max_iters=60", "--eval_interval=60", "--lr_decay_iters=60",
                    "--batch_size=8", "--eval_iters=10", "--learning_rate=1e-2", "--min_lr=1e-3")
    first, last = run.records("eval")[0], run.result
    assert first["iter"] == 0 and last["iter"] == 60
    assert first["val_loss"] == pytest.approx(math.log(CHAR_VOCAB), abs=0.1)  # uniform at init
    # A character model that has learnt at least the letter frequencies (~3.3 nats).
    assert last["val_loss"] < first["val_loss"] - 1.0, (first, last)


def test_every_optimizer_lowers_the_loss(twenty_step_run):
    name, run = twenty_step_run
    evals = run.records("eval")
    assert [e["iter"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, (name, evals)
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.5, (name, evals)
    assert run.result == {k: evals[-1][k] for k in ("iter", "tokens", "train_loss", "val_loss")}


@pytest.mark.parametrize("args, called, options", [
    (["--optimizer_name=sophiag", "--hess_estimator=empirical_fisher"], "gnb_hessian with the data's labels",
     {"clip": True, "sqrt_hessian": False}),
    (["--optimizer_name=sophiah", "--rho=0.01", "--hess_estimator=adahessian"], "hutchinson_fd_hessian",
     {"clip": True, "sqrt_hessian": True}),
    (["--optimizer_name=sophiah", "--rho=0.01", "--hess_estimator=adahessian", "--hessian_vector_product=exact"],
     "hutchinson_hessian", {"clip": True, "sqrt_hessian": True}),
    (["--optimizer_name=sophiag", "--sophia_clip=False", "--hess_interval=2"],
     "gnb_hessian with sampled labels", {"clip": False, "sqrt_hessian": False}),
], ids=["empirical-fisher", "adahessian", "adahessian-exact", "no-clip"])
def test_sophia_ablations_use_their_estimator_and_update_rule(tmp_path, monkeypatch, args, called, options):
    """Without the clip the run diverges here (m / (rho h) is huge wherever h is still ~0),
    as the paper reports for k > 2; the clipped variants learn."""
    calls = []
    gnb, hutchinson, hutchinson_fd = train.gnb_hessian, train.hutchinson_hessian, train.hutchinson_fd_hessian

    def gnb_spy(*a, targets=None, **kw):
        calls.append("gnb_hessian with " + ("sampled labels" if targets is None else "the data's labels"))
        return gnb(*a, targets=targets, **kw)

    def hutchinson_spy(*a, **kw):
        calls.append("hutchinson_hessian")
        return hutchinson(*a, **kw)

    def hutchinson_fd_spy(*a, **kw):
        calls.append("hutchinson_fd_hessian")
        return hutchinson_fd(*a, **kw)

    monkeypatch.setattr(train, "gnb_hessian", gnb_spy)
    monkeypatch.setattr(train, "hutchinson_hessian", hutchinson_spy)
    monkeypatch.setattr(train, "hutchinson_fd_hessian", hutchinson_fd_spy)
    run = run_train(tmp_path, *TWENTY_STEPS, *args)
    evals = run.records("eval")
    if options["clip"]:
        assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    else:
        assert evals[-1]["val_loss"] > evals[0]["val_loss"] + 10, evals
    hess_interval = 2 if "--hess_interval=2" in args else 3
    assert calls == [called] * len(range(0, 20, hess_interval))
    groups = load_ckpt(tmp_path)["optimizer"]["param_groups"]
    assert all({k: g[k] for k in options} == options for g in groups)


# ----------------------------------------------------------------------------- what a run writes

def test_metrics_jsonl_holds_train_and_eval_records_with_documented_fields(twenty_step_run):
    name, run = twenty_step_run
    train_records, eval_records = run.records("train"), run.records("eval")
    assert len(train_records) + len(eval_records) == len(run.metrics())
    assert [r["iter"] for r in train_records] == [5, 10, 15, 20]  # every log_interval steps
    tokens_per_iter = 2 * 4 * 32  # accumulation steps x batch size x block size
    cfg = settings.Config(json.loads((run.out_dir / "config.json").read_text()))
    for r in train_records:
        expected = TRAIN_FIELDS | (SOPHIA_FIELDS if name.startswith("sophia") else set())
        assert expected <= r.keys(), expected - r.keys()
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] == pytest.approx(train.get_lr(cfg, r["iter"] - 1))  # the lr of the last step
        assert r["time_ms"] > 0
        assert r["tokens_per_s"] * r["time_ms"] / 1000 == pytest.approx(tokens_per_iter)
        assert r["tokens"] == r["iter"] * tokens_per_iter
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert 0.0 <= r["clip_frac"] <= 1.0
        if name.startswith("sophia"):
            assert 0.0 <= r["win_rate"] <= 1.0
            assert r["hessian_norm"] > 0  # an estimate was folded in at step 0
            assert r["estimator_ms"] >= 0
        else:
            assert not SOPHIA_FIELDS & r.keys()
    for r in eval_records:
        assert r.keys() == EVAL_FIELDS
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])


def test_config_json_records_the_parsed_config(twenty_step_run):
    name, run = twenty_step_run
    config = json.loads((run.out_dir / "config.json").read_text())
    assert config.keys() == settings.DEFAULTS.keys()
    assert config["max_iters"] == 20 and config["n_embd"] == 32 and config["out_dir"] == str(run.out_dir)
    assert config["optimizer_name"] == name.split("-")[0]


def test_console_lines_have_the_documented_format(twenty_step_run):
    _, run = twenty_step_run
    iter_lines = re.findall(r"^iter (\d+): loss (\d+\.\d{4}), time (\d+\.\d{2})ms", run.stdout, re.MULTILINE)
    step_lines = re.findall(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", run.stdout, re.MULTILINE)
    assert [int(i) for i, _, _ in iter_lines] == [5, 10, 15, 20]
    assert [int(s) for s, _, _ in step_lines] == [0, 10, 20]
    for (_, train_loss, val_loss), record in zip(step_lines, run.records("eval")):
        assert float(train_loss) == pytest.approx(record["train_loss"], abs=5e-5)
        assert float(val_loss) == pytest.approx(record["val_loss"], abs=5e-5)
    for (_, loss, _), record in zip(iter_lines, run.records("train")):
        assert float(loss) == pytest.approx(record["loss"], abs=5e-5)


def test_checkpoint_loads_with_weights_only_and_holds_the_run_state(twenty_step_run):
    name, run = twenty_step_run
    ckpt = load_ckpt(run.out_dir)  # weights_only=True: no pickled code needed to read it
    assert CHECKPOINT_KEYS <= ckpt.keys()
    assert ckpt["iter_num"] == 20 and ckpt["world_size"] == 1
    assert ckpt["model_args"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "bias": False,
                                  "vocab_size": CHAR_VOCAB, "dropout": 0.1 if "dropout" in name else 0.0,
                                  "scale_attn_by_inverse_layer_idx": False}
    assert ckpt["config"]["optimizer_name"] == name.split("-")[0]
    assert ckpt["best_val_loss"] == min(e["val_loss"] for e in run.records("eval"))
    assert not list(run.out_dir.glob("*.tmp"))  # written atomically
    # The weights are the trained model: evaluating them reproduces the logged val loss (below).


@pytest.mark.parametrize("stop", [8, 9, 10], ids=["before-refresh", "on-refresh", "after-refresh"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(twenty_step_run, tmp_path, stop):
    """`stop` steps, checkpoint, then `init_from=resume` to 20 ends exactly where the
    20-step run ends: same losses, weights and optimizer state. With hess_interval=3 the
    Hessian is estimated before steps 0, 3, 6, 9, ...: stopping after 8, 9 or 10 steps puts
    the refresh just after, at or just before the resume. The checkpoint holds the RNG
    states (torch, data order, Hessian estimator), so nothing is redrawn."""
    name, full = twenty_step_run
    args = [*TWENTY_STEPS, *RUNS[name]]
    run_train(tmp_path, *args, f"--max_iters={stop}", "--always_save_checkpoint=True")
    assert load_ckpt(tmp_path)["iter_num"] == stop
    resumed = run_train(tmp_path, *args, "--init_from=resume")
    # The second part really started from `stop` (a restart from scratch would also end at
    # step 20, but log a second evaluation at 0): evaluations at 0, `stop` (the end of the
    # first part), 10 and 20, each once.
    assert [r["iter"] for r in resumed.records("eval")] == sorted({0, stop, 10, 20})
    assert resumed.result == full.result
    a, b = load_ckpt(full.out_dir), load_ckpt(tmp_path)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["rng"], b["rng"], "rng")


def test_a_resumed_run_scores_its_first_step_unless_its_log_holds_that_evaluation(tmp_path):
    """Resumed in its folder, a run whose checkpoint was written after its step's evaluation
    does not score that step twice; the same checkpoint copied into a new folder (no log of
    that evaluation) is scored there first."""
    args = [*TWENTY_STEPS, *RUNS["adamw"]]
    run_train(tmp_path / "run", *args, "--max_iters=10")
    (tmp_path / "copy").mkdir()
    shutil.copy(latest(tmp_path / "run"), tmp_path / "copy")
    same = run_train(tmp_path / "run", *args, "--init_from=resume")
    copy = run_train(tmp_path / "copy", *args, "--init_from=resume")
    assert [r["iter"] for r in same.metrics() if r["kind"] == "eval"] == [0, 10, 20]
    assert [r["iter"] for r in copy.records("eval")] == [10, 20]
    assert copy.records("eval")[0] == same.records("eval")[1]  # the same step scored the same
    assert copy.result == same.result


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tmp_path):
    """--compile=True (torch.compile of the model; Sophia's update and Hessian fold compiled
    too) computes what the eager run computes, to float tolerance: 4 Sophia-G steps with two
    Hessian refreshes. About 40 s of compilation on a CPU."""
    args = ["--optimizer_name=sophiag", "--max_iters=4", "--eval_interval=4", "--hess_interval=2"]
    eager = run_train(tmp_path / "eager", *args, "--compile=False")
    compiled = run_train(tmp_path / "compiled", *args, "--compile=True")
    assert compiled.result["val_loss"] == pytest.approx(eager.result["val_loss"], rel=1e-4)
    a, b = load_ckpt(tmp_path / "eager"), load_ckpt(tmp_path / "compiled")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_eval_only_resume_reproduces_the_final_val_loss_and_writes_no_checkpoint(tmp_path):
    out_dir = tmp_path / "out"
    run = run_train(out_dir, "--max_iters=6", "--eval_interval=3")
    before = snapshot(out_dir)
    again = run_train(out_dir, "--max_iters=6", "--eval_interval=3", "--init_from=resume", "--eval_only=True")
    assert again.result == run.result  # fixed evaluation batches: the same windows every time
    after = snapshot(out_dir)
    assert {k: v for k, v in after.items() if k.startswith("ckpt")} == {k: v for k, v in before.items() if k.startswith("ckpt")}


def test_a_finished_run_is_left_alone_and_a_larger_max_iters_continues_it(tmp_path):
    """Resuming at max_iters says so and writes nothing (no evaluation record, no config.json);
    raising max_iters continues from the checkpoint, the LR taken from the schedule at each step
    (past lr_decay_iters: min_lr)."""
    out_dir = tmp_path / "out"
    run_train(out_dir, "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out_dir.iterdir() if p.is_file()}
    for how in ("--init_from=resume", "--init_from=auto"):
        again = run_train(out_dir, "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6", how)
        assert again.result == {}
        assert again.stdout == (f"{out_dir}: already at step 6 (max_iters=6): nothing to do; "
                                "raise --max_iters to continue\n")
        assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out_dir.iterdir() if p.is_file()} == before
    more = run_train(out_dir, "--max_iters=9", "--eval_interval=3", "--lr_decay_iters=6", "--init_from=resume")
    assert more.result["iter"] == 9 and "resuming from step 6" in more.stdout
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "eval"][-1] == 9
    assert {r["lr"] for r in records if r["kind"] == "train" and r["iter"] > 6} == {3e-4}  # TINY's min_lr
    assert json.loads((out_dir / "config.json").read_text())["max_iters"] == 9


def test_get_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = settings.Config(settings.DEFAULTS | {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "lr_decay_iters": 110})
    assert train.get_lr(cfg, 0) == pytest.approx(1 / 11)
    assert train.get_lr(cfg, 9) == pytest.approx(10 / 11)
    assert train.get_lr(cfg, 10) == pytest.approx(1.0)
    assert train.get_lr(cfg, 60) == pytest.approx(0.55)  # halfway down the cosine
    assert train.get_lr(cfg, 110) == pytest.approx(0.1)
    assert train.get_lr(cfg, 1000) == pytest.approx(0.1)
    lrs = [train.get_lr(cfg, i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert train.get_lr(settings.Config(cfg | {"decay_lr": False}), 500) == 1.0


def test_wsd_warms_up_like_cosine_holds_the_peak_then_decays_by_1_minus_sqrt_over_the_last_fraction():
    """lr_schedule='wsd', decay_fraction=0.2 of lr_decay_iters=110: the same warmup as cosine, the
    peak until step 88 (110 - 22), then min_lr + (1 - sqrt(progress)) (peak - min_lr) to step 110."""
    cosine = settings.Config(settings.DEFAULTS | {"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10,
                                            "lr_decay_iters": 110})
    wsd = settings.Config(cosine | {"lr_schedule": "wsd", "decay_fraction": 0.2})
    assert [train.get_lr(wsd, i) for i in range(10)] == [train.get_lr(cosine, i) for i in range(10)]
    assert [train.get_lr(wsd, i) for i in range(10, 89)] == [1.0] * 79
    assert train.get_lr(wsd, 99) == pytest.approx(0.1 + (1 - math.sqrt(0.5)) * 0.9)  # halfway through the decay
    assert train.get_lr(wsd, 110) == pytest.approx(0.1) and train.get_lr(wsd, 1000) == pytest.approx(0.1)
    decay = [train.get_lr(wsd, i) for i in range(88, 111)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    # A run of half the length (the comparison's T/2) ends its own decay: over its last 20%.
    half = settings.Config(wsd | {"lr_decay_iters": 55})
    assert train.get_lr(half, 43) == 1.0 and train.get_lr(half, 44) == 1.0 and train.get_lr(half, 45) < 1.0
    assert train.get_lr(half, 55) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """An out_dir holding a finished adamw run (ckpt_*.pt, config.json, metrics.jsonl)."""
    out_dir = tmp_path_factory.mktemp("previous")
    run_train(out_dir, "--max_iters=4", "--eval_interval=2")
    assert checkpoints(out_dir)
    return out_dir


@pytest.fixture
def out_dir(previous_run, tmp_path) -> Path:
    """A private copy of the previous run, so a test can check that nothing in it changes."""
    copy = tmp_path / "out"
    shutil.copytree(previous_run, copy)
    return copy


@pytest.fixture
def make_dataset(tmp_path_factory):
    """A dataset folder `name` in a temporary folder, with the given token files and meta.json;
    returns its path, which train.py takes for --dataset as it takes a name under data/."""

    def make(train_ids=None, val_ids=None, meta: dict | None = None, raw: dict[str, bytes] | None = None,
             name: str = "dataset") -> str:
        folder = tmp_path_factory.mktemp("data") / name
        folder.mkdir()
        for split, ids in (("train", train_ids), ("val", val_ids)):
            if ids is not None:
                np.asarray(ids, dtype=np.uint16).tofile(folder / f"{split}.bin")
        for filename, content in (raw or {}).items():
            (folder / filename).write_bytes(content)
        if meta is not None:
            (folder / "meta.json").write_text(json.dumps(meta))
        return str(folder)

    return make


CHAR_META = {"tokenizer": "char", "vocab_size": CHAR_VOCAB, "chars": "".join(chr(33 + i) for i in range(CHAR_VOCAB))}


def char_ids(n: int = 2000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CHAR_VOCAB, n)


def expect_user_error(capsys, out_dir: Path, args: list[str], *fragments: str) -> str:
    """train.main refuses `args` with one error line holding every fragment, and every file
    in out_dir is byte-identical afterwards."""
    before = snapshot(out_dir)
    err = expect_one_line_error(capsys, train.main, [*TINY, f"--out_dir={out_dir}", "--max_iters=2", *args],
                                *fragments)
    assert snapshot(out_dir) == before
    return err


def test_a_model_that_cannot_fit_is_refused_with_the_numbers_before_it_is_built(capsys, tmp_path):
    """40 billion parameters: refused in one line at once, nothing allocated, nothing written."""
    start = time.monotonic()
    err = expect_one_line_error(capsys, train.main, [*TINY, f"--out_dir={tmp_path / 'out'}", "--n_layer=200",
                                                     "--n_embd=4096", "--n_head=32"],
                                "memory: 40267.44M parameters; per rank weights 150.0 GiB + gradients 150.0 GiB + "
                                "optimizer state 300.0 GiB + activations", "free on cpu: the run cannot fit",
                                "--memory_check=False")
    assert time.monotonic() - start < 60, err
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_is_one_line_and_memory_check_false_overrides_it(tmp_path, monkeypatch):
    run = run_train(tmp_path / "a", "--max_iters=1", "--eval_interval=1")
    [line] = [line for line in run.stdout.splitlines() if line.startswith("memory: ")]
    assert re.fullmatch(r"memory: 0\.\d\dM parameters; per rank weights \d+ MiB \+ gradients \d+ MiB \+ optimizer "
                        r"state \d+ MiB \+ activations \d+ MiB \(a 4x32 micro-batch\) = \d+ MiB estimated, of "
                        r"[\d.]+ [GM]iB free on cpu", line), line
    monkeypatch.setattr(train, "free_memory", lambda device: 2 ** 20)  # a device with 1 MiB free
    with pytest.raises(SystemExit):
        run_train(tmp_path / "b", "--max_iters=1", "--eval_interval=1")
    assert math.isfinite(run_train(tmp_path / "c", "--max_iters=1", "--eval_interval=1",
                                   "--memory_check=False").result["val_loss"])


cuda_missing = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("args, fragments", [
    pytest.param(["--learning_rat=1"], ["'learning_rat'", "--learning_rate"], id="unknown-key"),
    pytest.param(["--batch_size=abc"], ["batch_size takes an integer, got 'abc'"], id="wrong-type"),
    pytest.param(["--n_embd=30", "--n_head=4"], ["n_embd=30", "n_head=4"], id="n_embd-not-divisible"),
    pytest.param(["--compile"], ["--compile=VALUE"], id="key-without-value"),
    pytest.param(["--optimizer_name=sgd"], ["'sgd'", "adamw"], id="unknown-optimizer"),
    pytest.param(["--batch_size=0"], ["batch_size=0", "positive"], id="zero-batch-size"),
    pytest.param(["--learning_rate=-1"], ["learning_rate=-1", ">= 0"], id="negative-lr"),
    pytest.param(["--beta2=1.0"], ["beta2=1.0", "[0, 1)"], id="beta2-one"),
    pytest.param(["--dropout=2.0"], ["dropout=2.0", "[0, 1)"], id="dropout-above-one"),
    pytest.param(["--min_lr=1e-2"], ["min_lr=0.01 exceeds learning_rate=0.003", "--min_lr"], id="min-lr-above-peak"),
    pytest.param(["--lr_decay_iters=2"], ["lr_decay_iters=2", "warmup_iters=4", "--lr_decay_iters"],
                 id="decay-ends-before-warmup"),
    pytest.param(["--optimizer_name=sophiag", "--hess_batch_size=100"], ["hess_batch_size=100", "exceeds"],
                 id="hess-batch-larger-than-step"),
    pytest.param(["--optimizer_name=sophiag", "--hess_estimator=fisher"], ["hess_estimator='fisher'", "empirical_fisher"],
                 id="unknown-estimator"),
    pytest.param(["--hess_estimator=gnb"], ["for Sophia", "--optimizer_name=sophiag"], id="estimator-without-sophia"),
    pytest.param(["--optimizer_impl=fast"], ["optimizer_impl='fast'", "foreach, compiled"], id="unknown-optimizer-impl"),
    pytest.param(["--hessian_vector_product=forward"], ["hessian_vector_product='forward'", "finite_difference, exact"],
                 id="unknown-hessian-vector-product"),
    pytest.param(["--dataset=_no_such_dataset"], ["'_no_such_dataset' not found", "shakespeare_char"],
                 id="unknown-dataset"),
    pytest.param(["--device=cuda"], ["no CUDA GPU", "--device=cpu"], id="cuda-without-gpu", marks=cuda_missing),
    pytest.param(["--device=gpu"], ["device='gpu' is unknown"], id="unknown-device"),
    pytest.param(["--dtype=float16"], ["float16", "CUDA"], id="float16-on-cpu", marks=cuda_missing),
    pytest.param(["--dtype=fp32"], ["dtype='fp32'"], id="unknown-dtype"),
    pytest.param(["--init_from=gpt2-huge"], ["init_from='gpt2-huge'", "gpt2-medium"], id="unknown-gpt2-name"),
    pytest.param(["--init_from=resume", "--n_layer=3"], ["n_layer=2", "asks for 3", "--out_dir"],
                 id="resume-with-other-model-shape"),
    pytest.param(["--init_from=resume", "--optimizer_name=lion"], ["trained with adamw, not lion"],
                 id="resume-with-other-optimizer"),
    pytest.param(["--seed=99999999999999999999999"], ["seed=99999999999999999999999 is outside [0, 2**32)"],
                 id="seed-out-of-range"),
    pytest.param(["--fsdp=True", "--optimizer_name=muon"], ["fsdp=True does not work with optimizer_name='muon'"],
                 id="muon-with-fsdp"),
    pytest.param(["--fsdp=True", "--optimizer_name=soap"], ["fsdp=True does not work with optimizer_name='soap'"],
                 id="soap-with-fsdp"),
    pytest.param(["--lr_schedule=linear"], ["lr_schedule='linear' is unknown", "'wsd'"], id="unknown-lr-schedule"),
    pytest.param(["--lr_schedule=wsd", "--decay_fraction=0"], ["decay_fraction=0.0 must lie in (0, 1]"],
                 id="wsd-without-decay"),
    pytest.param(["--lr_schedule=wsd", "--decay_fraction=0.9", "--max_iters=20", "--lr_decay_iters=20"],
                 ["starts the decay at step 2, inside warmup_iters=4"], id="wsd-decay-inside-warmup"),
])
def test_bad_input_is_refused_with_one_error_line(capsys, out_dir, args, fragments):
    expect_user_error(capsys, out_dir, args, *fragments)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_out_dir_is_refused_and_nothing_is_written_here(capsys, tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    expect_one_line_error(capsys, train.main, [*TINY, f"--out_dir={value}"], "out_dir is empty")
    assert list(tmp_path.iterdir()) == []


def test_resume_into_a_missing_folder_creates_nothing(capsys, tmp_path):
    expect_one_line_error(capsys, train.main, [*TINY, f"--out_dir={tmp_path / 'nowhere'}", "--init_from=resume"],
                          "holds no checkpoint")
    assert not (tmp_path / "nowhere").exists()


def test_a_dataset_without_meta_json_is_assumed_gpt2_with_one_warning(capsys, tmp_path, make_dataset):
    name = make_dataset(train_ids=char_ids() + 1000, val_ids=char_ids(seed=1))  # an id above 255: not characters
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={tmp_path}", f"--dataset={name}", "--max_iters=1"])
    err = capsys.readouterr().err
    assert err.count("meta.json not found: assuming GPT-2 BPE") == 1


def test_gpt2_init_that_cannot_get_the_weights_is_refused(capsys, tmp_path, gpt2_hub):
    """An offline machine without the weights in its Hugging Face cache (simulated)."""
    gpt2_hub.cached = gpt2_hub.online = False
    expect_user_error(capsys, tmp_path, ["--init_from=gpt2"], "init_from='gpt2'", "Hugging Face cache")


def test_a_new_run_into_the_out_dir_of_another_is_refused(capsys, out_dir):
    """Its checkpoints would be pruned by the new run's (keep_checkpoints)."""
    expect_user_error(capsys, out_dir, ["--init_from=scratch"], "already holds a run's checkpoints",
                      "--init_from=resume", "new --out_dir")


def test_resume_on_another_dataset_is_refused(capsys, out_dir):
    expect_user_error(capsys, out_dir, ["--init_from=resume", f"--dataset={BPE}"],
                      f"trained on dataset {CHAR!r}, not {BPE!r}", f"--dataset={CHAR}")


def test_gpt2_init_fine_tunes_openai_weights_on_a_bpe_dataset(tmp_path, gpt2_hub):
    run = run_train(tmp_path, "--init_from=gpt2", f"--dataset={BPE}", "--max_iters=2", "--eval_interval=2")
    ckpt = load_ckpt(tmp_path)
    assert ckpt["model_args"]["n_embd"] == 8 and ckpt["model_args"]["vocab_size"] == 50257
    assert ckpt["model_args"]["block_size"] == 32, "cropped to the config's block_size"
    assert math.isfinite(run.result["val_loss"])


def test_resume_without_checkpoint_is_refused(capsys, tmp_path):
    expect_user_error(capsys, tmp_path, ["--init_from=resume"], "holds no checkpoint")
    assert not list(tmp_path.iterdir())


def test_resume_when_every_checkpoint_is_damaged_is_refused_on_one_line(capsys, out_dir):
    for path in checkpoints(out_dir):
        path.write_bytes(b"not a checkpoint")
    expect_user_error(capsys, out_dir, ["--init_from=resume"], "cannot read checkpoint", "damaged")


def test_resume_from_a_foreign_torch_file_is_refused(capsys, out_dir):
    for path in checkpoints(out_dir):
        path.unlink()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, out_dir / "ckpt_00000001.pt")
    expect_user_error(capsys, out_dir, ["--init_from=resume"], "not a checkpoint of this project", "model_args")


def test_unwritable_out_dir_is_refused(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    expect_user_error(capsys, blocker / "out", [], "cannot write to", str(blocker / "out"), "choose another --out_dir")
    assert blocker.read_text() == "keep me"


def test_a_folder_without_token_files_names_the_preparation_that_makes_them(capsys, out_dir, make_dataset):
    folder = make_dataset(name="openwebtext")
    err = expect_user_error(capsys, out_dir, [f"--dataset={folder}"], f"{folder} holds no token files",
                            f"`python -m data.openwebtext.prepare --out_dir={folder}`", "or put llm.c token shards")
    assert "fineweb_edu" not in err


def test_a_folder_of_another_name_gets_both_preparations_and_no_script_to_write(capsys, out_dir, make_dataset):
    """As a failed FineWeb-Edu preparation into data/my_corpus leaves it: empty."""
    folder = make_dataset(name="my_corpus")
    err = expect_user_error(capsys, out_dir, [f"--dataset={folder}"], f"{folder} holds no token files",
                            f"python -m data.openwebtext.prepare --data_files=GLOB --out_dir={folder}",
                            f"python -m data.fineweb_edu.prepare --out_dir={folder}")
    assert "create" not in err and "prepare.py" not in err


def test_missing_val_bin_is_named(capsys, out_dir, make_dataset):
    folder = make_dataset(train_ids=char_ids(), meta=CHAR_META)
    err = expect_user_error(capsys, out_dir, [f"--dataset={folder}"], f"{folder}/val.bin not found",
                            "the preparation that wrote train.bin did not finish")
    assert "create" not in err


@pytest.mark.parametrize("bad_id", [CHAR_VOCAB, 60000])
def test_token_ids_beyond_the_vocabulary_are_refused(capsys, out_dir, make_dataset, bad_id):
    ids = char_ids()
    ids[1234] = bad_id
    name = make_dataset(train_ids=ids, val_ids=char_ids(seed=1), meta=CHAR_META)
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], f"train.bin holds token id {bad_id}",
                      f"vocab_size is {CHAR_VOCAB}")


def test_gpt2_dataset_token_ids_beyond_the_tokenizer_vocabulary_are_refused(capsys, out_dir, make_dataset):
    """Not only beyond the model's padded 50304: GPT-2 has no token 50257 either."""
    ids = char_ids()
    ids[-1] = 50260
    name = make_dataset(train_ids=char_ids(), val_ids=ids, meta={"tokenizer": "gpt2", "vocab_size": 50257})
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], "val.bin holds token id 50260",
                      "the gpt2 tokenizer's vocab_size is 50257")


def test_block_size_larger_than_the_data_is_refused(capsys, out_dir, make_dataset):
    name = make_dataset(train_ids=char_ids(50), val_ids=char_ids(2000), meta=CHAR_META)
    expect_user_error(capsys, out_dir, [f"--dataset={name}", "--block_size=64"], "train.bin holds 50 tokens",
                      "--block_size")


def test_data_of_exactly_one_window_trains(tmp_path, make_dataset):
    name = make_dataset(train_ids=char_ids(33), val_ids=char_ids(33, seed=1), meta=CHAR_META)
    assert math.isfinite(run_train(tmp_path, f"--dataset={name}", "--max_iters=1", "--eval_interval=1")
                         .result["val_loss"])


def test_empty_token_file_is_refused(capsys, out_dir, make_dataset):
    name = make_dataset(train_ids=char_ids(), val_ids=[], meta=CHAR_META)
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], "val.bin holds 0 tokens")


def test_odd_sized_token_file_is_refused(capsys, out_dir, make_dataset):
    name = make_dataset(val_ids=char_ids(), meta=CHAR_META, raw={"train.bin": b"\x01" * 2001})
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], "train.bin has an odd size")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
def test_token_file_of_another_dtype_is_refused(capsys, out_dir, make_dataset, dtype):
    """Small ids written as int32 read as uint16 (id, 0) pairs: in range, and silently wrong,
    but twice as many tokens as meta.json records."""
    ids = char_ids()
    name = make_dataset(val_ids=char_ids(seed=1), meta={**CHAR_META, "train_tokens": len(ids), "val_tokens": len(ids)},
                        raw={"train.bin": ids.astype(dtype).tobytes()})
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], f"holds {len(ids) * np.dtype(dtype).itemsize // 2} uint16 "
                      f"tokens but meta.json records {len(ids)}", "another dtype")


def test_token_file_truncated_to_an_even_size_is_refused(capsys, out_dir, make_dataset):
    ids = char_ids()
    name = make_dataset(train_ids=ids[:1500], val_ids=char_ids(seed=1),
                        meta={**CHAR_META, "train_tokens": len(ids), "val_tokens": len(ids)})
    expect_user_error(capsys, out_dir, [f"--dataset={name}"], "holds 1500 uint16 tokens", "truncated")


def test_accumulation_steps_not_divisible_by_world_size_fails_before_process_group(tmp_path):
    """As launched by torchrun with 3 processes: validate() refuses the config before
    init_process_group, which would otherwise wait for the two missing ranks."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *TINY, f"--out_dir={tmp_path}", "--gradient_accumulation_steps=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: gradient_accumulation_steps=4 is not divisible by the world size 3")
    assert not list(tmp_path.iterdir())

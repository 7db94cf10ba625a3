"""Distributed training, on the CPU with gloo and 2 processes: DDP computes what one process
computes on the same global batch, every rank holds the same state, evaluation covers all
ranks' windows; FSDP2 (--fsdp=True) trains like DDP, writes the same checkpoint format and
resumes sharded or unsharded. Marked `distributed`: run alone with `pytest -m distributed`.

Each 2-rank launch starts tests/distributed_worker.py twice (the environment torchrun gives
a rank: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), and the two processes train several
runs one after the other, dumping each rank's final model and optimizer state. The runs are
12 steps of a 2-layer, width-32 model with a Hessian estimate every 3 steps (steps 0, 3, 6,
9), an evaluation and a checkpoint every 6 steps, and a global batch of 2 micro-batches of
4 sequences: one process with 2 accumulation steps, or 2 ranks with 1 each. The Hessian
estimate uses the whole global batch (hess_batch_size=8), so it sees the same sequences in
both layouts.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import train
from checkpoint import checkpoints
from tests.distributed_worker import free_port
from tests.helpers import CHAR

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TINY = [
    f"--dataset={CHAR}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
    "--batch_size=4", "--gradient_accumulation_steps=2", "--device=cpu", "--dtype=float32", "--compile=False",
    "--max_iters=12", "--eval_interval=6", "--eval_iters=3", "--log_interval=3", "--warmup_iters=2",
    "--lr_decay_iters=12", "--learning_rate=3e-3", "--min_lr=3e-4", "--hess_interval=3", "--hess_batch_size=8",
    "--wandb_log=False",
]
# eval_iters=3 on 2 ranks: rank 0 scores batches 0 and 2, rank 1 batch 1 and a padding forward.
OPTIMIZERS = {
    "adamw": ["--optimizer_name=adamw"],
    "lion": ["--optimizer_name=lion"],
    "muon": ["--optimizer_name=muon"],
    "soap": ["--optimizer_name=soap"],
    "sophiag": ["--optimizer_name=sophiag"],
    "sophiah": ["--optimizer_name=sophiah", "--rho=0.01"],
}
FSDP_OPTIMIZERS = ["adamw", "lion", "sophiag", "sophiah"]  # Muon and SOAP are refused under FSDP2
# 2 micro-steps per rank (4 in one process): the gradient all-reduce / reduce-scatter skipped on
# the first (DDP no_sync, FSDP2 set_requires_gradient_sync), the estimator over 2 micro-batches.
ACCUMULATE = ["--gradient_accumulation_steps=4", "--hess_batch_size=16", *OPTIMIZERS["sophiag"]]
# Without gradient clipping FSDP2 has no shard-by-shard norm: what is left to differ from one
# process is the finite-difference Hessian estimate on sharded parameters.
UNCLIPPED_SOPHIAH = [*OPTIMIZERS["sophiah"], "--grad_clip=0.0"]
DDP_TOL = {"rtol": 1e-5, "atol": 1e-5}  # measured: bitwise equal here (x/2 is exact)
# FSDP2's clip_grad_norm_ sums squares shard by shard: the clip factor differs in the last bit,
# and Sophia's m / (rho h) amplifies it; measured differences are at most 5e-6.
FSDP_TOL = {"rtol": 1e-4, "atol": 5e-5}


@dataclass
class Run:
    out_dir: Path
    result: dict | None = None
    stdout: str = ""  # of single-process runs

    def checkpoint(self, step: int | None = None) -> dict:
        path = self.out_dir / f"ckpt_{step:08d}.pt" if step is not None else checkpoints(self.out_dir)[-1]
        return torch.load(path, map_location="cpu", weights_only=True)

    def records(self, kind: str) -> list[dict]:
        lines = (self.out_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def rank_state(self, rank: int) -> dict:
        """What the worker dumped for this rank: model, optimizer (local shards), result."""
        return torch.load(self.out_dir / "ranks" / f"rank{rank}.pt", map_location="cpu", weights_only=True)


def single_process(out_dir: Path, *args: str) -> Run:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = train.main([*TINY, f"--out_dir={out_dir}", *args])
    return Run(out_dir, result, stdout.getvalue())


def launch(runs: dict[str, list[str]], root: Path, timeout: float = 300) -> dict[str, Run]:
    """Train `runs` ({name: train.py arguments}) on WORLD ranks, one after the other in the
    same processes; each run writes to root/name (its checkpoints, metrics.jsonl, and the
    ranks' final states under ranks/)."""
    spec = [{"dump": str(root / name / "ranks"), "argv": [*TINY, f"--out_dir={root / name}", *args]}
            for name, args in runs.items()]
    spec_file = root / f"launch-{'-'.join(runs)}.json"
    spec_file.write_text(json.dumps(spec))
    procs, logs = [], []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        log = open(root / f"{spec_file.stem}-rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(spec_file)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:  # one rank failed and the other waits for it, or a hang
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = [(rank, proc.returncode) for rank, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, f"ranks failed (rank, status): {failed}\n" + "\n".join(
        f"--- rank {rank} (last lines)\n" + "\n".join(out.splitlines()[-30:]) for rank, out in enumerate(outputs))
    out = {}
    for name in runs:
        run = Run(root / name)
        run.result = run.rank_state(0)["result"]
        out[name] = run
    return out


def copy_checkpoint(src: Run, step: int, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True)
    name = f"ckpt_{step:08d}.pt"
    shutil.copy(src.out_dir / name, out_dir / name)
    return out_dir


def flat(value, path: str = "") -> dict:
    """Nested dicts/lists flattened to {path: leaf}."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}[{i}]").items()}
    return {path: value}


def assert_bytes_equal(a: dict, b: dict, where: str) -> None:
    """Every tensor the same dtype, shape and bytes (stricter than ==: -0.0 != 0.0, NaN == NaN)."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), where
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            x, y = fa[k], fb[k]
            assert (x.dtype, x.shape) == (y.dtype, y.shape), f"{where}{k}"
            assert x.contiguous().numpy().tobytes() == y.contiguous().numpy().tobytes(), f"{where}{k} differs"
        else:
            assert fa[k] == fb[k], f"{where}{k}"


def assert_state_close(a: dict, b: dict, where: str, rtol: float, atol: float) -> None:
    """Same keys; tensors equal to tolerance, everything else exactly."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), where
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            torch.testing.assert_close(fa[k], fb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{where}{k}: {m}")
        else:
            assert fa[k] == fb[k], f"{where}{k}"


# ----------------------------------------------------------------------------- the runs

@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Run]:
    """One process: 2 accumulation steps per step for each optimizer, and 4 for Sophia-G's
    accumulation run."""
    root = tmp_path_factory.mktemp("single")
    runs = {**OPTIMIZERS, "accumulate": ACCUMULATE, "sophiah-unclipped": UNCLIPPED_SOPHIAH}
    return {name: single_process(root / name, *args) for name, args in runs.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Run]:
    """2 ranks, 1 accumulation step each: DDP for every optimizer, FSDP2 for those it supports;
    and Sophia-G with 2 accumulation steps on each rank, under DDP and FSDP2."""
    root = tmp_path_factory.mktemp("two-ranks")
    runs = {f"ddp-{name}": args for name, args in OPTIMIZERS.items()}
    runs.update({f"fsdp-{name}": [*OPTIMIZERS[name], "--fsdp=True"] for name in FSDP_OPTIMIZERS})
    runs.update({"ddp-accumulate": ACCUMULATE, "fsdp-accumulate": [*ACCUMULATE, "--fsdp=True"],
                 "fsdp-sophiah-unclipped": [*UNCLIPPED_SOPHIAH, "--fsdp=True"]})
    return launch(runs, root)


@pytest.fixture(scope="module")
def resumed(two_ranks, tmp_path_factory) -> dict[str, Run]:
    """The step-6 checkpoints of the 2-rank runs, continued to step 12: sharded on 2 ranks
    (from FSDP2 and from DDP checkpoints) and unsharded in one process."""
    root = tmp_path_factory.mktemp("resumed")
    runs = {}
    for name in FSDP_OPTIMIZERS:
        copy_checkpoint(two_ranks[f"fsdp-{name}"], 6, root / f"fsdp-to-fsdp-{name}")
        runs[f"fsdp-to-fsdp-{name}"] = [*OPTIMIZERS[name], "--fsdp=True", "--init_from=resume"]
    copy_checkpoint(two_ranks["ddp-sophiag"], 6, root / "ddp-to-fsdp-sophiag")
    runs["ddp-to-fsdp-sophiag"] = [*OPTIMIZERS["sophiag"], "--fsdp=True", "--init_from=resume"]
    out = launch(runs, root)
    copy_checkpoint(two_ranks["fsdp-sophiag"], 6, root / "fsdp-to-single-sophiag")
    out["fsdp-to-single-sophiag"] = single_process(root / "fsdp-to-single-sophiag", *OPTIMIZERS["sophiag"],
                                                   "--init_from=resume")
    return out


# ----------------------------------------------------------------------------- DDP

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_on_two_ranks_matches_one_process_with_two_accumulation_steps(single, two_ranks, name):
    """The same global batches, split over ranks instead of micro-steps, give the same model
    and optimizer state (m, v, and Sophia's Hessian EMA after 4 estimates: GNB draws the
    uniforms of the global batch on every rank and slices them, Hutchinson shares u and
    DDP averages each of its two finite-difference passes)."""
    one, ddp = single[name].checkpoint(), two_ranks[f"ddp-{name}"].checkpoint()
    assert one["iter_num"] == ddp["iter_num"] == 12 and (one["world_size"], ddp["world_size"]) == (1, WORLD)
    assert_state_close(one["model"], ddp["model"], "model", **DDP_TOL)
    assert_state_close(one["optimizer"], ddp["optimizer"], "optimizer", **DDP_TOL)
    if name.startswith("sophia"):
        assert all(s["hessian"].abs().sum() > 0 for s in ddp["optimizer"]["state"].values())
    for a, b in zip(single[name].records("train"), two_ranks[f"ddp-{name}"].records("train"), strict=True):
        assert b["iter"] == a["iter"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        if name.startswith("sophia"):
            assert b["hessian_norm"] == pytest.approx(a["hessian_norm"], rel=1e-5)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_ranks_end_with_bit_identical_parameters_and_optimizer_state(two_ranks, name):
    run = two_ranks[f"ddp-{name}"]
    rank0, rank1 = run.rank_state(0), run.rank_state(1)
    assert_bytes_equal(rank0["model"], rank1["model"], "model")
    assert_bytes_equal(rank0["optimizer"], rank1["optimizer"], "optimizer")  # m, v, Hessian EMA, steps
    # ... and the checkpoint holds exactly that state.
    assert_bytes_equal(rank0["model"], run.checkpoint()["model"], "checkpoint model")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_ddp_evaluation_averages_over_all_ranks(single, two_ranks, name):
    """Each rank scores part of the evaluation windows (eval_iters=3: 2 and 1); the result is
    the mean over all of them, the same as one process scoring them all."""
    one, ddp = single[name].records("eval"), two_ranks[f"ddp-{name}"].records("eval")
    assert [r["iter"] for r in one] == [r["iter"] for r in ddp] == [0, 6, 12]
    for a, b in zip(one, ddp):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert two_ranks[f"ddp-{name}"].result == pytest.approx(single[name].result, rel=1e-5)


def test_accumulation_on_each_rank_matches_one_process(single, two_ranks):
    """2 ranks x 2 micro-steps (Sophia-G) against 1 process x 4 micro-steps. FSDP2 and DDP add
    the 4 micro-gradients in the same order, (g0 + g1) + (g2 + g3), and agree to FSDP_TOL; one
    process adds ((g0 + g1) + g2) + g3, which differs in the last bits, and over 12 steps
    Sophia's clipped ratio m / (rho h) turns that into differences of up to 1e-4 in a few
    coordinates (measured: 2 of 3072 in one matrix), so that comparison is looser."""
    one = single["accumulate"].checkpoint()
    ddp, fsdp = two_ranks["ddp-accumulate"].checkpoint(), two_ranks["fsdp-accumulate"].checkpoint()
    assert_state_close(ddp["model"], fsdp["model"], "model", **FSDP_TOL)
    assert_state_close(ddp["optimizer"], fsdp["optimizer"], "optimizer", **FSDP_TOL)
    assert_state_close(one["model"], ddp["model"], "model", rtol=1e-3, atol=1e-3)
    assert_state_close(one["optimizer"], ddp["optimizer"], "optimizer", rtol=1e-3, atol=1e-3)
    for run in ("ddp-accumulate", "fsdp-accumulate"):
        assert two_ranks[run].result == pytest.approx(single["accumulate"].result, rel=1e-4)


def test_evaluation_is_independent_of_the_world_size_at_initialisation(single, two_ranks):
    """Before any step every run holds the same weights: the step-0 evaluation is bitwise the
    same on 1 and 2 ranks, DDP and FSDP2 (each loss slot is filled by one rank, plus zeros)."""
    losses = {name: run.records("eval")[0] for name, run in {**single, **two_ranks}.items()}
    assert len({(r["train_loss"], r["val_loss"]) for r in losses.values()}) == 1, losses


# ----------------------------------------------------------------------------- FSDP2

@pytest.mark.parametrize("name", FSDP_OPTIMIZERS)
def test_fsdp_trains_and_matches_ddp(two_ranks, name):
    """Sharded training lowers the loss and ends where DDP ends, to float tolerance: the
    gradients are bitwise DDP's, but clip_grad_norm_ sums the squared norms shard by shard,
    so the clipping factor differs in the last bits (with grad_clip=0 the runs are bitwise
    equal)."""
    fsdp, ddp = two_ranks[f"fsdp-{name}"], two_ranks[f"ddp-{name}"]
    evals = fsdp.records("eval")
    assert [r["iter"] for r in evals] == [0, 6, 12]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.3, evals
    a, b = fsdp.checkpoint(), ddp.checkpoint()
    assert_state_close(a["model"], b["model"], "model", **FSDP_TOL)
    assert_state_close(a["optimizer"], b["optimizer"], "optimizer", **FSDP_TOL)
    for x, y in zip(fsdp.records("train"), ddp.records("train"), strict=True):
        assert x["iter"] == y["iter"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    for x, y in zip(evals, ddp.records("eval"), strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)


def test_fsdp_sophiah_on_two_ranks_matches_one_process_with_two_accumulation_steps(single, two_ranks):
    """Sophia-H's finite-difference estimate on FSDP2: each rank perturbs its own shards with
    its slice of the shared u and gets its shard of each pass's averaged gradient. Without
    clipping (whose sharded norm differs in the last bits) it ends where one process with 2
    accumulation steps ends, to DDP's tolerance, after 4 estimates."""
    one, fsdp = single["sophiah-unclipped"].checkpoint(), two_ranks["fsdp-sophiah-unclipped"].checkpoint()
    assert one["iter_num"] == fsdp["iter_num"] == 12
    assert all(s["hessian"].abs().sum() > 0 for s in fsdp["optimizer"]["state"].values())
    assert_state_close(one["model"], fsdp["model"], "model", **DDP_TOL)
    assert_state_close(one["optimizer"], fsdp["optimizer"], "optimizer", **DDP_TOL)
    for a, b in zip(single["sophiah-unclipped"].records("train"), two_ranks["fsdp-sophiah-unclipped"].records("train"),
                    strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["hessian_norm"] == pytest.approx(a["hessian_norm"], rel=1e-5)


def test_fsdp_sophia_statistics_are_global(two_ranks):
    """win_rate and hessian_norm are all-reduced over the shards: the logged values are
    DDP's (one rank's shard alone has about 1/sqrt(2) of the Hessian norm)."""
    fsdp, ddp = two_ranks["fsdp-sophiag"].records("train"), two_ranks["ddp-sophiag"].records("train")
    assert [r["iter"] for r in fsdp] == [3, 6, 9, 12]
    for x, y in zip(fsdp, ddp, strict=True):
        assert x["hessian_norm"] == pytest.approx(y["hessian_norm"], rel=1e-5)
        assert x["win_rate"] == pytest.approx(y["win_rate"], rel=1e-3)
        assert 0 < x["win_rate"] < 1


@pytest.mark.parametrize("name", FSDP_OPTIMIZERS)
def test_fsdp_checkpoint_has_the_unsharded_format_and_holds_the_ranks_shards(two_ranks, name):
    fsdp, ddp = two_ranks[f"fsdp-{name}"].checkpoint(), two_ranks[f"ddp-{name}"].checkpoint()
    assert fsdp.keys() == ddp.keys()
    assert fsdp["world_size"] == WORLD and fsdp["config"]["fsdp"] is True
    shapes = {k: (v.dtype, v.shape) if isinstance(v, torch.Tensor) else v
              for k, v in flat({"model": fsdp["model"], "optimizer": fsdp["optimizer"]}).items()}
    assert shapes == {k: (v.dtype, v.shape) if isinstance(v, torch.Tensor) else v
                      for k, v in flat({"model": ddp["model"], "optimizer": ddp["optimizer"]}).items()}
    # Every tensor is the ranks' shards (dim 0, in rank order) put together, bit for bit.
    ranks = [two_ranks[f"fsdp-{name}"].rank_state(r) for r in range(WORLD)]
    for part in ("model", "optimizer"):
        shards = [flat(r[part]) for r in ranks]
        for key, full in flat(fsdp[part]).items():
            if isinstance(full, torch.Tensor) and full.dim() > 0:
                joined = torch.cat([s[key] for s in shards])
                assert joined.numpy().tobytes() == full.numpy().tobytes(), f"{part}{key}"
    assert ranks[0]["model"]["transformer.wte.weight"].shape[0] == fsdp["model"]["transformer.wte.weight"].shape[0] // 2


@pytest.mark.parametrize("name", FSDP_OPTIMIZERS)
def test_fsdp_resume_on_the_same_world_size_is_bitwise_identical(two_ranks, resumed, name):
    """Step 6's checkpoint, resumed sharded on 2 ranks, ends bit for bit where the
    uninterrupted run ends: weights, optimizer state, RNG states, evaluation."""
    full, again = two_ranks[f"fsdp-{name}"], resumed[f"fsdp-to-fsdp-{name}"]
    assert [r["iter"] for r in again.records("eval")] == [6, 12]
    assert again.result == full.result
    a, b = full.checkpoint(), again.checkpoint()
    assert_bytes_equal(a["model"], b["model"], "model")
    assert_bytes_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert_bytes_equal(a["rng"], b["rng"], "rng")
    assert [r["loss"] for r in again.records("train")] == [r["loss"] for r in full.records("train")][-2:]
    if name == "sophiag":  # the win rate after resuming counts only real steps
        assert [r["win_rate"] for r in again.records("train")] == [r["win_rate"] for r in full.records("train")][-2:]


def test_fsdp_checkpoint_resumes_unsharded(two_ranks, resumed):
    """An FSDP2 checkpoint continues in one process (2 accumulation steps) to where the
    sharded run ends, to float tolerance (clipping norms summed in another order)."""
    full, again = two_ranks["fsdp-sophiag"], resumed["fsdp-to-single-sophiag"]
    assert [r["iter"] for r in again.records("eval")] == [6, 12]
    a, b = full.checkpoint(), again.checkpoint()
    assert b["world_size"] == 1
    assert "resuming on 1 ranks (was 2)" in again.stdout and "no longer bitwise" in again.stdout
    assert_state_close(a["model"], b["model"], "model", **FSDP_TOL)
    assert_state_close(a["optimizer"], b["optimizer"], "optimizer", **FSDP_TOL)
    assert again.result == pytest.approx(full.result, rel=1e-5)


def test_ddp_checkpoint_resumes_sharded(two_ranks, resumed):
    full, again = two_ranks["ddp-sophiag"], resumed["ddp-to-fsdp-sophiag"]
    assert [r["iter"] for r in again.records("eval")] == [6, 12]
    a, b = full.checkpoint(), again.checkpoint()
    assert b["config"]["fsdp"] is True
    assert_state_close(a["model"], b["model"], "model", **FSDP_TOL)
    assert_state_close(a["optimizer"], b["optimizer"], "optimizer", **FSDP_TOL)
    assert again.result == pytest.approx(full.result, rel=1e-5)


def test_sophiah_with_the_exact_hessian_vector_product_and_fsdp_is_refused_at_startup_with_one_line(tmp_path):
    """As launched by torchrun (rank 0 of 2): validate() refuses before init_process_group,
    which would otherwise wait for rank 1. The exact product differentiates twice with respect
    to the parameters, which FSDP2 swaps for gathered copies during the forward."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", *TINY, f"--out_dir={tmp_path}", "--fsdp=True",
                             *OPTIMIZERS["sophiah"], "--hessian_vector_product=exact"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: fsdp=True does not work with hessian_vector_product='exact'")
    assert "--hessian_vector_product=finite_difference" in result.stderr and "--fsdp=False" in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_user_error_under_torchrun_is_printed_once_and_every_rank_exits_2(tmp_path):
    """Every rank meets the same bad setting; one line says so, not one per rank (torchrun then
    adds its own report of the failed workers, naming exit code 2)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            "train.py", *TINY, f"--out_dir={tmp_path / 'run'}", "--gradient_accumulation_steps=3"]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("error: gradient_accumulation_steps=3 is not divisible by the world size 2") == 1, output
    assert re.search(r"exitcode\s*:\s*2\b", output), output
    assert not (tmp_path / "run").exists()


def test_launch_py_ends_a_user_error_with_its_one_line_and_exit_2(tmp_path):
    """launch.py: torchrun without its ChildFailedError report."""
    argv = [sys.executable, "launch.py", "--standalone", f"--nproc_per_node={WORLD}",
            "train.py", *TINY, f"--out_dir={tmp_path / 'run'}", "--gradient_accumulation_steps=3"]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: gradient_accumulation_steps=3 is not divisible by the world size 2; make it a " \
                            "multiple of 2\n"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- preemption under torchrun

TORCHRUN = ("-m", "torch.distributed.run")

def start_torchrun(out_dir: Path, *launcher_args: str, launcher: tuple[str, ...] = TORCHRUN) -> subprocess.Popen:
    """A 2-rank Sophia-G run under torchrun (or launch.py), long enough to be stopped while it
    trains; the launcher and its workers form one process group."""
    argv = [sys.executable, *launcher, "--standalone", f"--nproc_per_node={WORLD}", *launcher_args, "train.py", *TINY, f"--out_dir={out_dir}", *OPTIMIZERS["sophiag"],
            "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--log_interval=1"]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def output_after_training_starts(proc: subprocess.Popen, stop, timeout: float = 180) -> str:
    """Wait for the 3rd step's log line, call stop(), and return everything printed until
    the last process of the group closes its output; the group is killed after `timeout`."""
    def kill_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    watchdog = threading.Timer(timeout, kill_group)
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter 3:"):
                stop()
        proc.wait()
        return "".join(lines)
    finally:
        watchdog.cancel()
        kill_group()


def assert_stopped_with_a_resumable_checkpoint(out_dir: Path, output: str, reason: str) -> None:
    assert f"{reason}: saved a checkpoint at step" in output, output[-3000:]
    step = torch.load(checkpoints(out_dir)[-1], map_location="cpu", weights_only=True)["iter_num"]
    assert step >= 3
    again = single_process(out_dir, *OPTIMIZERS["sophiag"], "--init_from=resume", f"--max_iters={step + 2}",
                           "--lr_decay_iters=100000", "--eval_interval=100000")
    assert again.result["iter"] == step + 2


def test_sigusr1_to_torchrun_is_forwarded_and_the_ranks_checkpoint_and_stop(tmp_path):
    """The README's SLURM recipe: torchrun forwards SIGUSR1 when told to handle it; the ranks
    finish their step, checkpoint and exit (torchrun itself then exits 1 after reporting the
    signal: its own behaviour)."""
    proc = start_torchrun(tmp_path, "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    output = output_after_training_starts(proc, lambda: proc.send_signal(signal.SIGUSR1))
    assert "closing signal SIGUSR1" in output
    assert_stopped_with_a_resumable_checkpoint(tmp_path, output, "received SIGUSR1")


def test_ctrl_c_under_torchrun_checkpoints_and_stops(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground group: torchrun and every rank. The
    ranks finish their step, agree to stop, and rank 0 saves a checkpoint the run resumes from."""
    proc = start_torchrun(tmp_path)
    output = output_after_training_starts(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert output.count("saved a checkpoint at step") == 1, output[-3000:]
    assert output.count("Ctrl-C: finishing the step") == 1, output[-3000:]
    assert_stopped_with_a_resumable_checkpoint(tmp_path, output, "received SIGINT (Ctrl-C)")


def test_launch_py_ends_ctrl_c_with_the_checkpoint_line_and_exit_0(tmp_path):
    """launch.py: torchrun without its SignalException traceback; the ranks alone get SIGINT."""
    proc = start_torchrun(tmp_path, launcher=("launch.py",))
    output = output_after_training_starts(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert proc.returncode == 0, output[-3000:]
    assert output.count("saved a checkpoint at step") == 1, output[-3000:]
    assert output.rstrip().splitlines()[-1].endswith("continue with --init_from=resume"), output[-3000:]
    assert not re.search(r"Traceback|Exception|Error", output), output[-3000:]
    assert_stopped_with_a_resumable_checkpoint(tmp_path, output, "received SIGINT (Ctrl-C)")


def test_ranks_whose_launcher_was_killed_checkpoint_and_stop(tmp_path):
    """torchrun killed outright (kill -9, or SIGUSR1 when it does not handle it): its workers
    notice that their parent is gone instead of training on unsupervised."""
    proc = start_torchrun(tmp_path)
    output = output_after_training_starts(proc, proc.kill)  # the launcher only
    assert_stopped_with_a_resumable_checkpoint(tmp_path, output, "the torchrun launcher is gone")


# ----------------------------------------------------------------------------- Sophia on shards

def _drop_an_estimate_that_is_bad_on_one_shard(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from sophia import SophiaG
        mesh = init_device_mesh("cpu", (WORLD,))
        param = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)]))
        optimizer = SophiaG([param], lr=0.1)
        estimate = torch.ones(4, 3)
        optimizer.update_hessian([distribute_tensor(estimate, mesh, [Shard(0)])])
        estimate[0, 0] = float("nan")  # in rank 0's shard only
        optimizer.update_hessian([distribute_tensor(estimate, mesh, [Shard(0)])])
        hessian = optimizer.state[param]["hessian"].to_local()
        torch.save({"hessian": hessian, "stats": optimizer.stats()}, Path(result_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_hessian_estimate_non_finite_on_one_shard_is_dropped_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_drop_an_estimate_that_is_bad_on_one_shard, args=(free_port(), str(tmp_path)),
                                nprocs=WORLD)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(result["hessian"], torch.full((2, 3), 0.01)), rank  # the first estimate only
        assert result["stats"]["skipped_estimates"] == 1


@pytest.mark.slow
def test_fsdp_with_compile_compiles_each_block_and_trains_like_eager_fsdp(two_ranks, tmp_path):
    """fsdp=True, compile=True: each block is compiled before it is sharded (the root is not),
    and the run ends where the eager sharded run ends, to compiled-vs-eager tolerance."""
    compiled = launch({"fsdp-compiled": [*OPTIMIZERS["sophiag"], "--fsdp=True", "--compile=True"]}, tmp_path,
                      timeout=600)["fsdp-compiled"]
    eager = two_ranks["fsdp-sophiag"]
    assert [r["iter"] for r in compiled.records("eval")] == [0, 6, 12]
    for x, y in zip(compiled.records("eval"), eager.records("eval"), strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-3)
    assert_state_close(compiled.checkpoint()["model"], eager.checkpoint()["model"], "model", rtol=1e-2, atol=1e-3)

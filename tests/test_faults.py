"""Specification of fault tolerance in train.py: checkpoints that survive anything,
preemption by SIGTERM/SIGUSR1, kill -9 at any moment, and non-finite steps.

A resumed run is the run it continues: bitwise on CPU, for every optimizer, whether
the stop falls before, on or after a Hessian refresh (hess_interval=3 below).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import checkpoints, load_latest_checkpoint
from model import GPT
from tests.test_train import TINY, assert_same_tensors, load_ckpt, run_train

ROOT = Path(__file__).resolve().parents[1]
SIXTY = ["--max_iters=60", "--lr_decay_iters=60", "--eval_interval=1000", "--log_interval=1"]


def final_state(out_dir: Path) -> dict:
    ckpt = load_ckpt(out_dir)
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"], "iter_num": ckpt["iter_num"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The 60-step runs that the interrupted ones must reproduce, per optimizer."""
    runs = {}
    for name in ("adamw", "sophiag", "sophiah", "lion", "muon", "soap"):
        out_dir = tmp_path_factory.mktemp(f"full-{name}")
        run_train(out_dir, *SIXTY, f"--optimizer_name={name}")
        runs[name] = final_state(out_dir)
    return runs


def start_training(out_dir: Path, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-u", "train.py", *TINY, f"--out_dir={out_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"process ended before printing {prefix!r}:\n{''.join(lines)}")


@pytest.mark.parametrize("resume", [False, True], ids=["first-evaluation", "after-steps"])
def test_sigterm_inside_a_long_evaluation_stops_the_run_within_seconds(tmp_path, resume):
    """An evaluation of a million batches (hours here) is asked about stop requests between
    batches: SIGTERM ends it in seconds, saving the steps taken since the run started."""
    long_eval = ["--eval_iters=1000000", "--eval_interval=4", "--max_iters=8", "--lr_decay_iters=8"]
    if resume:
        run_train(tmp_path, "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--lr_decay_iters=8")
    proc = start_training(tmp_path, *long_eval, *(["--init_from=resume"] if resume else []))
    wait_for_line(proc, "0.")  # the parameters line ("0.03M parameters, ..."): the loop starts
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and time.monotonic() - start < 20, output
    if resume:  # steps 2 to 4 ran, then the evaluation at step 4 was stopped
        assert output.rstrip().endswith(f"received SIGTERM: saved a checkpoint at step 4 in {tmp_path}; continue with "
                                        "--init_from=resume"), output
        assert checkpoints(tmp_path)[-1].name == "ckpt_00000004.pt"
    else:
        assert output.rstrip().endswith("received SIGTERM: stopped at step 0, where the run started; nothing new to "
                                        "save"), output
        assert not checkpoints(tmp_path)


def test_only_the_latest_keep_checkpoints_are_kept(tmp_path):
    run_train(tmp_path, "--max_iters=12", "--eval_interval=2", "--keep_checkpoints=3")
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_00000008.pt", "ckpt_00000010.pt",
                                                            "ckpt_00000012.pt"]


@pytest.mark.parametrize("sig, name, stop_at", [
    (signal.SIGTERM, "sophiag", "iter 9:"),   # the step before a Hessian refresh (at 9)
    (signal.SIGUSR1, "sophiah", "iter 7:"),   # right after one (at 6)
    (signal.SIGTERM, "adamw", "iter 5:"),
    (signal.SIGUSR1, "lion", "iter 3:"),
    (signal.SIGTERM, "muon", "iter 4:"),
    (signal.SIGTERM, "soap", "iter 6:"),
])
def test_preemption_signal_checkpoints_exits_0_and_the_resumed_run_is_bitwise_the_same(
        tmp_path, uninterrupted, sig, name, stop_at):
    proc = start_training(tmp_path, *SIXTY, f"--optimizer_name={name}")
    wait_for_line(proc, stop_at)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"received {signal.Signals(sig).name}" in out
    stopped = load_ckpt(tmp_path)["iter_num"]
    assert 0 < stopped < 60
    run_train(tmp_path, *SIXTY, f"--optimizer_name={name}", "--init_from=resume")
    assert_same_tensors(final_state(tmp_path), uninterrupted[name], name)



def test_a_checkpoint_cut_off_mid_write_is_skipped_for_the_previous_one(tmp_path, uninterrupted, capsys):
    """What kill -9 or a full disk can leave: a truncated newest file and a stray .tmp."""
    args = [*SIXTY, "--optimizer_name=adamw", "--eval_interval=10", "--keep_checkpoints=3"]
    run_train(tmp_path, *args, "--max_iters=30")
    newest = checkpoints(tmp_path)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    (tmp_path / "ckpt_00000031.pt.tmp").write_bytes(data[:100])
    run_train(tmp_path, *args, "--init_from=resume")
    assert "skipped a newer checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))
    assert_same_tensors(final_state(tmp_path), uninterrupted["adamw"])


DIE_IN_THE_THIRD_SAVE = """
import io, os, runpy, signal, sys, torch
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) < 3:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_kill_9_half_way_through_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, uninterrupted):
    """Deterministic: the process dies with half of its 3rd checkpoint (step 15) on disk."""
    args = [*SIXTY, "--optimizer_name=sophiag", "--eval_interval=5", "--eval_iters=1"]
    died = subprocess.run([sys.executable, "-c", DIE_IN_THE_THIRD_SAVE, *TINY, f"--out_dir={tmp_path}", *args],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    assert died.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == ["ckpt_00000005.pt", "ckpt_00000010.pt",
                                                               "ckpt_00000015.pt.tmp"]
    assert load_latest_checkpoint(tmp_path)[0]["iter_num"] == 10
    run_train(tmp_path, *args, "--init_from=auto")
    assert not list(tmp_path.glob("*.tmp"))
    assert_same_tensors(final_state(tmp_path), uninterrupted["sophiag"])


def test_init_from_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(tmp_path, uninterrupted):
    run_train(tmp_path, *SIXTY, "--optimizer_name=lion", "--max_iters=20", "--init_from=auto")
    assert load_ckpt(tmp_path)["iter_num"] == 20
    resumed = run_train(tmp_path, *SIXTY, "--optimizer_name=lion", "--init_from=auto")
    assert f"resuming from step 20 of {tmp_path / 'ckpt_00000020.pt'}" in resumed.stdout
    assert_same_tensors(final_state(tmp_path), uninterrupted["lion"])


@pytest.fixture
def poison_steps(monkeypatch):
    """Make the training loss NaN on chosen steps (counted from 0), as a bad batch or an
    overflow would; evaluation and the Hessian estimator see the normal model."""
    bad: set[int] = set()
    step = {"n": 0}
    train_step = train.train_step
    forward = GPT.forward

    def poisoned_forward(self, idx, targets=None, last_only=False):
        logits, loss = forward(self, idx, targets, last_only)
        if step.get("active") and loss is not None:
            loss = loss * float("nan")
        return logits, loss

    def counting_train_step(*args, **kwargs):
        step["active"] = step["n"] in bad
        try:
            return train_step(*args, **kwargs)
        finally:
            step["active"] = False
            step["n"] += 1

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    monkeypatch.setattr(train, "train_step", counting_train_step)
    return bad


@pytest.mark.parametrize("name", ["adamw", "sophiag", "lion", "muon"])
def test_a_non_finite_step_leaves_parameters_and_optimizer_state_untouched(tmp_path, poison_steps, name):
    """Steps 4 and 5 of 6 are NaN: the result equals a 4-step run (m, h, step counts too),
    and the skips are logged."""
    args = ["--lr_decay_iters=6", "--eval_interval=1000", "--decay_lr=False", f"--optimizer_name={name}"]
    poison_steps.update({4, 5})
    run = run_train(tmp_path / "bad", *args, "--max_iters=6")
    poison_steps.clear()
    run_train(tmp_path / "good", *args, "--max_iters=4")
    bad, good = load_ckpt(tmp_path / "bad"), load_ckpt(tmp_path / "good")
    assert bad["iter_num"] == 6
    assert_same_tensors(bad["model"], good["model"], "model")
    assert_same_tensors(bad["optimizer"], good["optimizer"], "optimizer")
    assert [r["iter"] for r in run.records("skipped")] == [5, 6]
    assert run.records("train")[-1]["skipped_steps"] == 2
    assert "non-finite loss or gradient, step skipped" in run.stdout


def test_a_non_finite_soap_step_leaves_its_moments_and_preconditioner_untouched(tmp_path, poison_steps):
    """As above for SOAP, with its eigenbasis refreshed every 2 steps (one refresh falls on a
    skipped step): p, the moments and the preconditioner (GG, Q) are those of a 4-step run. The
    package's host step counter (param_groups' "step") counts the skipped calls too: holding it
    back would need the host to read the flag."""
    args = ["--lr_decay_iters=6", "--eval_interval=1000", "--decay_lr=False", "--optimizer_name=soap",
            "--precondition_frequency=2"]
    poison_steps.update({4, 5})
    run_train(tmp_path / "bad", *args, "--max_iters=6")
    poison_steps.clear()
    run_train(tmp_path / "good", *args, "--max_iters=4")
    bad, good = load_ckpt(tmp_path / "bad"), load_ckpt(tmp_path / "good")
    assert_same_tensors(bad["model"], good["model"], "model")
    assert_same_tensors(bad["optimizer"]["state"], good["optimizer"]["state"], "optimizer")
    assert {k for s in bad["optimizer"]["state"].values() for k in s} >= {"exp_avg", "exp_avg_sq", "GG", "Q"}
    assert [g["step"] for g in bad["optimizer"]["param_groups"]] == [6, 6]
    assert [g["step"] for g in good["optimizer"]["param_groups"]] == [4, 4]


@pytest.mark.parametrize("name", ["sophiag", "sophiah"])
def test_a_non_finite_step_on_a_hessian_refresh_keeps_the_estimate_taken_before_it(tmp_path, poison_steps, name):
    """hess_interval=3: h is estimated at theta_3 before step 3, whose gradient is NaN. The
    parameters, m and the step count are those of a 3-step run; h holds the (finite)
    estimate at theta_3, exactly as a clean 4-step run's h: the curvature measured before the
    bad gradient is kept (undoing it would cost a copy of h at every refresh)."""
    args = ["--lr_decay_iters=6", "--eval_interval=1000", "--decay_lr=False", f"--optimizer_name={name}"]
    poison_steps.add(3)
    run_train(tmp_path / "bad", *args, "--max_iters=4")
    poison_steps.clear()
    run_train(tmp_path / "three", *args, "--max_iters=3")
    run_train(tmp_path / "four", *args, "--max_iters=4")
    bad, three, four = (load_ckpt(tmp_path / d) for d in ("bad", "three", "four"))
    assert_same_tensors(bad["model"], three["model"], "model")
    for i, state in bad["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], three["optimizer"]["state"][i]["exp_avg"])
        assert torch.equal(state["step"], three["optimizer"]["state"][i]["step"])
        assert torch.equal(state["hessian"], four["optimizer"]["state"][i]["hessian"])
        assert not torch.equal(state["hessian"], three["optimizer"]["state"][i]["hessian"])


def test_too_many_bad_steps_in_a_row_stop_the_run_with_one_line_keeping_the_last_checkpoint(
        tmp_path, poison_steps, capsys):
    """Checked on log steps (here every step): the run stops at step 7, the 4th bad one, and
    saves nothing, so the checkpoint of the evaluation at step 6 stays the latest."""
    poison_steps.update(range(3, 100))
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max_iters=50", "--eval_interval=2", "--max_bad_steps=4", "--log_interval=1")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 consecutive steps had a non-finite loss" in err and "up to step 7" in err
    assert "the latest checkpoint is ckpt_00000006.pt" in err
    assert load_ckpt(tmp_path)["iter_num"] == 6


# ----------------------------------------------------------------------------- one run per out_dir, Ctrl-C

def test_a_second_run_into_a_running_runs_out_dir_stops_with_one_line_naming_it(tmp_path, capsys):
    """The first run holds out_dir's lock (here taken by RunLock in this process: flock is per
    open file, so it conflicts all the same); the second stops before writing anything."""
    from lifecycle import RunLock
    run_train(tmp_path, "--max_iters=2", "--eval_interval=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    holder = RunLock(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=auto")
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is in use by another run (host " in err
    assert f"pid {os.getpid()}" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}
    run_train(tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=auto")  # released: it goes on


def test_a_fresh_run_never_mixes_its_records_with_an_earlier_runs(tmp_path, capsys):
    """A run stopped before its first checkpoint leaves metrics.jsonl only: init_from=scratch
    refuses to append to it, init_from=auto sets it aside and starts over."""
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "iter": 5, "loss": 3.0}\n')
    with pytest.raises(SystemExit):
        run_train(tmp_path, "--max_iters=2", "--eval_interval=2")
    assert "holds another run's records" in capsys.readouterr().err
    run_train(tmp_path, "--max_iters=2", "--eval_interval=2", "--init_from=auto")
    aside = list(tmp_path.glob("metrics.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == '{"kind": "train", "iter": 5, "loss": 3.0}\n'
    iters = [json.loads(line)["iter"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 5 not in iters and iters[0] == 0


def test_ctrl_c_finishes_the_step_saves_and_resumes_bitwise(tmp_path, uninterrupted):
    proc = start_training(tmp_path, *SIXTY, "--optimizer_name=sophiag")
    wait_for_line(proc, "iter 4:")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGINT (Ctrl-C): saved a checkpoint at step" in out and "--init_from=resume" in out
    assert 0 < load_ckpt(tmp_path)["iter_num"] < 60
    run_train(tmp_path, *SIXTY, "--optimizer_name=sophiag", "--init_from=resume")
    assert_same_tensors(final_state(tmp_path), uninterrupted["sophiag"])


def test_a_second_ctrl_c_aborts_at_once_with_one_line(tmp_path):
    """The second Ctrl-C lands while the first one's checkpoint is being written (save is
    slowed down here so that it always does): no traceback, exit 130."""
    slow_save = ("import time, checkpoint, runpy, sys\n"
                 "real = checkpoint.save_checkpoint\n"
                 "def slow(*a, **k):\n    print('saving', flush=True)\n    time.sleep(30)\n    return real(*a, **k)\n"
                 "checkpoint.save_checkpoint = slow\n"
                 "import train\ntrain.save_checkpoint = slow\n"
                 "sys.argv = ['train.py', *sys.argv[1:]]\ntrain.main()\n")
    proc = subprocess.Popen([sys.executable, "-u", "-c", slow_save, *TINY, f"--out_dir={tmp_path}", *SIXTY],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_line(proc, "iter 4:")
    proc.send_signal(signal.SIGINT)
    wait_for_line(proc, "saving")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted: stopped without a checkpoint" in out and "Traceback" not in out

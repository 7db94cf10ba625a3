"""Tests of the comparison runner's SLURM launcher (scripts/compare.py --launcher slurm) against a
real SLURM controller: scripts/ci/start_slurm.sh starts a single-node cluster (CI does). Every
run is the tiny Shakespeare model on the CPU, one CPU per job.

- a 2-run sweep through SLURM ends with the same losses as the same sweep run locally, and two
  compare.py started together submit each run once; one started after submits nothing;
- a job stopped mid-run, by the warning signal or by a requeue (preemption), checkpoints, is
  requeued and ends bitwise equal to the uninterrupted run;
- a run that fails with a user error fails once, with its one-line error, and is not requeued
  or submitted again.
The job scripts of a multi-node run are checked with --dry_run, which needs no cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts import compare
from tests.helpers import CHAR

needs_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="needs a SLURM cluster (sbatch not found): scripts/ci/start_slurm.sh starts one")

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "config" / "train_shakespeare_char.py")
STEPS = 1000  # long enough (about 10 s) to stop it mid-run
SWEEP = [BASE, "--optimizers", "adamw", "--steps", str(STEPS), "--lr_grid", "1", "--seeds", "1,2", f"--dataset={CHAR}",
         "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
         "--eval_interval=250", "--log_interval=50"]
SLURM = ["--launcher", "slurm", "--cpus_per_task", "1", "--poll_s", "1"]


def evals(out_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["val_loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "eval"}


def job_field(job: str, key: str) -> str:
    """A field of `scontrol show job` (jobs stay listed for MinJobAge after they end)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return next(word.split("=", 1)[1] for word in out.split() if word.startswith(key + "="))


def test_dry_run_prints_a_multi_node_torchrun_job_and_writes_nothing(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    argv = [a if a != "1,2" else "1" for a in SWEEP] + [
        "--runs_dir", str(runs_dir), "--launcher", "slurm", "--dry_run", "--nodes", "2", "--gpus_per_node", "4",
        "--cpus_per_task", "32", "--time", "4:00:00", "--partition", "gpu", "--account", "proj", "--qos", "high",
        "--mem", "200G", "--sbatch=--constraint=a100", "--setup", "source venv/bin/activate", "--signal_s", "120",
        "--gradient_accumulation_steps=8"]
    compare.main(argv)
    out = capsys.readouterr().out
    run = runs_dir / f"adamw_T{STEPS}_lr0.004_s1"
    header = [line for line in out.splitlines() if line.startswith("#SBATCH ")]
    assert header == [f"#SBATCH --job-name={run.name}", f"#SBATCH --output={run / 'train.log'}",
                      "#SBATCH --open-mode=append", f"#SBATCH --chdir={ROOT}", "#SBATCH --nodes=2",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=32", "#SBATCH --gpus-per-node=4",
                      "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=4:00:00",
                      "#SBATCH --mem=200G", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                      "#SBATCH --constraint=a100"]
    assert "\nsource venv/bin/activate\nexport OMP_NUM_THREADS=8 MKL_NUM_THREADS=8\n" in out
    launch = next(line for line in out.splitlines() if line.startswith("srun "))
    assert ("launch.py --nnodes=\"$SLURM_JOB_NUM_NODES\" --nproc_per_node=4 "
            "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout=120") in launch
    assert '--rdzv_endpoint="$head:' in launch and launch.endswith(f"--out_dir={run} --init_from=auto &")
    assert "scontrol requeue" in out and not runs_dir.exists()


def test_runs_are_checked_on_the_world_size_of_their_jobs(tmp_path, capsys):
    argv = [BASE, "--optimizers", "adamw", "--steps", "10", "--lr_grid", "1", "--seeds", "1", "--runs_dir",
            str(tmp_path / "runs"), "--launcher", "slurm", "--dry_run", "--nodes", "2", "--gpus_per_node", "4",
            "--gradient_accumulation_steps=4"]
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert ("error: adamw (config/train_shakespeare_char_adamw.py): gradient_accumulation_steps=4 is not divisible "
            "by the world size 8") in capsys.readouterr().err
    compare.main(argv[:-1] + ["--gradient_accumulation_steps=8"])


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The sweep run locally: the reference."""
    runs_dir = tmp_path_factory.mktemp("local")
    compare.main(SWEEP + ["--runs_dir", str(runs_dir), "--jobs", "2", "--threads", "2"])
    return runs_dir


@needs_slurm
def test_sweep_through_slurm_matches_local_and_submits_each_run_once(local, tmp_path, capsys):
    runs_dir = tmp_path / "slurm"
    argv = SWEEP + ["--runs_dir", str(runs_dir), *SLURM]
    # Two compare.py over the same folder at once: each run is submitted by one of them.
    procs = [subprocess.Popen([sys.executable, "-m", "scripts.compare", *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    jobs = {d.name: (d / "slurm.job").read_text().strip() for d in runs_dir.iterdir() if d.is_dir()}
    assert len(jobs) == 2 and len(set(jobs.values())) == 2
    submitted = [line for out in outputs for line in out.splitlines() if line.startswith("queued (job ")]
    assert len({line.split(")")[0] for line in submitted}) == 2  # the second saw the first's jobs

    results = compare.main(argv + ["--wait"])
    out = capsys.readouterr().out
    assert out.count("ok: ") == 2 and "2 run(s) not finished before: 2 ok" in out
    reference = json.loads((local / "results.json").read_text())
    assert results["groups"][0]["lrs"] == reference["groups"][0]["lrs"]  # final losses, states "ok"
    for name in jobs:
        assert evals(runs_dir / name) == evals(local / name) and max(evals(runs_dir / name)) == STEPS
        assert "received SIG" not in (runs_dir / name / "train.log").read_text()

    compare.main(argv)  # later: nothing to submit
    out = capsys.readouterr().out
    assert out.count("finished, not rerun") == 2 and "queued" not in out
    assert {d.name: (d / "slurm.job").read_text().strip() for d in runs_dir.iterdir() if d.is_dir()} == jobs


# How a job is stopped, and the signal train.py reports: the warning SLURM sends --signal_s before
# the time limit (USR1 to the batch shell, which passes it on), or a preemption that requeues the
# job (SIGTERM to every process of the job, train.py's own or the USR1 of the batch shell first).
STOPS = {"time_limit_warning": (["scancel", "--signal=USR1", "--batch"], ("SIGUSR1",)),
         "scheduler_requeue": (["scontrol", "requeue"], ("SIGTERM", "SIGUSR1"))}


@needs_slurm
@pytest.mark.parametrize("stop", list(STOPS))
def test_preempted_job_requeues_and_ends_bitwise_equal_to_an_uninterrupted_run(local, tmp_path, capsys, stop):
    runs_dir = tmp_path / "slurm"
    argv = [a if a != "1,2" else "1" for a in SWEEP] + ["--runs_dir", str(runs_dir), *SLURM]
    compare.main(argv)
    out_dir = next(d for d in runs_dir.iterdir() if d.is_dir())
    job = (out_dir / "slurm.job").read_text().strip()
    deadline = time.time() + 300
    while not (out_dir / "metrics.jsonl").exists() or '"kind": "train"' not in (out_dir / "metrics.jsonl").read_text():
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.1)
    command, received = STOPS[stop]
    subprocess.run([*command, job], check=True)
    compare.main(argv + ["--wait"])
    out = capsys.readouterr().out
    assert "ok: " in out and "failed" not in out
    log = (out_dir / "train.log").read_text()
    assert any(f"received {signal}: saved a checkpoint at step" in log for signal in received)
    assert f"slurm: job {job} stopped (exit 0); requeued to continue from its latest checkpoint" in log
    assert job_field(job, "Restarts") == "1" and (out_dir / "slurm.job").read_text().strip() == job

    assert evals(out_dir) == evals(local / out_dir.name) and max(evals(out_dir)) == STEPS
    final = f"ckpt_{STEPS:08d}.pt"
    mine, reference = (torch.load(d / final, map_location="cpu", weights_only=False) for d in (out_dir, local / out_dir.name))
    assert mine["model"].keys() == reference["model"].keys()
    assert all(torch.equal(mine["model"][k], reference["model"][k]) for k in mine["model"])


@needs_slurm
def test_a_user_error_fails_once_without_requeue(tmp_path, capsys):
    """--device=cuda passes the plan (made on a login node) but fails on this CPU-only node."""
    runs_dir = tmp_path / "slurm"
    argv = [a if a != "1,2" else "1" for a in SWEEP] + ["--runs_dir", str(runs_dir), "--device=cuda", *SLURM]
    compare.main(argv + ["--wait"])
    out = capsys.readouterr().out
    out_dir = next(d for d in runs_dir.iterdir() if d.is_dir())
    job = (out_dir / "slurm.job").read_text().strip()
    failed = [line for line in out.splitlines() if line.startswith("failed")]
    assert failed == [f"failed (exit 2, job {job}): {out_dir} (error: device='cuda' but this machine has no "
                      "CUDA GPU; use --device=cpu or --device=auto)"]
    assert job_field(job, "Restarts") == "0" and job_field(job, "JobState") == "FAILED"
    assert (out_dir / "train.log").read_text().count("error: ") == 1

    compare.main(argv)  # again: reported, not submitted again
    out = capsys.readouterr().out
    assert failed[0] in out.splitlines() and "queued" not in out
    assert (out_dir / "slurm.job").read_text().strip() == job

"""Running the plan of an optimizer comparison (scripts/compare.py): which runs are finished,
and the local launcher for the others (the SLURM one is scripts/compare_slurm.py).

A run whose metrics.jsonl has an evaluation at max_iters is finished and not rerun; any other
(unfinished, crashed, failed) is started again with --init_from=auto, which resumes from its
latest checkpoint. Locally each run is a subprocess `python train.py CONFIG --key=value ...`
(the commands are printed) with its console output in train.log in its out_dir; --jobs N runs N
at a time, each with --threads / N OpenMP threads. Runs start (or are submitted) round-robin over
the groups (every group's first run, then every group's second, ...), so a study stopped half-way
has every group's grid filled to the same depth.

A run's state: "done" (finished before), "ok" (finished now), "failed (...)", "not run"
(--no_train or --dry_run), and under SLURM "queued (job N)" or "running (job N)".
"""

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from paths import ROOT, shown
from scripts.compare_plan import Group, Run, check_reused, is_finished

WAITING = ("not run", "queued", "running")  # states of a run that has neither finished nor failed


def waiting(state: str) -> bool:
    return state.startswith(WAITING)


def error_line(out_dir: Path) -> str:
    """The last one-line error a run's train.log holds ("error: ..."), or ""."""
    log = out_dir / "train.log"
    if not log.exists():
        return ""
    errors = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else ""


def unfinished(runs: list[Run]) -> tuple[dict[Run, str], list[Run]]:
    """The finished runs' states ("done"), and the others in the order to start them."""
    states: dict[Run, str] = {}
    for run in runs:
        check_reused(run)
        if is_finished(run):
            states[run] = "done"
            print(f"finished, not rerun: {shown(run.out_dir)}")
    # Ordered over every run, finished ones included: a resumed study fills its shallowest grids first.
    return states, [run for run in round_robin(runs) if run not in states]


def execute(todo: list[Run], args: argparse.Namespace) -> dict[Run, str]:
    """The local launcher: each run's state after running `todo` here (none with --no_train or
    --dry_run, which print what they would do)."""
    if not (args.no_train or args.dry_run):
        return run_locally(todo, args.jobs, args.threads)
    for run in todo:
        print(f"not finished, not run ({'--no_train' if args.no_train else '--dry_run'}): {shown(run.out_dir)}")
    if args.dry_run:
        for run in todo:
            argv, env = command(run, max(1, args.threads // args.jobs), (run.out_dir / "metrics.jsonl").exists())
            print("$ " + shown_command(argv, env))
    return {run: "not run" for run in todo}


def command(run: Run, threads: int, resume: bool) -> tuple[list[str], dict[str, str]]:
    args = [sys.executable, "train.py", *run.args] + (["--init_from=auto"] if resume else [])
    # Torch sizes its intra-op pool from OMP_NUM_THREADS: parallel runs must not oversubscribe.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return args, env


def shown_command(argv: list[str], env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) + " python " + shlex.join(argv[1:])


def round_robin(runs: list[Run]) -> list[Run]:
    """The runs reordered: every group's first run, then every group's second, ..."""
    by_group: dict[Group, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    return [run for turn in itertools.zip_longest(*by_group.values()) for run in turn if run is not None]


def run_locally(todo: list[Run], jobs: int, threads: int) -> dict[Run, str]:
    """Run `todo` here, `jobs` at a time; returns each run's state: 'ok' or 'failed (exit N)'."""
    states: dict[Run, str] = {}
    if not todo:
        return states
    print(f"{len(todo)} run(s) to do, {jobs} at a time, commands run in {ROOT}:")
    lock = threading.Lock()
    per_job = max(1, threads // jobs)

    def one(run: Run) -> None:
        resume = (run.out_dir / "metrics.jsonl").exists()
        argv, env = command(run, per_job, resume)
        with lock:
            print(("$ (resume) " if resume else "$ ") + shown_command(argv, env), flush=True)
        run.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run.out_dir / "train.log", "a") as log:
            # check=False: a failed run is reported and the others go on.
            code = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT, check=False).returncode
        states[run] = "ok" if code == 0 and is_finished(run) else f"failed (exit {code})"
        with lock:
            print(f"  {shown(run.out_dir)}: {states[run]} in {time.perf_counter() - t0:.1f}s"
                  + ("" if states[run] == "ok" else f", see {shown(run.out_dir / 'train.log')}"), flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))  # list() re-raises a worker's exception
    return states

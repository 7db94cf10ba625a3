"""The SLURM launcher of an optimizer comparison (scripts/compare.py --launcher slurm): each run
that is not finished becomes one batch job, a generated sbatch script kept in its out_dir.

Generated scripts rather than a submission library (submitit): the script is the whole
contract with the cluster, readable (--dry_run prints it) and resubmittable by hand
(`sbatch <out_dir>/slurm.sbatch`); nothing is pickled, so the compute nodes need only this
repository and its Python environment, and no extra dependency. One job per run rather than a
job array: each run is requeued, failed and resubmitted on its own, and its job id is its own.

The job: the setup line (module loads, venv activation), then `python train.py ...
--init_from=auto` for a single process, else `srun` starting one launch.py (torchrun ending
in one line: a rank's user error ends the job with that line and exit status 2, which is not
requeued or resubmitted, where torchrun would add a traceback and exit 1) per node with the
c10d rendezvous on the job's first node; it gives its ranks --signal_s seconds to checkpoint
after it forwards a stop. Its console output is appended to <out_dir>/train.log, as for a
local run.

Preemption: the job asks for USR1 `--signal_s` seconds before its time limit
(`--signal=B:USR1@S`, to the batch shell). The shell passes a USR1 or a TERM (a scheduler's
preemption) on to the training process as USR1 (srun forwards USR1 to its tasks, where a TERM
would cancel the step; launch.py forwards it to its ranks): train.py finishes its step, saves a
checkpoint and exits, and the shell requeues the job (`scontrol requeue`; it has `--requeue`),
which starts again from the top and continues from that checkpoint with --init_from=auto,
exactly as an uninterrupted run. A job that ends without a
stop request is not requeued: a run that fails (train.py exits 2 with a one-line error for a
user mistake) fails once, and its exit status goes to <out_dir>/slurm.exit.

Collecting: <out_dir>/slurm.job holds the id of the run's job; a run is "queued (job N)" or
"running (job N)" while squeue lists that job, else finished (metrics.jsonl), or failed
(slurm.exit, or the job's end state from sacct where accounting is on). Submitting holds an
exclusive lock on <out_dir>/slurm.lock while it reads slurm.job and submits, so two compare.py
over the same runs never submit a run twice. A failed run is submitted again by the next
compare.py (with --init_from=auto), except one that failed with a user error (exit 2), which
would fail the same way: --retry_failed submits those too, once the cause is fixed.
"""

import argparse
import fcntl
import getpass
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from errors import UserError
from paths import ROOT, shown
from scripts.compare_plan import Run, is_finished
from scripts.compare_run import error_line, waiting

SCRIPT, JOB, EXIT, LOCK = "slurm.sbatch", "slurm.job", "slurm.exit", "slurm.lock"
# torchrun forwards these to its ranks; by default it would die on USR1, the stop the job passes on
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
QUEUED = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The --launcher slurm options."""
    s = parser.add_argument_group("SLURM (--launcher slurm): one batch job per run")
    s.add_argument("--partition", metavar="NAME", help="#SBATCH --partition")
    s.add_argument("--account", metavar="NAME", help="#SBATCH --account")
    s.add_argument("--qos", metavar="NAME", help="#SBATCH --qos")
    s.add_argument("--time", metavar="LIMIT", help="time limit per job, e.g. 24:00:00 (longer runs requeue from a checkpoint)")
    s.add_argument("--nodes", metavar="N", type=int, default=1, help="nodes per run (default 1)")
    s.add_argument("--gpus_per_node", metavar="N", type=int, default=0, help="GPUs per node, one training process each (default 0)")
    s.add_argument("--cpus_per_task", metavar="N", type=int, default=1,
                   help="CPUs per node (one task per node starts its processes; default 1)")
    s.add_argument("--mem", metavar="SIZE", help="memory per node, e.g. 64G")
    s.add_argument("--sbatch", action="append", default=[], metavar="LINE",
                   help="an extra #SBATCH line, e.g. --sbatch=--constraint=a100 (repeatable)")
    s.add_argument("--setup", metavar="LINE", default="", help="shell line run first in each job, e.g. 'module load cuda; . venv/bin/activate'")
    s.add_argument("--signal_s", metavar="S", type=int, default=300,
                   help="seconds before the time limit to checkpoint and requeue (default 300)")
    s.add_argument("--wait", action="store_true", help="wait until no run is queued or running, then write the results")
    s.add_argument("--poll_s", metavar="S", type=float, default=60, help="seconds between looks at the queue with --wait (default 60)")
    s.add_argument("--retry_failed", action="store_true", help="submit again runs that failed with a user error (exit 2)")


def check_options(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0 or args.cpus_per_task < 1 or args.signal_s < 1 or args.poll_s <= 0:
        raise UserError("--nodes, --cpus_per_task and --signal_s must be at least 1, --gpus_per_node at least 0, "
                        "--poll_s positive")
    if args.launcher == "slurm" and not args.dry_run:
        for tool in ("squeue",) if args.no_train else ("sbatch", "squeue"):
            if shutil.which(tool) is None:
                raise UserError(f"--launcher slurm: {tool} not found on PATH; run on a SLURM login node, "
                                "or --dry_run to print the job scripts")


def script(run: Run, args: argparse.Namespace) -> str:
    """The batch script of one run."""
    out = run.out_dir.resolve()
    procs = max(1, args.gpus_per_node)
    threads = max(1, args.cpus_per_task // procs)
    sbatch = [f"--job-name={run.out_dir.name}", f"--output={out / 'train.log'}", "--open-mode=append",
              f"--chdir={ROOT}", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={args.cpus_per_task}",
              *([f"--gpus-per-node={args.gpus_per_node}"] if args.gpus_per_node else []),
              *(f"--{key}={getattr(args, key)}" for key in ("partition", "account", "qos", "time", "mem")
                if getattr(args, key)),
              f"--signal=B:USR1@{args.signal_s}", "--requeue", *args.sbatch]
    train = [sys.executable, "train.py", *run.args, "--init_from=auto"]
    if args.nodes * procs == 1:
        launch = shlex.join(train)
    else:  # one torchrun per node; the port from the job id, so two jobs sharing a node do not collide
        launch = ('head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
                  'srun --kill-on-bad-exit=1 ' + shlex.join([train[0], "launch.py"])
                  + f' --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node={procs} --signals_to_handle={FORWARDED}'
                  + f' --shutdown_timeout={args.signal_s}'
                  + ' --rdzv_backend=c10d'
                  + ' --rdzv_endpoint="$head:$((20000 + SLURM_JOB_ID % 20000))" --rdzv_id="$SLURM_JOB_ID" '
                  + shlex.join(train[1:]))
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {line}" for line in sbatch),
        f"# One run of an optimizer comparison (python -m scripts.compare), written to {out / SCRIPT}.",
        "# On USR1 (the time limit is near) or TERM (preemption) train.py checkpoints, and the job requeues",
        "# itself to continue from that checkpoint (--init_from=auto); otherwise it ends with train.py's status.",
        args.setup,
        f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}",
        f"rm -f {shlex.quote(str(out / EXIT))}",
        "stopping=",
        "stop() { stopping=1; kill -USR1 \"$pid\" 2>/dev/null; }",
        "trap stop USR1 TERM",
        launch + " &",
        "pid=$!",
        "wait \"$pid\"",
        "while kill -0 \"$pid\" 2>/dev/null; do wait \"$pid\"; done  # a trapped signal interrupts wait",
        "wait \"$pid\"; code=$?",
        "if [ -n \"$stopping\" ] && [ \"$code\" -ne 2 ]; then",
        "    echo \"slurm: job $SLURM_JOB_ID stopped (exit $code); requeued to continue from its latest checkpoint\"",
        "    scontrol requeue \"$SLURM_JOB_ID\"",
        "    exit 0",
        "fi",
        f"echo \"$code\" > {shlex.quote(str(out / EXIT))}",
        "exit \"$code\"",
        ""])


def queue() -> dict[str, str]:
    """{job id: state} of this user's jobs that SLURM still runs or holds."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i %T", "-u", getpass.getuser()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"squeue failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def ended_as(job: str) -> str:
    """A job's end state from sacct (e.g. CANCELLED, TIMEOUT, NODE_FAIL), or "" without accounting."""
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    except FileNotFoundError:
        return ""
    return proc.stdout.split()[0] if proc.returncode == 0 and proc.stdout.split() else ""


def state_of(run: Run, jobs: dict[str, str]) -> str:
    """A run's state from its folder and `jobs`, the queue read before (a job ending in between
    is seen finished)."""
    job = (run.out_dir / JOB).read_text().strip() if (run.out_dir / JOB).exists() else ""
    if is_finished(run):
        return "ok"
    if not job:
        return "not run"
    if job in jobs:
        return f"{'queued' if jobs[job] in QUEUED else 'running'} (job {job})"
    if (run.out_dir / EXIT).exists():
        return f"failed (exit {(run.out_dir / EXIT).read_text().strip()}, job {job})"
    return f"failed ({ended_as(job) or 'ended without an exit status'}, job {job})"


def submit(run: Run, args: argparse.Namespace) -> str:
    """Submit the run unless its job is queued or running, or it failed with a user error
    (without --retry_failed); under the run's lock. Returns its state."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    with open(run.out_dir / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the job id is written: one submission per run
        # the queue as of now: another compare may have submitted this run a moment ago
        state = state_of(run, queue() if (run.out_dir / JOB).exists() else {})
        if state == "ok" or waiting(state) and state != "not run":
            return state
        if state.startswith("failed (exit 2,") and not args.retry_failed:
            return state
        (run.out_dir / SCRIPT).write_text(script(run, args))
        proc = subprocess.run(["sbatch", "--parsable", str(run.out_dir / SCRIPT)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"sbatch {shown(run.out_dir / SCRIPT)} failed: "
                            f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        job = proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"
        (run.out_dir / JOB).write_text(job + "\n")
        return f"queued (job {job})"


def report(run: Run, state: str, seen: dict[Run, str]) -> None:
    """Print a run's state when it changes; a failure once, with its one-line error."""
    if seen.get(run) == state:
        return
    seen[run] = state
    line = f"{state}: {shown(run.out_dir)}"
    if state.startswith("failed"):
        error = error_line(run.out_dir)
        line += f" ({error})" if error else f", see {shown(run.out_dir / 'train.log')}"
    print(line, flush=True)


def execute(todo: list[Run], args: argparse.Namespace) -> dict[Run, str]:
    """Submit (or with --dry_run print) the jobs of the runs in `todo` (none finished before);
    with --wait, wait until none is queued or running. Returns each run's state."""
    if args.dry_run:
        for run in todo:
            print(f"# {shown(run.out_dir / SCRIPT)}\n{script(run, args)}")
        return {run: "not run" for run in todo}
    seen: dict[Run, str] = {}
    jobs = queue()
    states = {run: state_of(run, jobs) if args.no_train else submit(run, args) for run in todo}
    for run, state in states.items():
        report(run, state, seen)
    while args.wait and any(s.startswith(("queued", "running")) for s in states.values()):
        time.sleep(args.poll_s)
        jobs = queue()
        states = {run: state_of(run, jobs) for run in todo}
        for run, state in states.items():
            report(run, state, seen)
    counts = Counter(state.split(" (")[0] for state in states.values())
    print(f"{len(todo)} run(s) not finished before: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return states

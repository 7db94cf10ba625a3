"""torchrun that ends in one line: the same options and arguments, e.g.

    python launch.py --standalone --nproc_per_node=8 train.py config/train_gpt2_medium_sophiag.py

train.py says in one line why its ranks stop (a mistake in the settings, Ctrl-C, a preemption
signal). torchrun then adds its own report: a ~40-line ChildFailedError traceback when a rank
exits non-zero, a ~20-line SignalException traceback when it is interrupted itself. This runs
torchrun's launcher in this process and ends with the ranks' exit status instead, with nothing
added except a line for a rank that was killed without a word (e.g. by the kernel's OOM killer):

- a user error: the rank's one `error: ...` line, exit status 2;
- Ctrl-C: torchrun starts each rank in a session of its own, so the terminal's SIGINT reaches
  the launcher alone; it passes it on to every rank once, as torchrun does, and the ranks finish
  their step, save a checkpoint and exit 0, and so does the launcher (torchrun then reports the
  signal with exit status 1). A second Ctrl-C, passed on too, makes the ranks abort (exit 130);
- SIGTERM (or a signal given with --signals_to_handle) to the launcher: forwarded to the ranks
  as torchrun does, then exit status 128 + the signal's number, without a traceback.
"""

import logging
import os
import signal
import sys
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

DEFAULT_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT"  # torchrun's, less SIGINT: pass_on() hands that to the ranks


def pass_on(signum: int, frame: object) -> None:
    """Signal every rank: the children of this process, each the leader of its process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                os.killpg(pid, signum)
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue


def main(argv: list[str] | None = None) -> int:
    """Launch as torchrun would; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = torchrun.parse_args(argv)
    if args.signals_to_handle == torchrun.get_args_parser().get_default("signals_to_handle"):
        args.signals_to_handle = DEFAULT_SIGNALS
    signal.signal(signal.SIGINT, pass_on)  # the ranks decide: checkpoint, or abort on a second
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure reports
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode  # the rank has said why (one line, or its own traceback)
        print(f"error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name} without a word "
              f"(out of memory?)", file=sys.stderr)
        return 128 - failure.exitcode
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

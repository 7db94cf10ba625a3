"""User errors: a mistake the user can fix is one line naming the problem and the fix, and
exit status 2, never a traceback. Torch-free, so the settings and the scripts that plan runs
import it without torch."""

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a write the folder, not the program, refused


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix. Entry points
    print it as one line and exit with status 2 instead of showing a traceback."""


def one_line(message: str) -> str:
    """The message on one line, even when it quotes a multi-line exception (e.g. torch.load's)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def first_rank() -> bool:
    """Rank 0 under torchrun, or a single process: read from the launcher's environment, so it
    holds before (and without) init_process_group."""
    return os.environ.get("RANK", "0") == "0"


def exit_on_user_error(fn: F) -> F:
    """Decorator for an entry point's main(): a UserError becomes one line on stderr and exit 2.
    Under torchrun only rank 0 prints it (every rank raises the same error), and all exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if first_rank():
                print("error: " + one_line(str(e)), file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # a full disk where no write expected it: still one line
            if e.errno not in NO_SPACE:
                raise
            if first_rank():
                print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}; free some space there or "
                      f"choose a writable folder", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # a second Ctrl-C: the first one asks for a checkpoint (StopRequests)
            print("interrupted: stopped without a checkpoint", file=sys.stderr)
            sys.exit(130)
    return wrapper  # type: ignore[return-value]

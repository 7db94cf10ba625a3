"""Where things are and where a run may write: the repository, paths as the subprocesses it
starts get them, output folders and files checked before any work is done, and the one line
for a write refused for lack of space. Torch-free."""

import contextlib
import errno
import os
import shutil
from pathlib import Path

from errors import NO_SPACE, UserError

ROOT = Path(__file__).resolve().parent  # the repository: data/, config/ and the entry points


def shown(path: Path) -> str:
    """A path as a subprocess run in the repository (train.py, an eval script) gets it, and as
    printed: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


PROBE_BYTES = 1 << 16  # what writable_dir writes: a full disk still creates empty files


def no_space(error: BaseException, folder: Path, what: str, needed: int) -> UserError | None:
    """The one line for a write of `what` (about `needed` bytes) into `folder` that failed for
    lack of space or quota, or on a read-only file system (an OSError that is `error` or its
    cause: torch.save reports one as a RuntimeError of its zip writer); None otherwise."""
    e = error
    while e is not None and not (isinstance(e, OSError) and e.errno in NO_SPACE):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {what} to {folder}: the file system is read-only; choose a writable folder")
    try:
        free = f", {shutil.disk_usage(folder).free / 2 ** 20:,.1f} MiB free"
    except OSError:
        free = ""
    return UserError(f"cannot write {what} to {folder}: {e.strerror} (it needs about {needed / 2 ** 20:,.1f} MiB"
                     f"{free}); free some space there or choose another folder")


def writable_dir(path: str | Path, option: str) -> Path:
    """Create the directory `path` if needed and check that files can be written in it (a
    real write of PROBE_BYTES, flushed to the file system), before any work is done; a
    UserError naming the command-line `option` to change otherwise."""
    if not str(path).strip():  # checked before Path(), which turns "" into "."
        raise UserError(f"{option} is empty; give a folder name")
    path = Path(path)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write to {str(path)!r} ({e.strerror}); choose another {option}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """Check, before any work is done, that `path` can be written as a file: not a folder, and
    in a folder that takes a write (writable_dir) or, when it does not exist yet, under one
    that lets it be created; nothing is created here (write_output creates the folder). An
    existing file is left as it is. A UserError naming `option` otherwise."""
    if not str(path).strip():
        raise UserError(f"{option} is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option}={str(path)!r} is a folder; give a file name, e.g. {path / 'results.json'}")
    if path.parent.is_dir():
        writable_dir(path.parent, option)
    else:
        existing = next(p for p in path.absolute().parents if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{option}={str(path)!r}: its folder cannot be created under {existing}; choose "
                            f"another {option}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option}={str(path)!r} exists and is not writable; choose another {option}")
    return path


def write_output(path: Path, text: str) -> None:
    """Write an output file that writable_file checked, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

"""Helpers several test files share."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# The embedded Shakespeare datasets, prepared on first use into a folder of this test session
# (train.py takes a dataset folder's path as well as a name under data/), so the suite writes
# nothing into the checkout. Subprocesses inherit the folder through the environment;
# tests/conftest.py removes it at the end.
DATA = Path(os.environ.setdefault("SOPHIA_GPT_TEST_DATA", tempfile.mkdtemp(prefix="sophia-gpt-test-data-")))
CHAR = str(DATA / "shakespeare_char")
BPE = str(DATA / "shakespeare")


def expect_one_line_error(capsys, main: Callable, argv: list[str], *fragments: str) -> str:
    """main(argv) refuses: exit status 2 and exactly one stderr line `error: ...` that holds
    every fragment. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err

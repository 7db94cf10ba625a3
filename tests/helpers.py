"""Helpers several test files share."""

from collections.abc import Callable

import pytest


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

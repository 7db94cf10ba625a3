"""Every entry point speaks one way: options are `--key=value` with underscores (argparse takes
that form as train.py's configurator does), one name means one thing (`--output` is the file a
script writes, `--out_dir` a run or dataset folder), and progress bars appear on a terminal
only, so a redirected log keeps one line per event."""

import fcntl
import importlib
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.test_data import no_network, owt_documents, write_jsonl  # noqa: F401  (autouse: offline)
from tests.test_fineweb import make_documents, write_parquet

ROOT = Path(__file__).resolve().parents[1]
ARGPARSE_ENTRY_POINTS = sorted(  # the commands that parse with argparse (the others are train.py's configurator)
    ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in [*ROOT.glob("scripts/*.py"), *ROOT.glob("data/*/*.py")]
    if "ArgumentParser(" in (text := p.read_text()) and "\ndef main(" in text)


def help_text(module: str, monkeypatch, capsys) -> str:
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, "--help"])  # as the command line would
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_script_argument_is_key_value_with_underscores(monkeypatch, capsys):
    for module in ARGPARSE_ENTRY_POINTS:
        options = set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", help_text(module, monkeypatch, capsys)))
        assert options, module
        assert not [o for o in options if "-" in o[2:]], module
        assert "--out" not in options, f"{module}: a file to write is --output, a folder --out_dir"


def test_preparations_draw_no_progress_bar_into_a_redirected_log(tmp_path, capsys):
    """(Given --key=value, as every other entry point.)"""
    import datasets
    openwebtext = importlib.import_module("data.openwebtext.prepare")
    fineweb = importlib.import_module("data.fineweb_edu.prepare")
    datasets.enable_progress_bars()  # as in a fresh process
    openwebtext.main([f"--data_files={write_jsonl(tmp_path / 'owt' / 'docs.jsonl', owt_documents(30))}",
                      f"--out_dir={tmp_path / 'a'}", "--num_proc=1", f"--cache_dir={tmp_path / 'cache'}",
                      "--min_val_tokens=0", "--val_fraction=0.1", "--skip_bad_files"])
    fineweb.main([f"--data_files={write_parquet(tmp_path / 'fw', make_documents(20))}", f"--out_dir={tmp_path / 'b'}",
                  "--min_val_tokens=0", "--val_every=5"])
    err = capsys.readouterr().err
    assert "\r" not in err, err
    assert datasets.is_progress_bar_enabled()  # left as found


def test_a_terminal_gets_the_progress_bar(tmp_path):
    """FineWeb-Edu's preparation on a (pseudo-)terminal, 100 columns wide, shows its bar."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "data.fineweb_edu.prepare",
                             f"--data_files={write_parquet(tmp_path / 'fw', make_documents(20))}",
                             f"--out_dir={tmp_path / 'out'}", "--min_val_tokens=0", "--val_every=5"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    shown = b""
    while chunk := read_or_eof(parent):
        shown += chunk
    assert proc.wait(timeout=300) == 0, shown
    assert re.search(rb"\rtokenizing: .*tok", shown), shown


def read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other side closed: Linux says EIO
        return b""

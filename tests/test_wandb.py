"""Specification of wandb logging: optional, and never able to stop or block a batch job.

Without credentials it logs offline into out_dir; when going online fails (a bad key, a
compute node without network) it falls back to offline; a resumed run continues the same
wandb run. The unit tests use a stand-in wandb module; one test runs the real one offline.
"""

import os
import sys
import types
from pathlib import Path

import pytest

import metrics
from tests.test_train import run_train


class FakeWandb(types.ModuleType):
    """Records wandb.init's arguments; fails the first `failures` calls like an unreachable server."""

    def __init__(self, failures: int = 0):
        super().__init__("wandb")
        self.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))
        self.calls: list[dict] = []
        self.failures = failures

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise self.errors.Error("Network error (ConnectTimeout), entering retry loop.\nmore detail")
        return types.SimpleNamespace(kwargs=kwargs)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME with no ~/.netrc and no wandb settings in the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def start(monkeypatch, tmp_path, fake: FakeWandb) -> object:
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    return metrics.init_wandb("sophia", "gpt2", {}, out_dir)


def write_netrc(home: Path, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host} login user password secret\n")
    (home / ".netrc").chmod(0o600)


def test_without_credentials_it_logs_offline(home, tmp_path, monkeypatch, capsys):
    start(monkeypatch, tmp_path, FakeWandb())
    assert os.environ["WANDB_MODE"] == "offline"
    assert "logging offline" in capsys.readouterr().out


def test_a_netrc_without_a_wandb_entry_is_no_credential(home, tmp_path, monkeypatch):
    write_netrc(home, "github.com")
    assert not metrics.wandb_has_credentials()
    start(monkeypatch, tmp_path, FakeWandb())
    assert os.environ["WANDB_MODE"] == "offline"


def test_credentials_keep_it_online(home, tmp_path, monkeypatch):
    write_netrc(home, "api.wandb.ai")
    assert metrics.wandb_has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not metrics.wandb_has_credentials(), "a netrc entry for another wandb server is not a key for this one"
    monkeypatch.delenv("WANDB_BASE_URL")
    fake = FakeWandb()
    start(monkeypatch, tmp_path, fake)
    assert "WANDB_MODE" not in os.environ
    assert "mode" not in fake.calls[0]


def test_a_failed_online_start_falls_back_to_offline(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    fake = FakeWandb(failures=1)
    start(monkeypatch, tmp_path, fake)
    assert [call.get("mode") for call in fake.calls] == [None, "offline"]
    message = capsys.readouterr().out.strip()
    assert message.count("\n") == 0 and "ConnectTimeout" in message and "offline" in message


def test_a_resumed_run_continues_the_same_wandb_run(home, tmp_path, monkeypatch):
    fake = FakeWandb()
    start(monkeypatch, tmp_path, fake)
    start(monkeypatch, tmp_path, fake)
    first, second = fake.calls
    assert first["id"] == second["id"] and second["resume"] == "allow"
    assert first["dir"] == str(tmp_path / "out")


def test_real_wandb_offline_run_does_not_block(home, tmp_path):
    run = run_train(tmp_path / "out", "--max_iters=2", "--eval_interval=2", "--wandb_log=True")
    assert run.result["iter"] == 2 and run.result["val_loss"] > 0
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*"))

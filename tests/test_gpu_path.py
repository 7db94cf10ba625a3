"""The GPU path's properties, checked on the CPU: a training step never waits for the device
(no host sync outside logging, evaluation and checkpoint steps), a compiled run does not
recompile in steady state, MFU counts the estimator, and the Hessian estimator's chunks share
one shape."""

import contextlib
import io

import pytest
import torch
import torch.distributed as dist

import train
from tests.test_train import TINY

OPTIMIZERS = {
    "adamw": ["--optimizer_name=adamw"],
    "lion": ["--optimizer_name=lion"],
    "sophiag": ["--optimizer_name=sophiag"],
    "sophiah": ["--optimizer_name=sophiah", "--rho=0.01"],
}


class SyncCounter:
    """Counts the calls that make the host wait for a device: Tensor.item, tolist, bool(),
    float(), int(), and blocking collectives, while `active`."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        for name in ("all_reduce", "all_gather_object", "barrier"):
            monkeypatch.setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(name)
            return original(*args, **kwargs)
        return counted


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch, name):
    """From the moment a step has its batches to the moment it has launched its work (the
    estimator on refresh steps, train_step, the step's bookkeeping), nothing waits for the
    device, for every optimizer: hess_interval=3 puts refreshes on steps 0, 3, 6, 9, 12."""
    counter = SyncCounter(monkeypatch)
    per_step: list[list[str]] = []
    next_batches, prefetch = train.Batches.next, train.Batches.prefetch

    def start(self):
        batches = next_batches(self)
        counter.calls, counter.active = [], True
        return batches

    def stop(self):
        if counter.active:
            per_step.append(counter.calls)
            counter.active = False
        prefetch(self)

    monkeypatch.setattr(train.Batches, "next", start)
    monkeypatch.setattr(train.Batches, "prefetch", stop)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={tmp_path}", "--max_iters=14", "--eval_interval=100", *OPTIMIZERS[name]])
    assert len(per_step) == 14 and per_step == [[]] * 14, per_step


def test_the_estimators_chunks_share_one_shape(tmp_path, monkeypatch):
    """hess_batch_size=6 over micro-batches of 4: two chunks of 3 (not 4 and 2), so a compiled
    model meets one estimator shape; they are the step's first 6 sequences."""
    seen = []
    gnb = train.gnb_hessian

    def recording_gnb(model, params, inputs, *args, **kwargs):
        seen.append([x.clone() for x in inputs])
        return gnb(model, params, inputs, *args, **kwargs)

    steps = []
    next_batches = train.Batches.next
    monkeypatch.setattr(train.Batches, "next", lambda self: steps.append(next_batches(self)) or steps[-1])
    monkeypatch.setattr(train, "gnb_hessian", recording_gnb)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={tmp_path}", "--max_iters=1", "--eval_interval=100", "--optimizer_name=sophiag",
                    "--gradient_accumulation_steps=2", "--hess_batch_size=6"])
    assert [x.shape for x in seen[0]] == [torch.Size([3, 32])] * 2
    first_six = torch.cat([x for x, _ in steps[0]])[:6]
    assert torch.equal(torch.cat(seen[0]), first_six)


def test_mfu_counts_the_estimators_tokens():
    cfg = train.Config(train.DEFAULTS)  # GPT-2 small: 480 x 1024 tokens a step, 240 sequences every 10 steps
    trainer = type("T", (), {"cfg": cfg, "estimator": None})()
    assert train.Trainer.mfu_tokens_per_iter(trainer) == 480 * 1024
    trainer.estimator = type("E", (), {"method": "gnb"})()
    assert train.Trainer.mfu_tokens_per_iter(trainer) == 480 * 1024 + 240 * 1024 / 10
    trainer.estimator.method = "hutchinson"
    assert train.Trainer.mfu_tokens_per_iter(trainer) == 480 * 1024 + 2 * 240 * 1024 / 10


@pytest.mark.slow
def test_a_compiled_run_does_not_recompile_in_steady_state(tmp_path):
    """compile=True with Sophia-G and Sophia-H: after the first Hessian refresh and the first
    evaluation have compiled their graphs, later refreshes, steps and evaluations reuse them."""
    from torch._dynamo.utils import counters

    def frames() -> int:
        return sum(counters["stats"].values()) if "stats" in counters else 0

    for name in ("sophiag", "sophiah"):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / name
        args = [*TINY, "--compile=True", "--max_iters=6", "--eval_interval=3", "--hess_interval=3", "--eval_iters=2",
                *OPTIMIZERS[name]]
        with contextlib.redirect_stdout(io.StringIO()):
            train.main([*args, f"--out_dir={out}"])
        warm = dict(counters["stats"])
        with contextlib.redirect_stdout(io.StringIO()):
            train.main([*args, f"--out_dir={out}", "--init_from=resume", "--max_iters=15"])
        assert counters["stats"]["unique_graphs"] == warm["unique_graphs"], (name, dict(counters["stats"]), warm)

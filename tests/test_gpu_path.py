"""The GPU path's properties, checked on the CPU: a training step never waits for the device
(no host sync outside logging, evaluation and checkpoint steps), a compiled run does not
recompile in steady state, MFU counts the estimator, and the Hessian estimator's chunks share
one shape."""

import contextlib
import io

import pytest
import torch
import torch.distributed as dist

import evaluation
import settings
import train
from tests.test_train import TINY

OPTIMIZERS = {
    "adamw": ["--optimizer_name=adamw"],
    "lion": ["--optimizer_name=lion"],
    "sophiag": ["--optimizer_name=sophiag"],
    "sophiah": ["--optimizer_name=sophiah", "--rho=0.01"],
    "muon": ["--optimizer_name=muon"],
    "soap": ["--optimizer_name=soap"],
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
    cfg = settings.Config(settings.DEFAULTS)  # GPT-2 small: 480 x 1024 tokens a step, 240 sequences every 10 steps
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


# ----------------------------------------------------------------------------- comparisons and divergence

def test_two_seeds_score_the_same_evaluation_windows(tmp_path, monkeypatch):
    """The windows depend on the dataset and eval_iters alone, so two runs that differ in
    seed (and optimizer) score exactly the same text."""
    scored = {}
    windows = evaluation.windows

    def recording_windows(data, offsets, block_size, device):
        scored.setdefault(run, []).append(list(offsets))
        return windows(data, offsets, block_size, device)

    monkeypatch.setattr(evaluation, "windows", recording_windows)
    for run, extra in (("a", ["--seed=1"]), ("b", ["--seed=2", "--optimizer_name=sophiag"])):
        with contextlib.redirect_stdout(io.StringIO()):
            train.main([*TINY, f"--out_dir={tmp_path / run}", "--max_iters=0", *extra])
    assert scored["a"] == scored["b"] and len(scored["a"]) == 2 * 5  # train and val, eval_iters=5


def test_a_diverged_run_stops_with_one_line_keeps_the_last_finite_checkpoint_and_logs_valid_json(
        tmp_path, capsys):
    """lr 1e38: from step 6 every loss is NaN and its step skipped. The log says so (null,
    never 0.0, and valid JSON), nothing is saved over the finite checkpoint of step 5, and
    the run exits 2 with one line naming it."""
    import json
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={out}", "--max_iters=5", "--eval_interval=5"])
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as stdout:
        train.main([*TINY, f"--out_dir={out}", "--max_iters=40", "--eval_interval=100", "--init_from=resume",
                    "--learning_rate=1e38", "--weight_decay=10.0", "--min_lr=0", "--warmup_iters=0",
                    "--max_bad_steps=3", "--log_interval=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "consecutive steps had a non-finite loss" in err and "ckpt_00000005.pt" in err
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000005.pt"]
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if r["kind"] == "train" and r["iter"] > 6]
    assert trains and all(r["loss"] is None for r in trains)
    assert "all 2 steps skipped" in stdout.getvalue()


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path, capsys):
    """lr 1e38 with weight decay 10 from scratch: 1 - lr wd overflows and the weights become
    infinite; the evaluation at step 3 would checkpoint them, and refuses."""
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={tmp_path}", "--max_iters=10", "--eval_interval=3", "--learning_rate=1e38",
                    "--weight_decay=10.0", "--min_lr=0", "--warmup_iters=0", "--max_bad_steps=100"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no longer finite at step 3" in err and "latest checkpoint, none" in err, err
    assert not list(tmp_path.glob("ckpt_*"))

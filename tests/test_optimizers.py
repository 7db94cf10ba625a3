"""Specification of the optimizer registry (optimizers.py): every registered optimizer, built as
train.py builds it on any device, takes train.py's step and skips a non-finite one; an
optimizer added through the registry alone trains with train.py."""

import contextlib
import io

import pytest
import torch

import optimizers
import settings
import sophia
import train
from model import GPT, GPTConfig
from tests.test_train import TINY

# "cpu": torch's fused AdamW exists there; "mps" stands for MPS and XPU, where it does not.
# The device type decides nothing else in a builder, so both build here on CPU tensors.
DEVICE_TYPES = ("cpu", "mps")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False))


def snapshot(model: GPT, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [t.detach().clone() for t in [*model.parameters(), *state]]


def step(model: GPT, optimizer: torch.optim.Optimizer, poisoned: bool) -> torch.Tensor:
    """train.py's step on one batch; a poisoned one has a NaN loss, as an overflow would."""
    class Poisoned(torch.nn.Module):
        def forward(self, x, y):
            logits, loss = model(x, y)
            return logits, loss * float("nan") if poisoned else loss

    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, _, applied = train.train_step(Poisoned(), optimizer, scaler, [(x, x)], contextlib.nullcontext(), 1.0)
    return applied


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
@pytest.mark.parametrize("name", list(optimizers.REGISTRY))
def test_every_optimizer_skips_a_non_finite_step_and_applies_a_finite_one(name, device_type):
    cfg = settings.resolve([f"--optimizer_name={name}", "--compile=False"])
    model = tiny_model()
    optimizer = optimizers.build(cfg, model, device_type)
    assert isinstance(optimizer.reads_found_inf, bool)
    step(model, optimizer, poisoned=False)  # creates the state (m, v, h, momentum buffers)
    if optimizers.REGISTRY[name].estimator is not None:
        optimizer.update_hessian([torch.rand_like(p) for g in optimizer.param_groups for p in g["params"]])
    before = snapshot(model, optimizer)
    assert float(step(model, optimizer, poisoned=True)) == 0.0
    for old, new in zip(before, snapshot(model, optimizer), strict=True):
        assert torch.equal(old, new)
    assert float(step(model, optimizer, poisoned=False)) == 1.0
    assert not all(torch.equal(old, new) for old, new in zip(before, snapshot(model, optimizer)))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_reading_found_inf_is_a_property_of_the_built_optimizer(name):
    """Torch's AdamW reads found_inf only fused: unfused, AdamW (and Muon's AdamW part) skip on the host."""
    cfg = settings.resolve([f"--optimizer_name={name}"])
    assert optimizers.build(cfg, tiny_model(), "cpu").reads_found_inf is True
    assert optimizers.build(cfg, tiny_model(), "mps").reads_found_inf is False


def test_a_builder_that_does_not_say_whether_it_reads_found_inf_is_refused(monkeypatch):
    monkeypatch.setitem(optimizers.REGISTRY, "sgd", optimizers.Entry(
        "sgd", lambda cfg, model, device_type: torch.optim.SGD(model.parameters(), lr=cfg.learning_rate)))
    with pytest.raises(TypeError, match="'sgd' must set reads_found_inf"):
        optimizers.build(settings.resolve(["--optimizer_name=sgd"]), tiny_model(), "cpu")


def test_sophia_implementations_are_named_alike_in_the_registry():
    assert optimizers.SOPHIA_IMPLEMENTATIONS == sophia.IMPLEMENTATIONS


def test_an_optimizer_added_through_the_registry_alone_trains_with_train_py(tmp_path, monkeypatch):
    """One entry: its name is a valid optimizer_name, train.py builds it, steps it (skipping on
    the host, as it does not read found_inf) and checkpoints it."""
    def build_sgd(cfg, model, device_type):
        optimizer = torch.optim.SGD(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.beta1)
        optimizer.reads_found_inf = False
        return optimizer

    monkeypatch.setitem(optimizers.REGISTRY, "sgd", optimizers.Entry("sgd", build_sgd))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = train.main([*TINY, "--optimizer_name=sgd", "--max_iters=2", "--eval_interval=2",
                             f"--out_dir={tmp_path}"])
    assert result["iter"] == 2 and result["val_loss"] > 0
    assert "iter 2: loss" in out.getvalue() and ", sgd, " in out.getvalue()
    checkpoint = torch.load(tmp_path / "ckpt_00000002.pt", weights_only=False)
    assert checkpoint["config"]["optimizer_name"] == "sgd"
    assert all("momentum_buffer" in s for s in checkpoint["optimizer"]["state"].values())


def test_an_unknown_optimizer_name_lists_the_registry():
    with pytest.raises(settings.UserError, match="choose one of adamw, lion, sophiag, sophiah, muon"):
        settings.resolve(["--optimizer_name=sgd"])

"""The optimizers a run can choose (optimizer_name): one registry entry each, saying how it is
built, which Hessian estimator it calls (Sophia) and whether FSDP2 can shard it.

Adding an optimizer is one `register(Entry(...))` here and a config file in config/. Its
builder takes the run's config, the model and the device type and returns the optimizer with
`reads_found_inf` set: whether that object reads `optimizer.found_inf` (a 0-dim tensor,
nonzero to skip) in step(), the protocol of torch's fused AdamW, so the loop skips a
non-finite step without waiting for the device; False makes the loop decide on the host.

Importing this module imports no torch (settings.py checks a run's config against the
entries; scripts plan runs without torch); each builder imports what it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model import GPT

# Sophia's diagonal pre-conditioners (paper Fig. 7b): GNB (Sophia-G), Hutchinson (Sophia-H),
# and for ablations the empirical Fisher (GNB with the data's labels instead of sampled ones)
# and AdaHessian's (the square root of an EMA of squared Hutchinson estimates).
ESTIMATORS = ("gnb", "hutchinson", "empirical_fisher", "adahessian")
SECOND_ORDER = ("hutchinson", "adahessian")  # need a Hessian-vector product
# How they compute it: a central difference of two ordinary gradients of the training model, or
# the exact double backward through the eager module (the reference).
HESSIAN_VECTOR_PRODUCTS = ("finite_difference", "exact")
SOPHIA_IMPLEMENTATIONS = ("foreach", "compiled")  # sophia.IMPLEMENTATIONS, named here without importing torch


@dataclass(frozen=True)
class Entry:
    """One optimizer of the registry."""
    name: str  # its optimizer_name
    build: Callable[[Any, GPT, str], torch.optim.Optimizer]  # (cfg, model, device_type) -> optimizer
    estimator: str | None = None  # the Hessian estimator it calls every hess_interval steps (Sophia); None: none
    fsdp_refusal: str | None = None  # why FSDP2 cannot shard it, on one line; None: it can
    state_bytes: float = 8  # its state per parameter, for the memory estimate: two float32 EMAs


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    REGISTRY[entry.name] = entry
    return entry


def fusable(device_type: str) -> bool:
    """Whether torch has fused AdamW kernels for this device type (the only AdamW that reads found_inf)."""
    return device_type in ("cuda", "cpu")


def build(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    """The run's optimizer over the model's parameter groups, from its registry entry."""
    optimizer = REGISTRY[cfg.optimizer_name].build(cfg, model, device_type)
    if not isinstance(getattr(optimizer, "reads_found_inf", None), bool):
        raise TypeError(f"the builder of optimizer {cfg.optimizer_name!r} must set reads_found_inf (True or False) "
                        f"on the optimizer it returns")
    return optimizer


def build_adamw(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    import torch
    fused = fusable(device_type)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), fused=fused)
    optimizer.reads_found_inf = fused
    return optimizer


def build_lion(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    from baselines import SkippableLion
    return SkippableLion(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def build_muon(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    from baselines import MuonAdamW
    from errors import UserError
    hidden = [p for block in model.transformer.h for p in block.parameters() if p.dim() == 2]
    if not hidden:
        raise UserError("optimizer_name='muon' needs 2-D hidden matrices and this model has none; use n_layer >= 1")
    return MuonAdamW(hidden, model.param_groups(cfg.weight_decay), cfg.learning_rate, cfg.weight_decay,
                     (cfg.beta1, cfg.beta2), cfg.muon_momentum, fused=fusable(device_type))


def build_soap(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    from baselines import SkippableSOAP
    return SkippableSOAP(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                         precondition_frequency=cfg.precondition_frequency)


def build_sophia(cfg: Any, model: GPT, device_type: str) -> torch.optim.Optimizer:
    import sophia
    cls = sophia.SophiaG if cfg.optimizer_name == "sophiag" else sophia.SophiaH
    impl = cfg.optimizer_impl
    if impl == "auto":  # compile=False asks for no compilation: of the update neither
        impl = "compiled" if cfg.compile else "foreach"
    # The win rate is sampled on the step before each log line: counting costs an extra read of m and h.
    optimizer = cls(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                    rho=cfg.rho, impl=impl, stats_every=cfg.log_interval, clip=cfg.sophia_clip,
                    sqrt_hessian=estimator_of(cfg) == "adahessian")
    optimizer.reads_found_inf = True  # on every device: its update selects on the flag
    return optimizer


def estimator_of(cfg: Any) -> str | None:
    """The Hessian estimator a run calls: hess_estimator, or its optimizer's own for 'auto'; None: none."""
    if cfg.hess_estimator == "auto":
        return REGISTRY[cfg.optimizer_name].estimator
    return cfg.hess_estimator


register(Entry("adamw", build_adamw))
register(Entry("lion", build_lion, state_bytes=4))  # one EMA
register(Entry("sophiag", build_sophia, estimator="gnb"))
register(Entry("sophiah", build_sophia, estimator="hutchinson"))
register(Entry("muon", build_muon, fsdp_refusal="its Newton-Schulz step needs each whole matrix, which FSDP2 "
                                                "splits over ranks"))
register(Entry("soap", build_soap, fsdp_refusal="its preconditioner's eigenbasis needs each whole matrix, which "
                                                "FSDP2 splits over ranks",
               state_bytes=40))  # two EMAs and d x d factors per matrix side: 39 B per GPT-2 block parameter

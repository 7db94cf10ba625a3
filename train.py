"""Train a GPT-2 with Sophia-G, Sophia-H, AdamW, Lion or Muon: one loop for every optimizer.

Single process:   python train.py config/train_shakespeare_char.py --max_iters=500
DDP, one node:    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_sophiag.py
Every default below can be overridden by a config file or --key=value; --help lists them.

Every optimizer runs through the same step (loss / accumulation steps, gradient clipping,
LR schedule, data order); Sophia adds one call of its Hessian estimator every
`hess_interval` steps, just before the step, on the first `hess_batch_size` sequences of
that step's batch (paper Algorithm 3: h_t is estimated at theta_t and used at step t).
The file reads top-down: defaults, checks, optimizers, the step, setup, the loop.
"""

import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
from checkpoint import (all_finite, checkpoints, full_state_dicts, load_full_optimizer_state, load_latest_checkpoint,
                        model_to_train, remove_partial_saves, rng_state, save_checkpoint, set_aside_damaged,
                        set_rng_state)
from dataset import EMBEDDED_DATASETS, Batches, check_split, dataset_meta, estimate_loss, prepare_dataset, read_split
from metrics import MetricsLog, StepWindow, init_wandb
from model import GPT, peak_flops
from runtime import device_type as runtime_device_type
from runtime import (ROOT, DeviceTimer, RunLock, StopRequests, UserError, autocast, exit_on_user_error, one_line, pick_device,
                     pick_dtype, set_grad_sync, shard_model, writable_dir)
from sophia import IMPLEMENTATIONS as _IMPLEMENTATIONS  # "_": a public tuple here would be a config key
from sophia import Sophia, SophiaG, SophiaH, gnb_hessian, hutchinson_hessian

# ----------------------------------------------------------------------------- defaults
# GPT-2 small (124M) on OpenWebText with AdamW, batch 480 x 1024 tokens (paper Table 2).
# I/O
out_dir = "out"  # checkpoints, metrics.jsonl and config.json are written here
eval_interval = 1000  # steps between evaluations (and checkpoints)
log_interval = 10  # steps between console log lines
eval_iters = 200  # batches per split in each evaluation (the same batches every time)
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save at every evaluation, not only when val loss improves
init_from = "scratch"  # 'scratch', 'resume' (latest checkpoint in out_dir), 'auto' (resume if there is one), 'gpt2*'
keep_checkpoints = 2  # how many of the latest checkpoints (ckpt_<step>.pt) to keep in out_dir
max_bad_steps = 20  # stop (with a checkpoint) after this many consecutive steps with a non-finite loss or gradient
# wandb logging
wandb_log = False  # log to Weights & Biases (offline mode when no API key is set)
wandb_project = "sophia"  # wandb project name
wandb_run_name = "gpt2"  # wandb run name
# data
dataset = "openwebtext"  # folder under data/ (or an absolute path) holding train.bin, val.bin, meta.json or llm.c shards
gradient_accumulation_steps = 40  # micro-steps per step over ALL ranks (divided by the world size)
batch_size = 12  # sequences per micro-step per rank
block_size = 1024  # context length in tokens
# model
n_layer = 12  # transformer blocks
n_head = 12  # attention heads
n_embd = 768  # embedding width
dropout = 0.0  # dropout rate (0 for pre-training)
bias = False  # biases in Linear layers and LayerNorms
scale_attn_by_inverse_layer_idx = False  # divide attention scores by the layer index + 1
# optimizer
optimizer_name = "adamw"  # 'adamw', 'lion', 'sophiag', 'sophiah' or 'muon' (hidden matrices; AdamW for the rest)
learning_rate = 6e-4  # peak learning rate
max_iters = 100000  # total optimizer steps
weight_decay = 1e-1  # decoupled weight decay on matrices and embeddings
beta1 = 0.9  # AdamW/Lion/Sophia beta1 (gradient EMA); Muon's AdamW part
beta2 = 0.95  # AdamW beta2, Lion beta2, Sophia's Hessian EMA rate; Muon's AdamW part
muon_momentum = 0.95  # Muon only: Nesterov momentum of its hidden matrices
grad_clip = 1.0  # clip the gradient to this global norm (0 disables)
rho = 0.05  # Sophia only (others ignore it): clipping scale gamma (paper: 0.05 Sophia-G, 0.01 Sophia-H)
hess_interval = 10  # Sophia only (others ignore it): steps between Hessian estimates (k)
hess_batch_size = 240  # Sophia only (others ignore it): sequences in each Hessian estimate, over all ranks
optimizer_impl = "auto"  # Sophia's update: 'auto' (compiled when compile=True, else foreach), 'foreach', 'compiled'
hess_estimator = "auto"  # Sophia's estimator: 'auto' (sophiag: 'gnb', sophiah: 'hutchinson'); ablations: 'empirical_fisher', 'adahessian'
sophia_clip = True  # Sophia's per-coordinate clip to [-1, 1]; False only for the no-clipping ablation
# learning rate schedule
decay_lr = True  # linear warmup then lr_schedule's decay; False keeps learning_rate constant
lr_schedule = "cosine"  # 'cosine' (to min_lr at lr_decay_iters) or 'wsd' (constant, then 1-sqrt decay to min_lr)
decay_fraction = 0.2  # 'wsd' only: the decay takes this last fraction of lr_decay_iters
warmup_iters = 2000  # steps of linear warmup
lr_decay_iters = 100000  # step at which the schedule reaches min_lr (usually max_iters)
min_lr = 3e-5  # final learning rate (paper: 0.05 x peak)
# system
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16; float32 on CPU), or explicit
compile = True  # torch.compile the model
fsdp = False  # shard parameters, gradients and optimizer state over ranks (FSDP2) instead of DDP
seed = 1337  # seeds model init, data order and the estimator's random draws
# -----------------------------------------------------------------------------
DEFAULTS = configurator.read_defaults(__file__)
OPTIMIZERS = ("adamw", "lion", "sophiag", "sophiah", "muon")
# Sophia's diagonal pre-conditioners (paper Fig. 7b): GNB (Sophia-G), Hutchinson (Sophia-H),
# and for ablations the empirical Fisher (GNB with the data's labels instead of sampled ones)
# and AdaHessian's (the square root of an EMA of squared Hutchinson estimates).
ESTIMATORS = ("gnb", "hutchinson", "empirical_fisher", "adahessian")
SECOND_ORDER = ("hutchinson", "adahessian")  # need a Hessian-vector product (double backward)


class Config(dict):
    """The run's settings; attribute access keeps the loop readable."""
    __getattr__ = dict.__getitem__


def estimator_of(cfg: Config) -> str:
    """The estimator a Sophia run uses: hess_estimator, or the optimizer's own for 'auto'."""
    if cfg.hess_estimator == "auto":
        return "gnb" if cfg.optimizer_name == "sophiag" else "hutchinson"
    return cfg.hess_estimator


def validate(cfg: Config, world_size: int) -> None:
    """Checks the config before anything is built or written; raises UserError."""
    if cfg.optimizer_name not in OPTIMIZERS:
        raise UserError(f"optimizer_name={cfg.optimizer_name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "log_interval",
                "eval_interval", "hess_interval", "n_layer", "n_head", "n_embd"):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "rho"):
        if cfg[key] < 0:
            raise UserError(f"{key}={cfg[key]} must be >= 0")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0:
        raise UserError("max_iters and warmup_iters must be >= 0")
    for key in ("beta1", "beta2", "dropout"):
        if not 0.0 <= cfg[key] < 1.0:
            raise UserError(f"{key}={cfg[key]} must lie in [0, 1)")
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr={cfg.min_lr} exceeds learning_rate={cfg.learning_rate}: the schedule would rise; "
                        f"lower --min_lr (the paper uses 0.05 x learning_rate)")
    if cfg.lr_schedule not in ("cosine", "wsd"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r} is unknown; choose 'cosine' or 'wsd'")
    if not 0.0 < cfg.decay_fraction <= 1.0:
        raise UserError(f"decay_fraction={cfg.decay_fraction} must lie in (0, 1]: the share of lr_decay_iters "
                        f"that lr_schedule='wsd' spends decaying (0.2: the last 20%)")
    if cfg.decay_lr and cfg.lr_schedule == "wsd" and wsd_decay_start(cfg) < cfg.warmup_iters:
        raise UserError(f"decay_fraction={cfg.decay_fraction} starts the decay at step {wsd_decay_start(cfg)}, "
                        f"inside warmup_iters={cfg.warmup_iters}; lower decay_fraction or warmup_iters")
    if cfg.decay_lr and cfg.lr_decay_iters < cfg.warmup_iters:
        raise UserError(f"lr_decay_iters={cfg.lr_decay_iters} is before the end of warmup_iters={cfg.warmup_iters}; "
                        f"set --lr_decay_iters to the run's length (usually max_iters)")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}; "
                        f"pick n_embd as a multiple of n_head")
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by "
                        f"the world size {world_size}; make it a multiple of {world_size}")
    if cfg.optimizer_impl not in ("auto", *_IMPLEMENTATIONS):
        raise UserError(f"optimizer_impl={cfg.optimizer_impl!r} is unknown; choose one of auto, "
                        f"{', '.join(_IMPLEMENTATIONS)}")
    if cfg.hess_estimator not in ("auto", *ESTIMATORS):
        raise UserError(f"hess_estimator={cfg.hess_estimator!r} is unknown; choose one of auto, "
                        f"{', '.join(ESTIMATORS)}")
    sophia = cfg.optimizer_name.startswith("sophia")
    if cfg.hess_estimator != "auto" and not sophia:
        raise UserError(f"hess_estimator={cfg.hess_estimator!r} is for Sophia, not optimizer_name="
                        f"{cfg.optimizer_name!r}; use --optimizer_name=sophiag or sophiah, or drop hess_estimator")
    if cfg.fsdp and cfg.optimizer_name == "muon":
        raise UserError("fsdp=True does not work with optimizer_name='muon': its Newton-Schulz step needs each "
                        "whole matrix, which FSDP2 splits over ranks; use DDP (--fsdp=False)")
    if cfg.fsdp and sophia and estimator_of(cfg) in SECOND_ORDER:
        raise UserError(f"fsdp=True does not work with optimizer_name={cfg.optimizer_name!r} and the "
                        f"{estimator_of(cfg)} estimator: its Hessian-vector product differentiates twice with "
                        "respect to the parameters, which FSDP2 replaces by gathered copies during the forward; "
                        "use --optimizer_name=sophiag, or DDP (--fsdp=False)")
    if sophia:
        local_accum = cfg.gradient_accumulation_steps // world_size
        if cfg.hess_batch_size <= 0 or cfg.hess_batch_size % world_size:
            raise UserError(f"hess_batch_size={cfg.hess_batch_size} must be a positive multiple of the "
                            f"world size {world_size}")
        if cfg.hess_batch_size // world_size > cfg.batch_size * local_accum:
            raise UserError(f"hess_batch_size={cfg.hess_batch_size} exceeds the batch of one step "
                            f"({cfg.batch_size * local_accum * world_size} sequences); lower it")
    if cfg.init_from.startswith("gpt2") and cfg.block_size > 1024:
        raise UserError(f"block_size={cfg.block_size} exceeds GPT-2's 1024 positions; use --block_size=1024 or less")
    if not 0 <= cfg.seed < 2 ** 32:
        raise UserError(f"seed={cfg.seed} is outside [0, 2**32); pick a smaller seed")
    if not cfg.out_dir.strip():
        raise UserError("out_dir is empty; give a folder name with --out_dir")
    if cfg.keep_checkpoints < 1 or cfg.max_bad_steps < 1:
        raise UserError("keep_checkpoints and max_bad_steps must be at least 1")
    if cfg.init_from not in ("scratch", "resume", "auto", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        raise UserError(f"init_from={cfg.init_from!r}: use 'scratch', 'resume', 'auto' or one of 'gpt2', 'gpt2-medium', "
                        f"'gpt2-large', 'gpt2-xl'")


def check_runs(argvs: list[list[str]]) -> list[dict]:
    """Each argument list's config as a single process would run it, or {"error": message}."""
    results = []
    for argv in argvs:
        try:
            cfg = Config(configurator.parse(DEFAULTS, argv))
            validate(cfg, world_size=1)
            results.append(dict(cfg))
        except UserError as e:
            results.append({"error": one_line(str(e))})
    return results


def tokens_per_step(cfg: Config) -> int:
    """Tokens of one optimizer step over all ranks."""
    return cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


def wsd_decay_start(cfg: Config) -> int:
    """The step at which lr_schedule='wsd' leaves the peak for its decay."""
    return cfg.lr_decay_iters - round(cfg.decay_fraction * cfg.lr_decay_iters)


def get_lr(cfg: Config, it: int) -> float:
    """Linear warmup for warmup_iters, a decay to min_lr at lr_decay_iters, then min_lr. The
    decay is a cosine, or for lr_schedule='wsd' (warmup-stable-decay) the peak held until the
    last decay_fraction of lr_decay_iters and then 1 - sqrt of the decay's progress: the cooldown
    Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations") found better than a linear one and, over 20% of the run, a match for cosine."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        start = wsd_decay_start(cfg)
        if it < start:
            return cfg.learning_rate
        ratio = (it - start) / max(1, cfg.lr_decay_iters - start)
        return cfg.min_lr + (1.0 - math.sqrt(ratio)) * (cfg.learning_rate - cfg.min_lr)
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- optimizers

def build_optimizer(cfg: Config, model: GPT, device_type: str) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    fused = device_type in ("cuda", "cpu")  # torch's fused AdamW kernels exist there
    if cfg.optimizer_name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)
    if cfg.optimizer_name == "lion":
        from optimizers import SkippableLion  # imported when used: lion_pytorch is needed for Lion only
        return SkippableLion(groups, lr=cfg.learning_rate, betas=betas)
    if cfg.optimizer_name == "muon":
        from optimizers import MuonAdamW
        hidden = [p for block in model.transformer.h for p in block.parameters() if p.dim() == 2]
        if not hidden:
            raise UserError("optimizer_name='muon' needs 2-D hidden matrices and this model has none; use n_layer >= 1")
        return MuonAdamW(hidden, groups, cfg.learning_rate, cfg.weight_decay, betas, cfg.muon_momentum, fused=fused)
    cls = SophiaG if cfg.optimizer_name == "sophiag" else SophiaH
    impl = cfg.optimizer_impl
    if impl == "auto":  # compile=False asks for no compilation: of the update neither
        impl = "compiled" if cfg.compile else "foreach"
    # The win rate is sampled on the step before each log line: counting costs an extra read of m and h.
    return cls(groups, lr=cfg.learning_rate, betas=betas, rho=cfg.rho, impl=impl, stats_every=cfg.log_interval,
               clip=cfg.sophia_clip, sqrt_hessian=estimator_of(cfg) == "adahessian")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer reads `found_inf` itself (no host sync to skip a step)."""
    return (isinstance(optimizer, Sophia) or getattr(optimizer, "reads_found_inf", False)
            or isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused")))


class HessianEstimator:
    """Sophia's estimator pass: takes this rank's share of the step's first `hess_batch_size`
    sequences, cut into equal chunks of at most batch_size sequences (one shape, so a compiled
    model compiles it once), calls gnb_hessian or hutchinson_hessian (see ESTIMATORS), and
    folds the result into the optimizer."""

    def __init__(self, cfg: Config, model: torch.nn.Module, eager_model: torch.nn.Module,
                 optimizer: Sophia, rank: int, world_size: int, autocast, loss_scale, device: str):
        self.optimizer, self.rank, self.world_size = optimizer, rank, world_size
        # GNB goes through the training model (compiled, DDP-wrapped: it averages g_hat over
        # ranks). Hutchinson needs a double backward, which neither torch.compile nor DDP
        # supports: the eager module, with H u all-reduced by hand.
        self.method = estimator_of(cfg)
        self.model = eager_model if self.method in SECOND_ORDER else model
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.autocast, self.loss_scale = autocast, loss_scale
        self.local_sequences = cfg.hess_batch_size // world_size
        chunks = next(n for n in range(-(-self.local_sequences // cfg.batch_size), self.local_sequences + 1)
                      if self.local_sequences % n == 0)
        self.chunk = self.local_sequences // chunks
        # Same seed on every rank: the draws are shared and sliced (see the estimators).
        self.generator = torch.Generator(device=device if device.startswith("cuda") else "cpu")
        self.generator.manual_seed(cfg.seed + 7919)
        self.timer = DeviceTimer(device)

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self.timer():
            self.estimate(batches)

    def estimate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        needed = batches[:-(-self.local_sequences // len(batches[0][0]))]
        x, y = (torch.cat(t)[:self.local_sequences] for t in zip(*needed))
        chunks = list(zip(x.split(self.chunk), y.split(self.chunk)))
        scale = self.loss_scale()
        if self.method in SECOND_ORDER:
            h_hat = hutchinson_hessian(self.model, self.params, chunks, self.generator, self.autocast, scale)
            if self.method == "adahessian":
                h_hat = [h * h for h in h_hat]
        else:
            targets = [y for _, y in chunks] if self.method == "empirical_fisher" else None
            h_hat = gnb_hessian(self.model, self.params, [x for x, _ in chunks], self.generator, self.rank,
                                self.world_size, self.autocast, scale, targets=targets,
                                grad_sync=functools.partial(set_grad_sync, self.model))
        self.optimizer.update_hessian(h_hat)


# ----------------------------------------------------------------------------- the step

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: list[tuple[torch.Tensor, torch.Tensor]], autocast, grad_clip: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; the same for every optimizer.

    Returns (mean loss, gradient norm before clipping, 1.0 if the step was applied else 0.0),
    as device tensors: the step never waits for the device. A step whose loss or gradient
    is not finite is skipped, so the parameters and the optimizer state (m, h, step counts)
    stay as they were. The decision is taken on the device, the same on every rank (the
    flag is all-reduced; NCCL enqueues that without blocking the host), and the optimizer
    reads it as `found_inf` (fused AdamW, Lion here, Sophia). fp16's GradScaler, and an
    optimizer that cannot read the flag (AdamW off CUDA and CPU), decide on the host."""
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        set_grad_sync(model, i == len(batches) - 1)  # all-reduce only on the last micro-step
        with autocast:
            loss = model(x, y)[1] / len(batches)  # [1]: the logits are not kept alive
        total += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if isinstance(norm, DTensor):  # FSDP2: the norm of the sharded gradient, reduced over ranks
        norm = norm.full_tensor()
    found_inf = (~(torch.isfinite(norm) & torch.isfinite(total))).float()
    if dist.is_initialized():
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    if scaler.is_enabled() or not skips_on_device(optimizer):
        if not found_inf.item():
            scaler.step(optimizer)
    else:
        optimizer.found_inf = found_inf
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, norm, 1.0 - found_inf


# ----------------------------------------------------------------------------- setup

@dataclass
class Progress:
    """Where the run stands: with the weights, optimizer state and RNG states, what a checkpoint saves."""
    iter_num: int = 0
    tokens: int = 0
    best_val_loss: float = float("inf")


@dataclass
class Trainer:
    """Everything setup() builds for the loop."""
    cfg: Config
    rank: int
    world_size: int
    distributed: bool  # started by torchrun: DDP, or FSDP2 when sharded
    sharded: bool
    device: str
    out_dir: Path
    data_dir: Path
    meta: dict
    model_args: dict
    model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    eager_model: GPT  # the plain module: parameters, state dict, MFU
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    batches: Batches
    estimator: HessianEstimator | None
    progress: Progress
    lock: RunLock | None = None  # rank 0's hold on out_dir

    @property
    def master(self) -> bool:
        return self.rank == 0

    def mfu_tokens_per_iter(self) -> float:
        """Tokens per step that MFU counts at the model's training FLOPs each: the step's, and
        the estimator's averaged over hess_interval (GNB is a forward and backward: one token
        each; Hutchinson's double backward about twice that)."""
        cfg = self.cfg
        tokens = tokens_per_step(cfg)
        if self.estimator is None:
            return tokens
        factor = 2 if self.estimator.method in SECOND_ORDER else 1
        return tokens + factor * cfg.hess_batch_size * cfg.block_size / cfg.hess_interval

    def generators(self) -> dict:
        """The RNGs alike on every rank, so they continue exactly on any world size (the data
        sampler stands in for its generator: its state is the position before a prefetch)."""
        gens = {"data": self.batches}
        if self.estimator is not None:
            gens["estimator"] = self.estimator.generator
        return gens

    def save(self) -> None:
        """Write a checkpoint of the run as it stands, unless the weights or the optimizer state
        have stopped being finite: then the last finite checkpoint stays the latest, and the run
        stops with UserError. A collective under DDP and FSDP2: every rank calls it."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        if not all_finite([*self.eager_model.parameters(), *state]):
            kept = checkpoints(self.out_dir)
            raise UserError(f"the weights or the optimizer state are no longer finite at step {self.progress.iter_num}: "
                            f"the run diverged, nothing was saved (the latest checkpoint, "
                            f"{kept[-1].name if kept else 'none'}, is the last finite one); lower --learning_rate "
                            f"or lengthen --warmup_iters" + (", then continue with --init_from=resume" if kept else ""))
        rngs = [rng_state(self.generators())]
        if self.distributed:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng_state(self.generators()))
        if self.sharded:  # gathered: the same format as an unsharded run's
            model_sd, optim_sd = full_state_dicts(self.eager_model, self.optimizer)
        else:
            model_sd, optim_sd = self.eager_model.state_dict(), self.optimizer.state_dict()
        p = self.progress
        if self.master:
            save_checkpoint(self.out_dir, {
                "model": model_sd, "optimizer": optim_sd, "scaler": self.scaler.state_dict(),
                "model_args": self.model_args, "iter_num": p.iter_num, "tokens": p.tokens,
                "best_val_loss": p.best_val_loss, "config": dict(self.cfg), "rng": rngs,
                "world_size": self.world_size, "meta": self.meta}, self.cfg.keep_checkpoints)


def setup(cfg: Config, rank: int, world_size: int, distributed: bool, dev: str) -> Trainer:
    """Check the data, build or resume the model, optimizer, sampler and estimator; nothing is
    written, and out_dir not even created, before every check has passed."""
    master = rank == 0
    device_type = runtime_device_type(dev)
    out_dir = Path(cfg.out_dir)
    if cfg.init_from == "resume" and not checkpoints(out_dir):  # before anything is created
        raise UserError(f"{out_dir} holds no checkpoint (ckpt_*.pt) to resume; train first, or point --out_dir at "
                        f"a run that has saved one")
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype_name = pick_dtype(cfg.dtype, device_type)
    sharded = cfg.fsdp and distributed
    if sharded and dtype_name == "float16":
        raise UserError("fsdp=True with float16: the GradScaler's overflow check would see only each rank's shard of "
                        "the gradients, so ranks could disagree on skipping a step; use --dtype=bfloat16")

    data_dir = ROOT / "data" / cfg.dataset
    if not data_dir.is_dir() and data_dir.name not in EMBEDDED_DATASETS:
        datasets = sorted(p.name for p in (ROOT / "data").iterdir()
                          if p.is_dir() and p.name[0] not in "_." and p.name != "gpt2")
        raise UserError(f"dataset {cfg.dataset!r} not found: no folder {data_dir}; choose one of {', '.join(datasets)} "
                        "or give a dataset folder's absolute path")
    if master:
        prepare_dataset(data_dir)
    if dist.is_initialized():
        dist.barrier()
    meta = dataset_meta(data_dir, warn=master)  # the tokenizer, saved in checkpoints for sample.py and the scripts

    checkpoint = resumed = None
    if cfg.init_from == "resume" or (cfg.init_from == "auto" and checkpoints(out_dir)):
        checkpoint, resumed = load_latest_checkpoint(out_dir)
        if master:
            print(f"resuming from step {checkpoint['iter_num']} of {resumed}")
            was = Config(checkpoint["config"])
            changed = [f"{k} {was[k]} -> {cfg[k]}" for k in ("batch_size", "gradient_accumulation_steps")
                       if was[k] != cfg[k]]
            if changed:
                print(f"resuming with {' and '.join(changed)}: the data position is kept, but a step now takes "
                      f"{tokens_per_step(cfg):,} tokens instead of {tokens_per_step(was):,}: the step size, and the "
                      f"batches drawn from here on, are not those the run would have had")
        if checkpoint["config"]["dataset"] != cfg.dataset:
            raise UserError(f"checkpoint in {out_dir} was trained on dataset {checkpoint['config']['dataset']!r}, not "
                            f"{cfg.dataset!r}; resume with --dataset={checkpoint['config']['dataset']}, or use a new --out_dir")
    model, model_args = model_to_train(cfg, out_dir, meta, checkpoint)
    for split in ("train", "val"):
        check_split(data_dir, split, model.config.vocab_size, cfg.block_size, meta)
    if checkpoint is None and checkpoints(out_dir):
        raise UserError(f"out_dir={str(out_dir)!r} already holds a run's checkpoints, which a new run would replace; "
                        f"continue it with --init_from=resume (or auto), or choose a new --out_dir")
    records = out_dir / "metrics.jsonl"
    if checkpoint is None and cfg.init_from == "scratch" and records.exists() and records.stat().st_size:
        raise UserError(f"out_dir={str(out_dir)!r} holds another run's records (metrics.jsonl) but no checkpoint; a "
                        f"new run would mix its records with them: choose a new --out_dir (init_from=auto would set "
                        f"them aside and start over)")
    if checkpoint is not None and checkpoint["config"]["optimizer_name"] != cfg.optimizer_name:
        raise UserError(f"checkpoint in {out_dir} was trained with {checkpoint['config']['optimizer_name']}, "
                        f"not {cfg.optimizer_name}; resume with the same optimizer_name or use a new --out_dir")
    lock = None
    if master:  # every check has passed: from here on this run owns out_dir
        lock = RunLock(writable_dir(out_dir, "--out_dir"))
        remove_partial_saves(out_dir)
        if resumed is not None:
            set_aside_damaged(out_dir, resumed)
    if sharded:
        # Before the optimizer (it holds the shards) and before moving to the GPU: fully_shard
        # moves one block at a time and shards it, so the whole model is never on one GPU.
        shard_model(model, device_type, world_size, compile_blocks=cfg.compile)
    elif cfg.fsdp and master:
        print("fsdp=True in a single process: nothing to shard, training unsharded")
    model.to(dev)

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype_name == "float16"))
    optimizer = build_optimizer(cfg, model, device_type)
    progress = Progress()
    if checkpoint is not None:
        if sharded:  # the weights were loaded above, before sharding
            load_full_optimizer_state(model, optimizer, checkpoint["optimizer"])
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        progress = Progress(checkpoint["iter_num"], checkpoint["tokens"], checkpoint["best_val_loss"])

    eager_model = model
    if cfg.compile and not sharded:  # sharded: its blocks were compiled before sharding
        model = torch.compile(model)
    if distributed and not sharded:
        model = DDP(model, device_ids=[int(dev.split(":")[1])] if device_type == "cuda" else None)
    mixed = autocast(device_type, dtype_name)
    estimator = None
    if cfg.optimizer_name.startswith("sophia"):
        estimator = HessianEstimator(cfg, model, eager_model, optimizer, rank, world_size, mixed,
                                     scaler.get_scale if scaler.is_enabled() else (lambda: 1.0), dev)
    trainer = Trainer(cfg, rank, world_size, distributed, sharded, dev, out_dir, data_dir, meta, model_args, model,
                      eager_model, optimizer, scaler, mixed,
                      Batches(read_split(data_dir, "train"), cfg.block_size, cfg.batch_size, cfg.seed, dev,
                              cfg.gradient_accumulation_steps // world_size, rank, world_size), estimator,
                      progress)
    if checkpoint is not None:
        saved_rngs = checkpoint["rng"]
        set_rng_state(saved_rngs[rank % len(saved_rngs)], trainer.generators())
        if rank >= len(saved_rngs):  # a rank the run did not have: its own dropout stream, not a copy
            torch.manual_seed(cfg.seed + 1_000_003 * progress.iter_num + rank)
        if len(saved_rngs) != world_size and master:
            print(f"resuming on {world_size} ranks (was {len(saved_rngs)}): the data order continues exactly, "
                  f"but gradients are reduced in another order, so the run is no longer bitwise the same")
    trainer.lock = lock
    if master and checkpoint is None and records.exists():  # init_from=auto after a run that never checkpointed
        aside = records.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        records.rename(aside)
        print(f"{records} held the records of a run that saved no checkpoint: moved to {aside.name}, starting over")
    if master:
        print(f"{eager_model.get_num_params() / 1e6:.2f}M parameters, {cfg.optimizer_name}, {tokens_per_step(cfg):,} "
              f"tokens per step, device {dev}, dtype {dtype_name}, world size {world_size}")
        peak = peak_flops(dev)
        if peak is not None:
            print(f"mfu is against {peak / 1e12:.0f} TFLOP/s bf16 for {torch.cuda.get_device_name(dev)} "
                  f"(a GPU missing from model.PEAK_FLOPS counts as an A100)")
    return trainer


# ----------------------------------------------------------------------------- the loop

def evaluate(t: Trainer, log: MetricsLog | None) -> tuple[dict, bool]:
    """Score both splits and log them; returns the record and whether val loss improved."""
    losses = estimate_loss(t.model, t.data_dir, t.cfg.block_size, t.cfg.batch_size, t.cfg.eval_iters, t.autocast,
                           t.device, t.rank, t.world_size)
    p = t.progress
    record = {"iter": p.iter_num, "tokens": p.tokens, "train_loss": losses["train"], "val_loss": losses["val"]}
    if t.master:
        print(f"step {p.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        log({"kind": "eval", **record})
    improved = losses["val"] < p.best_val_loss
    p.best_val_loss = min(p.best_val_loss, losses["val"])
    return record, improved


def train(t: Trainer) -> dict:
    """The loop: evaluate every eval_interval steps, one Hessian estimate every hess_interval
    steps (Sophia), one train_step per step, a log line every log_interval steps. Only
    evaluation, logging and checkpoint steps wait for the device. Returns the last
    evaluation's record."""
    cfg, p = t.cfg, t.progress
    tokens_per_iter = tokens_per_step(cfg)
    log = None
    if t.master:
        (t.out_dir / "config.json").write_text(json.dumps(dict(cfg), indent=2))
        wandb_run = init_wandb(cfg.wandb_project, cfg.wandb_run_name, dict(cfg), t.out_dir) if cfg.wandb_log else None
        log = MetricsLog(t.out_dir, wandb_run)
    stop = StopRequests()
    window = StepWindow(t.device, cfg.grad_clip)
    last_eval, start_iter = {}, p.iter_num
    t_log = time.perf_counter()
    try:
        while True:
            # --- evaluation and checkpoint
            if p.iter_num % cfg.eval_interval == 0 or p.iter_num == cfg.max_iters or cfg.eval_only:
                last_eval, improved = evaluate(t, log)
                if p.iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    t.save()
                t_log = time.perf_counter()  # evaluation time is not training time
            if p.iter_num >= cfg.max_iters or cfg.eval_only:
                break

            # --- the step (the next step's batches are read while the device works on this one)
            lr = get_lr(cfg, p.iter_num)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            step_batches = t.batches.next()
            if t.estimator is not None and p.iter_num % cfg.hess_interval == 0:
                t.estimator(step_batches)
            window.add(*train_step(t.model, t.optimizer, t.scaler, step_batches, t.autocast, cfg.grad_clip))
            t.batches.prefetch()
            p.iter_num += 1
            p.tokens += tokens_per_iter

            # --- logging: the loop's one regular host sync
            if p.iter_num % cfg.log_interval == 0 or p.iter_num == cfg.max_iters:
                w = window.close(p.iter_num, t.distributed)
                dt = (time.perf_counter() - t_log) / w["steps"]
                record = {"kind": "train", "iter": p.iter_num, "tokens": p.tokens, "loss": w["loss"], "lr": lr,
                          "time_ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt, "grad_norm": w["grad_norm"],
                          "clip_frac": w["clip_frac"], "skipped_steps": window.skipped_total}
                line = (f"iter {p.iter_num}: loss " + (f"{w['loss']:.4f}" if w["loss"] is not None else
                        f"n/a (all {w['steps']} steps skipped)") + f", time {dt * 1000:.2f}ms")
                mfu = t.eager_model.estimate_mfu(t.mfu_tokens_per_iter() / t.world_size, dt, t.device)
                if mfu is not None:
                    record["mfu"] = mfu
                    line += f", mfu {mfu * 100:.2f}%"
                if t.device.startswith("cuda"):  # the allocator's own count: no sync
                    record["memory_gib"] = torch.cuda.max_memory_allocated(t.device) / 2 ** 30
                line += f", lr {lr:.2e}, tok/s {tokens_per_iter / dt:,.0f}"
                if t.estimator is not None:
                    stats = t.optimizer.stats()
                    if math.isnan(stats["win_rate"]):  # no step counted since the last line (stats_every)
                        del stats["win_rate"]
                    record.update(stats, estimator_ms=t.estimator.timer.take_seconds() * 1000 / w["steps"])
                    if "win_rate" in stats:
                        line += f", win {stats['win_rate']:.3f}"
                    line += f", |h| {stats['hessian_norm']:.3g}"
                if t.master:
                    for it, in_a_row in w["skipped"]:
                        print(f"iter {it}: non-finite loss or gradient, step skipped ({in_a_row} in a row)")
                        log({"kind": "skipped", "iter": it, "in_a_row": in_a_row})
                    print(line)
                    log(record)
                if window.bad_in_a_row >= cfg.max_bad_steps:
                    # Nothing is saved: losses that stay non-finite over this many different
                    # batches usually mean the weights are broken, and a save would prune an
                    # earlier, good checkpoint.
                    kept = checkpoints(t.out_dir)
                    raise UserError(f"{window.bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                                    f"(up to step {p.iter_num}); stopped without saving, so the latest checkpoint is "
                                    f"{kept[-1].name if kept else 'none'}. Lower --learning_rate or check the data"
                                    + (", then continue with --init_from=resume" if kept else ""))
                t_log = time.perf_counter()

            # --- preemption: every step alone; under torchrun on log steps, where the loop syncs anyway
            reason = stop.agreed(t.device) if not t.distributed or p.iter_num % cfg.log_interval == 0 else ""
            if reason:
                t.save()
                if t.master:
                    print(f"{reason}: saved a checkpoint at step {p.iter_num} in {t.out_dir}; "
                          f"continue with --init_from=resume")
                break
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if t.lock is not None:
            t.lock.release()
    return last_eval


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Train; returns the final evaluation's record (used by tests and scripts). `--check` alone
    reads a JSON list of argument lists on stdin and prints, for each, the config it resolves
    to or {"error": the one-line message}: scripts/compare.py checks its runs so, with one start-up."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        print(json.dumps(check_runs(json.load(sys.stdin))))
        return {}
    cfg = Config(configurator.parse(DEFAULTS, argv, help_source=__file__))
    distributed = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    validate(cfg, world_size)
    dev = pick_device(cfg.device)
    if distributed and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    if distributed:
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    try:
        return train(setup(cfg, rank, world_size, distributed, dev))
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

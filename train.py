"""Train a GPT-2 with Sophia-G, Sophia-H, AdamW, Lion or Muon: one loop for every optimizer.

Single process:   python train.py config/train_shakespeare_char.py --max_iters=500
DDP, one node:    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_sophiag.py
The defaults, each with its meaning, are in settings.py; a config file or --key=value
overrides them, and --help lists them. The optimizers are built from their entries in
optimizers.py.

Every optimizer runs through the same step (loss / accumulation steps, gradient clipping,
LR schedule, data order); Sophia adds one call of its Hessian estimator every
`hess_interval` steps, just before the step, on the first `hess_batch_size` sequences of
that step's batch (paper Algorithm 3: h_t is estimated at theta_t and used at step t).
The file reads top-down: the schedule, the estimator, the step, the trainer, setup, the loop.
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

import optimizers
from checkpoint import (all_finite, checkpoints, full_state_dicts, load_full_optimizer_state, load_latest_checkpoint,
                        remove_partial_saves, rng_state, save_checkpoint, set_aside_damaged, set_rng_state)
from dataset import EMBEDDED_DATASETS, Batches, check_split, dataset_meta, prepare_dataset, read_split
from devices import DeviceTimer, autocast, device_type, free_memory, pick_device, pick_dtype
from errors import UserError, exit_on_user_error
from evaluation import estimate_loss
from lifecycle import RunLock, StopRequests
from metrics import MetricsLog, init_wandb, log_window, logged_evaluation
from model import GPT, GPTConfig, model_to_train, peak_flops, training_memory
from optimizers import SECOND_ORDER, estimator_of
from parallel import set_grad_sync, shard_model
from paths import ROOT, writable_dir
from progress import Progress, StepWindow
from settings import Config, resolve, wsd_decay_start
from sophia import Sophia, gnb_hessian, hutchinson_fd_hessian, hutchinson_hessian


# ----------------------------------------------------------------------------- the schedule

def tokens_per_step(cfg: Config) -> int:
    """Tokens of one optimizer step over all ranks."""
    return cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size


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


# ----------------------------------------------------------------------------- the estimator

def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for positive integers."""
    return -(-a // b)


class HessianEstimator:
    """Sophia's estimator pass: takes this rank's share of the step's first `hess_batch_size`
    sequences, cut into equal chunks of at most batch_size sequences (one shape, so a compiled
    model compiles it once), calls gnb_hessian, hutchinson_fd_hessian or hutchinson_hessian (see
    optimizers.ESTIMATORS and hessian_vector_product), and folds the result into the optimizer."""

    def __init__(self, cfg: Config, model: torch.nn.Module, eager_model: torch.nn.Module,
                 optimizer: Sophia, rank: int, world_size: int, autocast, loss_scale, device: str):
        self.optimizer, self.rank, self.world_size = optimizer, rank, world_size
        # GNB and the finite-difference Hessian-vector product go through the training model
        # (compiled, flash attention, DDP- or FSDP2-wrapped: it averages the gradients over
        # ranks). The exact product needs a double backward, which neither torch.compile nor
        # DDP supports: the eager module, with H u all-reduced by hand.
        self.method = estimator_of(cfg)
        self.exact = self.method in SECOND_ORDER and cfg.hessian_vector_product == "exact"
        self.model = eager_model if self.exact else model
        self.grad_sync = functools.partial(set_grad_sync, self.model)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.autocast, self.loss_scale = autocast, loss_scale
        self.local_sequences = cfg.hess_batch_size // world_size
        self.micro_batches = ceil_div(self.local_sequences, cfg.batch_size)  # the step's first ones hold them
        chunks = next(n for n in range(self.micro_batches, self.local_sequences + 1) if self.local_sequences % n == 0)
        self.chunk = self.local_sequences // chunks
        # Same seed on every rank: the draws are shared and sliced (see the estimators).
        self.generator = torch.Generator(device=device if device.startswith("cuda") else "cpu")
        self.generator.manual_seed(cfg.seed + 7919)
        self.timer = DeviceTimer(device)

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self.timer():
            self.estimate(batches)

    def estimate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        x, y = (torch.cat(t)[:self.local_sequences] for t in zip(*batches[:self.micro_batches]))
        chunks = list(zip(x.split(self.chunk), y.split(self.chunk)))
        scale = self.loss_scale()
        if self.exact:
            h_hat = hutchinson_hessian(self.model, self.params, chunks, self.generator, self.autocast, scale)
        elif self.method in SECOND_ORDER:
            h_hat = hutchinson_fd_hessian(self.model, self.params, chunks, self.generator, self.autocast, scale,
                                          grad_sync=self.grad_sync)
        else:
            targets = [y for _, y in chunks] if self.method == "empirical_fisher" else None
            h_hat = gnb_hessian(self.model, self.params, [x for x, _ in chunks], self.generator, self.rank,
                                self.world_size, self.autocast, scale, targets=targets, grad_sync=self.grad_sync)
        if self.method == "adahessian":
            h_hat = [None if h is None else h * h for h in h_hat]
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
    reads it as `found_inf` when it can (its `reads_found_inf`, see optimizers.py). fp16's
    GradScaler, and an optimizer that cannot read the flag (AdamW off CUDA and CPU), decide on
    the host."""
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
    if scaler.is_enabled() or not optimizer.reads_found_inf:
        if not found_inf.item():
            scaler.step(optimizer)
    else:
        optimizer.found_inf = found_inf
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, norm, 1.0 - found_inf


# ----------------------------------------------------------------------------- the trainer

@dataclass(kw_only=True)
class Trainer:
    """Everything setup() builds for the loop; rank 0 holds the lock on out_dir from the start."""
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
    lock: RunLock | None  # rank 0's hold on out_dir; None on the other ranks

    @property
    def master(self) -> bool:
        return self.rank == 0

    def mfu_tokens_per_iter(self) -> float:
        """Tokens per step that MFU counts at the model's training FLOPs each: the step's, and
        the estimator's averaged over hess_interval (GNB is a forward and backward: one token
        each; Hutchinson's two, by finite differences, or a double backward of about that cost)."""
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

    def window_record(self, window: dict, skipped_total: int, lr: float, seconds: float) -> dict:
        """The train record of the steps since the last log line (StepWindow.close's `window`),
        `seconds` after the previous one. Every rank builds it: the optimizer's stats read the device."""
        progress, tokens_per_iter = self.progress, tokens_per_step(self.cfg)
        dt = seconds / window["steps"]
        record = {"kind": "train", "iter": progress.iter_num, "tokens": progress.tokens, "loss": window["loss"],
                  "lr": lr, "time_ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt,
                  "grad_norm": window["grad_norm"], "clip_frac": window["clip_frac"], "skipped_steps": skipped_total}
        mfu = self.eager_model.estimate_mfu(self.mfu_tokens_per_iter() / self.world_size, dt, self.device)
        if mfu is not None:
            record["mfu"] = mfu
        if self.device.startswith("cuda"):  # the allocator's own count: no sync
            record["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.estimator is not None:
            stats = self.optimizer.stats()
            if math.isnan(stats["win_rate"]):  # no step counted since the last line (stats_every)
                del stats["win_rate"]
            record.update(stats, estimator_ms=self.estimator.timer.take_seconds() * 1000 / window["steps"])
        return record

    def stop_if_diverged(self, bad_in_a_row: int) -> None:
        """Stop the run (UserError) after max_bad_steps consecutive non-finite steps. Nothing is
        saved: losses that stay non-finite over this many different batches usually mean the
        weights are broken, and a save would prune an earlier, good checkpoint."""
        if bad_in_a_row >= self.cfg.max_bad_steps:
            kept = checkpoints(self.out_dir)
            raise UserError(f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient "
                            f"(up to step {self.progress.iter_num}); stopped without saving, so the latest checkpoint "
                            f"is {kept[-1].name if kept else 'none'}. Lower --learning_rate or check the data"
                            + (", then continue with --init_from=resume" if kept else ""))

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
        progress = self.progress
        if self.master:
            save_checkpoint(self.out_dir, {
                "model": model_sd, "optimizer": optim_sd, "scaler": self.scaler.state_dict(),
                "model_args": self.model_args, "iter_num": progress.iter_num, "tokens": progress.tokens,
                "best_val_loss": progress.best_val_loss, "config": dict(self.cfg), "rng": rngs,
                "world_size": self.world_size, "meta": self.meta}, self.cfg.keep_checkpoints)


# ----------------------------------------------------------------------------- setup

def check_memory(cfg: Config, meta: dict, dev: str, dtype_name: str, shards: int) -> str:
    """One rank's memory, estimated from the shapes before the model is built, against what the
    device has free (the RAM shared by this machine's ranks on a CPU): the line to print, or
    UserError with it when the run cannot fit (unless memory_check=False)."""
    shape = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, **GPT.PRETRAINED.get(cfg.init_from, {})}
    vocab = meta["vocab_size"] if meta.get("tokenizer") == "char" else 50304
    need = training_memory(GPTConfig(**shape, block_size=cfg.block_size, vocab_size=vocab, bias=cfg.bias),
                           cfg.batch_size, 4 if dtype_name == "float32" else 2,
                           optimizers.REGISTRY[cfg.optimizer_name].state_bytes, shards)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dev == "cpu" else 1
    total = ranks * sum(v for k, v in need.items() if k != "params")
    free = free_memory(dev)
    size = lambda n: f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"
    line = (f"memory: {need['params'] / 1e6:.2f}M parameters; per rank " +
            " + ".join(f"{k} {size(v)}" for k, v in need.items() if k != "params") +
            f" (a {cfg.batch_size}x{cfg.block_size} micro-batch)" + (f", x {ranks} ranks" if ranks > 1 else "") +
            f" = {size(total)} estimated" + (f", of {size(free)} free on {dev}" if free is not None else ""))
    if free is not None and total > free and cfg.memory_check:
        raise UserError(f"{line}: the run cannot fit; lower batch_size (raise gradient_accumulation_steps to keep the "
                        f"step), block_size, n_layer or n_embd, or pass --memory_check=False to try anyway")
    return line


class RunFinished(Exception):
    """A resume at or past max_iters: the run is left as it is (nothing written, exit status 0)."""


@dataclass(kw_only=True)
class Checked:
    """What setup's checks found and loaded, before anything is written or out_dir created."""
    out_dir: Path
    data_dir: Path
    meta: dict
    checkpoint: dict | None  # the one to resume from
    resumed: Path | None  # its file
    model: GPT  # on the CPU: from the checkpoint, GPT-2's weights or fresh
    model_args: dict
    dtype_name: str
    sharded: bool


def check_run(cfg: Config, master: bool, world_size: int, distributed: bool, dev: str) -> Checked:
    """Every check of the run's folders, data, checkpoint and model; rank 0 prepares the data."""
    out_dir = Path(cfg.out_dir)
    if cfg.init_from == "resume" and not checkpoints(out_dir):  # before anything is created
        raise UserError(f"{out_dir} holds no checkpoint (ckpt_*.pt) to resume; train first, or point --out_dir at "
                        f"a run that has saved one")
    dtype_name = pick_dtype(cfg.dtype, device_type(dev))
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
    finished = checkpoint is not None and checkpoint["iter_num"] >= cfg.max_iters and not cfg.eval_only
    talk = master and not finished  # a finished run is checked like any other, then left alone in one line
    if checkpoint is not None:
        if talk:
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
    memory = check_memory(cfg, meta, dev, dtype_name, world_size if sharded else 1)  # before the model is built
    if talk:
        print(memory)
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
    if finished:
        raise RunFinished(f"{out_dir}: already at step {checkpoint['iter_num']} (max_iters={cfg.max_iters}): "
                          f"nothing to do; raise --max_iters to continue")
    return Checked(out_dir=out_dir, data_dir=data_dir, meta=meta, checkpoint=checkpoint, resumed=resumed,
                   model=model, model_args=model_args, dtype_name=dtype_name, sharded=sharded)


def build_optimizer(cfg: Config, run: Checked, world_size: int, dev: str
                    ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler, Progress]:
    """Place the model (sharded first under FSDP2) and build its optimizer and loss scaler,
    with their state and the run's progress when resuming."""
    model = run.model
    if run.sharded:
        # Before the optimizer (it holds the shards) and before moving to the GPU: fully_shard
        # moves one block at a time and shards it, so the whole model is never on one GPU.
        shard_model(model, device_type(dev), world_size, compile_blocks=cfg.compile)
    model.to(dev)
    scaler = torch.amp.GradScaler(device_type(dev), enabled=(run.dtype_name == "float16"))
    optimizer = optimizers.build(cfg, model, device_type(dev))
    if run.checkpoint is None:
        return optimizer, scaler, Progress()
    if run.sharded:  # the weights were loaded before sharding
        load_full_optimizer_state(model, optimizer, run.checkpoint["optimizer"])
    else:
        optimizer.load_state_dict(run.checkpoint["optimizer"])
    scaler.load_state_dict(run.checkpoint["scaler"])
    step = run.checkpoint["iter_num"]
    # Every rank reads the log, so all agree whether the step is scored again.
    evaluated = step if logged_evaluation(run.out_dir / "metrics.jsonl", step) else -1
    return optimizer, scaler, Progress(step, run.checkpoint["tokens"], run.checkpoint["best_val_loss"], evaluated)


def wrap_parallel(cfg: Config, model: GPT, sharded: bool, distributed: bool, dev: str) -> torch.nn.Module:
    """What the step calls: the model compiled (sharded: its blocks were, before sharding) and
    DDP-wrapped under torchrun unless FSDP2 shards it."""
    if cfg.compile and not sharded:
        model = torch.compile(model)
    if distributed and not sharded:
        model = DDP(model, device_ids=[int(dev.split(":")[1])] if device_type(dev) == "cuda" else None)
    return model


def setup(cfg: Config, rank: int, world_size: int, distributed: bool, dev: str) -> Trainer:
    """Check, then build or resume the model, optimizer, sampler and estimator; nothing is
    written, and out_dir not even created, before every check has passed."""
    master = rank == 0
    torch.manual_seed(cfg.seed)
    if device_type(dev) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = check_run(cfg, master, world_size, distributed, dev)
    lock = None
    if master:  # every check has passed: from here on this run owns out_dir
        lock = RunLock(writable_dir(run.out_dir, "--out_dir"))
        remove_partial_saves(run.out_dir)
        if run.resumed is not None:
            set_aside_damaged(run.out_dir, run.resumed)
    if cfg.fsdp and not run.sharded and master:
        print("fsdp=True in a single process: nothing to shard, training unsharded")
    optimizer, scaler, progress = build_optimizer(cfg, run, world_size, dev)
    model = wrap_parallel(cfg, run.model, run.sharded, distributed, dev)
    mixed = autocast(device_type(dev), run.dtype_name)
    estimator = None
    if estimator_of(cfg) is not None:
        estimator = HessianEstimator(cfg, model, run.model, optimizer, rank, world_size, mixed,
                                     scaler.get_scale if scaler.is_enabled() else (lambda: 1.0), dev)
    batches = Batches(read_split(run.data_dir, "train"), cfg.block_size, cfg.batch_size, cfg.seed, dev,
                      cfg.gradient_accumulation_steps // world_size, rank, world_size)
    trainer = Trainer(cfg=cfg, rank=rank, world_size=world_size, distributed=distributed, sharded=run.sharded,
                      device=dev, out_dir=run.out_dir, data_dir=run.data_dir, meta=run.meta,
                      model_args=run.model_args, model=model, eager_model=run.model, optimizer=optimizer,
                      scaler=scaler, autocast=mixed, batches=batches, estimator=estimator, progress=progress,
                      lock=lock)
    if run.checkpoint is not None:
        saved_rngs = run.checkpoint["rng"]
        set_rng_state(saved_rngs[rank % len(saved_rngs)], trainer.generators())
        if rank >= len(saved_rngs):  # a rank the run did not have: its own dropout stream, not a copy
            torch.manual_seed(cfg.seed + 1_000_003 * progress.iter_num + rank)
        if len(saved_rngs) != world_size and master:
            print(f"resuming on {world_size} ranks (was {len(saved_rngs)}): the data order continues exactly, "
                  f"but gradients are reduced in another order, so the run is no longer bitwise the same")
    records = run.out_dir / "metrics.jsonl"
    if master and run.checkpoint is None and records.exists():  # init_from=auto after a run that never checkpointed
        aside = records.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        records.rename(aside)
        print(f"{records} held the records of a run that saved no checkpoint: moved to {aside.name}, starting over")
    if master:
        print(f"{run.model.get_num_params() / 1e6:.2f}M parameters, {cfg.optimizer_name}, {tokens_per_step(cfg):,} "
              f"tokens per step, device {dev}, dtype {run.dtype_name}, world size {world_size}")
        peak = peak_flops(dev)
        if peak is not None:
            print(f"mfu is against {peak / 1e12:.0f} TFLOP/s bf16 for {torch.cuda.get_device_name(dev)} "
                  f"(a GPU missing from model.PEAK_FLOPS counts as an A100)")
    return trainer


# ----------------------------------------------------------------------------- the loop

def evaluate(trainer: Trainer, log: MetricsLog | None, stop: StopRequests) -> tuple[dict, bool] | None:
    """Score both splits and log them; returns the record and whether val loss improved, or
    None when a stop request came during it (asked between batches: seconds, not the whole
    evaluation)."""
    cfg, progress = trainer.cfg, trainer.progress
    losses = estimate_loss(trainer.model, trainer.data_dir, cfg.block_size, cfg.batch_size, cfg.eval_iters,
                           trainer.autocast, trainer.device, trainer.rank, trainer.world_size,
                           stop=lambda: bool(stop.agreed(trainer.device)))
    if losses is None:
        return None
    record = {"iter": progress.iter_num, "tokens": progress.tokens, "train_loss": losses["train"],
              "val_loss": losses["val"]}
    if trainer.master:
        print(f"step {progress.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        log({"kind": "eval", **record})
    improved = losses["val"] < progress.best_val_loss
    progress.best_val_loss = min(progress.best_val_loss, losses["val"])
    progress.evaluated_iter = progress.iter_num
    return record, improved


def stop_with_checkpoint(trainer: Trainer, reason: str, start_iter: int) -> None:
    """Save the run as it stands for a stop request, unless no step was taken since it started."""
    if trainer.progress.iter_num == start_iter:
        if trainer.master:
            print(f"{reason}: stopped at step {start_iter}, where the run started; nothing new to save")
        return
    trainer.save()
    if trainer.master:
        print(f"{reason}: saved a checkpoint at step {trainer.progress.iter_num} in {trainer.out_dir}; "
              f"continue with --init_from=resume")


def open_log(trainer: Trainer) -> MetricsLog | None:
    """Rank 0's records (config.json, metrics.jsonl, wandb when asked for); None on the other ranks."""
    if not trainer.master:
        return None
    cfg = trainer.cfg
    (trainer.out_dir / "config.json").write_text(json.dumps(dict(cfg), indent=2))
    wandb_run = init_wandb(cfg.wandb_project, cfg.wandb_run_name, dict(cfg), trainer.out_dir) if cfg.wandb_log else None
    return MetricsLog(trainer.out_dir, wandb_run)


def train(trainer: Trainer) -> dict:
    """The loop: evaluate every eval_interval steps, one Hessian estimate every hess_interval
    steps (Sophia), one train_step per step, a log line every log_interval steps. Only
    evaluation, logging and checkpoint steps wait for the device. Returns the last
    evaluation's record."""
    cfg, progress = trainer.cfg, trainer.progress
    log, stop, window = open_log(trainer), StopRequests(), StepWindow(trainer.device, cfg.grad_clip)
    last_eval, start_iter, clock = {}, progress.iter_num, time.perf_counter()
    try:
        while True:
            # --- evaluation and checkpoint (not again at a resumed step the run had evaluated)
            due = progress.iter_num % cfg.eval_interval == 0 or progress.iter_num == cfg.max_iters
            if (due and progress.evaluated_iter != progress.iter_num) or cfg.eval_only:
                evaluated = evaluate(trainer, log, stop)
                if evaluated is None:
                    stop_with_checkpoint(trainer, stop.agreed(trainer.device), start_iter)
                    break
                last_eval, improved = evaluated
                if progress.iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    trainer.save()
                clock = time.perf_counter()  # evaluation time is not training time
            if progress.iter_num >= cfg.max_iters or cfg.eval_only:
                break

            # --- the step (the next step's batches are read while the device works on this one)
            lr = get_lr(cfg, progress.iter_num)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            step_batches = trainer.batches.next()
            if trainer.estimator is not None and progress.iter_num % cfg.hess_interval == 0:
                trainer.estimator(step_batches)
            window.add(*train_step(trainer.model, trainer.optimizer, trainer.scaler, step_batches, trainer.autocast,
                                   cfg.grad_clip))
            trainer.batches.prefetch()
            progress.iter_num += 1
            progress.tokens += tokens_per_step(cfg)

            # --- logging: the loop's one regular host sync
            if progress.iter_num % cfg.log_interval == 0 or progress.iter_num == cfg.max_iters:
                closed = window.close(progress.iter_num, trainer.distributed)
                log_window(log, trainer.window_record(closed, window.skipped_total, lr, time.perf_counter() - clock),
                           closed)
                trainer.stop_if_diverged(window.bad_in_a_row)
                clock = time.perf_counter()

            # --- preemption: every step alone; under torchrun on log steps, where the loop syncs anyway
            synced = not trainer.distributed or progress.iter_num % cfg.log_interval == 0
            reason = stop.agreed(trainer.device) if synced else ""
            if reason:
                stop_with_checkpoint(trainer, reason, start_iter)
                break
    finally:
        stop.restore()
        if log is not None:
            log.close()
        if trainer.lock is not None:
            trainer.lock.release()
    return last_eval


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Train; returns the final evaluation's record (used by tests and scripts)."""
    argv = sys.argv[1:] if argv is None else argv
    distributed = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = resolve(argv, world_size)
    dev = pick_device(cfg.device)
    if distributed and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    if distributed:
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    try:
        return train(setup(cfg, rank, world_size, distributed, dev))
    except RunFinished as e:
        if rank == 0:
            print(e)
        return {}
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

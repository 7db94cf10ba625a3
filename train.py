"""Train a GPT-2 with Sophia-G, Sophia-H, AdamW or Lion: one loop for every optimizer.

Single process:   python train.py config/train_shakespeare_char.py --max_iters=500
DDP, one node:    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_sophiag.py
Every default below can be overridden by a config file or --key=value; --help lists them.

Every optimizer runs through the same step (loss / accumulation steps, gradient clipping,
LR schedule, data order); Sophia adds one call of its Hessian estimator every
`hess_interval` steps, just before the step, on the first `hess_batch_size` sequences of
that step's batch (paper Algorithm 3: h_t is estimated at theta_t and used at step t).
"""

import json
import math
import netrc
import os
import random
import signal
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
from configurator import UserError
from model import GPT, GPTConfig, peak_flops
from tokenizer import read_meta
from sophia import IMPLEMENTATIONS as _IMPLEMENTATIONS  # "_": a public tuple here would be a config key
from sophia import Sophia, SophiaG, SophiaH, gnb_hessian, hutchinson_hessian, set_grad_sync

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
dataset = "openwebtext"  # folder under data/ holding train.bin, val.bin, meta.json
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
optimizer_name = "adamw"  # 'adamw', 'lion', 'sophiag' or 'sophiah'
learning_rate = 6e-4  # peak learning rate
max_iters = 100000  # total optimizer steps
weight_decay = 1e-1  # decoupled weight decay on matrices and embeddings
beta1 = 0.9  # AdamW/Lion/Sophia beta1 (gradient EMA)
beta2 = 0.95  # AdamW beta2, Lion beta2, Sophia's Hessian EMA rate
grad_clip = 1.0  # clip the gradient to this global norm (0 disables)
rho = 0.05  # Sophia's clipping scale gamma (paper: 0.05 for Sophia-G, 0.01 for Sophia-H)
hess_interval = 10  # Sophia: steps between Hessian estimates (k)
hess_batch_size = 240  # Sophia: sequences in each Hessian estimate, over all ranks
optimizer_impl = "auto"  # Sophia's update kernels: 'auto', 'reference', 'foreach' or 'compiled'
hess_estimator = "auto"  # Sophia's estimator: 'auto' (sophiag: 'gnb', sophiah: 'hutchinson'); ablations: 'empirical_fisher', 'adahessian'
sophia_clip = True  # Sophia's per-coordinate clip to [-1, 1]; False only for the no-clipping ablation
# learning rate schedule
decay_lr = True  # linear warmup then cosine decay; False keeps learning_rate constant
warmup_iters = 2000  # steps of linear warmup
lr_decay_iters = 100000  # step at which the cosine reaches min_lr (usually max_iters)
min_lr = 3e-5  # final learning rate (paper: 0.05 x peak)
# system
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16; float32 on CPU), or explicit
compile = True  # torch.compile the model
fsdp = False  # shard parameters, gradients and optimizer state over ranks (FSDP2) instead of DDP
seed = 1337  # seeds model init, data order and the estimator's random draws
# -----------------------------------------------------------------------------
DEFAULTS = {k: globals()[k] for k in configurator.config_keys(dict(globals()))}
OPTIMIZERS = ("adamw", "lion", "sophiag", "sophiah")
# Sophia's diagonal pre-conditioners (paper Fig. 7b): GNB (Sophia-G), Hutchinson (Sophia-H),
# and for ablations the empirical Fisher (GNB with the data's labels instead of sampled ones)
# and AdaHessian's (the square root of an EMA of squared Hutchinson estimates).
ESTIMATORS = ("gnb", "hutchinson", "empirical_fisher", "adahessian")
SECOND_ORDER = ("hutchinson", "adahessian")  # need a Hessian-vector product (double backward)


class Config(dict):
    """The run's settings; attribute access keeps the loop readable."""
    __getattr__ = dict.__getitem__


def hess_estimator(cfg: Config) -> str:
    """The estimator a Sophia run uses: hess_estimator, or the optimizer's own for 'auto'."""
    if cfg.hess_estimator == "auto":
        return "gnb" if cfg.optimizer_name == "sophiag" else "hutchinson"
    return cfg.hess_estimator


# ----------------------------------------------------------------------------- setup

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
    if cfg.hess_estimator != "auto" and not cfg.optimizer_name.startswith("sophia"):
        raise UserError(f"hess_estimator={cfg.hess_estimator!r} is for Sophia, not optimizer_name="
                        f"{cfg.optimizer_name!r}; use --optimizer_name=sophiag or sophiah, or drop hess_estimator")
    if cfg.fsdp and cfg.optimizer_name.startswith("sophia") and hess_estimator(cfg) in SECOND_ORDER:
        raise UserError(f"fsdp=True does not work with optimizer_name={cfg.optimizer_name!r} and the "
                        f"{hess_estimator(cfg)} estimator: its Hessian-vector product differentiates twice with "
                        "respect to the parameters, which FSDP2 replaces by gathered copies during the forward; "
                        "use --optimizer_name=sophiag, or DDP (--fsdp=False)")
    if cfg.optimizer_name.startswith("sophia"):
        local_accum = cfg.gradient_accumulation_steps // world_size
        if cfg.hess_batch_size <= 0 or cfg.hess_batch_size % world_size:
            raise UserError(f"hess_batch_size={cfg.hess_batch_size} must be a positive multiple of the "
                            f"world size {world_size}")
        if cfg.hess_batch_size // world_size > cfg.batch_size * local_accum:
            raise UserError(f"hess_batch_size={cfg.hess_batch_size} exceeds the batch of one step "
                            f"({cfg.batch_size * local_accum * world_size} sequences); lower it")
    if cfg.init_from.startswith("gpt2") and cfg.block_size > 1024:
        raise UserError(f"block_size={cfg.block_size} exceeds GPT-2's 1024 positions; use --block_size=1024 or less")
    if cfg.keep_checkpoints < 1 or cfg.max_bad_steps < 1:
        raise UserError("keep_checkpoints and max_bad_steps must be at least 1")
    if cfg.init_from not in ("scratch", "resume", "auto", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        raise UserError(f"init_from={cfg.init_from!r}: use 'scratch', 'resume', 'auto' or one of 'gpt2', 'gpt2-medium', "
                        f"'gpt2-large', 'gpt2-xl'")


def pick_device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={requested!r} but this machine has no CUDA GPU; use --device=cpu or --device=auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("device='mps' but MPS is not available here; use --device=cpu or --device=auto")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise UserError(f"device={requested!r} is unknown; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return requested


def pick_dtype(requested: str, device_type: str) -> str:
    if requested == "auto":
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if requested not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={requested!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    if requested == "float16" and device_type != "cuda":
        raise UserError("dtype='float16' needs a CUDA GPU (it trains with a GradScaler); use bfloat16 or float32")
    return requested


class Batches:
    """Random windows of a uint16 token file. Each step draws the offsets of the whole
    global batch from one generator, seeded alike on every rank, and each rank takes its
    own block of them: the data order depends on the seed alone (not on the optimizer or
    the world size), and the generator's state is the sampler's position in a checkpoint."""

    def __init__(self, path: Path, block_size: int, batch_size: int, seed: int, device: str):
        self.path, self.block_size, self.batch_size, self.device = path, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.n_tokens = path.stat().st_size // 2

    def step(self, micro_steps: int, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `micro_steps` (x, y) micro-batches of the next global batch."""
        ix = torch.randint(self.n_tokens - self.block_size, (world_size, micro_steps, self.batch_size),
                           generator=self.generator)[rank]
        # A fresh memmap per step avoids the memory growth of a long-lived one (nanoGPT #93).
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        return [self._load(data, row.tolist()) for row in ix]

    def _load(self, data: np.memmap, offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(np.stack([data[i:i + self.block_size + 1] for i in offsets]).astype(np.int64))
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


def prepare_dataset(data_dir: Path, is_master: bool) -> None:
    """Build the embedded Shakespeare datasets on first use; other datasets must be prepared."""
    if (data_dir / "train.bin").exists() and (data_dir / "val.bin").exists():
        return
    script = data_dir / "prepare.py"
    if data_dir.name in ("shakespeare_char", "shakespeare") and script.exists():
        if is_master:
            import subprocess
            print(f"preparing {data_dir.name} (first run)...")
            subprocess.run([sys.executable, str(script)], check=True)
        if dist.is_initialized():
            dist.barrier()
        return
    missing = next(p for p in (data_dir / "train.bin", data_dir / "val.bin") if not p.exists())
    raise UserError(f"{missing} not found; prepare the data first with "
                    f"`python {script}`" + ("" if script.exists() else f" (no such script: create {script})"))


def check_token_file(path: Path, vocab_size: int, block_size: int, expected_tokens: int | None = None) -> None:
    """Refuse files that would crash or silently corrupt training: too short, odd size, of
    another length than meta.json records (another dtype, or truncated), or holding token
    ids the model cannot embed."""
    if not path.exists():
        raise UserError(f"{path} not found; rerun the dataset's prepare.py")
    size = path.stat().st_size
    if size % 2:
        raise UserError(f"{path} has an odd size ({size} bytes): it is not a uint16 token file or is "
                        f"truncated; rerun the dataset's prepare.py")
    if expected_tokens is not None and size // 2 != expected_tokens:
        raise UserError(f"{path} holds {size // 2} uint16 tokens but meta.json records {expected_tokens}: it was "
                        f"written with another dtype or is truncated; rerun the dataset's prepare.py")
    if size // 2 < block_size + 1:  # checked before the memmap, which fails on an empty file
        raise UserError(f"{path} holds {size // 2} tokens, fewer than block_size+1={block_size + 1}; "
                        f"lower --block_size or use more data")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    # Full scan up to 2^31 tokens; beyond, 256 evenly spaced chunks of 1M tokens.
    chunk = 1 << 20
    starts = range(0, len(data), chunk) if len(data) <= 1 << 31 else np.linspace(0, len(data) - chunk, 256).astype(np.int64)
    top = max(int(data[s:s + chunk].max()) for s in starts)
    if top >= vocab_size:
        raise UserError(f"{path} holds token id {top} but the model's vocab_size is {vocab_size}; "
                        f"the data was tokenized for another vocabulary: rerun its prepare.py")


# ----------------------------------------------------------------------------- optimizers

def build_optimizer(cfg: Config, model: GPT, device_type: str) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer_name == "adamw":
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, fused=fused)
    if cfg.optimizer_name == "lion":
        from lion_pytorch import Lion
        return Lion(groups, lr=cfg.learning_rate, betas=betas)
    cls = SophiaG if cfg.optimizer_name == "sophiag" else SophiaH
    # The win rate is sampled on the step before each log line: counting costs an extra read of m and h.
    return cls(groups, lr=cfg.learning_rate, betas=betas, rho=cfg.rho, impl=cfg.optimizer_impl,
               stats_every=cfg.log_interval, clip=cfg.sophia_clip, sqrt_hessian=hess_estimator(cfg) == "adahessian")


class HessianEstimator:
    """Sophia's estimator pass: picks the step's first `hess_batch_size` sequences, calls
    gnb_hessian or hutchinson_hessian (see ESTIMATORS), and folds the result into the optimizer."""

    def __init__(self, cfg: Config, model: torch.nn.Module, eager_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, rank: int, world_size: int, autocast, loss_scale,
                 device: str):
        self.cfg, self.optimizer, self.rank, self.world_size = cfg, optimizer, rank, world_size
        # GNB goes through the training model (compiled, DDP-wrapped: it averages g_hat over
        # ranks). Hutchinson needs a double backward, which neither torch.compile nor DDP
        # supports: the eager module, with H u all-reduced by hand.
        self.method = hess_estimator(cfg)
        self.model = eager_model if self.method in SECOND_ORDER else model
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.autocast, self.loss_scale = autocast, loss_scale
        self.local_sequences = cfg.hess_batch_size // world_size
        # Same seed on every rank: the draws are shared and sliced (see the estimators).
        gen_device = device if device.startswith("cuda") else "cpu"
        self.generator = torch.Generator(device=gen_device).manual_seed(cfg.seed + 7919)
        # Time spent in the estimator. On CUDA, events: a host clock would time kernel launches only.
        self.cuda = device.startswith("cuda")
        self.seconds, self.events = 0.0, []

    def take_seconds(self) -> float:
        """Seconds spent in the estimator since the last call (syncs with CUDA events)."""
        seconds = self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000
        self.seconds, self.events = 0.0, []
        return seconds

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        chunks, left = [], self.local_sequences
        for x, y in batches:
            if left <= 0:
                break
            chunks.append((x[:left], y[:left]))
            left -= len(x)
        scale = self.loss_scale()
        if self.method in SECOND_ORDER:
            h_hat = hutchinson_hessian(self.model, self.params, chunks, self.generator, self.autocast, scale)
            if self.method == "adahessian":
                h_hat = [h * h for h in h_hat]
        else:
            targets = [y for _, y in chunks] if self.method == "empirical_fisher" else None
            h_hat = gnb_hessian(self.model, self.params, [x for x, _ in chunks], self.generator,
                                self.rank, self.world_size, self.autocast, scale, targets=targets)
        self.optimizer.update_hessian(h_hat)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        else:
            self.seconds += time.perf_counter() - t0


# ----------------------------------------------------------------------------- FSDP2

def shard_model(model: GPT, device_type: str, world_size: int) -> None:
    """FSDP2, in place: each transformer block is one unit and the root holds the rest. The
    tied wte/lm_head weight is one tensor, so it belongs to the root's unit (with wpe and
    ln_f). The parameters become DTensor shards over a 1-D mesh of all ranks; build the
    optimizer afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in the order of the integer ids of
    optimizer.state_dict() (a tied tensor goes by its first name, as in
    torch.distributed.checkpoint)."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state dicts of an FSDP2 model on the CPU,
    in the format of model.state_dict() and optimizer.state_dict(), so a sharded run writes
    the same checkpoint as an unsharded one. A collective: every rank calls it; ranks other
    than 0 get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not optim_sd:
        return model_sd, optim_sd
    ids = {name: i for i, name in enumerate(_param_names(model, optimizer))}  # names -> state_dict()'s ids
    return model_sd, {"state": {ids[name]: state for name, state in optim_sd["state"].items()},
                      "param_groups": [{**g, "params": [ids[name] for name in g["params"]]}
                                       for g in optim_sd["param_groups"]]}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load an unsharded optimizer.state_dict() (any run's checkpoint) into the optimizer of
    an FSDP2 model: rank 0's copy is broadcast and each rank keeps its shards. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: state for i, state in optim_sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if isinstance(optimizer, Sophia):
        # set_optimizer_state_dict creates the state with one zero-lr step first; forget its
        # win-rate counts (stats() is a collective here too: every rank calls it).
        optimizer.stats(reset=True)


# ----------------------------------------------------------------------------- checkpoints

def checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoints in out_dir, oldest first (names are zero-padded step numbers)."""
    return sorted(out_dir.glob("ckpt_*.pt"))


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write ckpt_<step>.pt atomically (temporary file, fsync, rename, fsync of the folder),
    so a crash at any moment leaves every earlier checkpoint intact; then delete all but
    the `keep` latest."""
    path = out_dir / f"ckpt_{state['iter_num']:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in checkpoints(out_dir)[:-keep]:
        old.unlink()
    return path


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint (weights_only: a checkpoint cannot run code); UserError if it is
    damaged or not one of ours. The tensors stay memory-mapped on the CPU, so the ranks of a
    large sharded run neither copy the whole file into their own memory nor onto their GPU;
    loading them into the model and optimizer moves what each rank holds to its device."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is damaged or not "
                        f"a checkpoint of this project") from e
    required = ("model", "optimizer", "scaler", "model_args", "iter_num", "tokens", "best_val_loss", "config", "meta")
    lacking = [k for k in required if k not in checkpoint] if isinstance(checkpoint, dict) else list(required)
    if lacking:
        raise UserError(f"{path} is not a checkpoint of this project (no {', '.join(lacking)}); "
                        f"use a new --out_dir")
    return checkpoint


def load_latest_checkpoint(out_dir: Path) -> dict:
    """The newest readable checkpoint in out_dir; a damaged newer one (a disk that lost
    the end of a file) is reported and skipped."""
    paths = checkpoints(out_dir)
    if not paths:
        raise UserError(f"{out_dir} holds no checkpoint (ckpt_*.pt); train first, or point --out_dir at a run "
                        f"that has saved one")
    damaged = []
    for path in reversed(paths):
        try:
            checkpoint = read_checkpoint(path)
        except UserError as e:
            damaged.append(e)
            continue
        for e in damaged:
            print(f"warning: skipped a newer checkpoint: {e}", file=sys.stderr)
        return checkpoint
    raise damaged[0]


def load_trained_model(out_dir: str | Path) -> tuple[GPT, dict]:
    """The model of out_dir's latest checkpoint (eval mode, CPU) and the meta of its dataset
    (the tokenizer); for sample.py and the scripts."""
    checkpoint = load_latest_checkpoint(Path(out_dir))
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint["meta"]


def rng_state(batches: Batches, estimator: HessianEstimator | None) -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "data": batches.generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if estimator is not None:
        state["estimator"] = estimator.generator.get_state()
    return state


def set_rng_state(state: dict, batches: Batches, estimator: HessianEstimator | None) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].cpu().numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"].cpu())
    batches.generator.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    if estimator is not None and "estimator" in state:
        estimator.generator.set_state(state["estimator"].cpu())


# ----------------------------------------------------------------------------- the loop

def get_lr(cfg: Config, it: int) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, cfg: Config, data_dir: Path, autocast, device: str,
                  rank: int, world_size: int) -> dict[str, float]:
    """Mean loss over eval_iters batches of batch_size windows per split. The windows come
    from a fixed seed, so every evaluation of every run, on any number of ranks, scores the
    same windows: rank r scores batches r, r + world_size, ..., and the per-batch losses
    are summed over ranks (each slot is filled by one rank, the others add 0). Every rank
    runs the same number of forwards (FSDP2 all-gathers in each), the last ones scoring a
    batch again with weight 0 when eval_iters is not a multiple of the world size."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        batches = Batches(data_dir / f"{split}.bin", cfg.block_size, cfg.batch_size, cfg.seed + 1000, device)
        ix = torch.randint(batches.n_tokens - cfg.block_size, (cfg.eval_iters, cfg.batch_size),
                           generator=batches.generator)
        data = np.memmap(batches.path, dtype=np.uint16, mode="r")
        losses = torch.zeros(cfg.eval_iters, device=device)
        rounds = -(-cfg.eval_iters // world_size)
        # A transient bar (a terminal only, rank 0): logs keep one line per evaluation.
        for k in tqdm(range(rank, rounds * world_size, world_size), desc=f"evaluating {split}", leave=False,
                      disable=rank != 0 or not sys.stderr.isatty()):
            x, y = batches._load(data, ix[k % cfg.eval_iters].tolist())
            with autocast:
                _, loss = model(x, y)
            if k < cfg.eval_iters:
                losses[k] = loss
        if dist.is_initialized():
            dist.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train()
    return out


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               batches: list[tuple[torch.Tensor, torch.Tensor]], autocast, grad_clip: float
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches; the same for every optimizer.

    Returns (mean loss, gradient norm before clipping, whether the step was applied). A
    step whose loss or gradient is not finite is skipped (GradScaler's rule, for every
    dtype), so the parameters and the optimizer state (m, h) stay as they were; checking
    costs one host sync per step, negligible beside the accumulation's micro-steps."""
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        set_grad_sync(model, i == len(batches) - 1)  # all-reduce only on the last micro-step
        with autocast:
            _, loss = model(x, y)
            loss = loss / len(batches)
        total += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if isinstance(norm, DTensor):  # FSDP2: the norm of the sharded gradient, reduced over ranks
        norm = norm.full_tensor()
    applied = bool(torch.isfinite(norm) & torch.isfinite(total))
    if applied:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, norm, applied


@configurator.exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Train; returns the final metrics (used by tests and scripts)."""
    cfg = Config(configurator.parse(DEFAULTS, sys.argv[1:] if argv is None else argv, help_source=__file__))

    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        rank, local_rank, world_size = 0, 0, 1
    validate(cfg, world_size)
    dev = pick_device(cfg.device)
    if ddp and dev.startswith("cuda"):
        dev = f"cuda:{local_rank}"
        torch.cuda.set_device(dev)
    device_type = "cuda" if dev.startswith("cuda") else dev
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    master = rank == 0
    try:
        return run(cfg, dev, device_type, rank, world_size, ddp, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def run(cfg: Config, dev: str, device_type: str, rank: int, world_size: int, ddp: bool, master: bool) -> dict:
    out_dir = Path(cfg.out_dir)
    if master:
        configurator.writable_dir(out_dir, "--out_dir")
        for stale in out_dir.glob("ckpt_*.pt.tmp"):  # left by a crash mid-write
            stale.unlink()
    local_accum = cfg.gradient_accumulation_steps // world_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype_name = pick_dtype(cfg.dtype, device_type)
    if cfg.fsdp and ddp and dtype_name == "float16":
        raise UserError("fsdp=True with float16: the GradScaler's overflow check would see only each rank's shard of "
                        "the gradients, so ranks could disagree on skipping a step; use --dtype=bfloat16")
    ptdtype = getattr(torch, dtype_name)
    autocast = nullcontext() if dtype_name == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)

    data_dir = Path(__file__).resolve().parent / "data" / cfg.dataset
    if not data_dir.is_dir():
        raise UserError(f"dataset {cfg.dataset!r} not found: no folder {data_dir}; "
                        f"choose one of {', '.join(sorted(p.name for p in data_dir.parent.iterdir() if p.is_dir()))}")
    prepare_dataset(data_dir, master)
    try:
        meta = read_meta(data_dir)  # the tokenizer, saved in checkpoints for sample.py and the scripts
    except FileNotFoundError:
        meta = {"tokenizer": "gpt2", "vocab_size": 50257}  # a dataset prepared without meta.json

    # model
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=None, dropout=cfg.dropout,
                      scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx)
    checkpoint = None
    resume = cfg.init_from == "resume" or (cfg.init_from == "auto" and bool(checkpoints(out_dir)))
    if resume:
        checkpoint = load_latest_checkpoint(out_dir)
        if checkpoint["config"]["dataset"] != cfg.dataset:
            raise UserError(f"checkpoint in {out_dir} was trained on dataset {checkpoint['config']['dataset']!r}, not "
                            f"{cfg.dataset!r}; resume with --dataset={checkpoint['config']['dataset']}, or use a new --out_dir")
        saved = checkpoint["model_args"]
        changed = {k: (saved[k], model_args[k]) for k in model_args if k not in ("vocab_size", "dropout") and saved.get(k) != model_args[k]}
        if changed:
            k, (a, b) = next(iter(changed.items()))
            raise UserError(f"checkpoint in {out_dir} has {k}={a!r} but the config asks for {b!r}; resume with the "
                            f"config the run was started with, or use a new --out_dir")
        model_args = {**saved, "dropout": cfg.dropout}  # dropout may change between runs
        model = GPT(GPTConfig(**model_args))
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint in {out_dir} does not fit the model ({str(e).splitlines()[0]}); "
                            f"use a new --out_dir") from e
    elif cfg.init_from.startswith("gpt2"):
        try:
            model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        except (ImportError, OSError) as e:  # no transformers, or the weights cannot be fetched
            raise UserError(f"init_from={cfg.init_from!r}: cannot load the GPT-2 weights ({e})") from e
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        model_args = {k: getattr(model.config, k) for k in model_args}
    else:
        model_args["vocab_size"] = meta.get("vocab_size", 50304) if meta.get("tokenizer") == "char" else 50304
        model = GPT(GPTConfig(**model_args))
    for split in ("train", "val"):
        check_token_file(data_dir / f"{split}.bin", model.config.vocab_size, cfg.block_size, meta.get(f"{split}_tokens"))
    if not resume and checkpoints(out_dir):
        raise UserError(f"out_dir={str(out_dir)!r} already holds a run's checkpoints, which a new run would replace; "
                        f"continue it with --init_from=resume (or auto), or choose a new --out_dir")
    sharded = cfg.fsdp and ddp
    if sharded:
        # Before the optimizer (it holds the shards) and before moving to the GPU: fully_shard
        # moves one block at a time and shards it, so the whole model is never on one GPU.
        shard_model(model, device_type, world_size)
    elif cfg.fsdp and master:
        print("fsdp=True in a single process: nothing to shard, training unsharded")
    model.to(dev)

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype_name == "float16"))
    optimizer = build_optimizer(cfg, model, device_type)
    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    if checkpoint is not None:
        if checkpoint["config"]["optimizer_name"] != cfg.optimizer_name:
            raise UserError(f"checkpoint in {out_dir} was trained with {checkpoint['config']['optimizer_name']}, "
                            f"not {cfg.optimizer_name}; resume with the same optimizer_name or use a new --out_dir")
        if sharded:  # the weights were loaded above, before sharding
            load_full_optimizer_state(model, optimizer, checkpoint["optimizer"])
        else:
            optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best_val_loss, tokens_seen = checkpoint["iter_num"], checkpoint["best_val_loss"], checkpoint["tokens"]

    eager_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp and not sharded:
        model = DDP(model, device_ids=[int(dev.split(":")[1])] if device_type == "cuda" else None)

    batches = Batches(data_dir / "train.bin", cfg.block_size, cfg.batch_size, cfg.seed, dev)
    estimator = None
    if cfg.optimizer_name.startswith("sophia"):
        estimator = HessianEstimator(cfg, model, eager_model, optimizer, rank, world_size, autocast,
                                     scaler.get_scale if scaler.is_enabled() else (lambda: 1.0), dev)
    if checkpoint is not None:
        saved_rngs = checkpoint["rng"]
        # The data and estimator generators are alike on every rank, so they continue exactly
        # on any world size; the global torch RNG (dropout) is per rank.
        set_rng_state(saved_rngs[rank % len(saved_rngs)], batches, estimator)
        if rank >= len(saved_rngs):  # a rank the run did not have: its own dropout stream, not a copy
            torch.manual_seed(cfg.seed + 1_000_003 * iter_num + rank)
        if len(saved_rngs) != world_size and master:
            print(f"resuming on {world_size} ranks (was {len(saved_rngs)}): the data order continues exactly, "
                  f"but gradients are reduced in another order, so the run is no longer bitwise the same")
        checkpoint = None  # free the memory

    wandb = None
    if master:
        n_params = eager_model.get_num_params()
        print(f"{n_params / 1e6:.2f}M parameters, {cfg.optimizer_name}, {tokens_per_iter:,} tokens per step, "
              f"device {dev}, dtype {dtype_name}, world size {world_size}")
        peak = peak_flops(dev)
        if peak is not None:
            print(f"mfu is against {peak / 1e12:.0f} TFLOP/s bf16 for {torch.cuda.get_device_name(dev)} "
                  f"(a GPU missing from model.PEAK_FLOPS counts as an A100)")
        (out_dir / "config.json").write_text(json.dumps(dict(cfg), indent=2))
        if cfg.wandb_log:
            wandb = init_wandb(cfg, out_dir)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if master else None

    def log(record: dict) -> None:
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if wandb is not None:
                wandb.log(record, step=record["iter"])

    def checkpoint_state() -> dict:
        rngs = [None] * world_size
        mine = rng_state(batches, estimator)
        if ddp:
            dist.all_gather_object(rngs, mine)
        else:
            rngs = [mine]
        if sharded:  # gathered: the same format as an unsharded run's
            model_sd, optim_sd = full_state_dicts(eager_model, optimizer)
        else:
            model_sd, optim_sd = eager_model.state_dict(), optimizer.state_dict()
        return {"model": model_sd, "optimizer": optim_sd,
                "scaler": scaler.state_dict(), "model_args": model_args, "iter_num": iter_num, "tokens": tokens_seen,
                "best_val_loss": best_val_loss, "config": dict(cfg), "rng": rngs, "world_size": world_size,
                "meta": meta}

    def save() -> None:
        state = checkpoint_state()  # a collective under DDP and FSDP2: every rank takes part
        if master:
            save_checkpoint(out_dir, state, cfg.keep_checkpoints)

    # Preemption (SLURM sends SIGTERM or SIGUSR1): finish the current step, checkpoint, exit 0.
    # Under torchrun, also when the launcher is gone (killed by a signal it does not handle):
    # its workers would otherwise train on unsupervised.
    stop_signal: list[str] = []
    handlers = {sig: signal.signal(sig, lambda signum, _: stop_signal.append(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGUSR1)}
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def stop_reason() -> str:
        if stop_signal:
            return f"received {stop_signal[0]}"
        if launcher is not None and os.getppid() != launcher:
            return "the torchrun launcher is gone"
        return ""
    last_eval: dict = {}
    start_iter = iter_num
    loss_sum = torch.zeros((), device=dev)
    clip_count = torch.zeros((), device=dev)
    steps_since_log = applied_since_log = bad_in_a_row = skipped_total = 0
    t_log = time.perf_counter()
    try:
        while True:
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
                losses = estimate_loss(model, cfg, data_dir, autocast, dev, rank, world_size)
                last_eval = {"iter": iter_num, "tokens": tokens_seen, "train_loss": losses["train"],
                             "val_loss": losses["val"]}
                if master:
                    print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log({"kind": "eval", **last_eval})
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                    save()
                t_log = time.perf_counter()  # evaluation time is not training time
            if iter_num >= cfg.max_iters or cfg.eval_only:
                break

            lr = get_lr(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_batches = batches.step(local_accum, rank, world_size)
            if estimator is not None and iter_num % cfg.hess_interval == 0:
                estimator(step_batches)
            loss, norm, applied = train_step(model, optimizer, scaler, step_batches, autocast, cfg.grad_clip)
            iter_num += 1
            tokens_seen += tokens_per_iter
            steps_since_log += 1
            if applied:
                bad_in_a_row = 0
                applied_since_log += 1
                loss_sum += loss
                if cfg.grad_clip > 0:
                    clip_count += (norm > cfg.grad_clip).float()
            else:
                bad_in_a_row += 1
                skipped_total += 1
                if master:
                    print(f"iter {iter_num}: non-finite loss or gradient, step skipped ({bad_in_a_row} in a row)")
                log({"kind": "skipped", "iter": iter_num, "in_a_row": bad_in_a_row})
                if bad_in_a_row >= cfg.max_bad_steps:
                    save()
                    raise UserError(f"{bad_in_a_row} consecutive steps had a non-finite loss or gradient (up to step "
                                    f"{iter_num}); saved the last good weights as step {iter_num} in {out_dir}. Lower "
                                    f"--learning_rate or check the data, then continue with --init_from=resume")

            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                if ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                lossf = loss_sum.item() / max(1, applied_since_log)  # the loop's regular sync point
                dt = (time.perf_counter() - t_log) / steps_since_log
                record = {"kind": "train", "iter": iter_num, "tokens": tokens_seen, "loss": lossf, "lr": lr, "time_ms": dt * 1000,
                          "tokens_per_s": tokens_per_iter / dt, "grad_norm": norm.item(),
                          "clip_frac": clip_count.item() / max(1, applied_since_log),
                          "skipped_steps": skipped_total}
                mfu = eager_model.estimate_mfu(tokens_per_iter // world_size, dt, dev)
                line = f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms"
                if mfu is not None:
                    record["mfu"] = mfu
                    line += f", mfu {mfu * 100:.2f}%"
                line += f", lr {lr:.2e}, tok/s {tokens_per_iter / dt:,.0f}"
                if estimator is not None:
                    stats = optimizer.stats()
                    if math.isnan(stats["win_rate"]):  # no step counted since the last line (stats_every)
                        del stats["win_rate"]
                    record.update(stats, estimator_ms=estimator.take_seconds() * 1000 / steps_since_log)
                    if "win_rate" in stats:
                        line += f", win {stats['win_rate']:.3f}"
                    line += f", |h| {stats['hessian_norm']:.3g}"
                if master:
                    print(line)
                log(record)
                loss_sum.zero_()
                clip_count.zero_()
                steps_since_log = applied_since_log = 0
                t_log = time.perf_counter()

            reason = stop_reason()
            stopping = torch.tensor(float(bool(reason)), device=dev)
            if ddp:  # any rank signalled: all stop at the same step
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
            if stopping.item() > 0:
                save()
                if master:
                    print(f"{reason or 'another rank received a stop signal'}: saved a checkpoint at step "
                          f"{iter_num} in {out_dir}; continue with --init_from=resume")
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    if metrics_file is not None:
        metrics_file.close()
    if wandb is not None:
        wandb.finish()
    return last_eval


def wandb_has_credentials() -> bool:
    """Whether wandb will find an API key: WANDB_API_KEY or a ~/.netrc entry for its host (a
    cluster's ~/.netrc often holds other hosts only)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(cfg: Config, out_dir: Path):
    """A wandb run that never stops a batch job: offline without credentials, and offline
    when going online fails (a bad key, a compute node without network). The run's id is kept
    in out_dir, so a resumed training run continues the same wandb run."""
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but wandb is not installed; `pip install wandb` or drop --wandb_log") from None
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        print(f"wandb: no API key found, logging offline to {out_dir / 'wandb'} (upload later with `wandb sync`)")
    id_file = out_dir / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    settings = dict(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dict(cfg), dir=str(out_dir),
                    id=run_id, resume="allow")
    try:
        return wandb.init(**settings)
    except wandb.errors.Error as e:
        print(f"wandb: could not log online ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
              f"logging offline to {out_dir / 'wandb'} instead")
        return wandb.init(mode="offline", **settings)


if __name__ == "__main__":
    main()

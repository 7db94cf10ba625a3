"""The run's settings: every default with its meaning, their checks, and the resolved Config.

The defaults live here, not at the top of train.py, and keep nanoGPT's convention: one
`key = value  # meaning` line each, all in one place, read by --help for its meanings. Here
because they are needed without training: scripts/compare.py, the ablations and the benches
plan and check train.py's runs from them (resolve) without importing torch or parsing an
entry point's source. A default that is not a literal (`batch_size = 6 * 2`) is an error
when this module is imported: a reader and --help see every value as written.

Every default can be overridden by a config file or --key=value (configurator.py):
    python train.py config/train_shakespeare_char.py --max_iters=500
"""

from pathlib import Path
from typing import Any

import configurator
from errors import UserError
from optimizers import ESTIMATORS, HESSIAN_VECTOR_PRODUCTS, REGISTRY, SECOND_ORDER, SOPHIA_IMPLEMENTATIONS, estimator_of

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
optimizer_name = "adamw"  # 'adamw', 'lion', 'sophiag', 'sophiah', 'muon' or 'soap' (Muon: hidden matrices, AdamW for the rest)
learning_rate = 6e-4  # peak learning rate
max_iters = 100000  # total optimizer steps; a finished run resumed with a larger one continues
weight_decay = 1e-1  # decoupled weight decay on matrices and embeddings
beta1 = 0.9  # AdamW/Lion/Sophia beta1 (gradient EMA); Muon's AdamW part
beta2 = 0.95  # AdamW beta2, Lion beta2, Sophia's Hessian EMA rate; Muon's AdamW part
muon_momentum = 0.95  # Muon only: Nesterov momentum of its hidden matrices
precondition_frequency = 10  # SOAP only: steps between refreshes of its preconditioner's eigenbasis
grad_clip = 1.0  # clip the gradient to this global norm (0 disables)
rho = 0.05  # Sophia only (others ignore it): clipping scale gamma (paper: 0.05 Sophia-G, 0.01 Sophia-H)
hess_interval = 10  # Sophia only (others ignore it): steps between Hessian estimates (k)
hess_batch_size = 240  # Sophia only (others ignore it): sequences in each Hessian estimate, over all ranks
optimizer_impl = "auto"  # Sophia's update: 'auto' (compiled when compile=True, else foreach), 'foreach', 'compiled'
hess_estimator = "auto"  # Sophia's estimator: 'auto' (sophiag: 'gnb', sophiah: 'hutchinson'); ablations: 'empirical_fisher', 'adahessian'
hessian_vector_product = "finite_difference"  # Hutchinson/adahessian: 'finite_difference' (2 passes of the training model) or 'exact'
sophia_clip = True  # Sophia's per-coordinate clip to [-1, 1]; False only for the no-clipping ablation
# learning rate schedule
decay_lr = True  # linear warmup then lr_schedule's decay; False keeps learning_rate constant
lr_schedule = "cosine"  # 'cosine' (to min_lr at lr_decay_iters) or 'wsd' (constant, then 1-sqrt decay to min_lr)
decay_fraction = 0.2  # 'wsd' only: the decay takes this last fraction of lr_decay_iters
warmup_iters = 2000  # steps of linear warmup
lr_decay_iters = 100000  # step at which the schedule reaches min_lr (usually max_iters); a resume uses the value given
min_lr = 3e-5  # final learning rate (paper: 0.05 x peak)
# system
device = "auto"  # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 on GPUs that have it, else float16; float32 on CPU), or explicit
compile = True  # torch.compile the model
memory_check = True  # refuse a run whose estimated memory exceeds what the device has free (False: try anyway)
fsdp = False  # shard parameters, gradients and optimizer state over ranks (FSDP2) instead of DDP
seed = 1337  # seeds model init, data order and the estimator's random draws
# -----------------------------------------------------------------------------
DEFAULTS = configurator.read_defaults(__file__)


class Config(dict):
    """The run's resolved settings: a dict (config.json and checkpoints save it) whose keys read
    as attributes; a missing one is an AttributeError, so hasattr, copy and pickle work."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no setting {key!r}") from None


def wsd_decay_start(cfg: Config) -> int:
    """The step at which lr_schedule='wsd' leaves the peak for its decay."""
    return cfg.lr_decay_iters - round(cfg.decay_fraction * cfg.lr_decay_iters)


def validate(cfg: Config, world_size: int) -> None:
    """Checks the config before anything is built or written; raises UserError."""
    if cfg.optimizer_name not in REGISTRY:
        raise UserError(f"optimizer_name={cfg.optimizer_name!r} is unknown; choose one of {', '.join(REGISTRY)}")
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
    if cfg.optimizer_impl not in ("auto", *SOPHIA_IMPLEMENTATIONS):
        raise UserError(f"optimizer_impl={cfg.optimizer_impl!r} is unknown; choose one of auto, "
                        f"{', '.join(SOPHIA_IMPLEMENTATIONS)}")
    if cfg.hess_estimator not in ("auto", *ESTIMATORS):
        raise UserError(f"hess_estimator={cfg.hess_estimator!r} is unknown; choose one of auto, "
                        f"{', '.join(ESTIMATORS)}")
    entry = REGISTRY[cfg.optimizer_name]
    sophia = entry.estimator is not None
    if cfg.hess_estimator != "auto" and not sophia:
        raise UserError(f"hess_estimator={cfg.hess_estimator!r} is for Sophia, not optimizer_name="
                        f"{cfg.optimizer_name!r}; use --optimizer_name=sophiag or sophiah, or drop hess_estimator")
    if cfg.fsdp and entry.fsdp_refusal:
        raise UserError(f"fsdp=True does not work with optimizer_name={cfg.optimizer_name!r}: {entry.fsdp_refusal}; "
                        f"use DDP (--fsdp=False)")
    if cfg.hessian_vector_product not in HESSIAN_VECTOR_PRODUCTS:
        raise UserError(f"hessian_vector_product={cfg.hessian_vector_product!r} is unknown; choose one of "
                        f"{', '.join(HESSIAN_VECTOR_PRODUCTS)}")
    if cfg.fsdp and sophia and estimator_of(cfg) in SECOND_ORDER and cfg.hessian_vector_product == "exact":
        raise UserError(f"fsdp=True does not work with hessian_vector_product='exact' (the {estimator_of(cfg)} "
                        "estimator): it differentiates twice with respect to the parameters, which FSDP2 replaces "
                        "by gathered copies during the forward; use --hessian_vector_product=finite_difference, "
                        "or DDP (--fsdp=False)")
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


def parse(argv: list[str], root: Path | None = None) -> Config:
    """The config of a run's arguments (config files and --key=value), not yet checked; config
    files are relative to `root` (default: the working directory). Raises UserError; --help
    prints every key and exits."""
    if root is not None:
        argv = [a if a.startswith("-") else str(root / a) for a in argv]
    return Config(configurator.parse(DEFAULTS, argv, help_source=__file__, command="python train.py"))


def resolve(argv: list[str], world_size: int = 1, root: Path | None = None) -> Config:
    """The checked config of a run's arguments, as train.py runs it on `world_size` ranks."""
    config = parse(argv, root)
    validate(config, world_size)
    return config

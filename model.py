"""GPT-2 in one file, with nanoGPT's architecture and parameter names.

The parameter names match nanoGPT's, so OpenAI/Hugging Face GPT-2 weights map onto
this model one to one (`GPT.from_pretrained`). Attention goes through
`F.scaled_dot_product_attention` (flash kernels on GPU); sophia.math_attention() forces the
plain math kernel where a double backward needs it.
"""

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from errors import UserError


def hf_progress_bars_on_terminal_only() -> None:
    """transformers' and the Hub's progress bars (downloading, loading, saving weights) on a
    terminal only: a log file gets none."""
    if not sys.stderr.isatty():
        from transformers.utils import logging
        logging.disable_progress_bar()


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as in GPT-2
    # Scale attention scores by 1/(layer index + 1) (Sophia paper, App. C.2): keeps AdamW
    # and Lion stable on models larger than 355M.
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_embd as a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        head_dim = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # OpenAI's GPT-2 sizes, for from_pretrained.
    PRETRAINED = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    }

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embeddings are left out by default because
        they do no multiplications (the token embedding counts: it is the tied lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits, loss).

        logits cover every position, shape (B, T, vocab_size); with `last_only=True`
        only the last position, shape (B, 1, vocab_size), which is all `generate` needs.
        loss is the mean cross-entropy against `targets` (positions with target -1 are
        ignored), or None without targets.
        """
        _, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, [-1], :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length, e.g. to fine-tune GPT-2 (1024) at a smaller block."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type: str, override_args: dict | None = None) -> "GPT":
        """Load OpenAI's GPT-2 weights through Hugging Face `transformers` (optional
        dependency): from the local Hugging Face cache when they are there, so a compute
        node without network can use weights downloaded once, and from the Hub otherwise."""
        if model_type not in cls.PRETRAINED:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(cls.PRETRAINED)}")
        override_args = override_args or {}
        if set(override_args) - {"dropout"}:
            raise ValueError("only dropout can be overridden when loading GPT-2 weights")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("from_pretrained needs `pip install transformers`") from e
        hf_progress_bars_on_terminal_only()
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(model_type, local_files_only=True)
        except OSError:
            try:
                hf_model = GPT2LMHeadModel.from_pretrained(model_type)
            except OSError as e:
                raise OSError(f"the {model_type} weights are neither in the Hugging Face cache nor reachable on the Hub; "
                              f"load them once where there is network (GPT2LMHeadModel.from_pretrained('{model_type}')) "
                              f"and copy the cache (HF_HOME) here") from e
        config = GPTConfig(**cls.PRETRAINED[model_type], vocab_size=50257, block_size=1024, bias=True,
                           **override_args)
        model = cls(config)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, sd_hf: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face GPT2LMHeadModel state dict into this model. HF stores the
        attention and MLP weights as Conv1D, i.e. transposed relative to nn.Linear."""
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = self.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.masked_bias", ".attn.bias"))]
        if len(keys) != len(sd):
            raise ValueError(f"state dict mismatch: {len(keys)} Hugging Face tensors, {len(sd)} here")
        with torch.no_grad():
            for k in keys:
                src = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                if src.shape != sd[k].shape:
                    raise ValueError(f"shape mismatch for {k}: {tuple(src.shape)} vs {tuple(sd[k].shape)}")
                sd[k].copy_(src)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices (matmul weights and embeddings) only; none on biases
        and LayerNorm gains. Every optimizer gets the same split."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter: int, dt: float, device: torch.device | str | None = None
                     ) -> float | None:
        """Model FLOPs utilisation of one iteration that processed `tokens_per_iter`
        tokens in `dt` seconds, against the bf16 dense peak of the device (None when the
        device's peak is unknown, e.g. a CPU)."""
        peak = peak_flops(device)
        if peak is None or dt <= 0:
            return None
        return self.flops_per_token() * tokens_per_iter / dt / peak

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after the context `idx` (B, T)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond, last_only=True)
            logits = logits[:, -1, :]
            if temperature == 0.0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def training_memory(config: GPTConfig, batch_size: int, activation_bytes: int, state_bytes: float,
                    shards: int = 1) -> dict[str, int]:
    """Bytes one rank needs to train this model, estimated from the shapes alone (the model is
    built on the meta device: nothing is allocated): float32 weights and gradients and the
    optimizer's state (`state_bytes` per parameter), each divided over `shards` (FSDP2), and
    what autograd keeps of one micro-batch: 17 values per layer, hidden unit and token
    (Korthikanti et al. 2022, "Reducing Activation Recomputation", with fused attention, which
    keeps no T x T scores) plus the logits, their float32 softmax and its gradient. The
    allocator, the framework and the data add their own."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(config).parameters())
    tokens = batch_size * config.block_size
    return {"params": params, "weights": 4 * params // shards, "gradients": 4 * params // shards,
            "optimizer state": int(state_bytes * params) // shards,
            "activations": tokens * (17 * config.n_layer * config.n_embd * activation_bytes
                                     + config.vocab_size * (activation_bytes + 8))}


# bf16 dense tensor-core peak FLOP/s, by model name (a whole word of torch.cuda.get_device_name()).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
    "V100": 125e12,  # fp16: V100 has no bf16
}
# Other GPUs: MFU against an A100, as nanoGPT reports it (train.py prints the peak it uses).
FALLBACK_PEAK_FLOPS = PEAK_FLOPS["A100"]


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device from PEAK_FLOPS (FALLBACK_PEAK_FLOPS for GPUs not in
    the table), None for CPUs and other devices."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_FLOPS.items() if re.search(rf"\b{k}\b", name)), FALLBACK_PEAK_FLOPS)


def model_to_train(cfg, out_dir: Path, meta: dict, checkpoint: dict | None) -> tuple[GPT, dict]:
    """The model a training run starts from and its GPTConfig arguments: the checkpoint's (whose
    shape must be the config's), GPT-2's weights (init_from='gpt2*'), or a fresh one. `cfg` is
    train.py's config (attribute access)."""
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=cfg.bias, vocab_size=None, dropout=cfg.dropout,
                      scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx)
    if checkpoint is not None:
        saved = checkpoint["model_args"]
        changed = {k: (saved[k], model_args[k]) for k in model_args
                   if k not in ("vocab_size", "dropout") and saved.get(k) != model_args[k]}
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
        return model, model_args
    if cfg.init_from.startswith("gpt2"):
        try:
            model = GPT.from_pretrained(cfg.init_from, dict(dropout=cfg.dropout))
        except (ImportError, OSError) as e:  # no transformers, or the weights cannot be fetched
            raise UserError(f"init_from={cfg.init_from!r}: cannot load the GPT-2 weights ({e})") from e
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        return model, {k: getattr(model.config, k) for k in model_args}
    model_args["vocab_size"] = meta.get("vocab_size", 50304) if meta.get("tokenizer") == "char" else 50304
    return GPT(GPTConfig(**model_args)), model_args

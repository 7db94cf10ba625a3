"""Checkpoints: atomic, self-verifying writes, reading the latest good one, pruning, RNG state,
FSDP2's full state dicts, and loading a trained model (or GPT-2's weights) to run.

A checkpoint out_dir/ckpt_<step>.pt is one torch.save'd dict: the model and optimizer state
dicts (always unsharded, so a sharded run resumes unsharded and back), the training progress,
every rank's RNG states, the config, the model's shape, the dataset's tokenizer (meta), and
"checksums": a CRC-32 of every tensor's bytes and one of everything else, so damage that
torch.load cannot see (bytes changed inside a tensor) is found on reading, like a truncation.
"""

import os
import random
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from errors import UserError
from model import GPT, GPTConfig
from paths import no_space
from tokenizer import check_meta, gpt2_encoding, load_tokenizer

REQUIRED = ("model", "optimizer", "scaler", "model_args", "iter_num", "tokens", "best_val_loss", "config", "meta")


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every floating-point tensor (of a DTensor, this rank's shard) is finite on every
    rank: one pass over them and one host sync; a collective under torch.distributed."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in local]).all().float()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoints in out_dir, oldest first (by the step number in their names)."""
    return sorted(Path(out_dir).glob("ckpt_*.pt"), key=step_of)


def step_of(path: Path) -> int:
    """The step of a checkpoint from its name ckpt_<step>.pt (-1 for another name)."""
    digits = path.name[len("ckpt_"):-len(".pt")]
    return int(digits) if digits.isdigit() else -1


def checksums(state: dict) -> dict[str, int]:
    """A CRC-32 of each tensor's bytes (with its dtype and shape) by its path in `state`
    ("model/lm_head.weight"), and under "" one of every other value's repr, in order. A
    tensor on a device is read to the CPU for it."""
    sums, rest = {}, 0

    def visit(path: str, value) -> None:
        nonlocal rest
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            head = f"{t.dtype}{tuple(value.shape)}".encode()
            sums[path] = zlib.crc32(t.view(torch.uint8).numpy(), zlib.crc32(head))
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{path}/{k}", v)
        elif isinstance(value, (list, tuple)):
            rest = zlib.crc32(f"{path}:{type(value).__name__}{len(value)};".encode(), rest)
            for i, v in enumerate(value):
                visit(f"{path}/{i}", v)
        else:
            rest = zlib.crc32(f"{path}={value!r};".encode(), rest)

    for key, value in state.items():
        if key != "checksums":
            visit(key, value)
    return {"": rest, **sums}


def verify(checkpoint: dict, path: Path) -> None:
    """UserError naming the first part of the checkpoint whose checksum differs from the one
    saved with it. A checkpoint saved before checksums existed is taken as it is."""
    saved = checkpoint.get("checksums")
    if saved is None:
        return
    found = checksums(checkpoint)
    if found != saved:
        part = next(k for k in [*found, *saved] if saved.get(k) != found.get(k))
        raise UserError(f"checkpoint {path} fails its checksum ({part or 'the values besides tensors'} changed "
                        f"since it was written): it is damaged")


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write ckpt_<step>.pt with its checksums atomically (temporary file, fsync, read back and
    verified, rename, fsync of the folder), so a crash at any moment leaves every earlier
    checkpoint intact; then prune. A full disk (or quota, or a read-only file system) is a
    UserError, and the temporary file is removed."""
    path = out_dir / f"ckpt_{state['iter_num']:08d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    state = {**state, "checksums": checksums(state)}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        read_checkpoint(tmp)
        os.replace(tmp, path)
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = no_space(e, out_dir, f"checkpoint {path.name}", state_bytes(state))
        if full:
            raise full from None
        raise
    prune(out_dir, path, keep)
    return path


def state_bytes(state) -> int:
    """The bytes of the tensors in `state`: about the size of its checkpoint."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def prune(out_dir: Path, written: Path, keep: int) -> None:
    """Delete, by step number, all but the `keep` latest checkpoints up to the one this run has
    just written and verified (`written`, which is kept). A newer file than it is never
    touched: a run only writes after setting aside (set_aside_damaged) every checkpoint newer
    than the one it resumed from, so one would be another's."""
    upto = [p for p in checkpoints(out_dir) if step_of(p) <= step_of(written)]
    for old in upto[:-keep]:
        old.unlink()


def remove_partial_saves(out_dir: Path) -> None:
    """Delete the temporary files of saves that a crash interrupted."""
    for stale in Path(out_dir).glob("ckpt_*.pt.tmp"):
        stale.unlink()


def read_checkpoint(path: Path) -> dict:
    """Load one checkpoint (weights_only: a checkpoint cannot run code) and verify its checksums;
    UserError if it is damaged or not one of ours. The tensors stay memory-mapped on the CPU,
    so the ranks of a large sharded run neither copy the whole file into their own memory nor
    onto their GPU; loading them into the model and optimizer moves what each rank holds to
    its device."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it is damaged or not "
                        f"a checkpoint of this project") from e
    lacking = [k for k in REQUIRED if k not in checkpoint] if isinstance(checkpoint, dict) else list(REQUIRED)
    if lacking:
        raise UserError(f"{path} is not a checkpoint of this project (no {', '.join(lacking)}); "
                        f"use a new --out_dir")
    verify(checkpoint, path)
    return checkpoint


def load_latest_checkpoint(out_dir: Path) -> tuple[dict, Path]:
    """The newest checkpoint in out_dir that reads and verifies, and its path; a damaged newer
    one (a disk that lost the end of a file, or changed bytes inside it) is reported and
    skipped."""
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
        return checkpoint, path
    raise damaged[0]


def set_aside_damaged(out_dir: Path, resumed: Path) -> None:
    """Rename every checkpoint newer than `resumed` (load_latest_checkpoint skipped them: they
    are damaged) to <name>.damaged, saying so, so that no later save or prune mistakes one for
    a good checkpoint and the damaged file stays for a look. Call it holding out_dir's lock."""
    for path in checkpoints(out_dir):
        if step_of(path) > step_of(resumed):
            aside = path.with_name(path.name + ".damaged")
            path.rename(aside)
            print(f"moved the damaged checkpoint {path.name} aside to {aside.name}; it is kept, never read again",
                  file=sys.stderr)


def load_trained_model(out_dir: str | Path) -> tuple[GPT, dict]:
    """The model of out_dir's latest checkpoint (eval mode, CPU) and the meta of its dataset
    (the tokenizer); for sample.py and the scripts."""
    checkpoint, path = load_latest_checkpoint(Path(out_dir))
    meta = check_meta(checkpoint["meta"], f"the dataset meta.json saved in {path}")
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    vocab_size = model.config.vocab_size
    if meta["vocab_size"] > vocab_size or (meta["tokenizer"] == "char" and meta["vocab_size"] != vocab_size):
        raise UserError(f"{path} holds a model of {vocab_size} tokens for a {meta['tokenizer']} tokenizer of "
                        f"{meta['vocab_size']}: the ids it generates could not be decoded")
    model.load_state_dict(checkpoint["model"])
    return model.eval(), meta


def load_model(cfg: dict) -> tuple[GPT, Callable[[str], list[int]], Callable[[list[int]], str]]:
    """A model to run, not train, and its tokenizer's (encode, decode): the latest checkpoint in
    cfg's out_dir (init_from='resume', the tokenizer of its dataset), or OpenAI's GPT-2 weights
    (init_from='gpt2*', GPT-2's BPE)."""
    if cfg["init_from"] != "resume":
        try:
            model = GPT.from_pretrained(cfg["init_from"])
        except (ImportError, OSError, ValueError) as e:
            raise UserError(f"init_from={cfg['init_from']!r}: cannot load GPT-2 weights ({e})") from e
        enc = gpt2_encoding()
        return model, lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}), enc.decode
    model, meta = load_trained_model(cfg["out_dir"])
    encode, decode = load_tokenizer(meta)
    return model, encode, decode


# ----------------------------------------------------------------------------- RNG state

def rng_state(generators: dict) -> dict:
    """This process's global RNG states (Python, NumPy, torch CPU and CUDA) and those of
    `generators` (anything with get_state/set_state: a torch.Generator, dataset.Batches), as
    tensors and plain values that a weights_only load accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        **{name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    """Restore what rng_state saved; a generator the checkpoint does not hold keeps its state."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].cpu().numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    for name, g in generators.items():
        if name in state:
            g.set_state(state[name].cpu())


# ----------------------------------------------------------------------------- FSDP2

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
    if hasattr(optimizer, "stats"):
        # Sophia: set_optimizer_state_dict creates the state with one zero-lr step first; forget
        # its win-rate counts (stats() is a collective here too: every rank calls it).
        optimizer.stats(reset=True)

"""Log-likelihood scoring of text continuations by a language model: this repository's GPT (a
checkpoint) or a Hugging Face GPT-2 directory (an export). The downstream evaluations
(scripts/eval_downstream.py, scripts/eval_hellaswag.py) share it."""

import gzip
import json
import sys
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch.nn import functional as F
from tqdm import tqdm

from checkpoint import load_trained_model
from devices import placement
from errors import UserError
from model import hf_progress_bars_on_terminal_only
from tokenizer import gpt2_encoding, load_tokenizer

if TYPE_CHECKING:  # imported where used: scoring a checkpoint needs no transformers
    from transformers import PreTrainedModel

    from model import GPT


class LogLikelihood(Protocol):
    """log p(continuation | context) for each (context, continuation) request."""

    def __call__(self, requests: Sequence[tuple[str, str]], desc: str = "") -> list[float]: ...


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file, plain or gzip-compressed (told by its first bytes, not its name)."""
    if not path.is_file():
        raise UserError(f"{path} not found; --data_dir needs <task>/train.jsonl and <task>/val.jsonl")
    data = path.read_bytes()
    try:
        text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} is a damaged gzip file ({e}); fetch it again") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): not a "
                        f"JSON Lines file, or an archive other than gzip; give the .jsonl (or .jsonl.gz)") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg})") from None
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


class ModelScorer:
    """LogLikelihood of a causal LM given as `forward(ids (B, T)) -> logits (B, T, V)`.
    Requests go longest first in right-padded batches (causal attention: the padding after
    a position cannot change its logits); a request longer than block_size + 1 tokens is cut
    from the left."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
                 block_size: int, batch_size: int = 8, device: str = "cpu", autocast=None):
        self.forward, self.encode, self.block_size = forward, encode, block_size
        self.batch_size, self.device = batch_size, device
        self.autocast = autocast or nullcontext()
        self.truncated = 0.0  # fraction of the latest call's requests that were cut

    def __call__(self, requests: Sequence[tuple[str, str]], desc: str = "") -> list[float]:
        encoded, cut = [], 0
        for context, continuation in requests:
            try:
                ctx, cont = self.encode(context), self.encode(continuation)
            except ValueError as e:  # a character-level vocabulary
                raise UserError(f"{desc}: the text cannot be encoded with the model's tokenizer ({e})") from None
            tokens = ctx + cont
            cut += len(tokens) > self.block_size + 1
            encoded.append((tokens[-(self.block_size + 1):], len(cont)))
        self.truncated = cut / max(1, len(requests))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        results = [0.0] * len(encoded)
        with torch.no_grad(), tqdm(total=len(encoded), desc=desc, unit="req", disable=not sys.stderr.isatty()) as bar:
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                x = torch.zeros((len(batch), len(encoded[batch[0]][0]) - 1), dtype=torch.long)
                for row, i in enumerate(batch):
                    inputs = encoded[i][0][:-1]
                    x[row, :len(inputs)] = torch.tensor(inputs)
                with self.autocast:
                    logits = self.forward(x.to(self.device))
                for row, i in enumerate(batch):
                    tokens, n_cont = encoded[i]
                    end = len(tokens) - 1  # logits at positions end - n_cont ... end - 1 predict the answer
                    logprobs = F.log_softmax(logits[row, end - n_cont:end].float(), dim=-1)
                    targets = torch.tensor(tokens[-n_cont:], device=logprobs.device)
                    results[i] = logprobs.gather(1, targets[:, None]).sum().item()
                bar.update(len(batch))
        return results


def gpt_scorer(model: "GPT", encode: Callable[[str], list[int]], cfg: dict) -> ModelScorer:
    """The scorer of one of this repository's models on cfg's device and dtype. Log-probabilities
    are over the tokenizer's vocabulary, as in an export and in llm.c: train.py pads GPT-2's
    50257 ids to 50304, and the padding's logits would otherwise take probability mass
    (character vocabularies are far smaller and not padded)."""
    vocab = min(model.config.vocab_size, gpt2_encoding().n_vocab)
    dev, mixed = placement(cfg["device"], cfg["dtype"])
    model.eval().to(dev)
    return ModelScorer(lambda x: model(x)[0][..., :vocab], encode, model.config.block_size, cfg["batch_size"],
                       dev, mixed)


def load_scorer(cfg: dict) -> tuple[ModelScorer, str]:
    """The scorer of the model the config names (--hf_dir, else --out_dir) and its name."""
    if not cfg["hf_dir"]:
        model, meta = load_trained_model(cfg["out_dir"])
        return gpt_scorer(model, load_tokenizer(meta)[0], cfg), cfg["out_dir"]
    dev, mixed = placement(cfg["device"], cfg["dtype"])
    model, encode, block_size = load_hf(Path(cfg["hf_dir"]))
    model.to(dev)
    return ModelScorer(lambda x: model(input_ids=x).logits, encode, block_size, cfg["batch_size"], dev,
                       mixed), cfg["hf_dir"]


def load_hf(hf_dir: Path) -> tuple["PreTrainedModel", Callable[[str], list[int]], int]:
    """(GPT2LMHeadModel in eval mode, encode, context length) of a Hugging Face directory;
    the tokenizer is its HF tokenizer or export_hf.py's char_vocab.json."""
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} is not a Hugging Face model directory (no config.json); "
                        f"export one with scripts/export_hf.py")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    hf_progress_bars_on_terminal_only()
    logging.set_verbosity_error()  # not its warning of over-long inputs: the scorer tells of cut contexts itself
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
        char_vocab = hf_dir / "char_vocab.json"
        if char_vocab.is_file():
            encode = load_tokenizer(json.loads(char_vocab.read_text()), str(char_vocab))[0]
        else:
            tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
            encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    except (OSError, ValueError) as e:  # a damaged or partial directory (JSONDecodeError is a ValueError)
        raise UserError(f"cannot load the model in {hf_dir} ({str(e).splitlines()[0]}); "
                        f"export it again with scripts/export_hf.py") from e
    return model, encode, model.config.n_positions

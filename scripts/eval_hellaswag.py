"""HellaSwag (Zellers et al. 2019), completion style as llm.c scores it: acc and acc_norm.

    python -m scripts.eval_hellaswag --out_dir=out-gpt2-small-sophiag --data=hellaswag_val.jsonl
    python -m scripts.eval_hellaswag --init_from=gpt2 --data=hellaswag_val.jsonl --limit=1000
    python -m scripts.eval_hellaswag --hf_dir=hf-gpt2-small-sophiag --data=hellaswag_val.jsonl

Data: the official validation split, data/hellaswag_val.jsonl of github.com/rowanz/hellaswag
(10,042 examples), from a local path: nothing is downloaded. One JSON object a line, with
`ctx` (the context), `endings` (4 candidate endings) and `label` (the right one, 0-3; a
string such as "3", as in Hugging Face's copy, is accepted); other fields are ignored.

Scoring, as llm.c's dev/data/hellaswag.py: the context is `ctx` as it stands, each ending is
preceded by a space and tokenized on its own, after the context's tokens, and scored by the
model's log-likelihood of its tokens given the context. `acc` is the fraction of examples
whose right ending has the largest sum, `acc_norm` the fraction whose right ending has the
largest mean per token (ties go to the first ending). llm.c reports acc 0.2859 and acc_norm
0.2955 for OpenAI's GPT-2 (124M) on the 10,042 examples this way (not rerun here). nanochat's
CORE metric picks by the same mean per token, but after a BOS token and with the context and
ending tokenized together. EleutherAI's lm-eval `hellaswag` task renders the context from
activity_label, ctx_a and ctx_b with some clean-up, and its acc_norm divides by the ending's
length in characters, so its numbers differ (llm.c: 0.2892 / 0.3114 for GPT-2 124M).

A context and ending longer than the model's context (block_size + 1 tokens: the first token
is only conditioned on) lose context tokens from the left; the number of examples cut is
printed once and reported. An ending longer than block_size tokens is an error. The
log-probabilities are over the tokenizer's vocabulary (GPT-2's 50257 ids, not the 50304 that
train.py pads it to), as in llm.c, so a checkpoint and its export_hf.py export score alike.

The file may be gzip-compressed (hellaswag_val.jsonl.gz). Output: one summary line on stdout;
--output=FILE.json also writes the scores of every example.
"""

import json
import sys
from pathlib import Path

import configurator
from errors import UserError, exit_on_user_error
from checkpoint import load_model
from paths import writable_file, write_output
from scoring import ModelScorer, gpt_scorer, load_scorer, read_jsonl

init_from = "resume"  # 'resume' (the checkpoint in out_dir) or OpenAI's 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'
out_dir = "out"  # the training run to evaluate (its latest checkpoint), with init_from='resume'
hf_dir = ""  # evaluate this Hugging Face GPT-2 directory (e.g. from export_hf.py) instead
data = ""  # the HellaSwag jsonl file, e.g. hellaswag_val.jsonl of github.com/rowanz/hellaswag
limit = 0  # score only the first `limit` examples (0: all)
batch_size = 16  # sequences per forward pass (4 per example)
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
dtype = "float32"  # 'float32', or 'bfloat16'/'auto' for speed on GPUs (near-ties may then flip)
output = ""  # also write everything, with each example's scores, to this JSON file ('': none)
DEFAULTS = {k: globals()[k] for k in configurator.config_keys(dict(globals()))}

NUM_ENDINGS = 4


def label_of(value) -> int:
    """The label as an index 0-3: an integer, or its string as in Hugging Face's copy."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or not 0 <= value < NUM_ENDINGS:
        raise ValueError(f"label {value!r} is not 0-{NUM_ENDINGS - 1} (the test split has no labels: use val)")
    return value


def read_examples(path: str) -> list[dict]:
    """The examples of a HellaSwag jsonl file, each checked: ctx, 4 endings (text) and a label."""
    if not path:
        raise UserError("no --data given; point it at hellaswag_val.jsonl (github.com/rowanz/hellaswag, data/)")
    if not Path(path).is_file():
        raise UserError(f"{path} not found; download hellaswag_val.jsonl from github.com/rowanz/hellaswag (data/) "
                        "and give its path with --data")
    examples = read_jsonl(Path(path))
    for i, ex in enumerate(examples):
        try:
            if not isinstance(ex, dict):
                raise ValueError(f"a JSON {type(ex).__name__}, not an object")
            missing = [k for k in ("ctx", "endings", "label") if k not in ex]
            if missing:
                raise ValueError(f"no field {', '.join(missing)}")
            if not isinstance(ex["ctx"], str) or not ex["ctx"]:
                raise ValueError("ctx is not a non-empty string")
            endings = ex["endings"]
            if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS
                    and all(isinstance(e, str) for e in endings)):
                raise ValueError(f"endings is not a list of {NUM_ENDINGS} strings")
            label_of(ex["label"])
        except ValueError as e:
            raise UserError(f"{path} example {i} is not a HellaSwag example: {e}") from None
    return examples


def load(cfg: dict) -> tuple[ModelScorer, str]:
    """The scorer of the model the config names (--hf_dir, else --init_from / --out_dir) and its name."""
    if cfg["hf_dir"]:
        return load_scorer(cfg)
    model, encode, _ = load_model(cfg)
    source = cfg["out_dir"] if cfg["init_from"] == "resume" else cfg["init_from"]
    return gpt_scorer(model, encode, cfg), source


def evaluate(score: ModelScorer, examples: list[dict]) -> dict:
    """acc, acc_norm, the number of examples cut to fit, and every example's scores."""
    lengths = []  # (context tokens, [tokens of each ending]) per example
    for i, ex in enumerate(examples):
        try:
            lengths.append((len(score.encode(ex["ctx"])), [len(score.encode(" " + e)) for e in ex["endings"]]))
        except ValueError as e:  # a character-level vocabulary
            raise UserError(f"example {i} cannot be encoded with the model's tokenizer ({e})") from None
        if max(lengths[-1][1]) > score.block_size:
            raise UserError(f"example {i} has an ending of {max(lengths[-1][1])} tokens, more than the model's "
                            f"block_size {score.block_size}: it cannot be scored")
    sums = score([(ex["ctx"], " " + e) for ex in examples for e in ex["endings"]], desc="hellaswag")
    results = []
    for i, (ex, (n_ctx, n_endings)) in enumerate(zip(examples, lengths)):
        sum_logprob = sums[i * NUM_ENDINGS:(i + 1) * NUM_ENDINGS]
        mean_logprob = [s / n for s, n in zip(sum_logprob, n_endings)]
        results.append({"label": label_of(ex["label"]),
                        "pred": max(range(NUM_ENDINGS), key=sum_logprob.__getitem__),
                        "pred_norm": max(range(NUM_ENDINGS), key=mean_logprob.__getitem__),
                        "sum_logprob": sum_logprob, "num_tokens": n_endings,
                        "truncated": n_ctx + max(n_endings) > score.block_size + 1})
    n = len(results)
    return {"examples": n,
            "acc": sum(r["pred"] == r["label"] for r in results) / n,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in results) / n,
            "truncated": sum(r["truncated"] for r in results),
            "per_example": results}


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Score, print the summary line, write --output; returns the report."""
    cfg = configurator.parse(DEFAULTS, sys.argv[1:] if argv is None else argv, help_source=__file__)
    for key, low in (("batch_size", 1), ("limit", 0)):
        if cfg[key] < low:
            raise UserError(f"{key}={cfg[key]} must be at least {low}")
    if cfg["output"]:
        writable_file(cfg["output"], "--output")  # before the evaluation, not after
    examples = read_examples(cfg["data"])
    examples = examples[:cfg["limit"]] if cfg["limit"] else examples
    scorer, source = load(cfg)
    result = evaluate(scorer, examples)
    if result["truncated"]:
        print(f"note: {result['truncated']} of {result['examples']} examples had their context cut from the left "
              f"to fit block_size {scorer.block_size}", file=sys.stderr)
    report = {"model": source, "data": cfg["data"], "limit": cfg["limit"], **result}
    print(f"hellaswag {source}: acc {report['acc']:.4f} acc_norm {report['acc_norm']:.4f} "
          f"({report['examples']} examples, {report['truncated']} cut to fit)")
    if cfg["output"]:
        write_output(Path(cfg["output"]), json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()

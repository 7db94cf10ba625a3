"""Few-shot SuperGLUE evaluation the Sophia paper's way (App. C.3, Fig. 11).

    python -m scripts.eval_downstream --out_dir=out-gpt2-small --data_dir=superglue
    python -m scripts.eval_downstream --hf_dir=hf-gpt2-small --data_dir=superglue --tasks=rte,cb

Protocol (paper App. C.3): BoolQ, RTE, CB and COPA; each prompt is the task's instruction,
2 exemplars drawn from the train split, then the validation example, in Fig. 11's
format; accuracy on the validation split, averaged over 5 draws of the exemplars. A draw is
one pair of train examples used for every validation example (seeds seed, seed+1, ...):

    <instruction>

    <exemplar 1>
    Answer: <its answer>

    <exemplar 2>
    Answer: <its answer>

    <validation example>
    Answer:

Answers, from the instructions in Fig. 11: BoolQ and RTE "Yes"/"No"; CB "True"
(entailment), "False" (contradiction), "Neither" (neutral); COPA "Choice1"/"Choice2", the
context being the premise without its final period plus "because" (cause) or "so"
(effect), and the choices with a lower-case first letter, exactly as in the figure. Fig. 11
is not consistent with itself here: its CB exemplars are answered "No"/"Yes" although the
instruction asks for True/False/Neither (and neutral needs a third word), and its second
RTE exemplar is answered "None"; the instructions are followed (`answers` in TASKS below).

Scoring: the paper decodes greedily. Here each candidate answer (" Yes", " No", ...) is
scored by the model's log-likelihood after the prompt and the most likely one is the
prediction. Under GPT-2's BPE every candidate set is a shared prefix (none, or " Choice")
and then one distinguishing token (" Yes"/" No", " True"/" False"/" Neither", "1"/"2"), so
this is exactly greedy decoding with the output restricted to the label set; unrestricted
greedy decoding would score anything else the model says as wrong. (With a character-level
model the candidates differ over several tokens, and the sum of their log-likelihoods is the
usual multiple-choice rule rather than restricted greedy decoding.) A prompt longer than the
model's context is cut from the left, keeping the answer and the end of the prompt, and the
fraction of cut prompts is reported.

Data: local files only, `<data_dir>/<task>/train.jsonl` and `<task>/val.jsonl` (the task
folder in any case, so SuperGLUE's own BoolQ/, CB/, COPA/, RTE/ folders work as unzipped) with
SuperGLUE's field names (BoolQ: passage, question, label; RTE: premise, hypothesis, label
in {entailment, not_entailment}; CB: premise, hypothesis, label in {entailment,
contradiction, neutral}; COPA: premise, choice1, choice2, question in {cause, effect},
label 0/1). Integer labels as in the Hugging Face `super_glue` datasets are accepted too.

Why not EleutherAI's lm-eval harness (0.4.13 was tried): it runs custom prompts on local
jsonl files offline, but its few-shot sampler draws a fresh exemplar pair for every
validation example, while the paper's 5 draws are 5 fixed pairs; its `first_n` sampler
ignores `fewshot_indices`, so each (task, draw) would need its own generated task file and
train file. It would also add ~30 packages and ~20 s of start-up (on this machine) to a few hundred lines, and
the tests here want a fake model with chosen log-likelihoods. The prompts built here equal
lm-eval's for the same template (checked on RTE: the instruction as description, a blank line
between shots, a space before the answer).

Output: a Markdown table on stdout and in <output>.md, everything (per-draw accuracies,
exemplar indices, cut prompts) in <output>.json.
"""

import json
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import configurator
from errors import UserError, exit_on_user_error
from paths import writable_file, write_output
from scoring import LogLikelihood, load_scorer, read_jsonl

out_dir = "out"  # the training run to evaluate (its latest checkpoint)
hf_dir = ""  # evaluate this Hugging Face GPT-2 directory (e.g. from export_hf.py) instead of out_dir
data_dir = ""  # folder with <task>/train.jsonl and <task>/val.jsonl (SuperGLUE field names)
tasks = "boolq,rte,cb,copa"  # comma-separated tasks
num_fewshot = 2  # exemplars per prompt (paper: 2)
num_draws = 5  # exemplar draws averaged over (paper: 5)
seed = 0  # draw d uses seed + d
limit = 0  # evaluate only the first `limit` validation examples of each task (0: all)
batch_size = 8  # sequences per forward pass
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
dtype = "float32"  # 'float32', or 'bfloat16'/'auto' for speed on GPUs (near-ties may then flip)
output = ""  # results path without extension (.json and .md); default <out_dir>/eval_downstream or <hf_dir>-eval_downstream
DEFAULTS = {k: globals()[k] for k in configurator.config_keys(dict(globals()))}



def lower_first(s: str) -> str:
    """COPA's choices as Fig. 11 prints them: "I attended..." -> "i attended..."."""
    return s[:1].lower() + s[1:]


@dataclass(frozen=True)
class Task:
    instruction: str
    answers: tuple[str, ...]  # the answer strings, indexed by label
    labels: tuple  # SuperGLUE's label values, in the order of `answers`
    render: Callable[[dict], str]  # the example's text before "\nAnswer:"

    def label(self, example: dict) -> int:
        """Index into `answers` of the example's label: a SuperGLUE value, or the integer id
        of the Hugging Face `super_glue` datasets (same order; BoolQ's 1 is True)."""
        value = example["label"]
        if value in self.labels:
            return self.labels.index(value)
        if type(value) is int and 0 <= value < len(self.answers):
            return value
        raise ValueError(f"unknown label {value!r}")


TASKS = {
    "boolq": Task(
        "The context is a passages containing some information. Given a question about the context, use the "
        "information to answer the question with either 'Yes' or 'No'.",
        ("Yes", "No"), (True, False),
        lambda ex: f"Context: {ex['passage']} Question: {ex['question']}"),
    "rte": Task(
        "Given a premise and a hypothesis, answer whether the hypothesis follows from the premise with "
        "'Yes' or 'No'.",
        ("Yes", "No"), ("entailment", "not_entailment"),
        lambda ex: f"Context: {ex['premise']} Question: {ex['hypothesis']}"),
    "cb": Task(
        "Given a premise and a hypothesis, answer whether the hypothesis logically follows from the premise "
        "with 'True' or 'False' or 'Neither'.",
        ("True", "False", "Neither"), ("entailment", "contradiction", "neutral"),
        lambda ex: f"Context: {ex['premise']} Question: {ex['hypothesis']}"),
    "copa": Task(
        "Choose the correct ending for the context.",
        ("Choice1", "Choice2"), (0, 1),
        lambda ex: (f"Choice1: {lower_first(ex['choice1'])}\nChoice2: {lower_first(ex['choice2'])}\n"
                    f"Context: {ex['premise'].rstrip().removesuffix('.')} "
                    f"{'because' if ex['question'] == 'cause' else 'so'}")),
}


def build_prompt(task: Task, exemplars: Sequence[dict], query: dict) -> str:
    """The instruction, the exemplars with their answers, then the query up to "Answer:"."""
    shots = "".join(f"{task.render(ex)}\nAnswer: {task.answers[task.label(ex)]}\n\n" for ex in exemplars)
    return f"{task.instruction}\n\n{shots}{task.render(query)}\nAnswer:"


def task_folder(data_dir: str | Path, name: str) -> Path:
    """The folder of a task's train.jsonl and val.jsonl in data_dir, in any case (SuperGLUE's
    download has BoolQ/, CB/, COPA/, RTE/); data_dir/name when there is none."""
    return next((p for p in sorted(Path(data_dir).iterdir()) if p.is_dir() and p.name.lower() == name),
                Path(data_dir) / name)


def load_task_data(data_dir: str | Path, name: str) -> tuple[list[dict], list[dict]]:
    """(train, val) examples of a task, checked to have the fields and label it needs. The
    task's folder may be spelled as in the SuperGLUE download (BoolQ/, CB/, COPA/, RTE/)."""
    folder = task_folder(data_dir, name)
    train, val = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "val.jsonl")
    task = TASKS[name]
    for split, rows in (("train", train), ("val", val)):
        for i, ex in enumerate(rows):
            try:
                task.render(ex)
                task.label(ex)
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise UserError(f"{folder}/{split}.jsonl example {i} does not fit {name} ({type(e).__name__}: {e}); "
                                f"use SuperGLUE's field names") from None
    return train, val


def evaluate_task(score: LogLikelihood, name: str, train: Sequence[dict], val: Sequence[dict],
                  num_fewshot: int = 2, num_draws: int = 5, seed: int = 0) -> dict:
    """Accuracy of one task for each exemplar draw, their mean and (population) standard
    deviation; each draw is one set of `num_fewshot` train examples (random.Random(seed + d))
    shared by every val example."""
    task = TASKS[name]
    if len(train) < num_fewshot:
        raise UserError(f"{name}: {len(train)} train examples, fewer than num_fewshot={num_fewshot}")
    draws = [random.Random(seed + d).sample(range(len(train)), num_fewshot) for d in range(num_draws)]
    requests = [(build_prompt(task, [train[i] for i in draw], ex), " " + answer)
                for draw in draws for ex in val for answer in task.answers]
    scores = score(requests, desc=name)
    k = len(task.answers)
    per_draw = []
    for d in range(num_draws):
        correct = 0
        for j, ex in enumerate(val):
            options = scores[(d * len(val) + j) * k:(d * len(val) + j + 1) * k]
            correct += max(range(k), key=options.__getitem__) == task.label(ex)
        per_draw.append(correct / len(val))
    return {"accuracy": statistics.fmean(per_draw), "std": statistics.pstdev(per_draw),
            "per_draw": per_draw, "n_val": len(val), "exemplars": draws}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per task (accuracy in %, spread over draws, prompts cut), plus their average."""
    lines = ["| task | accuracy (%) | ± std over draws | per draw (%) | val examples | prompts cut |",
             "|---|---:|---:|---|---:|---:|"]
    for name, r in results.items():
        per_draw = ", ".join(f"{100 * a:.1f}" for a in r["per_draw"])
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['std']:.1f} | {per_draw} | {r['n_val']} "
                     f"| {100 * r['truncated']:.0f}% |")
    if len(results) > 1:
        mean = statistics.fmean(r["accuracy"] for r in results.values())
        lines.append(f"| average | {100 * mean:.1f} | | | | |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Evaluate, print the Markdown table, write <output>.json and .md; returns the JSON."""
    cfg = configurator.parse(DEFAULTS, sys.argv[1:] if argv is None else argv, help_source=__file__)
    names = [t.strip() for t in cfg["tasks"].split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(f"unknown task(s) {unknown or cfg['tasks']!r}; choose from {', '.join(TASKS)}")
    if not cfg["data_dir"]:
        raise UserError("no --data_dir given; point it at a folder with <task>/train.jsonl and <task>/val.jsonl")
    if not Path(cfg["data_dir"]).is_dir():
        raise UserError(f"data_dir={cfg['data_dir']!r} is not a directory; point it at a folder with "
                        f"<task>/train.jsonl and <task>/val.jsonl")
    for key in ("num_fewshot", "num_draws", "batch_size"):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be a positive integer")
    default_output = f"{Path(cfg['hf_dir'])}-eval_downstream" if cfg["hf_dir"] else str(Path(cfg["out_dir"]) / "eval_downstream")
    output = cfg["output"] or default_output
    for suffix in (".json", ".md"):  # before the evaluation, not after
        writable_file(output + suffix, "--output")
    data = {name: load_task_data(cfg["data_dir"], name) for name in names}
    scorer, source = load_scorer(cfg)
    results = {}
    for name, (train, val) in data.items():
        val = val[:cfg["limit"]] if cfg["limit"] > 0 else val
        results[name] = evaluate_task(scorer, name, train, val, cfg["num_fewshot"], cfg["num_draws"], cfg["seed"])
        results[name]["truncated"] = scorer.truncated
    table = markdown_table(results)
    print(table)
    report = {"model": source, "protocol": {k: cfg[k] for k in ("num_fewshot", "num_draws", "seed", "limit")},
              "answers": {name: TASKS[name].answers for name in names}, "tasks": results}
    write_output(Path(output + ".json"), json.dumps(report, indent=2) + "\n")
    write_output(Path(output + ".md"), table + "\n")
    return report


if __name__ == "__main__":
    main()

"""Specification of scripts/eval_downstream.py: the paper's 2-shot SuperGLUE prompts (App.
C.3, Fig. 11: instruction, exactly 2 train exemplars, the validation example), accuracy
averaged over 5 exemplar draws and computed right (fake models whose log-likelihoods the
tests choose), the batched scorer equal to a plain forward pass, a tiny trained model end to
end on the fixture in tests/fixtures/superglue, and one `error: ...` line (exit status 2)
for missing or malformed data."""

import contextlib
import io
import json
import shutil
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import train
import scoring
from model import GPT, GPTConfig

from scripts import eval_downstream as ed
from tests.helpers import BPE, CHAR, expect_one_line_error

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "superglue"
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4",
        "--eval_interval=4", "--eval_iters=1", "--gradient_accumulation_steps=1", "--device=cpu",
        "--compile=False", f"--dataset={CHAR}"]


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("char")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--out_dir={out_dir}"])
    return out_dir


class Recorder:
    """A fake model: records the requests, scores them with `rule(context, answer)`."""

    def __init__(self, rule=lambda context, answer: 0.0):
        self.rule, self.requests = rule, []

    def __call__(self, requests, desc=""):
        self.requests += requests
        return [self.rule(context, answer) for context, answer in requests]


def test_copa_prompt_is_figure_11s():
    train_rows = [
        {"premise": "The man had lipstick on his cheek.", "choice1": "The woman kissed him.",
         "choice2": "The woman made him blush.", "question": "cause", "label": 0},
        {"premise": "I made a resolution to eat a healthy diet.", "choice1": "I attended a yoga class.",
         "choice2": "I bought fruits and vegetables.", "question": "effect", "label": 1},
    ]
    query = {"premise": "The glass fell.", "choice1": "It broke.", "choice2": "It sang.", "question": "effect",
             "label": 0}
    assert ed.build_prompt(ed.TASKS["copa"], train_rows, query) == (
        "Choose the correct ending for the context.\n\n"
        "Choice1: the woman kissed him.\nChoice2: the woman made him blush.\n"
        "Context: The man had lipstick on his cheek because\nAnswer: Choice1\n\n"
        "Choice1: i attended a yoga class.\nChoice2: i bought fruits and vegetables.\n"
        "Context: I made a resolution to eat a healthy diet so\nAnswer: Choice2\n\n"
        "Choice1: it broke.\nChoice2: it sang.\nContext: The glass fell so\nAnswer:")


def test_cb_labels_are_the_instructions_true_false_neither():
    rows = [{"premise": "P.", "hypothesis": "h", "label": label} for label in ("entailment", "contradiction", "neutral")]
    prompt = ed.build_prompt(ed.TASKS["cb"], rows[1:], rows[0])
    assert prompt == ("Given a premise and a hypothesis, answer whether the hypothesis logically follows from the "
                      "premise with 'True' or 'False' or 'Neither'.\n\n"
                      "Context: P. Question: h\nAnswer: False\n\nContext: P. Question: h\nAnswer: Neither\n\n"
                      "Context: P. Question: h\nAnswer:")


def test_hugging_face_integer_labels_mean_the_same_as_superglue_strings():
    assert [ed.TASKS["boolq"].label({"label": v}) for v in (True, False, 1, 0)] == [0, 1, 0, 1]  # Yes, No
    assert [ed.TASKS["rte"].label({"label": v}) for v in ("entailment", "not_entailment", 0, 1)] == [0, 1, 0, 1]
    assert [ed.TASKS["cb"].label({"label": v}) for v in ("neutral", 2, "contradiction", 1)] == [2, 2, 1, 1]


@pytest.mark.parametrize("name", list(ed.TASKS))
def test_every_prompt_is_the_instruction_two_train_exemplars_and_the_query(name):
    train_rows, val_rows = ed.load_task_data(FIXTURE, name)
    task, fake = ed.TASKS[name], Recorder()
    result = ed.evaluate_task(fake, name, train_rows, val_rows)
    assert len(fake.requests) == 5 * len(val_rows) * len(task.answers)
    assert {answer for _, answer in fake.requests} == {" " + a for a in task.answers}
    for n, (context, _) in enumerate(fake.requests):
        draw = result["exemplars"][n // (len(val_rows) * len(task.answers))]
        query = val_rows[n // len(task.answers) % len(val_rows)]
        assert context.startswith(task.instruction + "\n\n")
        assert context.endswith("\n\n" + task.render(query) + "\nAnswer:")
        assert context.count("\nAnswer:") == 3
        shots = sorted((ex for ex in train_rows if task.render(ex) + "\nAnswer: " in context),
                       key=lambda ex: context.index(task.render(ex)))
        assert shots == [train_rows[i] for i in draw]  # this draw's exemplars, in its order
        assert not any(task.render(ex) in context for ex in val_rows if ex is not query)
    assert len(result["exemplars"]) == 5 and all(len(set(d)) == 2 for d in result["exemplars"])
    assert len({tuple(d) for d in result["exemplars"]}) > 1  # the draws differ


def test_accuracy_is_the_fraction_of_val_examples_whose_label_scores_highest():
    train_rows, val_rows = ed.load_task_data(FIXTURE, "boolq")  # val labels: True, False, True
    always_yes = ed.evaluate_task(Recorder(lambda c, a: 0.0 if a == " Yes" else -1.0), "boolq", train_rows, val_rows)
    assert always_yes["per_draw"] == [2 / 3] * 5 and always_yes["accuracy"] == pytest.approx(2 / 3)
    always_no = ed.evaluate_task(Recorder(lambda c, a: -0.5 if a == " No" else -3.0), "boolq", train_rows, val_rows)
    assert always_no["accuracy"] == pytest.approx(1 / 3)

    cb_train, cb_val = ed.load_task_data(FIXTURE, "cb")  # val labels: contradiction, entailment, neutral
    neither = ed.evaluate_task(Recorder(lambda c, a: -0.1 if a == " Neither" else -2.0), "cb", cb_train, cb_val)
    assert neither["accuracy"] == pytest.approx(1 / 3)


def test_accuracy_is_averaged_over_five_exemplar_draws():
    train_rows, val_rows = ed.load_task_data(FIXTURE, "rte")
    task = ed.TASKS["rte"]
    first = task.render(train_rows[0])

    def rule(context: str, answer: str) -> float:
        """Right on every example when train[0] is an exemplar, wrong otherwise."""
        query = next(ex for ex in val_rows if context.endswith(task.render(ex) + "\nAnswer:"))
        right = answer == " " + task.answers[task.label(query)]
        return 0.0 if right == (first in context) else -1.0

    result = ed.evaluate_task(Recorder(rule), "rte", train_rows, val_rows, num_draws=5, seed=0)
    expected = [1.0 if 0 in draw else 0.0 for draw in result["exemplars"]]
    assert result["per_draw"] == expected and 0 < sum(expected) < 5
    assert result["accuracy"] == pytest.approx(sum(expected) / 5)
    assert result["std"] == pytest.approx(math.sqrt(sum((e - sum(expected) / 5) ** 2 for e in expected) / 5))


def test_batched_scorer_equals_a_plain_forward_pass_and_cuts_long_prompts_from_the_left():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=64)).eval()
    encode = lambda s: [ord(c) % 64 for c in s]
    requests = [("short:", " Yes"), ("a longer context here:", " No"), ("x" * 40 + ":", " Neither"),
                ("mid length:", " Choice2")]
    scorer = scoring.ModelScorer(lambda x: model(x)[0], encode, block_size=24, batch_size=3)
    got = scorer(requests)

    def plain(context: str, answer: str) -> float:
        tokens = (encode(context) + encode(answer))[-25:]
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0][0], dim=-1)
        n = len(encode(answer))
        return sum(logprobs[len(tokens) - 1 - n + i, tokens[len(tokens) - n + i]].item() for i in range(n))

    assert got == pytest.approx([plain(c, a) for c, a in requests], abs=1e-5)
    assert scorer.truncated == pytest.approx(1 / 4)


def test_tiny_trained_model_end_to_end(char_run, tmp_path, capsys):
    report = ed.main([f"--out_dir={char_run}", f"--data_dir={FIXTURE}", "--device=cpu",
                      f"--output={tmp_path / 'results'}"])
    table, err = capsys.readouterr()
    assert "\r" not in err  # no progress bar off a terminal
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    assert set(report["tasks"]) == {"boolq", "rte", "cb", "copa"}
    for name, r in report["tasks"].items():
        assert len(r["per_draw"]) == 5 and r["n_val"] == 3
        assert all(0.0 <= a <= 1.0 and (3 * a) == pytest.approx(round(3 * a)) for a in r["per_draw"])
        assert r["accuracy"] == pytest.approx(sum(r["per_draw"]) / 5)
        assert 0.0 <= r["truncated"] <= 1.0
        assert f"| {name} | {100 * r['accuracy']:.1f} |" in table


def test_an_exported_hugging_face_model_scores_like_the_checkpoint(char_run, tmp_path, capsys):
    from scripts import export_hf
    with contextlib.redirect_stdout(io.StringIO()):
        export_hf.main([f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'hf'}"])
    common = [f"--data_dir={FIXTURE}", "--device=cpu", "--tasks=copa,cb", "--num_draws=2"]
    ours = ed.main([f"--out_dir={char_run}", f"--output={tmp_path / 'ours'}", *common])
    hf = ed.main([f"--hf_dir={tmp_path / 'hf'}", f"--output={tmp_path / 'hf-results'}", *common])
    assert {k: r["per_draw"] for k, r in hf["tasks"].items()} == {k: r["per_draw"] for k, r in ours["tasks"].items()}


def test_a_bpe_checkpoint_scores_over_gpt2s_vocabulary_like_its_export(tmp_path):
    """train.py pads GPT-2's 50257 ids to 50304; the export crops them, and the checkpoint's
    scorer must not give the padding probability mass either (on this nearly untrained model the
    padding would add ~1e-3 nats per token)."""
    from scripts import export_hf
    out_dir = tmp_path / "bpe"
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--dataset={BPE}", f"--out_dir={out_dir}"])
        export_hf.main([f"--out_dir={out_dir}", f"--hf_dir={tmp_path / 'hf'}"])
    cfg = {**ed.DEFAULTS, "device": "cpu", "out_dir": str(out_dir)}
    ours, _ = scoring.load_scorer(cfg)
    exported, _ = scoring.load_scorer({**cfg, "hf_dir": str(tmp_path / "hf")})
    requests = [("To be, or not to be:", " that is the question"), ("Friends, Romans,", " countrymen")]
    assert ours(requests) == pytest.approx(exported(requests), abs=1e-5)


def test_missing_data_dir_is_one_error_line(capsys, tmp_path):
    expect_one_line_error(capsys, ed.main, [f"--data_dir={tmp_path / 'nowhere'}"], "nowhere")
    expect_one_line_error(capsys, ed.main, [], "--data_dir")


def test_missing_task_file_is_one_error_line(capsys, tmp_path):
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text((FIXTURE / "rte" / "train.jsonl").read_text())
    expect_one_line_error(capsys, ed.main, [f"--data_dir={tmp_path}", "--tasks=rte"], "val.jsonl not found")


def test_unknown_label_is_one_error_line(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "rte").mkdir(exist_ok=True)
        (tmp_path / "rte" / f"{split}.jsonl").write_text(
            json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    expect_one_line_error(capsys, ed.main, [f"--data_dir={tmp_path}", "--tasks=rte"], "train.jsonl example 0")


def test_unknown_task_is_one_error_line(capsys):
    expect_one_line_error(capsys, ed.main, [f"--data_dir={FIXTURE}", "--tasks=rte,wsc"], "wsc")


def test_unwritable_output_is_one_error_line_before_evaluating(capsys, char_run, tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    monkeypatch.setattr(ed, "evaluate_task", lambda *a, **k: pytest.fail("evaluated before checking --output"))
    expect_one_line_error(capsys, ed.main, [f"--out_dir={char_run}", f"--data_dir={FIXTURE}", "--device=cpu",
                                   f"--output={tmp_path / 'blocker' / 'results'}"], "choose another --output")


def test_a_damaged_hugging_face_directory_is_one_error_line(capsys, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    expect_one_line_error(capsys, ed.main, [f"--hf_dir={tmp_path / 'hf'}", f"--data_dir={FIXTURE}", "--device=cpu"],
                          "export it again")


def test_default_output_of_a_hugging_face_model_lies_beside_it(char_run, tmp_path):
    from scripts import export_hf
    with contextlib.redirect_stdout(io.StringIO()):
        export_hf.main([f"--out_dir={char_run}", f"--hf_dir={tmp_path / 'hf'}"])
        ed.main([f"--hf_dir={tmp_path / 'hf'}", f"--data_dir={FIXTURE}", "--device=cpu", "--tasks=copa",
                 "--num_draws=1", "--limit=1"])
    assert (tmp_path / "hf-eval_downstream.json").is_file()
    assert not list((tmp_path / "hf").glob("eval_downstream*")), "the export directory stays as exported"


def test_task_folders_spelled_as_in_the_superglue_download_are_found(tmp_path):
    shutil.copytree(FIXTURE / "rte", tmp_path / "RTE")
    assert ed.load_task_data(tmp_path, "rte") == ed.load_task_data(FIXTURE, "rte")

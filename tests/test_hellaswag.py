"""Specification of scripts/eval_hellaswag.py: llm.c's completion-style HellaSwag (the context
`ctx`, each ending tokenized as " " + ending after it; acc by the summed, acc_norm by the mean
log-likelihood of the ending's tokens) equal to a hand computation with the model's logits;
contexts cut from the left to fit block_size, counted and said once; a tiny trained run, its
Hugging Face export and --init_from=gpt2 end to end on tests/fixtures/hellaswag; and one
`error: ...` line (exit status 2) for bad input. Offline (tests.test_data's autouse fixture)."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import train
from errors import UserError
from model import GPT, GPTConfig
from scoring import ModelScorer
from scripts import eval_hellaswag as hs
from tests.helpers import BPE, expect_one_line_error
from tests.test_eval_downstream import TINY
from tests.test_data import no_network  # noqa: F401  (autouse: fails any internet connection)
from tokenizer import gpt2_encoding

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """test_eval_downstream's tiny run (block_size 32: every fixture context is cut) on GPT-2 BPE."""
    out_dir = tmp_path_factory.mktemp("bpe")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY, f"--dataset={BPE}", f"--out_dir={out_dir}"])
    return out_dir


def by_hand(logits_of, examples: list[dict], block_size: int) -> list[list[tuple[float, int]]]:
    """(sum of log-probabilities, token count) of each ending, straight from the logits:
    tokens = encode(ctx) + encode(" " + ending), the first ones dropped to fit block_size + 1."""
    enc = gpt2_encoding()
    scores = []
    for ex in examples:
        row = []
        for ending in ex["endings"]:
            ctx, end = enc.encode(ex["ctx"]), enc.encode(" " + ending)
            tokens = (ctx + end)[-(block_size + 1):]
            with torch.no_grad():
                logprobs = F.log_softmax(logits_of(torch.tensor([tokens[:-1]]))[0].double(), dim=-1)
            first = len(tokens) - len(end)  # position of the ending's first token
            row.append((sum(logprobs[p - 1, tokens[p]].item() for p in range(first, len(tokens))), len(end)))
        scores.append(row)
    return scores


def check_against_hand(result: dict, hand: list[list[tuple[float, int]]], examples: list[dict]) -> None:
    argmax = lambda values: max(range(4), key=values.__getitem__)
    assert len(result["per_example"]) == len(hand) == len(examples) == result["examples"] == 4
    for r, row, ex in zip(result["per_example"], hand, examples):
        assert r["sum_logprob"] == pytest.approx([s for s, _ in row], abs=1e-4)
        assert r["num_tokens"] == [n for _, n in row]
        assert r["label"] == ex["label"]
        assert r["pred"] == argmax([s for s, _ in row])
        assert r["pred_norm"] == argmax([s / n for s, n in row])
    assert result["acc"] == sum(r["pred"] == ex["label"] for r, ex in zip(result["per_example"], examples)) / 4
    assert result["acc_norm"] == sum(r["pred_norm"] == ex["label"]
                                     for r, ex in zip(result["per_example"], examples)) / 4


@pytest.mark.parametrize("block_size, cut", [(256, 0), (40, 1), (31, 4)])
def test_scores_are_the_hand_computed_log_likelihoods(block_size, cut):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=block_size, vocab_size=50257)).eval()
    examples = hs.read_examples(str(FIXTURE))
    enc = gpt2_encoding()
    scorer = ModelScorer(lambda x: model(x)[0], enc.encode, block_size, batch_size=3)
    result = hs.evaluate(scorer, examples)
    check_against_hand(result, by_hand(lambda x: model(x)[0], examples, block_size), examples)
    assert result["examples"] == 4 and result["truncated"] == cut


class Chosen:
    """A scorer whose log-likelihoods the test chooses; tokens are bytes."""
    block_size = 1000

    def __init__(self, sums: list[float]):
        self.sums = sums

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def __call__(self, requests, desc=""):
        assert len(requests) == len(self.sums)
        return self.sums


def test_acc_takes_the_largest_sum_and_acc_norm_the_largest_mean_per_token():
    example = {"ctx": "Context", "endings": ["a" * 19, "bb", "c" * 9, "d" * 39], "label": 0}  # " " + ending: 20, 3, 10, 40
    result = hs.evaluate(Chosen([-10.0, -6.0, -8.0, -12.0]), [example])  # means -0.5, -2, -0.8, -0.3
    r = result["per_example"][0]
    assert r["num_tokens"] == [20, 3, 10, 40]
    assert (r["pred"], r["pred_norm"]) == (1, 3)
    assert (result["acc"], result["acc_norm"]) == (0.0, 0.0)
    tie = hs.evaluate(Chosen([-4.0, -1.0, -1.0, -4.0]), [{**example, "label": 1}])  # ties go to the first
    assert tie["per_example"][0]["pred"] == 1 and tie["acc"] == 1.0


def test_an_ending_longer_than_the_context_window_is_an_error():
    scorer = Chosen([0.0] * 4)
    scorer.block_size = 15
    example = {"ctx": "c", "endings": ["short", "x" * 15, "ok", "fine"], "label": 0}  # ending 1: 16 tokens
    with pytest.raises(UserError, match="example 0 has an ending of 16 tokens, more than the model's block_size 15"):
        hs.evaluate(scorer, [example])


def test_a_trained_run_end_to_end_cuts_contexts_and_says_so_once(bpe_run, tmp_path, capsys):
    report = hs.main([f"--out_dir={bpe_run}", f"--data={FIXTURE}", "--device=cpu",
                      f"--output={tmp_path / 'hellaswag.json'}"])
    captured = capsys.readouterr()
    assert captured.out == (f"hellaswag {bpe_run}: acc {report['acc']:.4f} acc_norm {report['acc_norm']:.4f} "
                            "(4 examples, 4 cut to fit)\n")
    assert captured.err.count("note:") == 1 and "\r" not in captured.err  # no progress bar off a terminal
    assert "4 of 4 examples had their context cut from the left to fit block_size 32" in captured.err
    assert json.loads((tmp_path / "hellaswag.json").read_text()) == json.loads(json.dumps(report))
    from checkpoint import load_trained_model
    model, _ = load_trained_model(bpe_run)
    examples = hs.read_examples(str(FIXTURE))
    assert model.config.vocab_size == 50304  # train.py's padding: the scores are over the real 50257
    check_against_hand(report, by_hand(lambda x: model(x)[0][..., :50257], examples, 32), examples)


def test_limit_scores_the_first_examples(bpe_run, capsys):
    full = hs.main([f"--out_dir={bpe_run}", f"--data={FIXTURE}", "--device=cpu"])
    first = hs.main([f"--out_dir={bpe_run}", f"--data={FIXTURE}", "--device=cpu", "--limit=2", "--batch_size=3"])
    assert first["examples"] == 2
    assert len(first["per_example"]) == 2
    for a, b in zip(first["per_example"], full["per_example"]):  # pytest.approx takes numbers, not dicts of lists
        assert a.pop("sum_logprob") == pytest.approx(b.pop("sum_logprob"))
        assert a == b


def test_an_exported_hugging_face_model_scores_like_the_checkpoint(bpe_run, tmp_path, capsys):
    from scripts import export_hf
    with contextlib.redirect_stdout(io.StringIO()):
        export_hf.main([f"--out_dir={bpe_run}", f"--hf_dir={tmp_path / 'hf'}"])
    ours = hs.main([f"--out_dir={bpe_run}", f"--data={FIXTURE}", "--device=cpu"])
    hf = hs.main([f"--hf_dir={tmp_path / 'hf'}", f"--data={FIXTURE}", "--device=cpu"])
    assert "\r" not in capsys.readouterr().err  # no progress bar (export, loading, scoring) off a terminal
    for a, b in zip(ours["per_example"], hf["per_example"]):
        assert a["sum_logprob"] == pytest.approx(b["sum_logprob"], abs=1e-4)
        assert (a["pred"], a["pred_norm"], a["num_tokens"]) == (b["pred"], b["pred_norm"], b["num_tokens"])


def test_openai_gpt2_weights_score_like_the_hugging_face_model(gpt2_hub, capsys):
    report = hs.main(["--init_from=gpt2", f"--data={FIXTURE}", "--device=cpu"])
    examples = hs.read_examples(str(FIXTURE))
    check_against_hand(report, by_hand(lambda x: gpt2_hub.model(input_ids=x).logits, examples, 1024), examples)
    assert report["model"] == "gpt2" and report["truncated"] == 0


def write_examples(tmp_path: Path, *examples) -> str:
    path = tmp_path / "hellaswag.jsonl"
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in examples))
    return str(path)


GOOD = {"ctx": "A man opens the door. he", "endings": ["walks in.", "flies.", "sings.", "sleeps."], "label": 0}


@pytest.mark.parametrize("bad, fragment", [
    ("{not json", "line 2 is not JSON"),
    ({k: v for k, v in GOOD.items() if k != "endings"}, "example 1 is not a HellaSwag example: no field endings"),
    ({**GOOD, "label": 4}, "label 4 is not 0-3"),
    ({**GOOD, "label": ""}, "the test split has no labels"),
    ({**GOOD, "label": True}, "label True is not 0-3"),
    ({**GOOD, "endings": GOOD["endings"][:3]}, "endings is not a list of 4 strings"),
    ({**GOOD, "ctx": None}, "ctx is not a non-empty string"),
    ({**GOOD, "ctx": ""}, "ctx is not a non-empty string"),
    ([GOOD], "a JSON list, not an object"),
])
def test_a_bad_example_is_one_error_line(tmp_path, capsys, bad, fragment):
    data = write_examples(tmp_path, GOOD, bad)
    expect_one_line_error(capsys, hs.main, [f"--data={data}", f"--out_dir={tmp_path / 'no-run'}"], fragment)


def test_a_string_label_as_in_hugging_faces_copy_is_accepted(tmp_path):
    assert hs.read_examples(write_examples(tmp_path, {**GOOD, "label": "3"}))[0]["label"] == "3"
    assert hs.label_of("3") == 3


@pytest.mark.parametrize("argv, fragment", [
    ([], "no --data given"),
    (["--data=nowhere/hellaswag_val.jsonl"], "nowhere/hellaswag_val.jsonl not found"),
    (["--limit=-1", f"--data={FIXTURE}"], "limit=-1 must be at least 0"),
    ([f"--data={FIXTURE}", "--init_from=gpt5"], "init_from='gpt5'"),
])
def test_bad_arguments_are_one_error_line(capsys, argv, fragment):
    expect_one_line_error(capsys, hs.main, [*argv, "--device=cpu"], fragment)


def test_an_empty_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    expect_one_line_error(capsys, hs.main, [f"--data={tmp_path / 'empty.jsonl'}"], "holds no examples")


def test_a_character_the_vocabulary_lacks_is_one_error_line():
    class CharVocab(Chosen):
        def encode(self, text):
            raise ValueError("characters not in this dataset's vocabulary: ['%']")

    with pytest.raises(UserError, match=r"example 0 cannot be encoded with the model's tokenizer \(characters not"):
        hs.evaluate(CharVocab([0.0] * 4), [GOOD])

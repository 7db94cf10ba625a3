"""Specification of data/fineweb_edu/prepare.py on small local parquet/jsonl files the tests
write: every document comes back, followed by the end-of-text token, in train or val by the
stated rule (every val_every-th, and the leading ones up to min_val_tokens); --max_tokens
gives a prefix of the full preparation; the Hub default is streamed; a failed or interrupted
run leaves the previous dataset as it was; bad input is one `error: ...` line (exit 2).
Offline: the network is refused (tests.test_data's autouse fixture)."""

import importlib
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import expect_one_line_error
from tests.test_data import no_network  # noqa: F401  (autouse: fails any internet connection)
from tokenizer import gpt2_encoding

fineweb = importlib.import_module("data.fineweb_edu.prepare")
EOT_ID = 50256


def make_documents(n: int) -> list[str]:
    """Documents of varied length and script; one holds the end-of-text marker as plain text."""
    words = ["photosynthesis", "the", "élève", "Ωmega", "school", "日本語", "river", "\n", "1984", "🙂", "of"]
    docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + (i * 13) % 40)) for i in range(n)]
    docs[3] = "a document that quotes <|endoftext|> in its text"
    return docs


def write_parquet(folder: Path, docs: list[str], files: int = 2) -> str:
    """The documents in `files` parquet files (with FineWeb's extra columns); returns the glob."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = len(docs) // files
    for k in range(files):
        part = docs[k * cut:] if k == files - 1 else docs[k * cut:(k + 1) * cut]
        pq.write_table(pa.table({"id": [f"<urn:{k}:{i}>" for i in range(len(part))], "text": part,
                                 "score": [3.5] * len(part)}), folder / f"part_{k:02d}.parquet")
    return str(folder / "*.parquet")


def documents_of(path: Path) -> list[str]:
    """Decode a .bin file document by document: split after each end-of-text token id."""
    ids = np.fromfile(path, dtype=np.uint16)
    assert len(ids) and ids[-1] == EOT_ID, "every document ends with the end-of-text token"
    ends = np.flatnonzero(ids == EOT_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [gpt2_encoding().decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def prepare(capsys, *argv: str) -> dict:
    meta = fineweb.main(list(argv))
    assert "train" in capsys.readouterr().out
    return meta


def test_every_document_comes_back_in_train_or_val_by_the_rule(tmp_path, capsys):
    docs = make_documents(40)
    out = tmp_path / "out"
    meta = prepare(capsys, "--data_files", write_parquet(tmp_path / "in", docs), "--out_dir", str(out),
                   "--val_every", "7", "--min_val_tokens", "0")
    val = [d for i, d in enumerate(docs) if i % 7 == 0]
    train = [d for i, d in enumerate(docs) if i % 7]
    assert documents_of(out / "train.bin") == train
    assert documents_of(out / "val.bin") == val
    lengths = [len(gpt2_encoding().encode_ordinary(d)) + 1 for d in docs]
    expected = {"tokenizer": "gpt2", "vocab_size": 50257, "end_of_text": "<|endoftext|>",
                "train_tokens": sum(n for i, n in enumerate(lengths) if i % 7), "train_documents": len(train),
                "val_tokens": sum(n for i, n in enumerate(lengths) if i % 7 == 0), "val_documents": len(val),
                "source": f"local files {tmp_path / 'in' / '*.parquet'}", "max_tokens": 0, "val_every": 7,
                "min_val_tokens": 0}
    assert meta == expected
    assert json.loads((out / "meta.json").read_text()) == expected
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == 2 * expected[f"{split}_tokens"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_leading_documents_fill_val_up_to_min_val_tokens(tmp_path, capsys):
    docs = make_documents(30)
    lengths = np.cumsum([len(gpt2_encoding().encode_ordinary(d)) + 1 for d in docs])
    minimum = int(lengths[4]) - 1  # reached by the fifth document
    out = tmp_path / "out"
    meta = prepare(capsys, "--data_files", write_parquet(tmp_path / "in", docs), "--out_dir", str(out),
                   "--val_every", "20", "--min_val_tokens", str(minimum))
    assert documents_of(out / "val.bin") == docs[:5] + [docs[20]]
    assert documents_of(out / "train.bin") == docs[5:20] + docs[21:]
    assert meta["val_tokens"] >= minimum


def test_max_tokens_gives_a_prefix_of_the_full_preparation(tmp_path, capsys):
    docs = make_documents(60)
    pattern = write_parquet(tmp_path / "in", docs, files=3)
    common = ["--data_files", pattern, "--val_every", "4", "--min_val_tokens", "0"]
    prepare(capsys, *common, "--out_dir", str(tmp_path / "full"))
    lengths = np.cumsum([len(gpt2_encoding().encode_ordinary(d)) + 1 for d in docs])
    limit = int(lengths[30]) - 3  # reached inside document 30, in the second file
    meta = prepare(capsys, *common, "--out_dir", str(tmp_path / "part"), "--max_tokens", str(limit))
    assert meta["train_tokens"] + meta["val_tokens"] == lengths[30]  # the document that reaches it is whole
    for split in ("train", "val"):
        part = documents_of(tmp_path / "part" / f"{split}.bin")
        assert part == documents_of(tmp_path / "full" / f"{split}.bin")[:len(part)]
    assert meta["train_documents"] + meta["val_documents"] == 31


def test_jsonl_and_threads_give_the_same_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_DOCUMENTS", 3)  # many small batches through the threads
    docs = make_documents(25)
    common = ["--val_every", "6", "--min_val_tokens", "0"]
    prepare(capsys, "--data_files", write_parquet(tmp_path / "in", docs), "--out_dir", str(tmp_path / "a"),
            "--num_threads", "1", *common)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs))
    prepare(capsys, "--data_files", str(tmp_path / "docs.jsonl"), "--out_dir", str(tmp_path / "b"),
            "--num_threads", "3", *common)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_default_streams_fineweb_edu_sample_10bt_from_the_hub(tmp_path, capsys, monkeypatch):
    docs = make_documents(12)
    local = write_parquet(tmp_path / "hub", docs)
    calls = []
    real_load = datasets.load_dataset

    def hub(path, **kwargs):
        calls.append((path, kwargs))
        return real_load("parquet", data_files=local, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    meta = prepare(capsys, "--out_dir", str(tmp_path / "out"), "--min_val_tokens", "0", "--val_every", "5")
    assert calls == [("HuggingFaceFW/fineweb-edu", {"name": "sample-10BT", "split": "train", "streaming": True})]
    assert meta["source"] == "Hugging Face dataset HuggingFaceFW/fineweb-edu (sample-10BT)"
    assert documents_of(tmp_path / "out" / "val.bin") == [docs[0], docs[5], docs[10]]


def test_an_unreachable_hub_is_one_error_line(tmp_path, capsys, monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expect_one_line_error(capsys, fineweb.main, ["--out_dir", str(tmp_path / "out")],
                          "cannot read Hugging Face dataset HuggingFaceFW/fineweb-edu (sample-10BT)", "ConnectionError")
    assert not (tmp_path / "out" / "train.bin").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def prepared(tmp_path, capsys) -> Path:
    """A dataset already prepared in tmp_path/out, which a failing run must leave alone."""
    out = tmp_path / "out"
    prepare(capsys, "--data_files", write_parquet(tmp_path / "old", make_documents(10)), "--out_dir", str(out),
            "--val_every", "3", "--min_val_tokens", "0")
    return out


def test_a_damaged_file_fails_in_one_line_and_leaves_the_old_dataset(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_DOCUMENTS", 4)  # the good file is written (to the temporary file) first
    before = snapshot(prepared)
    pattern = write_parquet(tmp_path / "new", make_documents(30), files=1)
    (tmp_path / "new" / "part_99.parquet").write_bytes(b"PAR1 this is not parquet")
    expect_one_line_error(capsys, fineweb.main, ["--data_files", pattern, "--out_dir", str(prepared),
                                                 "--min_val_tokens", "0"], "cannot read", "part_99.parquet")
    assert snapshot(prepared) == before  # no temporary file left behind either


def test_an_interrupted_run_leaves_the_old_dataset(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_DOCUMENTS", 4)
    before = snapshot(prepared)
    encode, calls = fineweb.encode, []

    def interrupted(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(texts)

    monkeypatch.setattr(fineweb, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fineweb.main(["--data_files", write_parquet(tmp_path / "new", make_documents(30)), "--out_dir", str(prepared),
                      "--min_val_tokens", "0"])
    assert snapshot(prepared) == before


@pytest.mark.parametrize("case, fragments", [
    ("no_out_dir", ["--data_files needs --out_dir"]),
    ("no_match", ["matched no files"]),
    ("empty_file", ["empty.jsonl is empty"]),
    ("not_json", ["cannot read", "bad.jsonl"]),
    ("no_text_column", ["no column 'text'", "body"]),
    ("null_text", ["holds a NoneType"]),
    ("zero_rows", ["cannot read", "rows.parquet"]),
    ("blank_lines", ["blank.jsonl holds no documents"]),
    ("no_train", ["all held out for val"]),
    ("max_below_min", ["--max_tokens=10 leaves nothing"]),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, case, fragments):
    good = write_parquet(tmp_path / "good", make_documents(4))
    files = {
        "empty_file": ("empty.jsonl", ""),
        "not_json": ("bad.jsonl", json.dumps({"text": "fine"}) + "\n{not json\n"),
        "no_text_column": ("nocol.jsonl", json.dumps({"body": "a document"}) + "\n"),
        "blank_lines": ("blank.jsonl", "\n\n"),
    }
    if case in files:
        name, content = files[case]
        (tmp_path / name).write_text(content)
        data_files = str(tmp_path / name)
    elif case in ("null_text", "zero_rows"):
        data_files = str(tmp_path / f"{case[-4:]}.parquet")
        pq.write_table(pa.table({"text": pa.array(["a", None] if case == "null_text" else [], pa.string())}),
                       data_files)
    else:
        data_files = {"no_match": str(tmp_path / "nowhere" / "*.parquet")}.get(case, good)
    argv = ["--data_files", data_files] + ([] if case == "no_out_dir" else ["--out_dir", str(tmp_path / "out")])
    argv += {"no_train": ["--min_val_tokens", "100000"], "max_below_min": ["--max_tokens", "10"]}.get(case, [])
    err = expect_one_line_error(capsys, fineweb.main, argv, *fragments)
    assert not (tmp_path / "out").exists()  # a failed first preparation leaves no folder
    if case == "no_train":  # the advice that applies: --max_tokens is unlimited already
        assert "lower --min_val_tokens=100000 or give more documents" in err and "--max_tokens" not in err


def test_a_txt_file_is_one_document(tmp_path, capsys):
    docs = ["First file.\n\nIts second paragraph.", "Second file, one line.", "Third file."]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    prepare(capsys, "--data_files", str(tmp_path / "*.txt"), "--out_dir", str(tmp_path / "out"),
            "--val_every", "3", "--min_val_tokens", "0")
    assert documents_of(tmp_path / "out" / "val.bin") == docs[:1]
    assert documents_of(tmp_path / "out" / "train.bin") == docs[1:]

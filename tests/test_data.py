"""Tests for the tokenizers and the data/*/prepare.py scripts; offline and quick (seconds)."""

import importlib
import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset
from tests.helpers import expect_one_line_error
from tokenizer import gpt2_encoding, load_tokenizer, read_meta

ROOT = Path(__file__).resolve().parents[1]
EOT_ID = 50256


shakespeare_char = importlib.import_module("data.shakespeare_char.prepare")
shakespeare_bpe = importlib.import_module("data.shakespeare.prepare")
openwebtext = importlib.import_module("data.openwebtext.prepare")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any internet connection, so offline behaviour is checked rather than assumed.

    Unix sockets stay allowed: multiprocessing talks to its workers through them.
    """
    connect = socket.socket.connect

    def refuse_internet(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse_internet)


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def test_gpt2_encoding_from_shipped_files(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no tiktoken cache: read data/gpt2 itself
    enc = gpt2_encoding.__wrapped__()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, EOT_ID)


def test_gpt2_tokenizer_round_trip_with_endoftext():
    encode, decode = load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257})
    text = "First document.<|endoftext|>Second one, with ümlauts."
    ids = encode(text)
    assert ids.count(EOT_ID) == 1
    assert decode(ids) == text


def test_char_tokenizer():
    encode, decode = load_tokenizer({"tokenizer": "char", "vocab_size": 4, "chars": "\n ab"})
    assert encode("ab \n") == [2, 3, 1, 0]
    assert decode([3, 2, 1]) == "ba "
    with pytest.raises(ValueError, match="'z'"):
        encode("az")


def test_read_meta_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        read_meta(tmp_path)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "train.bin"
    target.write_bytes(b"complete")
    with pytest.raises(RuntimeError):
        with dataset.atomic_path(target) as tmp:
            tmp.write_bytes(b"trunc")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"]


@pytest.fixture(scope="module")
def shakespeare_splits() -> tuple[str, str]:
    return dataset.split_text(dataset.read_shakespeare())


def check_shakespeare_prepare(prepare, out_dirs, splits, tokenizer):
    """Shared checks of the char and BPE Shakespeare bins; prepares twice for determinism."""
    metas = [prepare(d) for d in out_dirs]
    meta = metas[0]
    assert meta == metas[1] == read_meta(out_dirs[0])
    assert meta["tokenizer"] == tokenizer and meta["source"]
    _, decode = load_tokenizer(meta)
    for split, text in zip(("train", "val"), splits, strict=True):
        ids = read_bin(out_dirs[0] / f"{split}.bin")
        assert len(ids) == meta[f"{split}_tokens"] > 0
        assert int(ids.max()) < meta["vocab_size"]
        assert decode(ids.tolist()) == text
        assert (out_dirs[0] / f"{split}.bin").read_bytes() == (out_dirs[1] / f"{split}.bin").read_bytes()
    return meta


def test_shakespeare_char_prepare(tmp_path, shakespeare_splits):
    meta = check_shakespeare_prepare(
        shakespeare_char.prepare, [tmp_path / "a", tmp_path / "b"], shakespeare_splits, "char"
    )
    text = "".join(shakespeare_splits)
    assert meta["chars"] == "".join(sorted(set(text)))
    assert meta["vocab_size"] == len(meta["chars"])
    assert meta["train_tokens"] == len(shakespeare_splits[0]) == int(0.9 * len(text))
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert text.count("\r") == 0 and text.startswith("ALL'S WELL THAT ENDS WELL")


def test_shakespeare_bpe_prepare(tmp_path, shakespeare_splits):
    meta = check_shakespeare_prepare(
        shakespeare_bpe.prepare, [tmp_path / "a", tmp_path / "b"], shakespeare_splits, "gpt2"
    )
    assert meta["vocab_size"] == 50257 and "chars" not in meta


def check_openwebtext_bins(out_dir: Path, meta: dict, documents: list[str]) -> None:
    """Each document ends with end-of-text, and train + val hold every document exactly once."""
    enc = gpt2_encoding()
    assert meta == json.loads((out_dir / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"]) == ("gpt2", 50257)
    texts = []
    for split in ("train", "val"):
        ids = read_bin(out_dir / f"{split}.bin")
        assert len(ids) == meta[f"{split}_tokens"] and ids[-1] == EOT_ID
        assert int((ids == EOT_ID).sum()) == meta[f"{split}_documents"] > 0
        texts += enc.decode(ids.tolist()).split("<|endoftext|>")[:-1]
    assert sorted(texts) == sorted(documents)


def test_openwebtext_jsonl(tmp_path):
    documents = [f"Document {i}: some words, then more words.\nA second line {i * i}." for i in range(8)]
    data_file = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"url": f"u{i}", "text": d}) for i, d in enumerate(documents)]
    data_file.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    meta = openwebtext.prepare(
        out_dir, data_files=str(data_file), num_proc=2, val_fraction=0.25, min_val_tokens=0,
        cache_dir=tmp_path / "hf_cache"
    )
    assert (meta["train_documents"], meta["val_documents"]) == (6, 2)
    check_openwebtext_bins(out_dir, meta, documents)


@pytest.mark.parametrize("sample_by", ["paragraph", "document"])
def test_openwebtext_txt(tmp_path, sample_by):
    documents = [f"Paragraph {i} of plain text.\nIt has two lines." for i in range(5)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if sample_by == "paragraph":  # one file, documents separated by blank lines
        (corpus / "all.txt").write_text("\n\n".join(documents))
    else:  # one document per file, like the original OpenWebText tarballs
        for i, d in enumerate(documents):
            (corpus / f"{i}.txt").write_text(d)
    out_dir = tmp_path / "out"
    meta = openwebtext.prepare(
        out_dir,
        data_files=str(corpus / "*.txt"),
        sample_by=sample_by,
        num_proc=1,
        val_fraction=0.2,
        min_val_tokens=0,
        shards=3,
        cache_dir=tmp_path / "hf_cache",
    )
    check_openwebtext_bins(out_dir, meta, documents)


def test_openwebtext_missing_glob(tmp_path, capsys):
    pattern = str(tmp_path / "nowhere" / "*.jsonl")
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        openwebtext.main(["--data_files", pattern, "--out_dir", str(out_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pattern in err and "matched no files" in err
    assert not out_dir.exists()


# --------------------------------------------------------------- openwebtext: failing cleanly
# Bad input is one `error: ...` line (exit 2) that names the file, and a failed preparation
# leaves the dataset already in --out_dir byte for byte as it was (no temporary files either).

@pytest.fixture
def quiet_datasets():
    """No `datasets` progress bars on stderr, which must hold the error line alone."""
    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    yield
    if not was_disabled:
        datasets.enable_progress_bars()


def owt_documents(n: int, words: int = 12) -> list[str]:
    return [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(words)) for i in range(n)]


def write_jsonl(path: Path, documents: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def owt_prepared(tmp_path, quiet_datasets) -> Path:
    """A dataset already prepared in tmp_path/out, which a failing run must leave alone."""
    out = tmp_path / "out"
    openwebtext.prepare(out, data_files=str(write_jsonl(tmp_path / "old" / "old.jsonl", owt_documents(6))),
                        num_proc=1, val_fraction=0.3, min_val_tokens=0, cache_dir=tmp_path / "hf_cache")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    return out


def owt_main(tmp_path: Path, *argv: str) -> list[str]:
    return ["--num_proc", "1", "--cache_dir", str(tmp_path / "hf_cache"), *argv]


def write_bad_input(folder: Path, case: str) -> str:
    """A corpus with one bad file (or no text at all) in `folder`; returns the --data_files glob."""
    folder.mkdir(parents=True)
    good = owt_documents(4)
    if case == "non_utf8_txt":
        for i, d in enumerate(good):
            (folder / f"{i}.txt").write_text(d)
        (folder / "bad.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
        return str(folder / "*.txt")
    if case == "empty_txt":  # 0 bytes, among good files
        for i, d in enumerate(good):
            (folder / f"{i}.txt").write_text(d)
        (folder / "empty.txt").write_text("")
        return str(folder / "*.txt")
    if case == "whitespace_txt":  # files that hold only blank documents: no text at all
        for i in range(3):
            (folder / f"{i}.txt").write_text(" \n\n\t\n")
        return str(folder / "*.txt")
    if case == "bad_jsonl_line":
        write_jsonl(folder / "a.jsonl", good)
        (folder / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "no" "comma"}\n')
        return str(folder / "*.jsonl")
    if case == "non_utf8_jsonl":
        write_jsonl(folder / "a.jsonl", good)
        (folder / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        return str(folder / "*.jsonl")
    if case == "bad_json_document":  # .json holding one JSON document (a list), broken on line 3
        (folder / "bad.json").write_text('[\n  {"text": "one"},\n  {"text": "two",},\n]\n')
        return str(folder / "*.json")
    if case == "damaged_parquet":
        pq.write_table(pa.table({"text": good}), folder / "a.parquet")
        (folder / "b.parquet").write_bytes(b"PAR1 not really parquet")
        return str(folder / "*.parquet")
    if case == "null_text":
        pq.write_table(pa.table({"text": pa.array(good + [None], pa.string())}), folder / "a.parquet")
        return str(folder / "*.parquet")
    raise ValueError(case)


@pytest.mark.parametrize("case, fragments", [
    ("non_utf8_txt", ["bad.txt is not UTF-8 text (line 2: byte 0xe9 at column 4)", "--skip_bad_files"]),
    ("empty_txt", ["empty.txt is empty (0 bytes)", "--skip_bad_files"]),
    ("whitespace_txt", ["holds no text (3 document(s), all empty or whitespace)"]),
    ("bad_jsonl_line", ["bad.jsonl is not JSON Lines (line 3, column 15: Expecting ','", "--skip_bad_files"]),
    ("non_utf8_jsonl", ["bad.jsonl is not UTF-8 text (line 2: byte 0xe9"]),
    ("bad_json_document", ["bad.json is not JSON (line 3, column"]),
    ("damaged_parquet", ["b.parquet cannot be read as parquet (ArrowInvalid", "--skip_bad_files"]),
    ("null_text", ["column 'text' of local files", "has 1 missing (null) value(s)"]),
])
def test_openwebtext_bad_input_is_one_line_and_keeps_the_old_dataset(owt_prepared, tmp_path, capsys, case,
                                                                     fragments):
    before = snapshot(owt_prepared)
    pattern = write_bad_input(tmp_path / "new", case)
    argv = owt_main(tmp_path, "--data_files", pattern, "--out_dir", str(owt_prepared), "--min_val_tokens", "0")
    expect_one_line_error(capsys, openwebtext.main, argv, *fragments)
    assert snapshot(owt_prepared) == before


def test_openwebtext_failed_first_preparation_leaves_no_folder(tmp_path, capsys, quiet_datasets):
    out = tmp_path / "new_dataset"
    argv = owt_main(tmp_path, "--data_files", write_bad_input(tmp_path / "in", "non_utf8_txt"), "--out_dir", str(out))
    expect_one_line_error(capsys, openwebtext.main, argv, "bad.txt")
    assert not out.exists()


def test_openwebtext_skip_bad_files_warns_once_per_file(tmp_path, capsys, quiet_datasets):
    folder = tmp_path / "in"
    pattern = write_bad_input(folder, "non_utf8_txt")
    (folder / "empty.txt").write_text("")
    out = tmp_path / "out"
    meta = openwebtext.main(owt_main(tmp_path, "--data_files", pattern, "--out_dir", str(out), "--skip_bad_files",
                                     "--min_val_tokens", "0", "--val_fraction", "0.25"))
    err = [line for line in capsys.readouterr().err.splitlines() if line and "writing" not in line]  # no progress bars
    assert err == [f"warning: skipping {folder / 'bad.txt'}, which is not UTF-8 text (line 2: byte 0xe9 at column 4)",
                   f"warning: skipping {folder / 'empty.txt'}, which is empty (0 bytes)"]
    check_openwebtext_bins(out, meta, owt_documents(4))
    # Nothing readable at all: an error, not an empty dataset.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff")
    with pytest.raises(SystemExit) as exit_info:
        openwebtext.main(owt_main(tmp_path, "--data_files", str(tmp_path / "bad" / "*.txt"), "--out_dir",
                                  str(tmp_path / "out2"), "--skip_bad_files"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipping {tmp_path / 'bad' / 'x.txt'}, which is not UTF-8 text (line 1: byte 0xff at column 1)",
        "error: all 1 file(s) of --data_files are unreadable (each named in a warning above)"]
    assert not (tmp_path / "out2").exists()


def test_openwebtext_failure_while_writing_val_keeps_the_old_train_bin(owt_prepared, tmp_path, monkeypatch):
    """train.bin and val.bin are renamed only when both are complete."""
    before = snapshot(owt_prepared)
    real_tqdm = openwebtext.tqdm

    def failing_val(*args, **kwargs):
        if kwargs.get("desc") == "writing val.bin":
            raise KeyboardInterrupt
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(openwebtext, "tqdm", failing_val)
    with pytest.raises(KeyboardInterrupt):
        openwebtext.prepare(owt_prepared, data_files=str(write_jsonl(tmp_path / "new.jsonl", owt_documents(20))),
                            num_proc=1, val_fraction=0.2, min_val_tokens=0, cache_dir=tmp_path / "hf_cache")
    assert snapshot(owt_prepared) == before


@pytest.mark.parametrize("argv, fragment", [
    (["--data_files", "corpus.jsonl"], "--data_files needs --out_dir"),
    (["--dataset", "someone/corpus"], "--dataset someone/corpus needs --out_dir"),
    (["--dataset", "someone/corpus", "--data_files", "corpus.jsonl", "--out_dir", "x"], "not both"),
    (["--data_files", "corpus.jsonl", "--out_dir", " "], "--out_dir is empty"),
    (["--data_files", "corpus.jsonl", "--out_dir", ""], "--out_dir is empty"),
])
def test_openwebtext_other_corpora_need_their_own_out_dir(tmp_path, capsys, monkeypatch, argv, fragment):
    """Only OpenWebText itself goes to the default folder (data/openwebtext, here a stand-in)."""
    default = tmp_path / "openwebtext"
    monkeypatch.setattr(openwebtext, "HERE", default)
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "corpus.jsonl", owt_documents(10))
    expect_one_line_error(capsys, openwebtext.main, owt_main(tmp_path, "--min_val_tokens", "0", *argv), fragment)
    assert not default.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_openwebtext_too_small_for_the_val_minimum(tmp_path, capsys, quiet_datasets):
    documents = owt_documents(40)
    tokens = sum(len(gpt2_encoding().encode_ordinary(d)) + 1 for d in documents)
    out = tmp_path / "out"
    expect_one_line_error(capsys, openwebtext.main,
                          owt_main(tmp_path, "--data_files", str(write_jsonl(tmp_path / "c.jsonl", documents)),
                                   "--out_dir", str(out)),
                          f"holds {tokens:,} tokens (40 documents)", "--min_val_tokens=1,000,000")
    assert not out.exists()


def test_openwebtext_val_filled_up_to_min_val_tokens(tmp_path, quiet_datasets):
    """The leading documents of the shuffled train split move to val until it has min_val_tokens;
    when val_fraction gives enough, the split is the plain train_test_split (nanoGPT's)."""
    documents = owt_documents(60)
    data_files = str(write_jsonl(tmp_path / "c.jsonl", documents))

    def run(name: str, min_val_tokens: int) -> tuple[dict, np.ndarray, np.ndarray]:
        meta = openwebtext.prepare(tmp_path / name, data_files=data_files, num_proc=1, val_fraction=0.05,
                                   min_val_tokens=min_val_tokens, cache_dir=tmp_path / "hf_cache")
        check_openwebtext_bins(tmp_path / name, meta, documents)
        return meta, read_bin(tmp_path / name / "train.bin"), read_bin(tmp_path / name / "val.bin")

    plain, train, val = run("plain", 0)
    assert plain["val_documents"] == 3 and plain["min_val_tokens"] == 0
    same, same_train, same_val = run("same", len(val))  # already enough
    assert np.array_equal(same_train, train) and np.array_equal(same_val, val)
    filled, filled_train, filled_val = run("filled", len(val) + 100)
    assert len(filled_val) >= len(val) + 100 > len(filled_val) - 40  # no more documents than needed
    moved = len(filled_val) - len(val)
    assert np.array_equal(filled_val, np.concatenate([val, train[:moved]]))
    assert np.array_equal(filled_train, train[moved:])
    assert filled["val_documents"] > 3 and filled["val_tokens"] == len(filled_val)


def test_openwebtext_unreachable_hub_is_one_error_line(tmp_path, capsys, monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "out"
    expect_one_line_error(capsys, openwebtext.main, ["--out_dir", str(out)],
                          "cannot read Hugging Face dataset Skylion007/openwebtext (ConnectionError")
    assert not out.exists()

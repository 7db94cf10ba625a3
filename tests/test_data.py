"""Tests for the tokenizers and the data/*/prepare.py scripts; offline and quick (seconds)."""

import importlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest

import dataset
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
        out_dir, data_files=str(data_file), num_proc=2, val_fraction=0.25, cache_dir=tmp_path / "hf_cache"
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

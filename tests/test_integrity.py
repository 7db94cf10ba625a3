"""Specification of integrity under damage: checkpoints that prove they are intact, pruning that
never deletes the last good one, records that survive a torn write, and full disks as one line.

The damage is what disks and kills leave behind: a truncated file, bytes changed inside a
tensor with the file's structure intact (which torch.load cannot see), a last line cut short.
A full disk is a small tmpfs (only when running as root; skipped otherwise, with the reason).
"""

import json
import os
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from checkpoint import checkpoints, load_latest_checkpoint, read_checkpoint
from errors import UserError
from tests.test_train import CHAR_META, ROOT, char_ids, make_dataset, run_train  # noqa: F401 (a fixture)

BASE = ["--optimizer_name=adamw", "--lr_decay_iters=20", "--eval_iters=1"]


def damage(path: Path, how: str) -> None:
    """Damage a checkpoint file: cut it in half, or overwrite 4 KiB inside the largest tensor's
    data with zeros or 0xFF bytes (NaN in float32), leaving the zip structure intact."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + 64
    size = min(4096, info.file_size - 64)
    fill = b"\x00" if how == "zeros" else b"\xff"
    path.write_bytes(data[:start] + fill * size + data[start + size:])
    torch.load(path, map_location="cpu", weights_only=True)  # the damage is invisible to torch.load


@pytest.mark.parametrize("how", ["zeros", "0xff"])
def test_bytes_changed_inside_a_tensor_fail_the_checksum(tmp_path, how):
    run_train(tmp_path, *BASE, "--max_iters=4", "--eval_interval=4")
    path = checkpoints(tmp_path)[-1]
    read_checkpoint(path)
    damage(path, how)
    with pytest.raises(UserError, match="fails its checksum .* changed since it was written"):
        read_checkpoint(path)


@pytest.mark.parametrize("how", ["truncated", "zeros", "0xff"])
@pytest.mark.parametrize("keep", [1, 2])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_last_good_one_survives_every_prune(
        tmp_path, capsys, keep, how):
    """ckpt_20 damaged, ckpt_10 good: the run resumes from 10, moves 20 aside, saves 15 and
    prunes down to `keep` good checkpoints (by step: 15, then 10); the next resume continues
    from 15 and the damaged file is still there to look at."""
    run_train(tmp_path, *BASE, "--max_iters=20", "--eval_interval=10")
    damage(tmp_path / "ckpt_00000020.pt", how)
    resumed = run_train(tmp_path, *BASE, "--max_iters=15", "--eval_interval=5", f"--keep_checkpoints={keep}",
                        "--init_from=resume")
    err = capsys.readouterr().err
    assert "resuming from step 10" in resumed.stdout
    assert "skipped a newer checkpoint" in err
    assert "moved the damaged checkpoint ckpt_00000020.pt aside to ckpt_00000020.pt.damaged" in err
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_00000010.pt", "ckpt_00000015.pt"][-keep:]
    assert (tmp_path / "ckpt_00000020.pt.damaged").exists()
    again = run_train(tmp_path, *BASE, "--max_iters=20", "--eval_interval=5", f"--keep_checkpoints={keep}",
                      "--init_from=resume")
    assert "resuming from step 15" in again.stdout
    assert load_latest_checkpoint(tmp_path)[0]["iter_num"] == 20


def test_pruning_goes_by_step_number_beyond_the_zero_padding(tmp_path):
    """Names past 8 digits sort wrongly as text; pruning and resuming go by the number."""
    from checkpoint import prune
    for step in (99_999_990, 100_000_000, 100_000_010):
        (tmp_path / f"ckpt_{step:08d}.pt").write_bytes(b"x")
    prune(tmp_path, tmp_path / "ckpt_100000010.pt", keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_100000000.pt", "ckpt_100000010.pt"]


# ----------------------------------------------------------------------------- records

def test_a_torn_last_record_is_cut_off_on_resume_and_the_readers_accept_the_file(tmp_path, capsys):
    """A kill (or a full disk) cut metrics.jsonl's last line; the resumed run says so once,
    cuts it off and appends whole lines, so plot_runs and compare.py read the file."""
    from metrics import read_metrics
    from scripts import plot_runs
    run_train(tmp_path, *BASE, "--max_iters=10", "--eval_interval=10")
    records = tmp_path / "metrics.jsonl"
    whole = records.read_bytes()
    records.write_bytes(whole + b'{"kind": "train", "iter": 11, "lo')
    resumed = run_train(tmp_path, *BASE, "--max_iters=20", "--eval_interval=10", "--init_from=resume")
    assert resumed.stdout.count("cut off a torn last line (33 bytes") == 1
    assert records.read_bytes().startswith(whole)
    assert [r["iter"] for r in read_metrics(records)["eval"]] == [0, 10, 20]
    plot_runs.main([str(tmp_path), f"--output={tmp_path / 'plot.png'}"])
    assert (tmp_path / "plot.png").stat().st_size


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    from metrics import MetricsLog, read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "iter": 1, "loss": 2.0}')
    log = MetricsLog(tmp_path)
    log({"kind": "train", "iter": 2, "loss": 1.5})
    log.close()
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")["train"]] == [1, 2]


def test_a_file_where_an_earlier_version_appended_after_a_torn_line_is_read(tmp_path):
    from metrics import read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "iter": 1, "loss": 2.0}\n{"kind": "train", "it'
                    '{"kind": "eval", "iter": 2, "val_loss": 1.0}\n{"kind": "train", "iter": 3, "loss": 1.0}\n')
    assert {k: [r["iter"] for r in v] for k, v in read_metrics(path).items()} == {"train": [1, 3], "eval": [2]}


# ----------------------------------------------------------------------------- full disks

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs to fill up (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the disk with a file, then give `leave` bytes back."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))


def test_a_fresh_run_into_a_full_disk_stops_with_one_line(small_disk, capsys):
    from tests.test_train import TINY
    import train
    from tests.helpers import expect_one_line_error
    fill(small_disk)
    expect_one_line_error(capsys, train.main, [*TINY, *BASE, f"--out_dir={small_disk / 'out'}", "--max_iters=2"],
                          "cannot write to", "No space left on device", "choose another --out_dir")


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_is_untouched(small_disk, capsys):
    from tests.test_train import TINY
    import train
    from tests.helpers import expect_one_line_error
    out = small_disk / "out"
    run_train(out, *BASE, "--max_iters=10", "--eval_interval=10")
    before = (out / "ckpt_00000010.pt").read_bytes()
    fill(small_disk, leave=1 << 16)  # room for the records, not for a checkpoint
    err = expect_one_line_error(capsys, train.main, [*TINY, *BASE, f"--out_dir={out}", "--max_iters=20",
                                                     "--eval_interval=10", "--init_from=resume"],
                                "cannot write checkpoint ckpt_00000020.pt to", "No space left on device",
                                "it needs about", "MiB free")
    assert str(out) in err
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_00000010.pt"]
    assert (out / "ckpt_00000010.pt").read_bytes() == before


@pytest.mark.parametrize("code, fragment", [
    ("EDQUOT", "Disk quota exceeded (it needs about"),
    ("EROFS", "the file system is read-only"),
])
def test_a_quota_or_a_read_only_file_system_during_a_save_is_one_line(tmp_path, monkeypatch, code, fragment):
    """What torch.save meets half-way through the file (any user, no mount needed)."""
    import errno
    import checkpoint
    run_train(tmp_path, *BASE, "--max_iters=10", "--eval_interval=10")
    before = (tmp_path / "ckpt_00000010.pt").read_bytes()
    state = dict(load_latest_checkpoint(tmp_path)[0], iter_num=20)

    def refused(obj, f, *args, **kwargs):
        f.write(b"PK" * 1000)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(torch, "save", refused)
    with pytest.raises(UserError) as refusal:
        checkpoint.save_checkpoint(tmp_path, state, keep=1)
    assert f"cannot write checkpoint ckpt_00000020.pt to {tmp_path}: {fragment}" in str(refusal.value)
    assert [p.name for p in tmp_path.glob("ckpt_*")] == ["ckpt_00000010.pt"]
    assert (tmp_path / "ckpt_00000010.pt").read_bytes() == before


def test_a_full_disk_during_a_record_write_is_one_line_and_leaves_no_partial_line(small_disk):
    from metrics import MetricsLog
    out = small_disk / "out"
    out.mkdir()
    line = '{"kind": "train", "iter": 1, "pad": "' + "x" * (4096 - 40) + '"}\n'
    assert len(line) == 4096  # a whole tmpfs page: the next record needs another
    (out / "metrics.jsonl").write_text(line)
    fill(small_disk)
    log = MetricsLog(out)
    with pytest.raises(UserError, match=f"cannot write a metrics record to {out}: No space left on device"):
        log({"kind": "train", "iter": 2, "loss": 1.0})
    log.close()
    assert (out / "metrics.jsonl").read_text() == line


# ----------------------------------------------------------------------------- metadata

def train_refuses(capsys, out_dir: Path, args: list[str], *fragments: str) -> None:
    """train.py stops with one line holding every fragment, before out_dir is even created."""
    import train
    from tests.helpers import expect_one_line_error
    from tests.test_train import TINY
    expect_one_line_error(capsys, train.main, [*TINY, f"--out_dir={out_dir}", "--max_iters=2", *args], *fragments)
    assert not out_dir.exists()


@pytest.mark.parametrize("meta, fragments", [
    ('{"tokenizer": "char", "vocab_', ["meta.json is not valid JSON", "cut short"]),
    ({**CHAR_META, "vocab_size": CHAR_META["vocab_size"] + 6}, ["has vocab_size 90 but lists 84 characters"]),
    ({"tokenizer": "sentencepiece", "vocab_size": 84}, ["names the tokenizer 'sentencepiece'", "unknown"]),
    ({"tokenizer": "gpt2", "vocab_size": 50304}, ["vocab_size 50304 for the GPT-2 tokenizer"]),
    ({"tokenizer": "char", "vocab_size": 84}, ["does not list its characters"]),
])
def test_damaged_dataset_metadata_is_refused_where_it_is_read(capsys, tmp_path, make_dataset, meta, fragments):
    name = make_dataset(train_ids=char_ids(), val_ids=char_ids(seed=1))
    (ROOT / "data" / name / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    train_refuses(capsys, tmp_path / "out", [f"--dataset={name}"], *fragments)


def test_a_dataset_without_meta_json_whose_ids_look_character_level_is_refused(capsys, tmp_path, make_dataset):
    name = make_dataset(train_ids=char_ids(), val_ids=char_ids(seed=1))
    train_refuses(capsys, tmp_path / "out", [f"--dataset={name}"], "has no meta.json", "looks character-level")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("char")
    run_train(out, *BASE, "--max_iters=2", "--eval_interval=2")
    return out


def with_meta(run: Path, out: Path, **changes) -> Path:
    """A copy of the run's checkpoint (checksums renewed) whose saved dataset meta is changed."""
    from checkpoint import save_checkpoint
    state = dict(load_latest_checkpoint(run)[0])
    state["meta"] = {**state["meta"], **changes}
    out.mkdir()
    save_checkpoint(out, {k: v for k, v in state.items() if k != "checksums"}, keep=1)
    return out


@pytest.mark.parametrize("changes, fragment", [
    ({"vocab_size": 90}, "has vocab_size 90 but lists"),
    ({"tokenizer": "sentencepiece"}, "names the tokenizer 'sentencepiece'"),
])
def test_sample_and_the_evaluation_scripts_refuse_damaged_metadata_in_one_line(capsys, tmp_path, char_run,
                                                                               changes, fragment):
    import sample
    from scripts import eval_hellaswag
    from tests.helpers import expect_one_line_error
    from tests.test_hellaswag import GOOD, write_examples
    run = with_meta(char_run, tmp_path / "run", **changes)
    expect_one_line_error(capsys, sample.main, [f"--out_dir={run}", "--device=cpu"], fragment, "ckpt_00000002.pt")
    expect_one_line_error(capsys, eval_hellaswag.main, [f"--out_dir={run}", "--device=cpu",
                                                        f"--data={write_examples(tmp_path, GOOD)}"], fragment)


# ----------------------------------------------------------------------------- entry points

def test_a_prompt_file_that_is_not_utf8_text_is_one_line(capsys, tmp_path, char_run):
    import sample
    from tests.helpers import expect_one_line_error
    (tmp_path / "prompt.bin").write_bytes(b"ROMEO\xff\xfe\x00")
    expect_one_line_error(capsys, sample.main, [f"--out_dir={char_run}", "--device=cpu",
                                                f"--start=FILE:{tmp_path / 'prompt.bin'}"],
                          "prompt.bin is not UTF-8 text (byte 0xff at offset 5)")


def test_a_gzipped_hellaswag_file_reads_like_the_plain_one(tmp_path):
    import gzip
    from scripts import eval_hellaswag
    from tests.test_hellaswag import GOOD, write_examples
    plain = Path(write_examples(tmp_path, GOOD, {**GOOD, "label": 2}))
    packed = tmp_path / "hellaswag_val.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert eval_hellaswag.read_examples(str(packed)) == eval_hellaswag.read_examples(str(plain))


@pytest.mark.parametrize("content, fragment", [
    (b"\x1f\x8b\x08\x00garbage", "is a damaged gzip file"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe", "is not UTF-8 text"),
])
def test_a_hellaswag_file_that_is_neither_text_nor_gzip_is_one_line(capsys, tmp_path, content, fragment):
    from scripts import eval_hellaswag
    from tests.helpers import expect_one_line_error
    (tmp_path / "hellaswag.zip").write_bytes(content)
    expect_one_line_error(capsys, eval_hellaswag.main, [f"--data={tmp_path / 'hellaswag.zip'}", "--device=cpu"],
                          fragment)


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(capsys, tmp_path):
    """The output is checked first: here the run to evaluate does not even exist, and the
    output error is the one reported."""
    from scripts import eval_downstream, eval_hellaswag, plot_runs
    from tests.helpers import expect_one_line_error
    from tests.test_hellaswag import GOOD, write_examples
    (tmp_path / "results.json").mkdir()
    expect_one_line_error(capsys, eval_hellaswag.main, [f"--data={write_examples(tmp_path, GOOD)}", "--device=cpu",
                                                        f"--out_dir={tmp_path / 'no-run'}",
                                                        f"--output={tmp_path / 'results.json'}"],
                          "--output=", "is a folder")
    expect_one_line_error(capsys, eval_downstream.main, [f"--data_dir={tmp_path}", "--device=cpu",
                                                         f"--out_dir={tmp_path / 'no-run'}",
                                                         f"--output={tmp_path / 'results'}"],
                          "--output=", "results.json' is a folder")
    expect_one_line_error(capsys, plot_runs.main, [str(tmp_path / 'no-run'),
                                                   f"--output={tmp_path / 'results.json'}"], "is a folder")


# ----------------------------------------------------------------------------- starting and resuming

@pytest.mark.parametrize("args, fragment", [
    (["--dtype=float8"], "dtype='float8'"),
    (["--dataset=no_such_dataset"], "dataset 'no_such_dataset' not found"),
])
def test_a_refused_run_creates_nothing(capsys, tmp_path, args, fragment):
    train_refuses(capsys, tmp_path / "out", args, fragment)


def test_a_resume_with_another_batch_size_says_what_changes(tmp_path):
    run_train(tmp_path, *BASE, "--max_iters=4", "--eval_interval=4")
    resumed = run_train(tmp_path, *BASE, "--max_iters=6", "--eval_interval=4", "--batch_size=8",
                        "--gradient_accumulation_steps=2", "--init_from=resume")
    line = next(line for line in resumed.stdout.splitlines() if line.startswith("resuming with"))
    assert line == ("resuming with batch_size 4 -> 8 and gradient_accumulation_steps 1 -> 2: the data position is "
                    "kept, but a step now takes 512 tokens instead of 128: the step size, and the batches drawn "
                    "from here on, are not those the run would have had")


# ----------------------------------------------------------------------------- preparation

def test_a_second_preparation_into_the_same_folder_stops_with_one_line_naming_the_holder(capsys, tmp_path):
    import importlib
    from lifecycle import RunLock
    from tests.helpers import expect_one_line_error
    from tests.test_data import owt_documents, owt_main, write_jsonl
    openwebtext = importlib.import_module("data.openwebtext.prepare")
    data = write_jsonl(tmp_path / "in" / "docs.jsonl", owt_documents(6))
    out = tmp_path / "out"
    out.mkdir()
    holder = RunLock(out)
    try:
        expect_one_line_error(capsys, openwebtext.main, owt_main(tmp_path, "--data_files", str(data), "--out_dir",
                                                                 str(out), "--min_val_tokens", "0"),
                              "is in use by another run", f"pid {os.getpid()}")
    finally:
        holder.release()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("script", ["openwebtext", "fineweb_edu"])
def test_a_preparation_removes_the_temporary_files_of_a_killed_one_and_says_so(capsys, tmp_path, script):
    import importlib
    from tests.test_data import owt_documents, owt_main, write_jsonl
    prepare = importlib.import_module(f"data.{script}.prepare")
    data = write_jsonl(tmp_path / "in" / "docs.jsonl", owt_documents(6))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".train.tmp4242.bin").write_bytes(bytes(3 << 20))  # what kill -9 left
    argv = ["--data_files", str(data), "--out_dir", str(out), "--min_val_tokens", "0"]
    prepare.main(owt_main(tmp_path, *argv) if script == "openwebtext" else argv)
    assert "removed " + str(out / ".train.tmp4242.bin") + " (3.0 MiB), a temporary file left by a preparation " \
           "that was killed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_failed_first_fineweb_preparation_leaves_no_folder(capsys, tmp_path):
    import importlib
    from tests.helpers import expect_one_line_error
    fineweb = importlib.import_module("data.fineweb_edu.prepare")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jsonl").write_text("{not json\n")
    expect_one_line_error(capsys, fineweb.main, ["--data_files", str(tmp_path / "in" / "bad.jsonl"), "--out_dir",
                                                 str(tmp_path / "out")], "cannot read")
    assert not (tmp_path / "out").exists()

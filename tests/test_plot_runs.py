"""Specification of scripts/plot_runs.py: a PNG from the metrics.jsonl of several runs
(synthetic records in train.py's format), with Sophia panels when the records have them,
and one `error: ...` line with exit status 2 for files that are missing or not metrics."""

import json
from pathlib import Path


from scripts import plot_runs
from tests.helpers import expect_one_line_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, sophia: bool, steps: int = 40) -> Path:
    """A run folder like train.py's: config.json and metrics.jsonl with train and eval records."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"gradient_accumulation_steps": 2, "batch_size": 4,
                                                    "block_size": 32}))
    with open(folder / "metrics.jsonl", "w") as f:
        for it in range(0, steps + 1, 5):
            loss = 4.0 - it / steps
            if it % 10 == 0:
                f.write(json.dumps({"kind": "eval", "iter": it, "train_loss": loss, "val_loss": loss + 0.1}) + "\n")
            if it:
                record = {"kind": "train", "iter": it, "loss": loss, "lr": 1e-3, "time_ms": 5.0,
                          "tokens_per_s": 1e4, "grad_norm": 0.5, "clip_frac": 0.1}
                if sophia:
                    record.update(win_rate=0.5, hessian_norm=1e-2, skipped_estimates=0, estimator_ms=1.0)
                f.write(json.dumps(record) + "\n")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_two_runs_give_a_png(tmp_path):
    a, b = write_run(tmp_path / "out-sophiag", sophia=True), write_run(tmp_path / "out-adamw", sophia=False)
    out = plot_runs.main([str(a), str(b / "metrics.jsonl"), "--x=tokens", f"--output={tmp_path / 'runs.png'}",
                          "--labels=Sophia-G,AdamW", "--ylim=2.5,4.5"])
    width, height = png_size(out)
    assert width > 600 and height > 400


def test_x_axis_in_tokens_uses_the_tokens_per_step_of_config_json(tmp_path):
    fig = plot_runs.make_figure([write_run(tmp_path / "run", sophia=False)], x="tokens")
    val_line = fig.axes[0].get_lines()[1]  # the faint training loss comes first
    assert list(val_line.get_xdata()) == [it * 2 * 4 * 32 for it in (0, 10, 20, 30, 40)]
    assert list(plot_runs.make_figure([tmp_path / "run"]).axes[0].get_lines()[1].get_xdata()) == [0, 10, 20, 30, 40]
    plot_runs.plt.close("all")


def test_sophia_panels_only_when_some_run_logged_them(tmp_path):
    adamw = plot_runs.make_figure([write_run(tmp_path / "adamw", sophia=False)])
    assert [ax.get_title() for ax in adamw.axes][1:] == ["grad-norm clipping frequency"]
    both = plot_runs.make_figure([write_run(tmp_path / "sophia", sophia=True), tmp_path / "adamw"])
    assert [ax.get_title() for ax in both.axes][1:] == [
        "Sophia win rate (not clipped)", "Sophia Hessian norm", "grad-norm clipping frequency"]
    assert len(both.axes[1].get_lines()) == 1  # only the Sophia run has a win rate
    assert len(both.axes[3].get_lines()) == 2
    plot_runs.plt.close("all")


def test_a_step_logged_twice_after_a_resume_keeps_the_later_record(tmp_path):
    run = write_run(tmp_path / "run", sophia=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "iter": 20, "train_loss": 1.0, "val_loss": 1.5}) + "\n")
    evals = plot_runs.read_metrics(run / "metrics.jsonl")["eval"]
    assert [r["iter"] for r in evals] == [0, 10, 20, 30, 40]
    assert evals[2]["val_loss"] == 1.5


def test_missing_metrics_file_is_one_error_line(capsys, tmp_path):
    run = write_run(tmp_path / "run", sophia=False)
    expect_one_line_error(capsys, plot_runs.main, [str(run), str(tmp_path / "missing"), f"--output={tmp_path / 'x.png'}"],
                          "missing not found")
    assert not (tmp_path / "x.png").exists()


def test_out_dir_without_metrics_is_one_error_line(capsys, tmp_path):
    (tmp_path / "empty-run").mkdir()
    expect_one_line_error(capsys, plot_runs.main, [str(tmp_path / "empty-run")], "metrics.jsonl not found")


def test_garbage_line_is_one_error_line(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"kind": "eval", "iter": 0, "val_loss": 3.0}\nnot json\n')
    expect_one_line_error(capsys, plot_runs.main, [str(tmp_path / "bad.jsonl")], "bad.jsonl line 2")


def test_wrong_number_of_labels_is_one_error_line(capsys, tmp_path):
    run = write_run(tmp_path / "run", sophia=False)
    expect_one_line_error(capsys, plot_runs.main, [str(run), "--labels=a,b"], "2 labels for 1 runs")


def test_tokens_axis_without_config_json_is_one_error_line(capsys, tmp_path):
    run = write_run(tmp_path / "run", sophia=False)
    (run / "config.json").unlink()
    expect_one_line_error(capsys, plot_runs.main, [str(run), "--x=tokens"], "config.json")


def test_an_eval_record_without_val_loss_is_one_error_line(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"kind": "eval", "iter": 0, "val_loss": 3.0}\n{"kind": "eval", "iter": 10}\n')
    expect_one_line_error(capsys, plot_runs.main, [str(tmp_path / "bad.jsonl")], "eval record of step 10 has no val_loss")


def test_unwritable_output_is_one_error_line(capsys, tmp_path):
    run = write_run(tmp_path / "run", sophia=False)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    expect_one_line_error(capsys, plot_runs.main, [str(run), f"--output={tmp_path / 'blocker' / 'x.png'}"], "choose another --output")


def test_a_short_run_has_whole_step_ticks_and_a_visible_single_train_point(tmp_path):
    run = tmp_path / "short"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"kind": "eval", "iter": 0, "val_loss": 4.2}\n{"kind": "train", "iter": 2, "loss": 4.1}\n'
        '{"kind": "eval", "iter": 2, "val_loss": 4.0}\n')
    fig = plot_runs.make_figure([run])
    fig.canvas.draw()
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "" not in [label.get_text() for label in ax.get_xticklabels()]
    train_line = ax.get_lines()[0]
    assert list(train_line.get_xdata()) == [2] and train_line.get_marker() not in (None, "None", "")
    plot_runs.plt.close("all")

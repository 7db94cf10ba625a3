"""Tests of the optimizer-comparison tools: scripts/compare.py (the runner, its results and
speed-up arithmetic), scripts/plot_compare.py (through the runner), scripts/ablations.py and
scripts/toy_landscape.py.

The end-to-end test runs real train.py subprocesses on a 1-layer, width-32 model for 10
steps; everything else works on synthetic metrics, so the file takes well under a minute.
"""

import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
from scripts import ablations, compare, toy_landscape

BASE = str(ROOT / "config" / "train_shakespeare_char.py")
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_interval=5", "--log_interval=5", "--hess_batch_size=2", "--hess_interval=2"]
PLOTS = ("val_loss.png", "lr_sweep.png", "sophia_stats.png", "grad_clip.png")
GROUP_FIELDS = {"optimizer", "fraction", "steps", "config", "warmup_iters", "best_lr", "best_at_edge",
                "val_loss_mean", "val_loss_std", "lrs", "steps_to_target", "speedup"}


def group(results: dict, optimizer: str) -> dict:
    return next(g for g in results["groups"] if g["optimizer"] == optimizer)


# ----------------------------------------------------------------------------- speed-up arithmetic

def test_steps_to_reach_interpolates_linearly_between_evaluations():
    iters, losses = [0, 100, 200, 300], [4.0, 3.0, 2.0, 1.5]
    assert compare.steps_to_reach(iters, losses, 2.5) == pytest.approx(150.0)
    assert compare.steps_to_reach(iters, losses, 1.75) == pytest.approx(250.0)
    assert compare.steps_to_reach(iters, losses, 2.0) == pytest.approx(200.0)  # exactly at an evaluation
    assert compare.steps_to_reach(iters, losses, 5.0) == 0.0  # already there at the start


def test_steps_to_reach_not_reached_and_first_crossing():
    assert compare.steps_to_reach([0, 100, 200], [4.0, 3.0, 2.5], 2.4) is None
    # A curve that dips below the target and comes back: the first crossing counts.
    assert compare.steps_to_reach([0, 10, 20, 30], [4.0, 1.0, 3.0, 1.0], 2.5) == pytest.approx(5.0)


def write_metrics(out_dir: Path, evals: dict[int, float]) -> None:
    out_dir.mkdir(parents=True)
    records = [{"kind": "eval", "iter": i, "train_loss": v, "val_loss": v} for i, v in evals.items()]
    records += [{"kind": "train", "iter": i, "loss": v, "clip_frac": 0.5, "win_rate": 0.3, "hessian_norm": 2.0}
                for i, v in evals.items() if i > 0]
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_speedup_and_best_lr_on_synthetic_metrics(tmp_path, capsys):
    """Finished synthetic runs: nothing is run, and the numbers follow by hand.
    Baseline adamw (T = 10) at its best LR 1e-3 ends at (2.0 + 2.2) / 2 = 2.1, the target.
    Sophia-G (5 steps) at 1e-3 has the mean curve 4.0 -> 2.0 over steps 0 -> 5: it reaches 2.1
    at 5 * 1.9 / 2.0 = 4.75 steps, a 10 / 4.75 = 2.105x speed-up; its 2e-3 run has a NaN
    loss. Lion never gets below 2.5: not reached."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag,lion", "--steps", "10", "--lrs", "adamw=1e-3,2e-3",
            "--lrs", "sophiag=1e-3,2e-3", "--lrs", "lion=1e-4,2e-4", "--seeds", "1,2", "--runs_dir", str(runs_dir),
            "--hess_batch_size=6"]
    curves = {("adamw", 1e-3, 1): {0: 4.0, 5: 3.0, 10: 2.0}, ("adamw", 1e-3, 2): {0: 4.0, 5: 3.0, 10: 2.2},
              ("adamw", 2e-3, 1): {0: 4.0, 5: 3.0, 10: 2.5}, ("adamw", 2e-3, 2): {0: 4.0, 5: 3.0, 10: 2.5},
              ("sophiag", 1e-3, 1): {0: 4.0, 5: 1.9}, ("sophiag", 1e-3, 2): {0: 4.0, 5: 2.1},
              ("sophiag", 2e-3, 1): {0: 4.0, 5: 1.0}, ("sophiag", 2e-3, 2): {0: 4.0, 5: math.nan},
              ("lion", 1e-4, 1): {0: 4.0, 5: 3.0, 10: 2.5}, ("lion", 1e-4, 2): {0: 4.0, 5: 3.0, 10: 2.5},
              ("lion", 2e-4, 1): {0: 4.0, 5: 3.5, 10: 3.0}, ("lion", 2e-4, 2): {0: 4.0, 5: 3.5, 10: 3.0}}
    _, runs = compare.plan(*compare.parse_args(argv))
    assert len(runs) == len(curves)
    for run in runs:
        write_metrics(run.out_dir, curves[(run.group.optimizer, run.lr, run.seed)])

    results = compare.main(argv)
    out = capsys.readouterr().out
    assert "$ " not in out and out.count("finished, not rerun") == 12

    assert results["target_val_loss"] == pytest.approx(2.1)
    adamw, sophiag, lion = (group(results, name) for name in ("adamw", "sophiag", "lion"))
    assert (adamw["steps"], sophiag["steps"], lion["steps"]) == (10, 5, 10)
    assert adamw["best_lr"] == 1e-3 and adamw["val_loss_mean"] == pytest.approx(2.1)
    assert adamw["val_loss_std"] == pytest.approx(statistics.stdev([2.0, 2.2]))
    assert adamw["speedup"] == pytest.approx(1.0)
    assert sophiag["best_lr"] == 1e-3  # 2e-3 has the lower loss on one seed, but failed on the other
    assert sophiag["lrs"][1]["val_loss_mean"] is None
    assert sophiag["steps_to_target"] == pytest.approx(4.75)
    assert sophiag["speedup"] == pytest.approx(10 / 4.75)
    assert lion["best_lr"] == 1e-4 and lion["steps_to_target"] is None and lion["speedup"] is None
    assert sophiag["curve"]["val_loss"] == pytest.approx([4.0, 2.0])
    assert sophiag["train_stats"]["win_rate"] == pytest.approx([0.3])

    md = (runs_dir / "results.md").read_text()
    assert "| sophiag | 5 | 0.001 * | 2.0000 ± 0.1414 | 4.8 | 2.11x |" in md
    assert "| lion | 10 | 0.0001 * | 2.5000 ± 0.0000 | not reached | not reached |" in md
    assert json.loads((runs_dir / "results.json").read_text()) == json.loads(json.dumps(results))


def test_variants_are_groups_with_their_own_overrides_and_can_be_the_baseline(tmp_path, capsys):
    """An ablation: Sophia-G at k = 10 (the baseline) against k = 1 and a Hutchinson variant at
    T/2; each variant's runs carry its overrides and are named by its label."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--baseline", "sophiag", "--optimizers", "", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--variant", "k1=sophiag --hess_interval=1", "--variant", "hutch=sophiag:0.5 --hess_estimator=hutchinson",
            "--lrs", "hutch=3e-4", "--runs_dir", str(runs_dir), "--hess_batch_size=6"]
    groups, runs = compare.plan(*compare.parse_args(argv))
    assert [(g.label, g.optimizer, g.steps, g.overrides) for g in groups] == [
        ("sophiag", "sophiag", 10, ()), ("k1", "sophiag", 10, ("--hess_interval=1",)),
        ("hutch", "sophiag", 5, ("--hess_estimator=hutchinson",))]
    by_label = {r.group.label: r for r in runs}
    assert by_label["k1"].out_dir == runs_dir / "k1_T10_lr0.0005_s1"
    assert compare.resolve(by_label["k1"].args)["hess_interval"] == 1
    assert compare.resolve(by_label["sophiag"].args)["hess_interval"] == 10
    assert by_label["hutch"].lr == 3e-4 and compare.resolve(by_label["hutch"].args)["hess_estimator"] == "hutchinson"
    for run, final in zip(runs, (2.0, 1.8, 2.5)):
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: final})
    results = compare.main(argv)
    assert results["baseline"] == "sophiag" and results["target_val_loss"] == pytest.approx(2.0)
    assert [(g["label"], g["overrides"]) for g in results["groups"]] == [
        ("sophiag", []), ("k1", ["--hess_interval=1"]), ("hutch", ["--hess_estimator=hutchinson"])]
    md = (runs_dir / "results.md").read_text()
    assert "| k1 | 10 | 0.0005 | 1.8000 ± 0.0000 |" in md
    assert "Variants: k1 = sophiag --hess_interval=1; hutch = sophiag --hess_estimator=hutchinson." in md


def test_ablation_studies_run_the_papers_variants_sharing_the_baseline_and_collect_their_tables(tmp_path):
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--runs_dir", str(runs_dir), "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--hess_batch_size=4"]
    _, _, cfg, argvs = ablations.parse(argv)
    assert list(argvs) == ["rho_beta2", "hess_interval", "preconditioner", "clipping"]
    settings = {}
    for study_argv in argvs.values():
        for run in compare.plan(*compare.parse_args(study_argv))[1]:
            settings[run.out_dir.name.split("_T")[0]] = compare.resolve(run.args)
            if not run.out_dir.exists():
                write_metrics(run.out_dir, {0: 4.0, 10: 2.0 + 0.01 * len(settings)})
    # 9 rho x beta2 cells (the baseline is one), k 1 and 100, 3 pre-conditioners, 3 clipping
    # variants: the baseline's run is shared by all four studies.
    assert len(settings) == 9 + 2 + 3 + 3
    grid = {(c["rho"], c["beta2"]) for name, c in settings.items() if name == "sophiag" or name.startswith("rho")}
    assert grid == {(f * cfg["rho"], b) for f in (0.5, 1.0, 2.0) for b in (0.95, 0.99, 0.995)}
    assert settings["k1"]["hess_interval"] == 1 and settings["k100"]["hess_interval"] == 100
    assert settings["sophiag"]["hess_interval"] == 10 and settings["sophiag"]["hess_estimator"] == "auto"
    assert (settings["empirical_fisher"]["optimizer_name"], settings["empirical_fisher"]["hess_estimator"]) == (
        "sophiag", "empirical_fisher")
    assert (settings["adahessian"]["optimizer_name"], settings["adahessian"]["hess_estimator"]) == (
        "sophiah", "adahessian")
    assert settings["adahessian"]["rho"] == settings["sophiah"]["rho"] == 0.01  # Sophia-H's own config
    assert settings["no_clip"]["sophia_clip"] is False and settings["no_clip"]["hess_interval"] == 2
    momentum = settings["sign_momentum"]
    assert momentum["optimizer_name"] == "lion" and momentum["beta1"] == momentum["beta2"] == cfg["beta1"]

    results = ablations.main(argv)
    assert [g["label"] for g in results["clipping"]["groups"]] == ["sophiag", "adamw", "no_clip", "sign_momentum"]
    md = (runs_dir / "ablations.md").read_text()
    assert all(f"## {study}" in md for study in argvs)
    assert "| k1 | `sophiag --hess_interval=1` | 10 | 0.0005 |" in md
    assert (runs_dir / "ablation-rho_beta2" / "rho_beta2.png").stat().st_size > 10_000
    assert (runs_dir / "ablation-clipping" / "results.md").exists()


@pytest.mark.parametrize("extra, message", [
    (["--studies", "rho,k"], "unknown study 'rho'"),
    (["--variant", "x=sophiag"], "--variant is set by each study"),
    (["--baseline=adamw"], "--baseline is set by each study"),
])
def test_ablations_refuse_bad_arguments_before_running(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        ablations.main([BASE, "--runs_dir", str(tmp_path / "runs"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the runner, for real

def test_runner_end_to_end_and_resumable(tmp_path, capsys, monkeypatch):
    """adamw (10 steps) and sophiag (5 steps) at 2 LRs each: four train.py subprocesses, two
    at a time. A rerun skips the finished runs and resumes one made unfinished (its
    subprocess is only recorded: a fifth real run would double the test's time)."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag", "--steps", "10", "--lr_grid", "0.5,2", "--seeds", "1",
            "--runs_dir", str(runs_dir), "--jobs", "2", "--threads", "2", *TINY]
    results = compare.main(argv)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 4 and all("python train.py " in c and "OMP_NUM_THREADS=1" in c for c in commands)
    assert any("--optimizer_name=sophiag --max_iters=5 --lr_decay_iters=5" in c for c in commands)
    assert out.count(": ok in ") == 4

    for name in ("results.md", "results.json") + PLOTS:
        assert (runs_dir / name).stat().st_size > 0, name
    saved = json.loads((runs_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"baseline", "T", "seeds", "lr_grid", "target_val_loss", "groups"} <= set(saved)
    for row in saved["groups"]:
        assert GROUP_FIELDS <= set(row)
        assert row["best_lr"] in [r["lr"] for r in row["lrs"]] and math.isfinite(row["val_loss_mean"])
        assert {"seed", "out_dir", "val_loss", "state"} <= set(row["lrs"][0]["runs"][0])
    assert group(saved, "adamw")["speedup"] == pytest.approx(1.0)
    assert "win_rate" in group(saved, "sophiag")["train_stats"]

    # Make one run unfinished: drop its final evaluation, as a kill just before it would.
    redo = runs_dir / group(saved, "sophiag")["lrs"][0]["runs"][0]["out_dir"]
    lines = (redo / "metrics.jsonl").read_text().splitlines()
    (redo / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    others = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/metrics.jsonl") if p.parent != redo}
    started = []
    real_run = compare.subprocess.run
    monkeypatch.setattr(compare.subprocess, "run", lambda argv, **kw: real_run(argv, **kw) if argv[-1] == "--check"
                        else started.append(argv) or compare.subprocess.CompletedProcess(argv, 0))

    compare.main(argv)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert out.count("finished, not rerun") == 3
    assert len(commands) == 1 and commands[0].startswith("$ (resume)") and "--init_from=auto" in commands[0]
    assert len(started) == 1 and started[0][-2:] == [f"--out_dir={redo}", "--init_from=auto"]
    assert {p: p.stat().st_mtime_ns for p in others} == others


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, message", [
    (["--seed=3"], "use --seeds"),
    (["--learning_rate=1e-3"], "--lr_grid or --lrs"),
    (["--lrs", "sophiag=1e-3,2e-3,3e-3"], "same number of LRs"),
    (["--optimizers", "adamw,bogus"], "unknown optimizer"),
    (["--n_layr=2"], "did you mean --n_layer"),
    (["--hess_batch_size=240"], "hess_batch_size=240 exceeds"),
    (["--variant", "sophiag --hess_interval=1"], "expected LABEL=OPT"),
    (["--variant", "sophiah=sophiag --hess_interval=1"], "is an optimizer's name"),
    (["--variant", "k1=sophiag --max_iters=5"], "use --steps"),
    (["--variant", "k1=sophiag --batch_size=24"], "k1 (config/train_shakespeare_char_sophiag.py) sets batch_size=24"),
    (["--variant", "k1=sophiag", "--variant", "k1=sophiah"], "a label is used twice"),
    (["--baseline", "k2", "--variant", "k1=sophiag"], "nor a --variant label"),
])
def test_refuses_bad_arguments_before_running(tmp_path, capsys, extra, message):
    argv = [BASE, "--optimizers", "adamw,sophiag", "--lr_grid", "1,2", "--runs_dir", str(tmp_path / "runs"),
            "--hess_batch_size=6", *extra]
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_refuses_an_unfair_optimizer_config(tmp_path, capsys):
    """A per-optimizer config that changes the batch would make the comparison unfair."""
    variant = tmp_path / "sophiag_bigger_batch.py"
    variant.write_text(f'include({BASE!r})\noptimizer_name = "sophiag"\nbatch_size = 24\n')
    argv = [BASE, "--config_for", f"sophiag={variant}", "--runs_dir", str(tmp_path / "runs"), "--hess_batch_size=6"]
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert "batch_size=24" in capsys.readouterr().err


def test_variant_configs_are_found_by_family(tmp_path):
    """train_x_adamw.py as the base finds train_x_sophiag.py; a missing variant falls back to
    the family's plain config, never to another optimizer's variant."""
    for name in ("train_x.py", "train_x_adamw.py", "train_x_sophiag.py"):
        (tmp_path / name).write_text("")
    base = tmp_path / "train_x_adamw.py"
    assert compare.optimizer_config(base, "sophiag", {}) == tmp_path / "train_x_sophiag.py"
    assert compare.optimizer_config(base, "lion", {}) == tmp_path / "train_x.py"
    assert compare.optimizer_config(base, "lion", {"lion": "mine.py"}) == Path("mine.py")


# ----------------------------------------------------------------------------- toy landscape (paper Fig. 2)

def test_toy_landscape_figure(tmp_path, capsys):
    out = tmp_path / "toy.png"
    finals = toy_landscape.main(["--out", str(out)])
    assert out.stat().st_size > 10_000
    t1, t2, loss = finals["Sophia"]
    assert abs(t1 - 1) < 1e-2 and abs(t2 - 4) < 1e-2 and loss < 1e-3
    assert abs(finals["Newton"][0]) < 1e-2  # stuck at the saddle t1 = 0
    assert all(finals[name][2] > 0.1 for name in ("GD", "SignGD", "Adam"))  # not there yet in 30 steps
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in toy_landscape.COLORS)

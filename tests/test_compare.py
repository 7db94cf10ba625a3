"""Tests of the optimizer-comparison tools: scripts/compare.py (the runner, its results and
speed-up arithmetic), scripts/significance.py (its t-tests), scripts/downstream_scores.py
(through the runner), scripts/plot_compare.py, scripts/ablations.py and scripts/toy_landscape.py.

The end-to-end test runs real train.py subprocesses on a 1-layer, width-32 model for 10
steps; everything else works on synthetic metrics, so the file takes well under a minute.
Downstream scores (--hellaswag, --superglue) run the real eval scripts on a tiny GPT-2 BPE
checkpoint copied into synthetic runs, and on the end-to-end test's character-level runs.
"""

import contextlib
import io
import json
import math
import shutil
import statistics
import warnings
from pathlib import Path

import pytest

import settings

ROOT = Path(__file__).resolve().parents[1]
from tests.helpers import BPE, CHAR
from scripts import ablations, compare, compare_plan, compare_report, compare_run, downstream_scores, plot_compare, significance, toy_landscape

BASE = str(ROOT / "config" / "train_shakespeare_char.py")
TINY = [f"--dataset={CHAR}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_interval=5", "--log_interval=5", "--hess_batch_size=2", "--hess_interval=2"]
PLOTS = ("val_loss.png", "lr_sweep.png", "sophia_stats.png", "grad_clip.png")
HELLASWAG = ROOT / "tests" / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"
SUPERGLUE = ROOT / "tests" / "fixtures" / "superglue"
GROUP_FIELDS = {"optimizer", "fraction", "steps", "config", "warmup_iters", "best_lr", "best_at_edge",
                "val_loss_mean", "val_loss_std", "lrs", "steps_to_target", "speedup", "per_seed", "vs_baseline",
                "reaches_target"}


def group(results: dict, optimizer: str) -> dict:
    return next(g for g in results["groups"] if g["optimizer"] == optimizer)


# ----------------------------------------------------------------------------- speed-up arithmetic

def test_steps_to_reach_interpolates_linearly_between_evaluations():
    iters, losses = [0, 100, 200, 300], [4.0, 3.0, 2.0, 1.5]
    assert compare_report.steps_to_reach(iters, losses, 2.5) == pytest.approx(150.0)
    assert compare_report.steps_to_reach(iters, losses, 1.75) == pytest.approx(250.0)
    assert compare_report.steps_to_reach(iters, losses, 2.0) == pytest.approx(200.0)  # exactly at an evaluation
    assert compare_report.steps_to_reach(iters, losses, 5.0) == 0.0  # already there at the start


def test_steps_to_reach_not_reached_and_first_crossing():
    assert compare_report.steps_to_reach([0, 100, 200], [4.0, 3.0, 2.5], 2.4) is None
    # A curve that dips below the target and comes back: the first crossing counts.
    assert compare_report.steps_to_reach([0, 10, 20, 30], [4.0, 1.0, 3.0, 1.0], 2.5) == pytest.approx(5.0)


def write_metrics(out_dir: Path, evals: dict[int, float]) -> None:
    out_dir.mkdir(parents=True)
    records = [{"kind": "eval", "iter": i, "train_loss": v, "val_loss": v} for i, v in evals.items()]
    sophia = {"win_rate": 0.3, "hessian_norm": 2.0} if out_dir.name.startswith("sophia") else {}
    records += [{"kind": "train", "iter": i, "loss": v, "clip_frac": 0.5, **sophia} for i, v in evals.items() if i > 0]
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
    _, runs = compare_plan.plan(*compare.parse_args(argv))
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
    # Per seed at the best LR, each on its own curve: 4.0 -> 1.9 reaches 2.1 at 5 * 1.9 / 2.1 steps.
    assert [(s["seed"], s["val_loss"]) for s in sophiag["per_seed"]] == [(1, 1.9), (2, 2.1)]
    assert [s["steps_to_target"] for s in sophiag["per_seed"]] == pytest.approx([5 * 1.9 / 2.1, 5.0])
    assert [s["steps_to_target"] for s in adamw["per_seed"]] == [pytest.approx(9.5), None]
    assert adamw["vs_baseline"] is None and adamw["reaches_target"] is None

    md = (runs_dir / "results.md").read_text()
    assert "| sophiag | 5 | 0.001 * | 2.0000 ± 0.1414 | 4.8 | 2.11x |" in md
    assert "| lion | 10 | 0.0001 * | 2.5000 ± 0.0000 | not reached | not reached |" in md
    # Only Sophia logs a win rate: one row, its one training record (step 5) covering every point.
    sophia_section = md.split("## Sophia's statistics")[1].split("\n## ")[0]
    assert "| sophiag | 5 | 0.001 | " + "0.300 | " * 5 + "2 | " * 3 + "2 |" in sophia_section
    assert "| adamw |" not in sophia_section and "| lion |" not in sophia_section
    assert json.loads((runs_dir / "results.json").read_text()) == json.loads(json.dumps(results))


def test_run_statistics_weigh_each_record_by_the_steps_it_covers():
    """Records at steps 10, 20 and 40 cover 10, 10 and 20 steps: the run's win rate is
    (10 x 0.1 + 10 x 0.2 + 20 x 0.4) / 40; a point of the run reads the record covering it."""
    stats = {"iters": [10, 20, 40], "win_rate": [0.1, 0.2, 0.4]}
    assert compare_report.run_mean(stats, "win_rate") == pytest.approx(0.275)
    assert compare_report.run_mean(stats, "clip_frac") is None
    assert [compare_report.at_fraction(stats, "win_rate", 40, f) for f in (0.05, 0.25, 0.3, 0.5, 1.0)] == [
        0.1, 0.1, 0.2, 0.2, 0.4]
    assert compare_report.at_fraction(stats, "hessian_norm", 40, 0.5) is None


def test_variants_are_groups_with_their_own_overrides_and_can_be_the_baseline(tmp_path, capsys):
    """An ablation: Sophia-G at k = 10 (the baseline) against k = 1 and a Hutchinson variant at
    T/2; each variant's runs carry its overrides and are named by its label."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--baseline", "sophiag", "--optimizers", "", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--variant", "k1=sophiag --hess_interval=1", "--variant", "hutch=sophiag:0.5 --hess_estimator=hutchinson",
            "--lrs", "hutch=3e-4", "--runs_dir", str(runs_dir), "--hess_batch_size=6"]
    groups, runs = compare_plan.plan(*compare.parse_args(argv))
    assert [(g.label, g.optimizer, g.steps, g.overrides) for g in groups] == [
        ("sophiag", "sophiag", 10, ()), ("k1", "sophiag", 10, ("--hess_interval=1",)),
        ("hutch", "sophiag", 5, ("--hess_estimator=hutchinson",))]
    by_label = {r.group.label: r for r in runs}
    assert by_label["k1"].out_dir == runs_dir / "k1_T10_lr0.0005_s1"
    assert compare_plan.resolve(by_label["k1"].args)["hess_interval"] == 1
    assert compare_plan.resolve(by_label["sophiag"].args)["hess_interval"] == 10
    assert by_label["hutch"].lr == 3e-4 and compare_plan.resolve(by_label["hutch"].args)["hess_estimator"] == "hutchinson"
    for run, final in zip(runs, (2.0, 1.8, 2.5)):
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: final})
    results = compare.main(argv)
    assert results["baseline"] == "sophiag" and results["target_val_loss"] == pytest.approx(2.0)
    assert [(g["label"], g["overrides"]) for g in results["groups"]] == [
        ("sophiag", []), ("k1", ["--hess_interval=1"]), ("hutch", ["--hess_estimator=hutchinson"])]
    md = (runs_dir / "results.md").read_text()
    assert "| k1 | 10 | 0.0005 | 1.8000 |" in md
    assert "Variants: k1 = sophiag --hess_interval=1; hutch = sophiag --hess_estimator=hutchinson." in md
    # sophiag and k1 are one grid (Sophia-G at 10 steps), hutch at 5 steps is alone: no row.
    assert "| sophiag | 10 | 2 of 2 | k1 at LR 0.0005 | 1.8000 | 2.0000 | 0.2000 |" in md
    assert "| sophiag | 5 |" not in md.split("## Tuning grids")[1].split("##")[0]


def test_a_tuning_grid_is_variants_with_their_own_warmup_started_round_robin(tmp_path, capsys):
    """A variant may tune the warmup (the others keep the runner's, here 5% of T as in the config),
    checked against T, not the config's shorter run; a study stopped half-way has every group's
    grid filled to the same depth: runs start round-robin over the groups."""
    argv = [BASE, "--optimizers", "", "--steps", "20000", "--lr_grid", "0.5,1", "--seeds", "1",
            "--variant", "adamw_w20=adamw --beta2=0.95 --warmup_iters=4000",
            "--variant", "sophiag_w20=sophiag --warmup_iters=4000", "--runs_dir", str(tmp_path / "runs"),
            "--hess_batch_size=6"]
    groups, runs = compare_plan.plan(*compare.parse_args(argv))
    assert [(g.label, g.warmup_iters) for g in groups] == [("adamw", 1000), ("adamw_w20", 4000), ("sophiag_w20", 4000)]
    assert all(compare_plan.resolve(r.args)["warmup_iters"] == r.group.warmup_iters for r in runs)
    assert compare_plan.resolve(runs[2].args)["beta2"] == 0.95
    order = [(r.group.label, r.lr) for r in compare_run.round_robin(runs)]
    assert [label for label, _ in order] == ["adamw", "adamw_w20", "sophiag_w20"] * 2
    assert order[:3] == [(g.label, g.lrs[0]) for g in groups]
    # Resumed with adamw's first run finished: the other groups' first runs still come first.
    write_metrics(runs[0].out_dir, {0: 4.0, 20000: 2.0})
    _, todo = compare_run.unfinished(runs)
    compare_run.execute(todo, compare.parse_args(argv + ["--no_train"])[0])
    printed = [line.split(": ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("not finished")]
    assert [p.rsplit("/", 1)[1].split("_T")[0] for p in printed] == ["adamw_w20", "sophiag_w20", "adamw", "adamw_w20",
                                                                       "sophiag_w20"]

    # WSD for every run: each ends its own decay, over the last decay_fraction of its own steps.
    _, wsd = compare_plan.plan(*compare.parse_args(argv + ["--optimizers", "sophiag:0.5", "--lr_schedule=wsd"]))
    half = next(r for r in wsd if r.group.steps == 10000)
    assert {compare_plan.resolve(r.args)["lr_schedule"] for r in wsd} == {"wsd"}
    assert compare_plan.resolve(half.args)["lr_decay_iters"] == 10000


def test_ablation_studies_run_the_papers_variants_sharing_the_baseline_and_collect_their_tables(tmp_path):
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--runs_dir", str(runs_dir), "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--hess_batch_size=4"]
    _, _, cfg, argvs = ablations.parse(argv)
    assert list(argvs) == ["rho_beta2", "hess_interval", "preconditioner", "clipping"]
    settings = {}
    for study_argv in argvs.values():
        for run in compare_plan.plan(*compare.parse_args(study_argv))[1]:
            settings[run.out_dir.name.split("_T")[0]] = compare_plan.resolve(run.args)
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


# ----------------------------------------------------------------------------- significance

def test_t_distribution_matches_tables_and_closed_forms():
    cdf = significance.t_cdf
    # One-sided 5% and 2.5% critical values of t tables.
    for t, df, p in ((2.131847, 4, 0.05), (1.833113, 9, 0.05), (4.302653, 2, 0.025), (1.644854, 1e7, 0.05)):
        assert cdf(-t, df) == pytest.approx(p, abs=1e-6) and cdf(t, df) == pytest.approx(1 - p, abs=1e-6)
        assert significance.t_quantile(1 - p, df) == pytest.approx(t, abs=1e-5)
        assert significance.t_quantile(p, df) == pytest.approx(-t, abs=1e-5)
    for t in (-300.0, -3.0, -0.5, 0.0, 0.7, 12.0):
        assert cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-10)  # Cauchy
        assert cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-10)
        for df in (1, 2.6, 9, 100):
            assert cdf(t, df) + cdf(-t, df) == pytest.approx(1.0, abs=1e-12)
    assert cdf(0.0, 3.3) == 0.5 and cdf(-math.inf, 3) == 0.0 and cdf(math.inf, 3) == 1.0
    # A fractional df (Welch's) lies between its neighbours: fewer degrees of freedom, heavier tails.
    assert cdf(-3.0, 2) > cdf(-3.0, 2.5) > cdf(-3.0, 3)
    assert cdf(-3.0, 2.5) == pytest.approx(0.0362880478, rel=1e-7)  # scipy.stats.t.cdf(-3, 2.5)
    assert significance.t_quantile(cdf(-1.3, 3.7), 3.7) == pytest.approx(-1.3, abs=1e-9)


def test_welch_and_one_sample_tests_by_hand():
    # [1, 2, 3] vs [4, 5, 6]: difference -3, variances 1, s.e. sqrt(1/3 + 1/3), df 4.
    r = significance.welch_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 0.05)
    assert r["n"] == r["n_baseline"] == 3 and r["diff_mean"] == -3.0 and r["df"] == pytest.approx(4.0)
    assert r["diff_std_err"] == pytest.approx(math.sqrt(2 / 3)) and r["t"] == pytest.approx(-3.6742346)
    assert r["p_one_sided"] == pytest.approx(0.0106558206, rel=1e-6) and r["significant"] and r["no_test"] is None
    assert r["diff_upper_bound"] == pytest.approx(-3 + 2.1318468 * math.sqrt(2 / 3))
    # The other way round: the same t, positive, is no evidence of a lower loss.
    r = significance.welch_test([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], 0.05)
    assert r["p_one_sided"] == pytest.approx(1 - 0.0106558206) and r["significant"] is False
    # Unequal variances 2 and 16: df = (2/2 + 16/3)^2 / ((2/2)^2 / 1 + (16/3)^2 / 2) = 2.635.
    r = significance.welch_test([1.0, 3.0], [0.0, 4.0, 8.0], 0.05)
    assert r["df"] == pytest.approx(2.6350365) and r["t"] == pytest.approx(-0.7947194)
    assert r["p_one_sided"] == pytest.approx(0.2460443591, rel=1e-6) and r["significant"] is False
    for losses, baseline in (([1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [3.0])):
        r = significance.welch_test(losses, baseline, 0.05)
        assert r["no_test"] == "n = 1: no test" and r["diff_mean"] is not None
        assert r["diff_std_err"] is r["p_one_sided"] is r["significant"] is r["t"] is None
    assert significance.welch_test([2.0, 2.0], [3.0, 3.0], 0.05)["no_test"] == "no spread across seeds: no test"

    # One sample [1, 2, 3] against 4: t = -2 / (1 / sqrt 3), df 2, p = 1/2 + t / (2 sqrt(2 + t^2)).
    r = significance.target_test([1.0, 2.0, 3.0], 4.0, 3, 0.05)
    t = -2 * math.sqrt(3)
    assert (r["target"], r["n"], r["seeds_reaching"], r["df"]) == (4.0, 3, 3, 2) and r["t"] == pytest.approx(t)
    assert r["p_one_sided"] == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t))) and r["significant"]
    assert significance.target_test([2.0], 2.5, 1, 0.05)["no_test"] == "n = 1: no test"


def test_significance_on_synthetic_metrics(tmp_path):
    """Three seeds each at one LR. The baseline adamw ends at 2.10, 2.12, 2.11 (the target
    2.11); Sophia-G at T/2 is clearly better, Sophia-H at T/2 a little (Welch p = 0.021), Lion
    is as good but noisy. The p-values are scipy.stats' ttest_ind(equal_var=False) and
    ttest_1samp, alternative='less'."""
    runs_dir = tmp_path / "runs"
    finals = {"adamw": [2.10, 2.12, 2.11], "sophiag": [2.00, 2.01, 2.02], "sophiah": [2.06, 2.09, 2.08],
              "lion": [2.00, 2.22, 2.12]}
    argv = [BASE, "--optimizers", "adamw,sophiag,sophiah,lion", "--steps", "10", "--lr_grid", "1", "--seeds",
            "1,2,3", "--runs_dir", str(runs_dir), "--hess_batch_size=6"]
    for run in compare_plan.plan(*compare.parse_args(argv))[1]:
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: finals[run.group.optimizer][run.seed - 1]})

    results = compare.main(argv)
    assert results["alpha"] == 0.05
    adamw, sophiag, sophiah, lion = (group(results, name) for name in finals)
    assert adamw["vs_baseline"] is None
    # Seed 1 of Sophia-G: 4.0 at step 0 to 2.00 at step 5 crosses 2.11 at 5 * 1.89 / 2.
    assert sophiag["per_seed"][0] == {"seed": 1, "val_loss": 2.0, "steps_to_target": pytest.approx(4.725)}
    expected = {"sophiag": (1.276083747e-4, True, 1.658379361e-3, True, 3),
                "sophiah": (0.02095725874, True, 0.03170709421, True, 3),
                "lion": (0.5184769229, False, 0.5185185185, False, 1)}
    for row in (sophiag, sophiah, lion):
        p, significant, p_target, target_significant, reaching = expected[row["label"]]
        welch, target = row["vs_baseline"], row["reaches_target"]
        assert (welch["n"], welch["n_baseline"], target["n"]) == (3, 3, 3)
        assert welch["p_one_sided"] == pytest.approx(p, rel=1e-6) and welch["significant"] is significant
        assert target["p_one_sided"] == pytest.approx(p_target, rel=1e-6)
        assert target["significant"] is target_significant and target["seeds_reaching"] == reaching
        assert welch["diff_mean"] == pytest.approx(statistics.fmean(finals[row["label"]]) - 2.11)

    md = (runs_dir / "results.md").read_text()
    section = md.split("## Significance")[1].split("## Every")[0]
    assert "one-sided at α = 0.05" in section and "Bonferroni's level is α/3 = 0.0167" in section
    assert "| adamw (baseline) | 10 | 3 | 2.1100 ± 0.0100 | — | — | — |" in section
    assert ("| sophiag | 5 | 3 | 2.0100 ± 0.0100 | -0.1000 (-0.0826) | 0.000128, significant | 0.00166, "
            "significant | 3 of 3 |") in section
    assert "| lion | 10 | 3 | 2.1133 ± 0.1102 | +0.0033 (+0.1878) | 0.518, not significant |" in section
    per_seed = "s1: 2.0000 (4.7), s2: 2.0100 (4.7), s3: 2.0200 (4.8)"  # final loss (steps to target)
    assert f"| sophiag | 5 | {sophiag['best_lr']:.3g} | {per_seed} |" in section
    words = {line.split("**")[1]: line for line in section.splitlines() if line.startswith("- **")}
    assert words["sophiag"].startswith("- **sophiag** at 5 steps (0.5T), n = 3, vs **adamw** at 10 steps, n = 3. "
                                       "Lower final val loss than adamw: **significant** (Δ = -0.1000 ± 0.0082 s.e.")
    assert "Welch t = -12.25, df = 4, p = 0.000128 < 0.05)" in words["sophiag"]
    assert "Reaches the target 2.1100: **significant**" in words["sophiag"]
    assert "p = 0.021 < 0.05)" in words["sophiah"]
    assert "Lower final val loss than adamw: not significant (" in words["lion"]
    assert "p = 0.518 ≥ 0.05)" in words["lion"]
    assert "Reaches the target 2.1100: not significant (" in words["lion"] and "1 of 3 seeds reach it" in words["lion"]

    # A stricter level: Sophia-H's difference is no longer significant, Sophia-G's still is.
    strict = compare.main(argv + ["--alpha", "0.01", "--results_dir", str(tmp_path / "strict")])
    assert group(strict, "sophiah")["vs_baseline"]["significant"] is False
    assert group(strict, "sophiag")["vs_baseline"]["significant"] is True
    assert "p = 0.021 ≥ 0.01)" in (tmp_path / "strict" / "results.md").read_text()

    # One seed (the same runs): no test, and the output says so rather than print a p-value.
    one = compare.main([a if a != "1,2,3" else "1" for a in argv] + ["--results_dir", str(tmp_path / "one")])
    assert one["seeds"] == [1]
    for row in one["groups"][1:]:
        assert row["vs_baseline"]["no_test"] == row["reaches_target"]["no_test"] == "n = 1: no test"
        assert row["vs_baseline"]["p_one_sided"] is None and row["vs_baseline"]["significant"] is None
    md = (tmp_path / "one" / "results.md").read_text()
    assert "| sophiag | 5 | 1 | 2.0000 | -0.1000 | n = 1: no test | n = 1: no test | 1 of 1 |" in md
    assert "Lower final val loss than adamw: n = 1: no test (Δ = -0.1000)" in md
    assert "significant" not in md


def test_significance_without_finished_seeds(tmp_path):
    """A group whose only LR has a failed seed is not tested; without a baseline nothing is."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag,lion", "--steps", "10", "--lr_grid", "1", "--seeds", "1,2",
            "--runs_dir", str(runs_dir), "--hess_batch_size=6"]
    finals = {"adamw": [2.1, 2.2], "sophiag": [2.0, math.nan], "lion": [2.3, 2.4]}
    for run in compare_plan.plan(*compare.parse_args(argv))[1]:
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: finals[run.group.optimizer][run.seed - 1]})
    results = compare.main(argv)
    sophiag, lion = group(results, "sophiag"), group(results, "lion")
    assert sophiag["per_seed"] == [] and sophiag["vs_baseline"] is sophiag["reaches_target"] is None
    assert lion["vs_baseline"]["significant"] is False and lion["reaches_target"]["seeds_reaching"] == 0
    md = (runs_dir / "results.md").read_text()
    assert "| sophiag | 5 | 0 | failed | — | — | — | — |" in md
    assert "- **sophiag** at 5 steps (0.5T): no LR at which every seed finished: no test." in md

    broken = runs_dir / group(results, "adamw")["lrs"][0]["runs"][1]["out_dir"]
    shutil.rmtree(broken)
    write_metrics(broken, {0: 4.0, 10: math.nan})  # the baseline's seed 2 diverged
    results = compare.main(argv)
    assert all(row["vs_baseline"] is None for row in results["groups"])
    md = (runs_dir / "results.md").read_text()
    assert "No test: the baseline adamw has no LR at which every seed finished." in md


def test_a_finished_run_of_older_code_is_reused_and_another_runs_settings_refused(tmp_path, capsys):
    """A run's config.json from older code lacks the keys added since: they count as their
    defaults, so the run is finished and not rerun; so is a run folder copied from elsewhere (its
    out_dir differs). A missing key whose wanted value is not the default, or a differing one, is
    another run: refused with one line."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--runs_dir", str(runs_dir), "--n_layer=1", "--no_train"]
    run = compare_plan.plan(*compare.parse_args(argv))[1][0]
    write_metrics(run.out_dir, {0: 4.0, 10: 2.0})
    config = compare_plan.resolve(run.args)
    added = next(k for k, v in config.items() if v == settings.DEFAULTS[k] and k != "init_from")
    copied = {k: v for k, v in config.items() if k != added} | {"out_dir": "/elsewhere/" + run.out_dir.name}
    (run.out_dir / "config.json").write_text(json.dumps(copied))
    results = compare.main(argv)
    assert results["groups"][0]["lrs"][0]["runs"][0]["state"] == "done"

    (run.out_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(SystemExit):
        compare.main(argv)
    assert f"error: {run.out_dir} holds a run with n_layer=12, not 1;" in capsys.readouterr().err


def test_results_tell_runs_not_run_from_failed_ones(tmp_path, monkeypatch):
    """A group or LR without a final loss is "not run" while none of its runs has run (--no_train,
    or still training elsewhere), "K of N not run" when some have finished, and "failed" only
    once a run has failed."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag,lion", "--steps", "10", "--lr_grid", "1", "--seeds", "1,2",
            "--runs_dir", str(runs_dir), "--hess_batch_size=6"]
    for run in compare_plan.plan(*compare.parse_args(argv))[1]:
        if run.group.label == "adamw" or (run.group.label == "lion" and run.seed == 1):
            write_metrics(run.out_dir, {0: 4.0, run.group.steps: 2.0})
    results = compare.main(argv + ["--no_train"])
    sophiag_lr, lion_lr = (f"{group(results, name)['lrs'][0]['lr']:.3g}" for name in ("sophiag", "lion"))
    md = (runs_dir / "results.md").read_text()
    lines = md.splitlines()
    assert "| sophiag | 5 | — | not run | — | — |" in lines  # the summary table
    assert "| lion | 10 | — | 1 of 2 not run | — | — |" in lines
    assert "| sophiag | 5 | 0 | not run | — | — | — | — |" in lines  # significance
    assert "| sophiag | 5 | — | not run |" in lines and "| lion | 10 | — | 1 of 2 not run |" in lines  # per seed
    assert f"| sophiag | 5 | {sophiag_lr} | not run | s1: — (not run), s2: — (not run) |" in lines
    assert f"| lion | 10 | {lion_lr} | 1 of 2 not run | s1: 2.0000, s2: — (not run) |" in lines
    assert "failed" not in md

    # Training them now: every run started exits 1 at once.
    monkeypatch.setattr(compare_run.subprocess, "run", lambda argv, **kw: compare_run.subprocess.CompletedProcess(argv, 1))
    compare.main(argv)
    md = (runs_dir / "results.md").read_text()
    lines = md.splitlines()
    assert "| sophiag | 5 | — | failed | — | — |" in lines and "| lion | 10 | — | failed | — | — |" in lines
    assert f"| lion | 10 | {lion_lr} | failed | s1: 2.0000, s2: — (failed (exit 1)) |" in lines
    assert "not run" not in md


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--runs_dir", str(runs_dir), "--hess_batch_size=6", "--dry_run", "--jobs", "2", "--threads", "2"]
    results = compare.main(argv)
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and all(c.startswith("$ OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python train.py ")
                                      for c in commands)
    assert [r["state"] for g in results["groups"] for r in g["lrs"][0]["runs"]] == ["not run", "not run"]
    assert not runs_dir.exists()


def test_no_plots_before_any_group_has_a_finished_lr(tmp_path):
    """--no_train before any run has finished: results.md and results.json, but no plot (each
    would be empty, its legend a matplotlib warning)."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--runs_dir", str(runs_dir), "--hess_batch_size=6", "--no_train"]
    results = compare.main(argv)
    assert sorted(p.name for p in runs_dir.iterdir()) == ["results.json", "results.md"]
    assert "![" not in (runs_dir / "results.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_compare.plot_all(results, tmp_path / "plots") == []
    assert list((tmp_path / "plots").iterdir()) == []


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
    assert saved["alpha"] == 0.05 and group(saved, "sophiag")["vs_baseline"]["no_test"] == "n = 1: no test"

    # HellaSwag on the character-level runs: a character their vocabulary lacks makes it n/a, not an error.
    example = json.loads(HELLASWAG.read_text().splitlines()[0])
    unencodable = tmp_path / "hellaswag.jsonl"
    unencodable.write_text(json.dumps({**example, "ctx": example["ctx"] + " 100% sure,"}) + "\n")
    scored = compare.main(argv + ["--no_train", "--hellaswag", str(unencodable), "--eval_device=cpu"])
    assert "$ python" not in capsys.readouterr().out
    for row in scored["groups"]:
        cell = row["downstream"]["hellaswag"]
        assert (cell["n"], cell["n_runs"], cell["status"], cell["acc_norm_mean"]) == (0, 1, "n/a (tokenizer)", None)
        assert "cannot be encoded" in cell["per_seed"][0]["error"] and cell["per_seed"][0]["step"] in (5, 10)
    best = group(scored, "adamw")["best_lr"]
    assert f"| adamw | 10 | {best:.3g} | — | 0 of 1, n/a (tokenizer) | n/a (tokenizer) | n/a (tokenizer) |" in (
        runs_dir / "results.md").read_text()

    # Make one run unfinished: drop its final evaluation, as a kill just before it would.
    redo = runs_dir / group(saved, "sophiag")["lrs"][0]["runs"][0]["out_dir"]
    lines = (redo / "metrics.jsonl").read_text().splitlines()
    (redo / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    others = {p: p.stat().st_mtime_ns for p in runs_dir.glob("*/metrics.jsonl") if p.parent != redo}
    started = []
    monkeypatch.setattr(compare_run.subprocess, "run",
                        lambda argv, **kw: started.append(argv) or compare_run.subprocess.CompletedProcess(argv, 0))

    # --no_train starts nothing: the unfinished run counts as not run.
    partial = compare.main(argv + ["--no_train"])
    assert started == [] and "not finished, not run (--no_train): " in capsys.readouterr().out
    assert [r["state"] for r in group(partial, "sophiag")["lrs"][0]["runs"]] == ["not run"]

    compare.main(argv)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert out.count("finished, not rerun") == 3
    assert len(commands) == 1 and commands[0].startswith("$ (resume)") and "--init_from=auto" in commands[0]
    assert len(started) == 1 and started[0][-2:] == [f"--out_dir={redo}", "--init_from=auto"]
    assert {p: p.stat().st_mtime_ns for p in others} == others


# ----------------------------------------------------------------------------- downstream scores

@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory) -> Path:
    """A GPT-2 BPE checkpoint (test_eval_downstream's tiny model on data/shakespeare), trained at step 4."""
    import train
    from tests.test_eval_downstream import TINY as TINY_EVAL
    out_dir = tmp_path_factory.mktemp("bpe")
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([*TINY_EVAL, f"--dataset={BPE}", f"--out_dir={out_dir}"])
    return next(out_dir.glob("ckpt_*.pt"))


def test_downstream_scores_of_finished_runs_are_cached_in_each_run(tmp_path, capsys, monkeypatch, bpe_checkpoint):
    """Synthetic finished runs, adamw's with a real checkpoint, sophiag's without: HellaSwag and
    SuperGLUE are scored by the eval scripts (subprocesses) on adamw's, sophiag's are "no
    checkpoint"; a second call reads downstream.json; a new checkpoint or another limit is scored again."""
    from scripts import eval_downstream, eval_hellaswag
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag", "--steps", "10", "--lr_grid", "1", "--seeds", "1",
            "--runs_dir", str(runs_dir), "--hess_batch_size=6", f"--dataset={BPE}", "--eval_device=cpu",
            "--hellaswag", str(HELLASWAG), "--hellaswag_limit", "3",
            "--superglue", str(SUPERGLUE), "--superglue_tasks", "rte,copa", "--superglue_limit", "2"]
    _, runs = compare_plan.plan(*compare.parse_args(argv))
    for run in runs:
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: 2.0})
    adamw_dir = next(r.out_dir for r in runs if r.group.label == "adamw")
    shutil.copy(bpe_checkpoint, adamw_dir)

    results = compare.main(argv)
    out = capsys.readouterr().out
    assert out.count("$ (downstream) ") == 2 and "python -m scripts.eval_hellaswag --out_dir=" in out
    assert results["downstream"]["hellaswag"]["examples"] == 3
    assert results["downstream"]["superglue"]["tasks"] == ["rte", "copa"]
    adamw, sophiag = group(results, "adamw"), group(results, "sophiag")
    hellaswag, superglue = adamw["downstream"]["hellaswag"], adamw["downstream"]["superglue"]
    # The eval scripts' own numbers on the same checkpoint.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        own_hs = eval_hellaswag.main([f"--out_dir={adamw_dir}", f"--data={HELLASWAG}", "--limit=3", "--device=cpu"])
        own_sg = eval_downstream.main([f"--out_dir={adamw_dir}", f"--data_dir={SUPERGLUE}", "--tasks=rte,copa",
                                       "--limit=2", "--device=cpu", f"--output={tmp_path / 'own'}"])
    assert (hellaswag["n"], hellaswag["n_runs"], hellaswag["status"], hellaswag["steps"]) == (1, 1, None, [4])
    assert hellaswag["acc_norm_mean"] == own_hs["acc_norm"] and hellaswag["acc_mean"] == own_hs["acc"]
    assert hellaswag["acc_norm_std"] == 0.0 and hellaswag["per_seed"][0]["examples"] == 3
    tasks = {name: r["accuracy"] for name, r in own_sg["tasks"].items()}
    assert superglue["tasks"] == {name: {"mean": acc, "std": 0.0} for name, acc in tasks.items()}
    assert superglue["average_mean"] == pytest.approx(statistics.fmean(tasks.values()))
    for cell in sophiag["downstream"].values():
        assert (cell["n"], cell["n_runs"], cell["status"]) == (0, 1, "no checkpoint")
        assert cell["per_seed"] == [{"seed": 1, "out_dir": "sophiag_T5_lr0.0005_s1", "status": "no checkpoint",
                                     "step": None, "cached": False}]
    md = (runs_dir / "results.md").read_text()
    section = md.split("## Downstream")[1].split("## Every")[0]
    assert ("| optimizer | steps | best LR | checkpoint step | seeds scored | HellaSwag acc_norm | HellaSwag acc | "
            "SuperGLUE avg (%) | rte (%) | copa (%) |") in section
    assert (f"| adamw | 10 | 0.004 | 4 | 1 of 1 | {own_hs['acc_norm']:.4f} | {own_hs['acc']:.4f} | "
            f"{100 * statistics.fmean(tasks.values()):.1f} | {100 * tasks['rte']:.1f} |") in section
    assert ("| sophiag | 5 | 0.0005 | — | 0 of 1, no checkpoint | no checkpoint | no checkpoint | no checkpoint | "
            "no checkpoint | no checkpoint |") in section
    assert "(the first 3 examples)" in section and "the first 2 validation examples of each" in section
    assert json.loads((runs_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    cache = json.loads((adamw_dir / "downstream.json").read_text())
    assert cache["hellaswag"]["key"]["checkpoint"]["file"] == bpe_checkpoint.name and cache["superglue"]["result"]

    # Rerun: nothing is scored again; then a new checkpoint, or another limit, is scored again.
    calls = []

    def fake_score(bench, out_dir, args):
        calls.append((bench.name, out_dir.name, bench.key["limit"]))
        return {"status": "ok", "acc_norm": 0.5, "acc": 0.25, "examples": 3, "truncated": 0}

    monkeypatch.setattr(downstream_scores, "score", fake_score)
    again = compare.main(argv)
    assert calls == [] and "$ (downstream)" not in capsys.readouterr().out
    assert group(again, "adamw")["downstream"]["hellaswag"]["acc_norm_mean"] == own_hs["acc_norm"]
    assert group(again, "adamw")["downstream"]["hellaswag"]["per_seed"][0]["cached"] is True
    shutil.copy(bpe_checkpoint, adamw_dir / "ckpt_00000010.pt")
    hellaswag_only = argv[:argv.index("--superglue")]
    changed = compare.main(hellaswag_only)  # at the new checkpoint
    assert calls == [("hellaswag", adamw_dir.name, 3)]
    assert group(changed, "adamw")["downstream"]["hellaswag"]["steps"] == [10]
    assert "superglue" not in group(changed, "adamw")["downstream"]
    compare.main([a if a != "3" else "2" for a in hellaswag_only])
    assert calls[1:] == [("hellaswag", adamw_dir.name, 2)]
    assert json.loads((adamw_dir / "downstream.json").read_text())["superglue"] == cache["superglue"]  # kept


def test_downstream_mean_and_std_over_seeds_at_the_best_lr(tmp_path, monkeypatch):
    """Scores chosen by a stand-in scorer: mean ± sample std over the seeds at each group's best
    LR only; a seed the benchmark does not apply to is left out and said; failures are not kept."""
    runs_dir = tmp_path / "runs"
    argv = [BASE, "--optimizers", "adamw,sophiag", "--steps", "10", "--lrs", "adamw=1e-3,2e-3",
            "--lrs", "sophiag=1e-3,2e-3", "--seeds", "1,2,3", "--runs_dir", str(runs_dir), "--hess_batch_size=6",
            "--hellaswag", str(HELLASWAG), "--superglue", str(SUPERGLUE), "--superglue_tasks", "cb"]
    for run in compare_plan.plan(*compare.parse_args(argv))[1]:
        write_metrics(run.out_dir, {0: 4.0, run.group.steps: 2.0 if run.lr == 1e-3 else 2.5})
        (run.out_dir / f"ckpt_{run.group.steps:08d}.pt").write_bytes(b"stand-in")
    acc_norm = {("adamw", 1): 0.30, ("adamw", 2): 0.32, ("adamw", 3): 0.34, ("sophiag", 1): 0.40, ("sophiag", 2): 0.44}
    calls, fail_once = [], {("adamw", 3)}

    def fake_score(bench, out_dir, args):
        label, seed = out_dir.name.split("_")[0], int(out_dir.name[-1])
        calls.append((bench.name, out_dir.name))
        assert "_lr0.001_" in out_dir.name  # the best LR's runs only
        if bench.name == "superglue":
            return {"status": "ok", "average": 0.5 + 0.1 * seed, "tasks": {"cb": 0.5 + 0.1 * seed},
                    "truncated": {"cb": 0.0}}
        if (label, seed) == ("sophiag", 3):
            return {"status": "n/a (tokenizer)", "error": "example 0 cannot be encoded with the model's tokenizer"}
        if (label, seed) in fail_once:
            fail_once.remove((label, seed))
            return {"status": "failed", "error": "CUDA out of memory"}
        return {"status": "ok", "acc_norm": acc_norm[label, seed], "acc": acc_norm[label, seed] - 0.1,
                "examples": 4, "truncated": 0}

    monkeypatch.setattr(downstream_scores, "score", fake_score)
    first = compare.main(argv)
    assert len(calls) == 12  # 2 groups x 3 seeds x 2 benchmarks
    cell = group(first, "adamw")["downstream"]["hellaswag"]
    assert (cell["n"], cell["status"], cell["acc_norm_mean"]) == (2, "failed", pytest.approx(0.31))
    assert cell["per_seed"][2]["error"] == "CUDA out of memory"
    second = compare.main(argv)  # only the failed scoring is tried again
    assert calls[12:] == [("hellaswag", "adamw_T10_lr0.001_s3")]
    adamw, sophiag = (group(second, name)["downstream"] for name in ("adamw", "sophiag"))
    assert adamw["hellaswag"]["acc_norm_mean"] == pytest.approx(0.32)
    assert adamw["hellaswag"]["acc_norm_std"] == pytest.approx(0.02)
    assert adamw["hellaswag"]["acc_mean"] == pytest.approx(0.22) and adamw["hellaswag"]["status"] is None
    assert (sophiag["hellaswag"]["n"], sophiag["hellaswag"]["status"]) == (2, "n/a (tokenizer)")
    assert sophiag["hellaswag"]["acc_norm_mean"] == pytest.approx(0.42)
    assert sophiag["hellaswag"]["acc_norm_std"] == pytest.approx(statistics.stdev([0.40, 0.44]))
    assert adamw["superglue"]["average_mean"] == pytest.approx(0.7)
    assert adamw["superglue"]["tasks"]["cb"]["std"] == pytest.approx(0.1)
    md = (runs_dir / "results.md").read_text()
    assert ("| adamw | 10 | 0.001 | 10 | 3 of 3 | 0.3200 ± 0.0200 | 0.2200 ± 0.0200 | 70.0 ± 10.0 | "
            "70.0 ± 10.0 |") in md
    assert ("| sophiag | 5 | 0.001 | 5 | HellaSwag 2 of 3, n/a (tokenizer); SuperGLUE 3 of 3 | 0.4200 ± 0.0283 | "
            "0.3200 ± 0.0283 | 70.0 ± 10.0 | 70.0 ± 10.0 |") in md


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, message", [
    (["--seed=3"], "use --seeds"),
    (["--alpha", "0.5"], "needs 0 < alpha < 0.5"),
    (["--learning_rate=1e-3"], "--lr_grid or --lrs"),
    (["--lrs", "sophiag=1e-3,2e-3,3e-3"], "same number of LRs"),
    (["--optimizers", "adamw,bogus"], "unknown optimizer"),
    (["--n_layr=2"], "did you mean --n_layer"),
    (["--hess_batch_size=240"], "hess_batch_size=240 exceeds"),
    (["--variant", "sophiag --hess_interval=1"], "expected LABEL=OPT"),
    (["--variant", "sophiah=sophiag --hess_interval=1"], "is an optimizer's name"),
    (["--variant", "k1=sophiag --max_iters=5"], "use --steps"),
    (["--variant", "k1=sophiag --batch_size=24"], "k1 (config/train_shakespeare_char_sophiag.py) sets batch_size=24"),
    (["--variant", "w=sophiag --lr_schedule=wsd"], "w (config/train_shakespeare_char_sophiag.py) sets lr_schedule='wsd'"),
    (["--variant", "k1=sophiag", "--variant", "k1=sophiah"], "a label is used twice"),
    (["--baseline", "k2", "--variant", "k1=sophiag"], "nor a --variant label"),
    (["--hellaswag", "nowhere/hellaswag_val.jsonl"], "nowhere/hellaswag_val.jsonl not found"),
    (["--hellaswag_limit", "-1"], "--hellaswag_limit and --superglue_limit must be at least 0"),
    (["--superglue", "nowhere"], "--superglue nowhere is not a directory"),
    (["--superglue", str(SUPERGLUE), "--superglue_tasks", "rte,mnli"], "--superglue_tasks=rte,mnli: each task once"),
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
    assert compare_plan.optimizer_config(base, "sophiag", {}) == tmp_path / "train_x_sophiag.py"
    assert compare_plan.optimizer_config(base, "lion", {}) == tmp_path / "train_x.py"
    assert compare_plan.optimizer_config(base, "lion", {"lion": "mine.py"}) == Path("mine.py")


# ----------------------------------------------------------------------------- toy landscape (paper Fig. 2)

def test_toy_landscape_figure(tmp_path, capsys):
    out = tmp_path / "toy.png"
    finals = toy_landscape.main([f"--output={out}"])
    assert out.stat().st_size > 10_000
    t1, t2, loss = finals["Sophia"]
    assert abs(t1 - 1) < 1e-2 and abs(t2 - 4) < 1e-2 and loss < 1e-3
    assert abs(finals["Newton"][0]) < 1e-2  # stuck at the saddle t1 = 0
    assert all(finals[name][2] > 0.1 for name in ("GD", "SignGD", "Adam"))  # not there yet in 30 steps
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in toy_landscape.COLORS)

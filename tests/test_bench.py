"""scripts/bench_optimizer.py --what gpu (scripts/bench_gpu.py), checked on the CPU: the
rehearsal runs the GPU benchmark's whole path end to end, the GPU plan's train.py runs are valid
configs, the report handles what only a GPU logs (mfu, memory_gib) and what it does not, and
without CUDA the command is a one-line error."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch

import benchmarking
from errors import UserError
from paths import ROOT
from scripts import bench_gpu as gpu
from scripts import bench_optimizer as bench
from tests.helpers import expect_one_line_error


def run_main(monkeypatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_optimizer", *argv])
    bench.main()


def test_gpu_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_one_line_error(capsys, lambda argv: run_main(monkeypatch, argv), ["--what", "gpu"],
                          "needs a CUDA GPU", "--rehearse")
    expect_one_line_error(capsys, lambda argv: run_main(monkeypatch, argv), ["--what", "step", "--rehearse"],
                          "--rehearse goes with --what gpu")


def test_estimator_batches_are_the_papers_fractions():
    # config/_gpt2_small.py: 12 x 40 = 480 sequences; Sophia-G 240 of them, Sophia-H 32.
    assert gpu.paper_estimator_batches() == {"sophiag": (240, 480), "sophiah": (32, 480)}
    hess = gpu.scaled_hess_batches(64)
    assert hess["sophiag"] == (32, "240/480 x 64 = 32")
    assert hess["sophiah"][0] == 4 and "4.27" in hess["sophiah"][1] and "rounded to 4" in hess["sophiah"][1]
    assert gpu.scaled_hess_batches(4)["sophiah"][0] == 1  # never 0


def test_step_shapes_are_gpt2_small_and_medium():
    from model import GPT, GPTConfig

    counts = {}
    for name in ("small", "medium"):
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in GPT(GPTConfig(**benchmarking.SHAPES[name])).parameters())
    assert 124e6 < counts["small"] < 125e6 and 354e6 < counts["medium"] < 356e6, counts


@pytest.mark.parametrize("rehearse", [False, True])
def test_the_plans_train_runs_pass_train_py_checks(rehearse):
    """The GPU plan's argument lists (device cuda, compile, bf16, block 1024) are valid configs:
    a typo there would otherwise surface only on a GPU."""
    plan = gpu.gpu_plan(rehearse, None)
    hess = gpu.scaled_hess_batches(plan.sequences)
    argvs = {name: gpu.gpu_train_argv(plan, name, hess.get(name, (0, ""))[0], "_bench_synthetic_test",
                                      ROOT / "out-test") for name, _ in gpu.GPU_TRAIN}
    if not rehearse:
        for name, argv in argvs.items():
            assert {"--compile=True", "--dtype=bfloat16", "--block_size=1024", "--device=cuda"} <= set(argv), argv
        assert "--hess_batch_size=32" in argvs["sophiag"] and "--hess_batch_size=4" in argvs["sophiah"]
    # The runs are checked in order, so the error names the mistyped last one.
    with pytest.raises(UserError, match="refuses the mistyped run of --what gpu: .*batch_sise"):
        gpu.check_train_argvs({**argvs, "mistyped": [*argvs["adamw"], "--batch_sise=3"]})


def test_summary_without_gpu_fields():
    records = [{"kind": "eval", "iter": 0, "val_loss": 10.9}]
    records += [{"kind": "train", "iter": 10 * i, "time_ms": t, "tokens_per_s": 1000 / t, "loss": 10.8}
                for i, t in enumerate([900.0, 300.0, 100.0, 110.0, 120.0, 130.0], start=1)]
    summary = gpu.summarize_train(records, skip=2)
    assert summary["time_ms"] == 115.0 and summary["steady_windows"] == 4
    assert summary["mfu"] is None and summary["memory_gib"] is None and summary["estimator_ms"] is None
    with pytest.raises(benchmarking.RunFailed):
        gpu.summarize_train(records[:1], skip=2)


def fake_gpu_results(plan) -> dict:
    def train(ms, mfu, gib, est=None, hess=0):
        return {"status": "ok", "time_ms": ms, "tokens_per_s": plan.tokens_per_iter / ms * 1000, "mfu": mfu,
                "estimator_ms": est, "memory_gib": gib, "peak_rss_gib": 3.0, "windows_ms": [9e4, 500.0, ms, ms],
                "steady_windows": 2, "wall_s": 90.0, "hess_batch_size": hess}

    def step(ms, mean, n_params=124.4e6):
        return {"status": "ok", "n_params": n_params, "step_ms": ms, "step_ms_mean": mean, "hessian_ms": 0.5,
                "cuda_peak_mib": 2000.0, "peak_rss_mib": 900.0}

    small = {"adamw_fused": step(1.0, 1.0), "sophiag_compiled_s10": step(0.86, 0.88),
             "sophiag_compiled": step(0.95, 0.95), "sophiag_foreach": {"status": "failed: exit 1: boom"}}
    medium = {"adamw_fused": step(3.0, 3.0), "sophiag_compiled_s10": step(2.9, 2.95)}
    return {"train": {"adamw": train(130.0, 0.47, 20.0), "sophiag": train(133.0, 0.46, 20.4, 4.0, 32),
                      "sophiah": train(140.0, 0.44, 21.0, 9.0, 4)},
            "step": {"small": small, "medium": medium}}


def test_gpu_report_reads_the_targets():
    """The report of a CUDA run, from made-up results: every target gets its measured value and a verdict."""
    plan = gpu.gpu_plan(False, None)
    header = {"machine": "NVIDIA H200", "gpu_name": "NVIDIA H200", "command": "python -m scripts.bench_optimizer "
              "--what gpu", "date": "today", "progress": "Wall time: 400 s"}
    text = gpu.gpu_report(plan, fake_gpu_results(plan), gpu.scaled_hess_batches(plan.sequences), header)
    targets = text.split("## Targets")[1]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets.splitlines() if line.startswith("| ")}
    assert "1.023x" in rows["Sophia-G training iteration <= 1.03x AdamW (GPT-2 small (124M), k = 10)"]
    assert rows["Sophia-G training iteration <= 1.03x AdamW (GPT-2 small (124M), k = 10)"].endswith("| met |")
    step_row = next(v for k, v in rows.items() if k.startswith("Sophia step"))
    assert "small 0.880x" in step_row and "medium 0.983x" in step_row and "met by small; missed by medium" in step_row
    mfu_row = next(v for k, v in rows.items() if k.startswith("MFU"))
    assert "AdamW 47.0%" in mfu_row and "met by AdamW, Sophia-G; missed by Sophia-H" in mfu_row
    memory_row = next(v for k, v in rows.items() if k.startswith("Peak memory"))
    assert "Sophia-G 1.020x" in memory_row and "Sophia-H 1.050x" in memory_row
    assert "failed: exit 1: boom" in text and "rehearsal" not in text.lower()
    assert "| Sophia-H | 4 | 140.0 | 1.077x |" in text

    # Another GPU, and fields a run did not log: no crash, and the MFU target says why it does not apply.
    results = fake_gpu_results(plan)
    for r in results["train"].values():
        r["mfu"] = r["memory_gib"] = None
    header["gpu_name"] = "NVIDIA A100-SXM4-80GB"
    text = gpu.gpu_report(plan, results, gpu.scaled_hess_batches(plan.sequences), header)
    assert "n/a: no mfu logged" in text
    assert "| Peak memory within 3% of AdamW's (training run) | - | not measured |" in text
    results["train"]["sophiah"]["mfu"] = 0.3
    text = gpu.gpu_report(plan, results, gpu.scaled_hess_batches(plan.sequences), header)
    assert "n/a: not an H100/H200 (NVIDIA A100-SXM4-80GB)" in text


def test_a_failed_or_late_run_costs_only_its_row(tmp_path, monkeypatch):
    """The orchestration with the runs faked: a run that raises is reported as failed, one cut by
    the deadline as stopped, the runs after the deadline as not run; the report and the raw JSON
    are still written, the synthetic dataset deleted, and the exit status is 1."""
    clock = types.SimpleNamespace(offset=0.0)
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(
        monotonic=lambda: time.monotonic() + clock.offset, perf_counter=time.perf_counter,
        strftime=time.strftime, gmtime=time.gmtime, sleep=time.sleep))
    fake = fake_gpu_results(gpu.gpu_plan(False, None))
    seen = []

    def train_run(plan, name, hess_batch_size, dataset, timeout):
        seen.append(name)
        assert (bench.ROOT / "data" / dataset / "train.bin").exists()
        if name == "sophiag":
            raise ValueError("boom")
        if name == "sophiah":
            raise benchmarking.RunFailed(f"timed out after {timeout:.0f} s")
        return fake["train"][name]

    def worker(args, timeout, threads=0):
        seen.append(f"{args[5]} {args[1]}")
        if args[1] == "sophiag_foreach":
            clock.offset = 10_000.0  # the deadline passes during this run
        return fake["step"]["small"]["adamw_fused"]

    monkeypatch.setattr(gpu, "gpu_train_run", train_run)
    monkeypatch.setattr(gpu, "run_worker", worker)
    args = argparse.Namespace(rehearse=True, budget_s=100.0, threads=0, only=None, output=tmp_path / "report.md",
                              raw=tmp_path / "raw.json")
    assert gpu.bench_gpu(args) == 1
    assert seen == ["adamw", "sophiag", "tiny adamw_fused", "tiny sophiag_compiled_s10", "sophiah",
                    "tiny sophiag_compiled", "tiny sophiag_foreach"]
    text = args.output.read_text()
    assert "| Sophia-G | | failed: ValueError: boom |" in text
    assert re.search(r"\| Sophia-H \| \| stopped by the --budget_s deadline after \d+ s \|", text)
    assert text.count("not run: the --budget_s deadline had passed") == 4  # the tiny2 step runs
    assert "| AdamW | - | 130.0 | 1.000x |" in text
    assert json.loads(args.raw.read_text())["results"]["train"]["sophiag"]["status"] == "failed: ValueError: boom"
    assert not (bench.ROOT / "data" / f"{gpu.SYNTHETIC_PREFIX}_{os.getpid()}").exists()


def test_the_machine_line_on_a_gpu(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H200", total_memory=143771 * 2 ** 20, major=9, minor=0,
                                  multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    line = gpu.gpu_machine("cuda")
    assert line.startswith("NVIDIA H200 (140 GiB, compute capability 9.0, 132 SMs, bf16 supported), CUDA ")
    assert f"torch {torch.__version__}" in line


def test_a_run_past_its_time_is_stopped(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(benchmarking.RunFailed, match="timed out after 1 s"):
        benchmarking.spawn([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                    tmp_path / "log", timeout=1)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(benchmarking.RunFailed, match="exit 3: bad thing"):
        benchmarking.spawn([sys.executable, "-c", "import sys; print('bad thing'); sys.exit(3)"], tmp_path / "log", 60)


@pytest.mark.slow
def test_rehearsal_runs_the_gpu_path_end_to_end(tmp_path):
    """--what gpu --rehearse: three train.py runs and eight step workers on the CPU, the report
    written, the synthetic dataset deleted (about a minute on an idle 2-core machine)."""
    out, raw = tmp_path / "report.md", tmp_path / "raw.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.bench_optimizer", "--what=gpu", "--rehearse",
                           f"--output={out}", f"--raw={raw}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    for heading in ("## Training iteration", "## Optimizer step", "## Targets"):
        assert heading in text
    for label in ("AdamW", "Sophia-G", "Sophia-H"):
        assert re.search(rf"^\| {label} \| [-\d]+ \| [\d.]+ \| [\d.]+x \|", text, re.M), (label, text)
    for shape in ("tiny", "tiny2"):
        for name in gpu.GPU_STEP:
            assert re.search(rf"^\| {shape} \([\d.]+M\) \| {name} \| [\d.]+ \|", text, re.M), (shape, name, text)
    assert "failed" not in text and "not run" not in text and "pending" not in text
    assert text.count("(rehearsal: not a measurement)") == 4
    results = json.loads(raw.read_text())["results"]
    assert results["train"]["sophiag"]["hess_batch_size"] == 2 and results["train"]["sophiah"]["hess_batch_size"] == 1
    assert results["train"]["adamw"]["mfu"] is None  # a CPU logs none
    folder = re.search(r"synthetic dataset: (data/\S+)", proc.stderr).group(1)
    assert folder.startswith("data/_bench_synthetic_") and not (ROOT / folder).exists()

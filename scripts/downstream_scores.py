"""Downstream scores of an optimizer comparison (scripts/compare.py --hellaswag, --superglue):
each group's runs at its best LR scored on HellaSwag (scripts/eval_hellaswag.py) and the paper's
2-shot SuperGLUE (scripts/eval_downstream.py), each eval script in a subprocess on the run's
latest checkpoint, the results kept in the run's downstream.json, and results.md's table of them.

It works on compare.py's results (results.json's content): a run is its seed and out_dir there.
"""

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from configurator import comma_list
from errors import UserError
from paths import ROOT, shown
from scripts.significance import mean_std

DOWNSTREAM_CACHE = "downstream.json"
# eval script's error line -> why the benchmark does not apply to the model (kept, not retried)
NOT_APPLICABLE = (("cannot be encoded with the model's tokenizer", "n/a (tokenizer)"),
                  ("more than the model's block_size", "n/a (block_size)"))
BENCHMARK_NAMES = {"hellaswag": "HellaSwag", "superglue": "SuperGLUE"}


@dataclass(frozen=True)
class Benchmark:
    """A downstream benchmark to score runs on: 'hellaswag' (scripts/eval_hellaswag.py) or
    'superglue' (scripts/eval_downstream.py)."""
    name: str
    path: str  # the data file or folder, as given
    key: dict  # what the scores depend on besides the checkpoint: the data's sha256, limit, tasks, protocol
    args: tuple[str, ...]  # the eval script's arguments besides --out_dir, --device and --output


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def benchmarks(args: argparse.Namespace) -> list[Benchmark]:
    """The benchmarks --hellaswag and --superglue ask for, their data read and checked (one-line
    errors) before any run starts. The eval scripts import torch: only when asked for."""
    out = []
    if args.hellaswag:
        from scripts import eval_hellaswag
        n = len(eval_hellaswag.read_examples(args.hellaswag))
        n = min(n, args.hellaswag_limit) if args.hellaswag_limit else n
        out.append(Benchmark("hellaswag", args.hellaswag,
                             {"sha256": sha256_of([Path(args.hellaswag)]), "limit": args.hellaswag_limit,
                              "examples": n},
                             (f"--data={shown(Path(args.hellaswag))}", f"--limit={args.hellaswag_limit}")))
    if args.superglue:
        from scripts import eval_downstream
        tasks = comma_list(args.superglue_tasks, str, "--superglue_tasks")
        unknown = [t for t in tasks if t not in eval_downstream.TASKS]
        if unknown or len(set(tasks)) != len(tasks):
            raise UserError(f"--superglue_tasks={args.superglue_tasks}: each task once, from "
                            f"{', '.join(eval_downstream.TASKS)}")
        if not Path(args.superglue).is_dir():
            raise UserError(f"--superglue {args.superglue} is not a directory; point it at a folder with "
                            f"<task>/train.jsonl and <task>/val.jsonl")
        files = []
        for task in tasks:
            eval_downstream.load_task_data(args.superglue, task)  # fields and labels checked
            folder = eval_downstream.task_folder(args.superglue, task)
            files += [folder / "train.jsonl", folder / "val.jsonl"]
        protocol = {k: eval_downstream.DEFAULTS[k] for k in ("num_fewshot", "num_draws", "seed")}
        out.append(Benchmark("superglue", args.superglue,
                             {"sha256": sha256_of(files), "tasks": tasks, "limit": args.superglue_limit, **protocol},
                             (f"--data_dir={shown(Path(args.superglue))}", f"--tasks={','.join(tasks)}",
                              f"--limit={args.superglue_limit}")))
    return out


def latest_checkpoint(out_dir: Path) -> dict | None:
    """The checkpoint an eval script scores (the latest ckpt_<step>.pt) as {file, step, size,
    mtime_ns}: a changed checkpoint is scored again. None: the run saved none."""
    paths = sorted(out_dir.glob("ckpt_*.pt"))
    if not paths:
        return None
    stat = paths[-1].stat()
    return {"file": paths[-1].name, "step": int(paths[-1].stem.removeprefix("ckpt_")), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


def score(bench: Benchmark, out_dir: Path, args: argparse.Namespace) -> dict:
    """Score out_dir's latest checkpoint on a benchmark with its eval script, in a subprocess
    (its memory is freed when it ends; its output is appended to out_dir/downstream.log).
    Returns {"status": "ok", scores...}, or the status "n/a (tokenizer)" / "n/a (block_size)"
    (the model cannot take the data) or "failed", with the script's error line."""
    if bench.name == "hellaswag":
        output = out_dir / "hellaswag.json"  # the eval script's report, every example's scores
        module, written = "scripts.eval_hellaswag", output
    else:
        output = out_dir / "superglue"  # superglue.json and superglue.md
        module, written = "scripts.eval_downstream", output.with_suffix(".json")
    argv = [sys.executable, "-m", module, f"--out_dir={shown(out_dir)}", *bench.args,
            f"--device={args.eval_device}", f"--output={shown(output)}"]
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print("$ (downstream) " + " ".join(f"{k}={v}" for k, v in env.items()) + " python " + shlex.join(argv[1:]),
          flush=True)
    written.unlink(missing_ok=True)
    log_path = out_dir / "downstream.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        code = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode
    with open(log_path, errors="replace") as log:
        log.seek(start)
        errors = [line.strip() for line in log.read().replace("\r", "\n").splitlines() if line.startswith("error: ")]
    if code != 0 or not written.is_file():
        error = errors[-1].removeprefix("error: ") if errors else f"exit {code}, see {shown(log_path)}"
        status = next((s for fragment, s in NOT_APPLICABLE if fragment in error), "failed")
        print(f"  {bench.name} of {shown(out_dir)}: {status}: {error}", flush=True)
        return {"status": status, "error": error}
    report = json.loads(written.read_text())
    print(f"  {bench.name} of {shown(out_dir)}: scored in {time.perf_counter() - t0:.1f}s", flush=True)
    if bench.name == "hellaswag":
        return {"status": "ok", **{k: report[k] for k in ("acc_norm", "acc", "examples", "truncated")}}
    tasks = {name: r["accuracy"] for name, r in report["tasks"].items()}
    return {"status": "ok", "average": statistics.fmean(tasks.values()), "tasks": tasks,
            "truncated": {name: r["truncated"] for name, r in report["tasks"].items()}}


def read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: score again
        return {}
    return cache if isinstance(cache, dict) else {}


def run_scores(out_dir: Path, benches: list[Benchmark], args: argparse.Namespace) -> dict[str, dict]:
    """{benchmark: result} of a finished run's latest checkpoint: from out_dir/downstream.json
    when it holds a result for the same checkpoint, data and settings, else scored (and the
    result kept there, unless the scoring failed). Each result has status, step (of the
    checkpoint; None without one), cached, and when ok the scores."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return {b.name: {"status": "no checkpoint", "step": None, "cached": False} for b in benches}
    cache_path = out_dir / DOWNSTREAM_CACHE
    cache, out = read_cache(cache_path), {}
    for bench in benches:
        key = json.loads(json.dumps({**bench.key, "checkpoint": checkpoint}))
        entry = cache.get(bench.name)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("result"), dict):
            out[bench.name] = {**entry["result"], "cached": True}
            continue
        result = {**score(bench, out_dir, args), "step": checkpoint["step"]}
        if result["status"] != "failed":  # a failure may be passing (memory, a device): tried again next time
            cache = {**read_cache(cache_path), bench.name: {"key": key, "data": bench.path, "result": result}}
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            tmp.write_text(json.dumps(cache, indent=1) + "\n")
            os.replace(tmp, cache_path)
        out[bench.name] = {**result, "cached": False}
    return out


def group_downstream(bench: Benchmark, best_runs: list[dict], scores: dict[str, dict[str, dict]]) -> dict:
    """A group's scores on one benchmark at its best LR: mean and std over the seeds scored.
    best_runs: results.json's runs there; scores: run_scores by their out_dir."""
    per_seed = [{"seed": r["seed"], "out_dir": r["out_dir"], **scores[r["out_dir"]][bench.name]} for r in best_runs]
    ok = [s for s in per_seed if s["status"] == "ok"]
    missing = sorted({s["status"] for s in per_seed if s["status"] != "ok"})
    row = {"n": len(ok), "n_runs": len(per_seed), "status": ", ".join(missing) or None,
           "steps": sorted({s["step"] for s in ok})}
    metrics = ("acc_norm", "acc") if bench.name == "hellaswag" else ("average",)
    for metric in metrics:
        row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std([s[metric] for s in ok])
    if bench.name == "superglue":
        row["tasks"] = {}
        for task in bench.key["tasks"]:
            mean, std = mean_std([s["tasks"][task] for s in ok])
            row["tasks"][task] = {"mean": mean, "std": std}
    return {**row, "per_seed": per_seed}


def add_downstream(results: dict, benches: list[Benchmark], args: argparse.Namespace) -> None:
    """Score the runs at each group's best LR (every seed finished there) and put the scores
    into results: results["downstream"] (what was scored) and each group's "downstream".
    results: compare.py's, whose runs' out_dir are relative to args.runs_dir."""
    results["downstream"] = {b.name: {"data": b.path, **b.key} for b in benches} or None
    for row in results["groups"]:
        best_runs = [r for lr_row in row["lrs"] if lr_row["lr"] == row["best_lr"] for r in lr_row["runs"]]
        scores = {r["out_dir"]: run_scores(Path(args.runs_dir) / r["out_dir"], benches, args)
                  for r in best_runs} if benches else {}
        row["downstream"] = {b.name: group_downstream(b, best_runs, scores) for b in benches} or None


def fmt_score(cell: dict, mean: float | None, std: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """A downstream table cell: mean ± std over the seeds scored; why none was; or — (no LR at
    which every seed finished)."""
    if cell["n_runs"] == 0:
        return "—"
    if cell["n"] == 0:
        return cell["status"]
    return f"{scale * mean:.{digits}f}" + ("" if cell["n"] == 1 else f" ± {scale * std:.{digits}f}")


def fmt_scored(cells: dict[str, dict]) -> str:
    """The seeds-scored cell: "n of N" and why not the others, per benchmark when they differ."""
    texts = {}
    for name, c in cells.items():
        why = f", {c['status']}" if c["status"] else ""
        texts[name] = "—" if c["n_runs"] == 0 else f"{c['n']} of {c['n_runs']}{why}"
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{BENCHMARK_NAMES[name]} {text}" for name, text in texts.items())


def downstream_lines(results: dict) -> list[str]:
    """results.md's downstream section: each group's scores at its best LR ([] if none asked for)."""
    benches = results.get("downstream")
    if not benches:
        return []
    hs, sg = benches.get("hellaswag"), benches.get("superglue")
    text = ("Each optimizer at its best LR (by final val loss): the latest checkpoint of each seed's run, "
            "mean ± std (sample, over the seeds scored). ")
    header, rule = "| optimizer | steps | best LR | checkpoint step | seeds scored |", "|---|---:|---:|---:|---|"
    if hs:
        first = "the first " if hs["limit"] else ""
        text += (f"HellaSwag: {hs['data']} ({first}{hs['examples']} examples), llm.c's completion scoring "
                 "(scripts/eval_hellaswag.py): acc_norm picks the ending with the highest mean log-likelihood per "
                 "token, acc the highest sum; chance is 0.25. ")
        header, rule = header + " HellaSwag acc_norm | HellaSwag acc |", rule + "---|---|"
    if sg:
        limit = f", the first {sg['limit']} validation examples of each" if sg["limit"] else ""
        text += (f"SuperGLUE: {sg['data']} ({', '.join(sg['tasks'])}{limit}), the paper's {sg['num_fewshot']}-shot "
                 f"prompts, accuracy in % averaged over {sg['num_draws']} exemplar draws (scripts/eval_downstream.py); "
                 "avg is the mean over the tasks. ")
        header += " SuperGLUE avg (%) |" + "".join(f" {task} (%) |" for task in sg["tasks"])
        rule += "---|" * (1 + len(sg["tasks"]))
    text += ("Checkpoint step: of the checkpoints scored; below the run's steps when the config sets "
             "always_save_checkpoint=False and the val loss did not improve at the end (the latest checkpoint is "
             "then the best). Scores are kept in each run's downstream.json and redone when its checkpoint, the "
             "data or the settings change. n/a (tokenizer): the data has characters the model's vocabulary lacks; "
             "n/a (block_size): a HellaSwag ending is longer than the model's context.")
    lines = ["", "## Downstream", "", text, "", header, rule]
    for row in results["groups"]:
        cells = row["downstream"]
        steps = sorted({s for cell in cells.values() for s in cell["steps"]})
        best = "—" if row["best_lr"] is None else f"{row['best_lr']:.3g}"
        steps_cell = ", ".join(map(str, steps)) or "—"
        line = f"| {row['label']} | {row['steps']} | {best} | {steps_cell} | {fmt_scored(cells)} |"
        if hs:
            cell = cells["hellaswag"]
            line += (f" {fmt_score(cell, cell['acc_norm_mean'], cell['acc_norm_std'])} |"
                     f" {fmt_score(cell, cell['acc_mean'], cell['acc_std'])} |")
        if sg:
            cell = cells["superglue"]
            line += f" {fmt_score(cell, cell['average_mean'], cell['average_std'], 100, 1)} |"
            line += "".join(f" {fmt_score(cell, t['mean'], t['std'], 100, 1)} |" for t in cell["tasks"].values())
        lines.append(line)
    return lines

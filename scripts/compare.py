"""Fair optimizer comparison, following the Sophia paper's methodology (Sec. 3.2): every
optimizer at its step budget (Sophia T/2, others T), each tuned over the same LR grid density,
on identical data, model and evaluation; the speed-up to reach the tuned baseline's loss, with
one-sided t-tests over seeds. Runs locally or as SLURM batch jobs; finished runs are reused.

    python -m scripts.compare config/train_shakespeare_char.py --optimizers adamw,sophiag,lion \\
        --steps 2000 --lr_grid 0.5,1,2 --seeds 1,2,3 --runs_dir out-compare --jobs 2

Writes results.md, results.json and plots into --results_dir (default --runs_dir). The plan:
scripts/compare_plan.py; running: scripts/compare_run.py and compare_slurm.py; the results
and the tests: scripts/compare_report.py.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dataset import prepare_dataset
from errors import UserError, exit_on_user_error
from paths import ROOT, shown
from scripts import compare_run, compare_slurm
from scripts.compare_plan import check_overrides, plan, resolve
from scripts.compare_report import markdown, summarize
from scripts.downstream_scores import add_downstream, benchmarks
from scripts.plot_compare import plot_all


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The runner's options and the --key=value overrides passed on to every run."""
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", usage="%(prog)s CONFIG [options] [--key=value ...]",
                                description=__doc__, formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                                    prog, max_help_position=30, width=110),
                                allow_abbrev=False)  # else --seed=1 would silently mean --seeds
    p.add_argument("config", help="base config file, e.g. config/train_shakespeare_char.py")
    w = p.add_argument_group("what to compare (every other --key=value goes to every run)")
    w.add_argument("--optimizers", metavar="LIST", default="adamw,sophiag", help="comma list of OPT or OPT:FRACTION of T")
    w.add_argument("--variant", action="append", default=[], metavar="SPEC",
                   help='an extra group "LABEL=OPT[:FRACTION] --key=value ..." (repeatable)')
    w.add_argument("--baseline", metavar="LABEL", default="adamw", help="the optimizer or variant whose tuned loss is the target")
    w.add_argument("--config_for", action="append", default=[], metavar="OPT=FILE",
                   help="config file for one optimizer (repeatable; default: <family>_OPT.py)")
    s = p.add_argument_group("the sweep")
    s.add_argument("--steps", metavar="T", type=int, help="T, the baseline's steps (default: the config's max_iters)")
    s.add_argument("--lr_grid", metavar="LIST", default="0.5,1,2", help="multipliers of each optimizer's learning_rate")
    s.add_argument("--lrs", action="append", default=[], metavar="OPT=LIST",
                   help="explicit peak LRs for one optimizer (repeatable; as many as the grid)")
    s.add_argument("--seeds", metavar="LIST", default="1,2,3", help="comma list of seeds")
    s.add_argument("--warmup_iters", metavar="N", type=int, help="warmup steps of every run (default: the config's fraction of T)")
    s.add_argument("--alpha", metavar="A", type=float, default=0.05, help="level of the one-sided tests (default 0.05)")
    r = p.add_argument_group("running")
    r.add_argument("--runs_dir", metavar="DIR", default="out-compare", help="folder of the runs (and of the results)")
    r.add_argument("--results_dir", metavar="DIR", default=None, help="folder of the results and plots (default: --runs_dir)")
    r.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local subprocesses, or one SLURM batch job per run")
    r.add_argument("--jobs", metavar="N", type=int, default=1, help="local runs in parallel")
    r.add_argument("--threads", metavar="N", type=int, default=os.cpu_count() or 1,
                   help="CPU threads shared out over the local runs (default: all cores)")
    r.add_argument("--no_train", action="store_true", help="start nothing: report the runs' states and results")
    r.add_argument("--dry_run", action="store_true", help="print the commands or job scripts; start nothing")
    compare_slurm.add_options(p)
    d = p.add_argument_group("downstream scores of each group's best-LR runs")
    d.add_argument("--hellaswag", metavar="PATH", help="HellaSwag jsonl: acc_norm and acc")
    d.add_argument("--hellaswag_limit", type=int, default=0, metavar="N", help="its first N examples (0: all)")
    d.add_argument("--superglue", metavar="DIR", help="SuperGLUE folder: 2-shot accuracy per task and average")
    d.add_argument("--superglue_tasks", metavar="LIST", default="boolq,rte,cb,copa", help="comma list (default: the paper's four)")
    d.add_argument("--superglue_limit", type=int, default=0, metavar="N", help="first N examples per task (0: all)")
    d.add_argument("--eval_device", metavar="DEV", default="auto", help="device of the scoring: auto, cpu, cuda, cuda:N or mps")
    args, extra = p.parse_known_args(argv)
    check_overrides(extra, "expected a runner option (see --help) or a train.py override --key=value")
    if args.jobs < 1 or args.threads < 1:
        raise UserError("--jobs and --threads must be at least 1")
    if args.hellaswag_limit < 0 or args.superglue_limit < 0:
        raise UserError("--hellaswag_limit and --superglue_limit must be at least 0 (0: all)")
    if not 0 < args.alpha < 0.5:
        raise UserError(f"--alpha={args.alpha:g}: a one-sided significance level needs 0 < alpha < 0.5")
    compare_slurm.check_options(args)
    return args, extra


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    """Run (or resume, or submit) the comparison, write results.json, results.md and the plots;
    returns the results (results.json's content)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    benches = benchmarks(args)  # the downstream data read and checked before anything runs
    groups, runs = plan(args, overrides)
    for g in groups:
        definition = f" = {shlex.join([g.optimizer, *g.overrides])}" if g.overrides else ""
        print(f"{g.label}{definition} x {g.fraction:g}T = {g.steps} steps, warmup {g.warmup_iters}, {g.config}, "
              f"LRs {', '.join(f'{lr:.3g}' for lr in g.lrs)}")
    if not (args.no_train or args.dry_run):
        dataset = resolve([groups[0].config, *overrides])["dataset"]
        prepare_dataset(ROOT / "data" / dataset)  # once, not racing in parallel runs
    states, todo = compare_run.unfinished(runs)
    states.update((compare_slurm if args.launcher == "slurm" else compare_run).execute(todo, args))
    results = summarize(groups, runs, states, args, overrides).to_json()
    if args.dry_run:
        return results
    out = Path(args.results_dir or args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_downstream(results, benches, args)
    plots = plot_all(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results, plots))
    print((out / "results.md").read_text().split("\n## Every")[0])
    print(f"wrote {shown(out / 'results.md')}, {shown(out / 'results.json')} and {len(plots)} plots")
    return results


if __name__ == "__main__":
    main()

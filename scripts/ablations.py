"""The paper's Sophia ablations at small scale, each one run of scripts/compare.py.

    python -m scripts.ablations config/train_shakespeare_char.py --studies all --lr_grid 1 --seeds 1 \\
        --runs_dir out-ablations --jobs 2 --eval_interval=100

Every study compares Sophia-G at the config's own settings (the baseline, and so the target
loss) with variants that change one thing (compare.py --variant):
  rho_beta2       Fig. 6c: rho x {0.5, 1, 2} of the config's value, beta2 in {0.95, 0.99,
                  0.995}; also drawn as a heat map of the final validation loss.
  hess_interval   Fig. 7a: the Hessian estimate every k = 1, 10 (baseline) or 100 steps.
  preconditioner  Fig. 7b: GNB (Sophia-G) against Hutchinson (Sophia-H, its own config), the
                  empirical Fisher (GNB with the data's labels) and AdaHessian's pre-conditioner
                  (sqrt of an EMA of squared Hutchinson estimates), each with the clip.
  clipping        Fig. 7c: Sophia-G without the per-coordinate clip (k = 2, as the paper had
                  to), clipping without a pre-conditioner (sign momentum: Lion with beta1 =
                  beta2 = Sophia's beta1), and AdamW.
All studies share --runs_dir, so a run two studies have in common (the baseline) trains
once, and runs of an earlier compare.py in that folder are reused when their settings match.
Each study's results.md, results.json and plots go to <runs_dir>/ablation-<study>/, and
<runs_dir>/ablations.md collects every study's table. Every other option (--steps,
--lr_grid, --lrs, --seeds, --jobs, --threads, --launcher slurm and its options, --key=value
overrides) goes to compare.py; under SLURM every study's runs are submitted at once, a run
two studies share once, and running the same command again collects them.
The paper tunes the LR of every variant: pass an --lr_grid of several points to do the same.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import settings  # noqa: E402
from configurator import comma_list  # noqa: E402
from errors import UserError, exit_on_user_error  # noqa: E402
from paths import shown  # noqa: E402
from scripts import compare, compare_plan, compare_report  # noqa: E402

RHO_FACTORS = (0.5, 1.0, 2.0)
BETA2S = (0.95, 0.99, 0.995)


def rho_beta2_label(rho: float, beta2: float) -> str:
    return f"rho{rho:g}_beta2_{beta2:g}"


def studies(rho: float, beta1: float, beta2: float) -> dict[str, list[str]]:
    """compare.py arguments of each study, given Sophia-G's configured rho, beta1 and beta2."""
    grid = [f"--variant={rho_beta2_label(f * rho, b)}=sophiag --rho={f * rho!r} --beta2={b!r}"
            for f in RHO_FACTORS for b in BETA2S if (f, b) != (1.0, beta2)]
    return {
        "rho_beta2": grid,
        "hess_interval": ["--variant=k1=sophiag --hess_interval=1", "--variant=k100=sophiag --hess_interval=100"],
        "preconditioner": ["--optimizers=sophiah:1",
                           "--variant=empirical_fisher=sophiag --hess_estimator=empirical_fisher",
                           "--variant=adahessian=sophiah --hess_estimator=adahessian"],
        "clipping": ["--optimizers=adamw",
                     "--variant=no_clip=sophiag --sophia_clip=False --hess_interval=2",
                     f"--variant=sign_momentum=lion --beta1={beta1!r} --beta2={beta1!r}"],
    }


def plot_rho_beta2(results: dict, rho: float, path: Path) -> Path:
    """Heat map of the final validation loss over rho x beta2 (paper Fig. 6c)."""
    rows = {row["label"]: row for row in results["groups"]}
    center = rows[results["baseline"]]
    cells = [[rows.get(rho_beta2_label(f * rho, b), center) for b in BETA2S] for f in RHO_FACTORS]
    fig, ax = plt.subplots(figsize=(5, 4))
    values = [[float("nan") if c["val_loss_mean"] is None else c["val_loss_mean"] for c in row] for row in cells]
    image = ax.imshow(values, cmap="viridis_r", origin="lower")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            bright = v == v and image.norm(v) < 0.5  # the low (yellow) end of viridis_r
            ax.text(j, i, compare_report.group_loss(cells[i][j]) if v != v else f"{v:.3f}", ha="center", va="center",
                    color="k" if bright else "w", fontsize=9)
    ax.set_xticks(range(len(BETA2S)), [f"{b:g}" for b in BETA2S])
    ax.set_yticks(range(len(RHO_FACTORS)), [f"{f * rho:g}" for f in RHO_FACTORS])
    ax.set(xlabel="beta2", ylabel="rho", title="Sophia-G: final validation loss")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary(study: str, results: dict, plot: Path | None = None) -> list[str]:
    lines = [f"## {study}", ""]
    if plot is not None:
        lines += [f"![{study}](ablation-{study}/{plot.name})", ""]
    lines += ["| group | settings | steps | best LR | final val loss (mean ± std) |", "|---|---|---:|---:|---|"]
    for row in results["groups"]:
        settings = " ".join([row["optimizer"], *row["overrides"]])
        best = "—" if row["best_lr"] is None else f"{row['best_lr']:.3g}"
        lines.append(f"| {row['label']} | `{settings}` | {row['steps']} | {best} | {compare_report.group_loss(row)} |")
    return lines + ["", f"Details and plots: [ablation-{study}/results.md](ablation-{study}/results.md)", ""]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], dict, dict[str, list[str]]]:
    """(args, the options passed on to compare.py, Sophia-G's resolved config, {study: compare.py argv})."""
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", usage="%(prog)s CONFIG [--studies a,b] [compare.py options]",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("config", help="base config, e.g. config/train_shakespeare_char.py")
    parser.add_argument("--studies", default="all", help="comma list of studies, or all")
    parser.add_argument("--runs_dir", default="out-ablations", help="folder of the runs (shared by the studies)")
    args, passed = parser.parse_known_args(argv)
    for option in ("--baseline", "--variant", "--optimizers", "--results_dir"):
        if any(a == option or a.startswith(option + "=") for a in passed):
            raise UserError(f"{option} is set by each study; run scripts/compare.py for a comparison of your own")
    if not Path(args.config).is_file():
        raise UserError(f"config file {args.config} not found")
    overrides = [a for a in passed if a.startswith("--") and a.partition("=")[0][2:] in settings.DEFAULTS]
    sophiag_config = shown(compare_plan.optimizer_config(Path(args.config), "sophiag", {}))
    cfg = compare_plan.resolve([sophiag_config, *overrides, "--optimizer_name=sophiag"])
    plans = studies(cfg["rho"], cfg["beta1"], cfg["beta2"])
    chosen = list(plans) if args.studies == "all" else comma_list(args.studies, str, "--studies")
    unknown = [s for s in chosen if s not in plans]
    if unknown:
        raise UserError(f"--studies: unknown study {unknown[0]!r}; choose from {', '.join(plans)} or all")
    argvs = {}
    for study in chosen:
        only_variants = [] if any(a.startswith("--optimizers") for a in plans[study]) else ["--optimizers="]
        argvs[study] = [args.config, "--baseline=sophiag", *only_variants, *plans[study], "--runs_dir",
                        args.runs_dir, "--results_dir", str(Path(args.runs_dir) / f"ablation-{study}"), *passed]
    return args, passed, cfg, argvs


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run (or resume) the chosen studies; returns each study's compare.py results."""
    args, passed, cfg, argvs = parse(sys.argv[1:] if argv is None else argv)
    runs_dir = Path(args.runs_dir)
    out = {}
    lines = ["# Sophia ablations", "", f"Base config {args.config}; options passed to compare.py: "
             f"`{' '.join(passed)}`.", ""]
    for study, study_argv in argvs.items():
        print(f"== {study}: python -m scripts.compare {' '.join(study_argv)}", flush=True)
        out[study] = results = compare.main(study_argv)
        if "--dry_run" in passed:  # the job scripts or commands printed; nothing written
            continue
        plot = None
        if study == "rho_beta2":
            plot = plot_rho_beta2(results, cfg["rho"], runs_dir / f"ablation-{study}" / "rho_beta2.png")
        lines += summary(study, results, plot)
    if "--dry_run" in passed:
        return out
    (runs_dir / "ablations.md").write_text("\n".join(lines))
    (runs_dir / "ablations.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {runs_dir / 'ablations.md'}")
    return out


if __name__ == "__main__":
    main()

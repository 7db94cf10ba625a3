"""Every config in config/ parses, passes train.py's checks, says what it reproduces and
what it costs in its opening comment, and has its row in the README's table; every GPT-2
config runs what its size's config/_gpt2_<size>.py sets (model shape, batch, paper setup)."""

import itertools
import re
from pathlib import Path

import pytest

import configurator
import optimizers
import settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "config").glob("*.py"))
RUNNABLE = [p for p in CONFIGS if not p.name.startswith("_")]  # "_*.py" are pieces to include()


def test_there_is_a_config_per_paper_size_and_optimizer():
    names = {p.stem for p in RUNNABLE}
    for size in ("30m", "small", "medium", "540m", "large"):
        for opt in ("adamw", "lion", "sophiag", "sophiah", "muon", "soap"):
            assert f"train_gpt2_{size}_{opt}" in names
    assert "train_gpt2_medium_sophiag" in names and "train_shakespeare_char" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_opens_with_a_comment_that_states_its_cost(path):
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("# ")
    assert any(line.startswith("# Cost:") for line in header.splitlines()), header


def readme_config_names() -> set[str]:
    """The configs the README's table names; `{a,b}` expands, `{…}` is every optimizer."""
    names = set()
    for pattern in re.findall(r"^\| `(train_[^`]+)\.py` \|", (ROOT / "README.md").read_text(), re.M):
        pattern = pattern.replace("{…}", "{adamw,lion,sophiag,sophiah,muon,soap}")
        parts = [p.split(",") for p in re.split(r"\{([^}]*)\}", pattern)[1::2]]
        literals = re.split(r"\{[^}]*\}", pattern)
        for choice in itertools.product(*parts):
            names.add("".join(a + b for a, b in itertools.zip_longest(literals, choice, fillvalue="")))
    return names


def test_the_readme_table_lists_exactly_the_runnable_configs():
    assert readme_config_names() == {p.stem for p in RUNNABLE}


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_every_config_parses_and_validates(path):
    cfg = settings.Config(configurator.parse(settings.DEFAULTS, [str(path)]))
    assert cfg.optimizer_name in optimizers.REGISTRY
    assert cfg.optimizer_name in path.stem or path.stem == "train_shakespeare_char"
    header = path.read_text().split("\n\n")[0]
    if path.stem.startswith("train_gpt2_"):
        assert "Cost:" in header and "Table 2" in header
        assert cfg.batch_size * cfg.gradient_accumulation_steps == 480
        assert cfg.max_iters == cfg.lr_decay_iters == 100000
        assert cfg.min_lr == pytest.approx(cfg.learning_rate / 20)
        settings.validate(cfg, world_size=8)  # one 8-GPU node
    else:
        settings.validate(cfg, world_size=1)


@pytest.mark.parametrize("path", [p for p in RUNNABLE if p.stem.startswith("train_gpt2_")], ids=lambda p: p.name)
def test_every_gpt2_config_runs_what_its_size_file_sets(path):
    """train_gpt2_<size>_<opt>.py includes _gpt2_<size>.py (not another size's) and overrides
    none of it, so the four optimizers at one size train the same model on the same batches."""
    size = path.stem.split("_")[2]
    # With every default None, the keys left non-None are those the size file (and its includes) sets.
    size_file = configurator.parse(dict.fromkeys(settings.DEFAULTS), [str(ROOT / "config" / f"_gpt2_{size}.py")])
    shared = {k: v for k, v in size_file.items() if v is not None}
    assert {"n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps", "max_iters"} <= shared.keys()
    if "_fineweb_edu_" in path.stem:  # the paper's recipe on FineWeb-Edu: all of it but the dataset
        assert shared.pop("dataset") == "openwebtext"
    cfg = configurator.parse(settings.DEFAULTS, [str(path)])
    assert {k: cfg[k] for k in shared} == shared
    assert cfg["dataset"] == ("fineweb_edu" if "_fineweb_edu_" in path.stem else "openwebtext")

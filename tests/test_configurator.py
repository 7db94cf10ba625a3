"""Specification of configurator.py: how defaults, config files and --key=value combine,
and what a mistake on the command line says."""

import copy
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

import configurator
import errors
import settings
from configurator import parse
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = settings.DEFAULTS


def parse_error(argv: list[str], defaults: dict | None = None) -> str:
    with pytest.raises(UserError) as e:
        parse(DEFAULTS if defaults is None else defaults, argv)
    return str(e.value)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- defaults and overrides

def test_defaults_are_the_settings_module_values():
    """Read from settings.py's source, they are exactly the values Python gives its
    module-level names, in file order."""
    assert DEFAULTS == {k: getattr(settings, k) for k in DEFAULTS}
    assert list(DEFAULTS)[:2] == ["out_dir", "eval_interval"] and list(DEFAULTS)[-1] == "seed"
    assert DEFAULTS["batch_size"] == settings.batch_size == 12
    assert DEFAULTS["optimizer_name"] == "adamw"
    # Only the configuration: no modules, functions or constants defined after it.
    assert "np" not in DEFAULTS and "CHECKPOINT" not in DEFAULTS and "REGISTRY" not in DEFAULTS
    assert all(isinstance(v, configurator.CONFIG_TYPES) for v in DEFAULTS.values())


def test_settings_import_no_torch():
    """Scripts plan and check train.py's runs from settings.py without torch's start-up."""
    code = "import sys, settings; settings.resolve(['config/train_shakespeare_char.py']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_default_that_is_not_a_literal_is_an_error_not_dropped(tmp_path):
    source = write(tmp_path / "defaults.py", "batch_size = 6 * 2  # sequences\nblock_size = 8  # tokens\n")
    with pytest.raises(ValueError, match=r"defaults.py:1: the default batch_size = 6 \* 2 is not a literal"):
        configurator.read_defaults(source)
    write(tmp_path / "defaults.py", "batch_size = 12  # sequences\nBLOCK = 6 * 2\n_private = max(1, 2)\n")
    assert configurator.read_defaults(source) == {"batch_size": 12}


def test_config_reads_settings_as_attributes():
    cfg = settings.resolve(["--batch_size=3"])
    assert cfg.batch_size == cfg["batch_size"] == 3
    assert hasattr(cfg, "n_layer") and not hasattr(cfg, "no_such_key")
    with pytest.raises(AttributeError, match="no_such_key"):
        cfg.no_such_key
    for copied in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert type(copied) is settings.Config and copied == cfg and copied.batch_size == 3


def test_resolve_checks_the_run_for_its_world_size():
    assert settings.resolve(["--gradient_accumulation_steps=4"], world_size=2).gradient_accumulation_steps == 4
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        settings.resolve(["--gradient_accumulation_steps=4"], world_size=3)


def test_config_keys_are_public_lower_case_values_of_plain_types():
    namespace = {"lr": 1e-3, "beta2": 0.99, "name": "x", "_private": 1, "TYPE_CHECKING": False,
                 "MAX_SIZE": 3, "helper": print, "betas": (0.9, 0.95)}
    assert configurator.config_keys(namespace) == ["lr", "beta2", "name", "betas"]


def test_no_arguments_gives_the_defaults_as_a_copy():
    config = parse(DEFAULTS, [])
    assert config == DEFAULTS
    config["batch_size"] = 1
    assert DEFAULTS["batch_size"] == 12


def test_override_changes_only_that_key():
    config = parse(DEFAULTS, ["--batch_size=32", "--optimizer_name=sophiag"])
    assert config["batch_size"] == 32 and config["optimizer_name"] == "sophiag"
    assert {k: v for k, v in config.items() if k not in ("batch_size", "optimizer_name")} == \
        {k: v for k, v in DEFAULTS.items() if k not in ("batch_size", "optimizer_name")}


def test_value_may_contain_equals_signs():
    assert parse(DEFAULTS, ["--wandb_run_name=a=b"])["wandb_run_name"] == "a=b"


def test_config_file_overrides_defaults_and_ignores_its_helpers(tmp_path):
    path = write(tmp_path / "cfg.py",
                 "import math\n_private = 3\nbatch_size = 7\nlearning_rate = 1e-3 * math.sqrt(4)\n")
    config = parse(DEFAULTS, [path])
    assert config["batch_size"] == 7
    assert config["learning_rate"] == pytest.approx(2e-3)
    assert "math" not in config and "_private" not in config


def test_config_file_sees_earlier_values(tmp_path):
    path = write(tmp_path / "cfg.py", "lr_decay_iters = max_iters\n")
    assert parse(DEFAULTS, ["--max_iters=500", path])["lr_decay_iters"] == 500


def test_arguments_apply_in_order(tmp_path):
    path = write(tmp_path / "cfg.py", "batch_size = 7\n")
    assert parse(DEFAULTS, [path, "--batch_size=9"])["batch_size"] == 9
    assert parse(DEFAULTS, ["--batch_size=9", path])["batch_size"] == 7


def test_shipped_config_file_parses():
    config = parse(DEFAULTS, [str(ROOT / "config" / "train_shakespeare_char.py")])
    assert config["dataset"] == "shakespeare_char"


# ----------------------------------------------------------------------------- value parsing

def test_int_is_accepted_for_a_float_key_and_becomes_float():
    value = parse(DEFAULTS, ["--learning_rate=1"])["learning_rate"]
    assert value == 1.0 and type(value) is float


def test_scientific_notation_for_a_float_key():
    assert parse(DEFAULTS, ["--learning_rate=3e-4"])["learning_rate"] == 3e-4


@pytest.mark.parametrize("raw, expected", [("True", True), ("true", True), ("False", False), ("false", False)])
def test_bool_from_python_or_lowercase_spelling(raw, expected):
    assert parse(DEFAULTS, [f"--compile={raw}"])["compile"] is expected


def test_int_is_not_accepted_for_a_bool_key():
    assert parse_error(["--compile=1"]).startswith("command line: compile takes True or False, got 1 ")


@pytest.mark.parametrize("raw", ["2024", "1e3", "True", "[1, 2]"])
def test_string_key_keeps_numeric_looking_raw_text(raw):
    assert parse(DEFAULTS, [f"--wandb_run_name={raw}"])["wandb_run_name"] == raw


def test_bare_word_is_a_string_and_quoted_strings_are_unquoted():
    assert parse(DEFAULTS, ["--dataset=shakespeare_char"])["dataset"] == "shakespeare_char"
    assert parse(DEFAULTS, ["--dataset='shakespeare'"])["dataset"] == "shakespeare"


def test_tuple_key_from_tuple_or_list_literal_with_element_types_of_the_default():
    defaults = {"betas": (0.9, 0.95)}
    assert parse(defaults, ["--betas=(0.8,0.99)"])["betas"] == (0.8, 0.99)
    from_list = parse(defaults, ["--betas=[1, 0.5]"])["betas"]
    assert from_list == (1.0, 0.5) and type(from_list) is tuple and type(from_list[0]) is float


@pytest.mark.parametrize("raw", ["(0.9,)", "(0.9, 0.95, 0.99)", "('a', 'b')", "0.9"])
def test_tuple_key_rejects_wrong_length_or_element_types(raw):
    message = parse_error([f"--betas={raw}"], {"betas": (0.9, 0.95)})
    assert message.startswith("command line: betas takes a tuple of 2 numbers like (0.9, 0.95), got ")


def test_none_default_accepts_any_literal():
    assert parse({"x": None}, ["--x=3"])["x"] == 3


# ----------------------------------------------------------------------------- errors

def test_unknown_key_suggests_the_closest_keys():
    message = parse_error(["--learning_rat=1"])
    assert "'learning_rat'" in message and "--learning_rate" in message
    assert message.startswith("command line:")


def test_unknown_key_without_close_match_points_to_help():
    assert "--help" in parse_error(["--zzzzzz=1"])


@pytest.mark.parametrize("arg, accepted, given", [
    ("--batch_size=abc", "an integer", "'abc'"),
    ("--batch_size=1.5", "an integer", "1.5"),
    ("--learning_rate=fast", "a number", "'fast'"),
    ("--eval_only=maybe", "True or False", "'maybe'"),
])
def test_wrong_type_names_the_key_the_value_given_and_the_values_it_takes(arg, accepted, given):
    key = arg[2:].split("=")[0]
    message = parse_error([arg])
    assert message.startswith(f"command line: {key} takes {accepted}, got {given} ")
    assert f"(the value in force is {DEFAULTS[key]!r}, the default)" in message


def test_a_wrong_type_names_the_value_in_force_and_the_file_that_set_it(tmp_path):
    """--compile=yes after a config that sets False: not 'default True'."""
    path = write(tmp_path / "cfg.py", "compile = False\n")
    message = parse_error([path, "--compile=yes"])
    assert message == (f"command line: compile takes True or False, got 'yes' (the value in force is False, "
                       f"set by {path})")


def test_help_tags_every_value_a_config_file_sets_even_the_default(tmp_path, capsys):
    path = write(tmp_path / "cfg.py", f"decay_lr = {DEFAULTS['decay_lr']!r}\nbatch_size = 8\n")
    with pytest.raises(SystemExit):
        parse(DEFAULTS, [path, "--help"], help_source="train.py")
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  --(\w+) .*$", capsys.readouterr().out, re.MULTILINE)}
    assert f"[{path}]" in lines["decay_lr"] and f"[{path}]" in lines["batch_size"]
    assert "[" not in lines["grad_clip"]


def test_key_without_value_says_how_to_write_it():
    message = parse_error(["--compile"])
    assert "--compile=VALUE" in message


def test_missing_config_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.py")
    message = parse_error([missing])
    assert missing in message and "not found" in message


def test_config_file_with_a_typo_names_the_file_and_the_closest_key(tmp_path):
    path = write(tmp_path / "cfg.py", "batch_sise = 8\n")
    message = parse_error([path])
    assert message.startswith(path) and "'batch_sise'" in message and "--batch_size" in message


def test_config_file_with_a_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path / "cfg.py", "max_iters = 1e5\n")
    message = parse_error([path])
    assert message.startswith(f"{path}: max_iters takes an integer, got 100000.0 (the value in force is")


def test_config_file_that_raises_is_reported_on_one_line(tmp_path):
    path = write(tmp_path / "cfg.py", "batch_size = 1 / 0\n")
    message = parse_error([path])
    assert path in message and "ZeroDivisionError" in message and "\n" not in message


def test_exit_on_user_error_prints_one_error_line_and_exits_2(capsys):
    @errors.exit_on_user_error
    def main():
        raise UserError("something to fix")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: something to fix\n"


def test_exit_on_user_error_folds_a_multi_line_message_into_one_line(capsys):
    """Messages may quote another library's multi-line exception (torch.load's does)."""
    @errors.exit_on_user_error
    def main():
        raise UserError("cannot read it (Error: first\n\n\tsecond\n)")

    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().err == "error: cannot read it (Error: first second )\n"


def test_exit_on_user_error_passes_return_values_and_other_exceptions_through():
    assert errors.exit_on_user_error(lambda x: x + 1)(1) == 2
    with pytest.raises(KeyError):
        errors.exit_on_user_error(lambda: {}["x"])()


# ----------------------------------------------------------------------------- --help

def test_every_key_has_a_meaning_comment_in_settings_py():
    meanings = configurator.key_help(ROOT / "settings.py")
    assert set(DEFAULTS) <= set(meanings), sorted(set(DEFAULTS) - set(meanings))


def test_help_piped_into_a_reader_that_stops_early_exits_quietly():
    """`python train.py --help | head -3`: no BrokenPipeError traceback. Here the reader is
    gone before anything is written."""
    proc = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_help_lists_every_key_with_default_and_meaning():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            check=False, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python train.py")
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  --(\w+) .*$", result.stdout, re.MULTILINE)}
    assert set(lines) == set(DEFAULTS)
    meanings = configurator.key_help(ROOT / "settings.py")
    for key, default in DEFAULTS.items():
        assert f"= {default!r}" in lines[key], lines[key]
        assert lines[key].endswith(meanings[key]), lines[key]
    assert "sequences per micro-step per rank" in lines["batch_size"]
    assert "'adamw', 'lion', 'sophiag', 'sophiah', 'muon' or 'soap'" in lines["optimizer_name"]
    assert "= 0.0006" in lines["learning_rate"]


def test_help_after_a_config_shows_the_effective_values_and_where_they_come_from():
    result = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char_adamw.py", "--max_iters=7",
                             "--help"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  --(\w+) .*$", result.stdout, re.MULTILINE)}
    assert "= 7 " in lines["max_iters"] and "[command line]" in lines["max_iters"]
    assert "= 0.004 " in lines["learning_rate"] and "[config/train_shakespeare_char_adamw.py]" in lines["learning_rate"]
    assert "= 0.9 " in lines["beta1"] and "[config/_optimizer_adamw.py]" in lines["beta1"]  # an include's key
    assert "= 4 " in lines["n_layer"] and "[config/train_shakespeare_char.py]" in lines["n_layer"]
    assert "[" not in lines["decay_lr"]  # the default: no origin

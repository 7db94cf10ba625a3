"""Command-line configuration, nanoGPT style, with errors that say what to fix.

The defaults are plain module-level values (train.py's in settings.py). Then, in order:
    python train.py config/some_config.py --batch_size=32 --compile=False
a bare argument is a Python file executed to override defaults, and `--key=value`
overrides one key, the value parsed with `ast.literal_eval` (a bare word is a string).
A config file can start from another with `include("other.py")` (path relative to it).
An unknown key is an error naming the closest known keys; a value of another type than
the default's (except int for float) is an error naming the key, the value given, the values
it takes and the value in force. `--help` prints every key with its value, the file that set
it (whenever a config file assigns it, equal to the default or not) and the comment from its
line.
"""

import ast
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from errors import UserError

CONFIG_TYPES = (bool, int, float, str, tuple, type(None))


def config_keys(namespace: dict[str, Any]) -> list[str]:
    """The configurable names of a module namespace: public lower-case values of plain types
    (UPPER_CASE constants such as typing's TYPE_CHECKING are not settings)."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, CONFIG_TYPES)]


def read_defaults(source_file: str | Path) -> dict[str, Any]:
    """The settings a module declares as top-level `key = literal  # meaning` lines, in file
    order. A public lower-case assignment whose value is not a literal raises ValueError: it
    would be a default that neither a reader nor --help sees as written."""
    values = {}
    for node in ast.parse(Path(source_file).read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("_") or not name.islower():
                continue
            try:
                values[name] = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{source_file}:{node.lineno}: the default {name} = {ast.unparse(node.value)} is "
                                 f"not a literal; write its value") from None
    return {k: values[k] for k in config_keys(values)}


def key_help(source_file: str | Path) -> dict[str, str]:
    """Map each `key = value  # meaning` line of a source file to its meaning."""
    pattern = re.compile(r"^(\w+)\s*=\s*.+?\s+#\s*(.+)$")
    meanings = {}
    for line in Path(source_file).read_text().splitlines():
        m = pattern.match(line)
        if m:
            meanings[m.group(1)] = m.group(2).strip()
    return meanings


ACCEPTED = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, value: Any, default: Any, origin: str, in_force: str = "") -> Any:
    """Check `value` against the type of `default`; int is accepted for float and a
    list for a tuple. Raises UserError naming the key, the value given, what the key takes
    and `in_force` (the value that holds without this one, and where it comes from)."""
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected is tuple and isinstance(value, list):
        value = tuple(value)
    if expected is not tuple and type(value) is expected:
        return value
    if expected is tuple and isinstance(value, tuple) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(type(d)(v) for d, v in zip(default, value))
    accepted = ACCEPTED[expected] if expected in ACCEPTED else f"a tuple of {len(default)} numbers like {default!r}"
    raise UserError(f"{origin}: {key} takes {accepted}, got {value!r}" + (f" ({in_force})" if in_force else ""))


def in_force(key: str, config: dict[str, Any], origins: dict[str, str]) -> str:
    """What holds for `key` so far: 'the value in force is X, the default' or '..., set by FILE'."""
    where = f"set by {origins[key]}" if key in origins else "the default"
    return f"the value in force is {config[key]!r}, {where}"


def parse_value(raw: str, default: Any) -> Any:
    """`--key=value` parsing: a Python literal, else the bare string. For a string key
    the raw text is kept even when it looks like a number (`--wandb_run_name=2024`)."""
    if isinstance(default, bool) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    if isinstance(default, str) and not isinstance(value, str):
        return raw
    return value


def comma_list(text: str, kind: type, what: str) -> list:
    """The values of a comma list option (`what`, e.g. "--seeds") as `kind`; empty items skipped."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}={text!r}: expected a comma list of {kind.__name__}s") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def unknown_key_error(key: str, known: list[str], origin: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else "see --help for every key"
    return UserError(f"{origin}: unknown config key {key!r}; {hint}")


def apply_config_file(path: str, config: dict[str, Any], origins: dict[str, str] | None = None) -> None:
    """Run a config file over `config`; `origins` records which file set each key it changes."""
    origins = {} if origins is None else origins
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found; give a file from config/ "
                        f"(e.g. config/train_shakespeare_char.py) or --key=value overrides")
    namespace = dict(config)

    def include(name: str) -> None:
        """Apply another config file (path relative to this one) at this point."""
        apply_config_file(str(file.parent / name), config, origins)
        namespace.update(config)

    namespace["include"] = include
    source = file.read_text()
    try:
        assigned = {n.id for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        exec(compile(source, str(file), "exec"), namespace)
    except UserError:
        raise
    except Exception as e:  # a user's Python file: report its error on one line
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    for key, value in namespace.items():
        if key.startswith("_") or not isinstance(value, CONFIG_TYPES + (list, dict)):
            continue  # imports, helpers and dunders of the config file
        if key not in config:
            raise unknown_key_error(key, list(config), path)
        value = coerce(key, value, config[key], path, in_force(key, config, origins))
        if key in assigned:  # equal to the value before or not: this file sets it
            origins[key] = path
        config[key] = value


def parse(defaults: dict[str, Any], argv: list[str], help_source: str | Path | None = None,
          command: str | None = None) -> dict[str, Any]:
    """Apply config files and `--key=value` overrides in `argv` to a copy of `defaults`.
    --help prints every key's effective value (after all of argv), where it came from and its
    meaning from `help_source`; `command` (default: the one that runs help_source) opens it."""
    config, origins = dict(defaults), {}
    for arg in argv:
        if arg in ("-h", "--help"):
            continue
        if not arg.startswith("--"):
            apply_config_file(arg, config, origins)
            continue
        if "=" not in arg:
            raise UserError(f"{arg} has no value; write {arg}=VALUE")
        key, raw = arg[2:].split("=", 1)
        if key not in config:
            raise unknown_key_error(key, list(config), "command line")
        config[key] = coerce(key, parse_value(raw, defaults[key]), defaults[key], "command line",
                             in_force(key, config, origins))
        origins[key] = "command line"
    if "-h" in argv or "--help" in argv:
        try:
            print_help(config, origins, help_source, command)
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented recipe
        sys.exit(0)
    return config


def print_help(config: dict[str, Any], origins: dict[str, str], help_source: str | Path | None,
               command: str | None = None) -> None:
    """Every key with its value, where the value came from (when not the default) and its meaning."""
    meanings = key_help(help_source) if help_source else {}
    if command is None:
        source = Path(help_source) if help_source else Path("train.py")
        # scripts/ are modules of the repository: run as `python -m scripts.NAME` from its root.
        command = f"python -m scripts.{source.stem}" if source.parent.name == "scripts" else f"python {source.name}"
    print(f"usage: {command} [config/FILE.py ...] [--key=value ...]\n")
    width = max(len(k) for k in config)
    for key, value in config.items():
        source = f"[{origins[key]}] " if key in origins else ""
        print(f"  --{key:<{width}} = {value!r:<22} {source}{meanings.get(key, '')}".rstrip())

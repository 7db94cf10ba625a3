"""`pip install .` installs the optimizer alone: the wheel built from this repository holds
sophia.py and nothing else, and in a fresh virtual environment (which imports torch from the
environment running the tests, virtualenv or not, but not this repository) the README's
own-loop snippet runs as written against the installed module and halves its toy model's loss.

Nothing is downloaded: the wheel is built without build isolation (setuptools comes from
this environment) and installed without dependencies.
"""

import json
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REPORT = '''
import json, sys
import sophia
print(json.dumps({"sophia": sophia.__file__, "prefix": sys.prefix, "path": sys.path}))
'''


def readme_snippet() -> str:
    """The README's fenced Python block that uses the installed optimizer."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    matches = [b for b in blocks if "from sophia import SophiaG" in b]
    assert len(matches) == 1, f"{len(matches)} README blocks import SophiaG"
    return matches[0]


def see_this_environment(python: Path) -> None:
    """Let the venv of `python` import this environment's packages (torch, pip), after its own.

    A venv's system_site_packages would expose the base interpreter's packages, which lack
    torch when this test itself runs in a virtualenv; a .pth file names the site-packages
    folders this interpreter imports from, wherever they are."""
    inner = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=python.parent)
    folders = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(inner.strip()) / "outer_environment.pth").write_text("".join(f"{p}\n" for p in folders))


def run(*cmd, cwd: Path) -> str:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_sophia_alone_and_the_readme_snippet_trains_with_it(tmp_path):
    # Build from a copy, as pip would see the checkout, so the build leaves nothing in the tree.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.pyc", "*.bin", "out*", "wandb", ".pytest_cache", "*.egg-info", "build", ".venv"))
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
        "-w", tmp_path / "dist", cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"sophia.py"}, names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    see_this_environment(python)
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    script = tmp_path / "own_loop.py"
    script.write_text(readme_snippet() + REPORT)  # the snippet as written: it defines what it uses
    # -I: neither the script's folder nor the current one nor PYTHONPATH is on sys.path, so
    # `import sophia` can only find the installed copy.
    out = run(python, "-I", script, cwd=tmp_path).splitlines()
    result = json.loads(out[-1])
    installed = Path(result["sophia"]).resolve()
    assert Path(result["prefix"]).resolve() == env_dir.resolve()
    assert env_dir.resolve() in installed.parents, installed
    assert not any(Path(p).resolve() == ROOT for p in result["path"] if p)
    losses = [float(line.rsplit(" ", 1)[1]) for line in out[:-1]]
    assert [line.split(":")[0] for line in out[:-1]] == ["step 0", "step 100", "step 200", "step 299"], out
    assert losses[-1] < 0.5 * losses[0], out

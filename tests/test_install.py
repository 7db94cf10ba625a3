"""How the project installs: requirements*.txt state ranges (the ordinary install takes the newest
releases within them), constraints.txt pins every package they need, directly or not, to the
versions CI tests, within those ranges, and CI installs with it."""

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_constraints_pin_every_requirement_within_its_range():
    pins = {}
    for req in requirements(ROOT / "constraints.txt"):
        [spec] = req.specifier
        assert spec.operator == "==" and "+" not in spec.version, f"{req}: pin an exact public version"
        pins[canonicalize_name(req.name)] = spec.version
    for file in ("requirements.txt", "requirements-test.txt"):
        for req in requirements(ROOT / file):
            pinned = pins.get(canonicalize_name(req.name))
            assert pinned is not None, f"{req.name} ({file}) is not in constraints.txt"
            assert req.specifier.contains(pinned), f"constraints.txt pins {req.name}=={pinned}, outside {file}'s {req}"


def test_ci_installs_the_pinned_versions():
    assert "-r requirements.txt -r requirements-test.txt -c constraints.txt" in (ROOT / ".ci" / "run").read_text()

"""What the repository says speaks of the project only: no issue-tracker numbers and no
machinery of the place it was written in, in the docs, in code comments or in what the code
prints."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = sorted(p for p in ROOT.rglob("*") if p.suffix in (".py", ".md") and p != Path(__file__).resolve()
               and not {".git", "build", ".venv", "venv"} & set(p.parts))
ISSUE_NUMBER = re.compile(r"\bissues? #?\d+|#\d+\b", re.IGNORECASE)
INTERNAL = re.compile(r"\blent (H200|GPU)|GPU (was|has been) lent|\$OUT\b|\btimeout_s\b|KINDS\.md|device tool")


def test_no_issue_numbers_or_internal_tools_anywhere():
    found = []
    for path in TEXTS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern in (ISSUE_NUMBER, INTERNAL):
                if (m := pattern.search(line)) and not re.match(r"#[0-9a-f]{6}\b", line[m.start():]):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)

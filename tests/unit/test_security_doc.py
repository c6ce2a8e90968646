"""docs/security.md stays true to the suite: every test it cites exists, in the file it names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "security.md").read_text()


def _defined_tests() -> dict[str, set[str]]:
    """test file name -> the test functions it defines."""
    return {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M))
            for p in (ROOT / "tests").rglob("test_*.py")}


def test_every_cited_test_exists():
    defined = _defined_tests()
    everywhere = set().union(*defined.values())
    missing = []
    for cell in re.findall(r"`([^`]*test_[^`]*)`", DOC):
        file = re.search(r"(test_\w+\.py)", cell)
        names = re.findall(r"(?:::|^)(test_\w+)(?![\w.])", cell)
        if file and file.group(1) not in defined:
            missing.append(cell)
        for name in names:
            if name not in (defined.get(file.group(1), set()) if file else everywhere) and name not in everywhere:
                missing.append(f"{cell} ({name})")
    assert not missing, f"docs/security.md cites tests that do not exist: {missing}"
    assert len(re.findall(r"`[^`]*test_\w+", DOC)) > 30  # the parser found the citations

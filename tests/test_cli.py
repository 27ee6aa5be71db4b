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
    for command in ("demo", "up", "chat", "issuer", "relay", "gateway", "node", "verify"):
        assert command in proc.stdout


def test_unknown_command_is_a_usage_error() -> None:
    proc = openpcc("no-such-command")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr

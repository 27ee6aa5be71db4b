"""Trust over time in the client (issue 18): a manifest stops being trusted the moment it
expires, also in a client that is already running, and a profile never goes back to an
older manifest, also across restarts.

The stack is the real one (conftest.local_stack); each test signs its own manifest with
the stack's release key, in a profile folder of its own.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from openpcc.client.errors import NoVerifiedNodeError
from openpcc.client.profile import SERIALS_FILE, client_from_config
from openpcc.devstack.local import LocalStack
from tests.harness import ROOT


def profile(stack: LocalStack, folder: Path, **manifest: Any) -> Path:
    """A copy of the stack's client profile whose manifest is re-signed with ``manifest``
    changed (the stack's own release key signs it, as `openpcc release sign` does)."""
    folder.mkdir(parents=True, exist_ok=True)
    release = stack.state / "release"
    doc = json.loads((release / "manifest.json").read_text()) | manifest
    unsigned = folder / f"manifest-{doc['serial']}.json"
    unsigned.write_text(json.dumps(doc))
    signed = folder / "trust-policy.json"
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "release", "sign", str(unsigned),
         "--key", str(release / "release-key.pem"), "--out", str(signed)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    cfg = json.loads(stack.config_path.read_text())
    cfg["policy"] = str(signed)
    cfg["wallet"] = str(folder / "wallet.json")
    path = folder / "client.json"
    path.write_text(json.dumps(cfg))
    return path


def status(config: Path) -> subprocess.CompletedProcess[str]:
    """`openpcc status` as a fresh process: what a restarted client does."""
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "status", "--config", str(config), "--json",
         "--wait", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def test_a_running_client_stops_trusting_an_expired_manifest(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """Seen in an attack: two seconds after ``expires_at`` a running proxy still verified
    the node and sealed to it. The node's claims are valid for an hour; the manifest here
    for a minute: after it, the same client has no node, cached or fetched again."""
    expires = int(time.time()) + 60
    config = profile(local_stack, tmp_path / "p", serial=int(time.time()), expires_at=expires)
    now = [time.time()]

    async def go() -> None:
        client, wallet, model, _ = client_from_config(config, clock=lambda: now[0])
        try:
            assert len(await client.verified_nodes(refresh=True)) == 1
            now[0] = expires + 2
            assert await client.verified_nodes() == []  # the cached verdict is gone
            assert await client.verified_nodes(refresh=True) == []  # and not re-earned
            assert any(
                "release manifest expired" in " ".join(r) for r in client.rejected_nodes().values()
            ), client.rejected_nodes()
            with pytest.raises(NoVerifiedNodeError):
                await client.chat_completions(model, [{"role": "user", "content": "hi"}])
        finally:
            await client.aclose()
            await wallet.aclose()

    asyncio.run(go())


def test_an_older_manifest_is_refused_across_restarts(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """The profile remembers the highest serial it verified (release-serials.json, 0600);
    a validly signed but older manifest is a rollback, refused by the next process too."""
    folder = tmp_path / "p"
    base = int(time.time())
    config = profile(local_stack, folder, serial=base + 10)
    first = status(config)
    assert first.returncode == 0, first.stdout + first.stderr
    record = folder / SERIALS_FILE
    assert (record.stat().st_mode & 0o777) == 0o600
    assert list(json.loads(record.read_text()).values()) == [base + 10]

    profile(local_stack, folder, serial=base + 5)  # the older one, same signer
    rolled_back = status(config)
    assert rolled_back.returncode != 0
    assert "rollback" in rolled_back.stderr and "Traceback" not in rolled_back.stderr

    profile(local_stack, folder, serial=base + 20)  # newer: accepted, remembered
    assert status(config).returncode == 0
    assert list(json.loads(record.read_text()).values()) == [base + 20]

    # Another profile folder has its own memory: the serials are per profile.
    other = tmp_path / "q"
    shutil.copytree(folder, other, ignore=shutil.ignore_patterns(SERIALS_FILE + "*"))
    profile(local_stack, other, serial=base + 5)
    assert status(other / "client.json").returncode == 0

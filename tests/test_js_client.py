"""The TypeScript/JavaScript client (clients/js) against the real Python stack.

Starts the whole local stack (issuer, relay, gateway, a simulated-TEE node) on the fake
engine, then runs the JS package's own tests: the cross-language vectors (`node --test
test/*.test.js`), and end to end (`test/e2e.test.js`, pointed at the stack's
client.json): a Node client and the example extension page in headless Debian Chromium
(playwright-core, served over http://127.0.0.1 by a same-origin forwarder) each get a
private, attested, streamed answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from openpcc.local import LocalStack, start_local_stack
from tests.conftest import FAKE_MODEL

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "clients" / "js"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REQUIRE_ALL = os.environ.get("OPENPCC_REQUIRE_ALL") == "1"


def _need(ok: bool, why: str) -> None:
    if not ok:
        if REQUIRE_ALL:
            pytest.fail(f"{why} (required under scripts/dev test)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def node_bin() -> str:
    node = shutil.which("node")
    _need(node is not None, "node is not installed")
    _need((JS / "node_modules" / "@hpke" / "core").is_dir(), "run `npm ci` in clients/js")
    assert node is not None
    return node


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake_engine: str) -> Iterator[LocalStack]:
    s = start_local_stack(
        tmp_path_factory.mktemp("jsstack"),
        engine_url=fake_engine,
        model_name=FAKE_MODEL,
        log=lambda *_: None,
    )
    yield s
    s.procs.stop()


def _node_test(node: str, files: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        [node, "--test", *files],
        cwd=JS,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "# fail 0" in out, out[-6000:]
    return out


def test_js_unit_and_vectors(node_bin: str) -> None:
    """Wire vectors, sealed-request vector both ways, SNP samples, simulated bundles."""
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    out = _node_test(node_bin, [f for f in files if not f.endswith("e2e.test.js")], {})
    assert "# skipped 0" in out, out[-3000:]


def test_js_client_node_end_to_end(node_bin: str, stack: LocalStack) -> None:
    out = _node_test(
        node_bin,
        ["test/e2e.test.js"],
        {
            "OPENPCC_CLIENT_CONFIG": str(stack.config_path),
            "OPENPCC_EXPECT_TEXT": "Hello from the fake engine.",
            "OPENPCC_SKIP_BROWSER": "1",
        },
    )
    assert "ok 1 - Node: tokens, verified node, streamed private chat" in out


def test_js_client_headless_chromium(node_bin: str, stack: LocalStack) -> None:
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (Debian package chromium)")
    _need((JS / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in clients/js")
    build = subprocess.run(
        [node_bin, "build.mjs"], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert build.returncode == 0, build.stdout + build.stderr
    out = _node_test(
        node_bin,
        ["test/e2e.test.js"],
        {"OPENPCC_CLIENT_CONFIG": str(stack.config_path), "CHROMIUM": CHROMIUM},
    )
    assert "ok 2 - headless Chromium: the example page completes a private streamed chat" in out
    assert "SKIP" not in out

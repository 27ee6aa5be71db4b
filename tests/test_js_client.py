"""The TypeScript/JavaScript client (clients/js) against the real Python local_stack.

Starts the whole local local_stack (issuer, relay, gateway, a simulated-TEE node) on the fake
engine, then runs the JS package's own tests: the cross-language vectors (`node --test
test/*.test.js`), and end to end (`test/e2e.test.js`, pointed at the local_stack's
client.json): a Node client and the example extension page in headless Debian Chromium
(playwright-core) each get a private, attested, streamed answer, X-Wing on both layers
(OHTTP as the relay saw it, sealed requests v2 as the node saw them). The page is served from
its own origin and calls the relay and issuer cross-origin, which the local_stack allows with
`--allow-origin` (CORS); from an origin not allowed, the same calls fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from openpcc.audit import read_audit
from openpcc.devstack.local import LocalStack
from openpcc.devstack.processes import free_port

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


# Where the browser test serves its page: the one origin the local_stack allows.
PAGE_PORT = free_port()
STACK_OPTIONS = {
    "audit": True,  # each party's record of what it received: preflights, Origin headers
    "allow_origins": [f"http://127.0.0.1:{PAGE_PORT}"],
}  # for conftest.local_stack


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


def test_js_client_node_end_to_end(node_bin: str, local_stack: LocalStack) -> None:
    out = _node_test(
        node_bin,
        ["test/e2e.test.js"],
        {
            "OPENPCC_CLIENT_CONFIG": str(local_stack.config_path),
            "OPENPCC_EXPECT_TEXT": "Hello from the fake engine.",
            "OPENPCC_SKIP_BROWSER": "1",
            "OPENPCC_EXPECT_KEM": str(0x647A),  # the dev manifest pins the X-Wing config
            "OPENPCC_EXPECT_INNER_KEM": str(0x647A),  # the dev nodes attest X-Wing keys
        },
    )
    assert "ok 1 - Node: tokens, verified node, streamed private chat" in out
    # ...and the node received only sealed v2 (X-Wing) envelopes: its own record.
    versions = _node_sealed_versions(local_stack)
    assert versions and set(versions) == {(2, 0x647A)}, versions
    # Our gateway opened what the JS client sent on X-Wing, plain (discovery) and chunked
    # (chats) OHTTP alike: the relay saw only X-Wing request headers.
    kinds = _relay_ohttp_kems(local_stack)
    assert {ctype for ctype, _ in kinds} == {"message/ohttp-req", "message/ohttp-chunked-req"}
    assert {kem for _, kem in kinds} == {0x647A}


def _relay_ohttp_kems(local_stack: LocalStack, origin: str | None = None) -> set[tuple[str, int]]:
    """(content type, KEM of the OHTTP header) of every OHTTP POST the relay received."""
    out = set()
    for r in read_audit(local_stack.audit["relay"]):
        h = _headers(r)
        if r["method"] == "POST" and (origin is None or h.get("origin") == origin):
            body = bytes.fromhex(str(r["body_hex"]))
            out.add((h["content-type"], int.from_bytes(body[1:3], "big")))
    return out


def _node_sealed_versions(local_stack: LocalStack) -> list[tuple[int, int]]:
    """(version, KEM) of every sealed envelope the node received, from its audit log."""
    out = []
    for r in read_audit(local_stack.audit["node"]):
        if r["method"] == "POST" and r["path"] == "/v1/sealed":
            body = bytes.fromhex(str(r["body_hex"]))
            out.append((body[0], int.from_bytes(body[1:3], "big")))
    return out


def _headers(rec: dict) -> dict[str, str]:
    return {k.lower(): v for k, v in rec["headers"]}


def test_js_client_headless_chromium(node_bin: str, local_stack: LocalStack) -> None:
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (Debian package chromium)")
    _need((JS / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in clients/js")
    build = subprocess.run(
        [node_bin, "build.mjs"], cwd=JS, capture_output=True, text=True, timeout=120
    )
    assert build.returncode == 0, build.stdout + build.stderr
    sealed_before = len(_node_sealed_versions(local_stack))
    out = _node_test(
        node_bin,
        ["test/e2e.test.js"],
        {
            "OPENPCC_CLIENT_CONFIG": str(local_stack.config_path),
            "CHROMIUM": CHROMIUM,
            "OPENPCC_PAGE_PORT": str(PAGE_PORT),
        },
    )
    assert "ok 2 - headless Chromium: the example page completes a private streamed chat" in out
    assert "SKIP" not in out
    (summary,) = [
        json.loads(line[2:]) for line in out.splitlines() if line.startswith('# {"result"')
    ]
    page = f"http://127.0.0.1:{PAGE_PORT}"
    # The page ran on its own origin and talked to the relay and the issuer directly.
    assert summary["page_origin"] == page
    assert page not in (summary["relay_origin"], summary["issuer_origin"])
    sent = summary["to_stack"]
    assert {(r["to"], r["method"]) for r in sent} >= {
        ("relay", "GET"),
        ("relay", "POST"),
        ("issuer", "GET"),
        ("issuer", "POST"),
    }, sent
    assert all(r["origin"] == page and r["allow_origin"] == page for r in sent), sent
    # Chromium preflighted the POSTs: each party recorded the OPTIONS it answered itself.
    relay_log = read_audit(local_stack.audit["relay"])
    issuer_log = read_audit(local_stack.audit["issuer"])
    preflights = [r for r in relay_log + issuer_log if r["method"] == "OPTIONS"]
    assert {(r["party"], r["path"]) for r in preflights if _headers(r)["origin"] == page} == {
        ("relay", "/"),
        ("issuer", "/token-request"),
    }
    denied = summary["denied"]  # below; its POST was preflighted too (and refused)
    assert {_headers(r)["origin"] for r in preflights} == {page, denied["page_origin"]}
    assert any(r["method"] == "POST" and _headers(r).get("origin") == page for r in relay_log)
    # The browser bundle sent its OHTTP on X-Wing too (the dev manifest pins it).
    assert {kem for _, kem in _relay_ohttp_kems(local_stack, page)} == {0x647A}
    # ...and sealed its prompt to the node with X-Wing as well (sealed v2).
    from_page = _node_sealed_versions(local_stack)[sealed_before:]
    assert from_page and set(from_page) == {(2, 0x647A)}, from_page
    # ...and the gateway heard of none of it: no preflight, no Origin.
    gateway_log = read_audit(local_stack.audit["gateway"])
    assert gateway_log and all(r["method"] != "OPTIONS" for r in gateway_log)
    assert all("origin" not in _headers(r) for r in gateway_log)
    # From an origin the local_stack does not allow, the same calls are CORS failures.
    assert denied["page_origin"] != page
    for what in ("relay_keys", "relay_post", "issuer_directory"):
        assert denied[what] == "TypeError: Failed to fetch", denied
    assert denied["cors_errors"] >= 3, denied

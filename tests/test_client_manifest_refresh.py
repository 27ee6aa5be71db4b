"""The client refreshes its release manifest before it expires (openpcc/client/manifest.py).

Through the gateway (``GET /v1/release-manifest`` inside OHTTP, via the relay) against the
real stack (conftest.local_stack), and from a direct URL served by a small aiohttp server
in this process. Each test signs its own manifests with the stack's release key in a
profile folder of its own; the client runs on an injected clock. The gateway serves the
file it admits nodes under (``STATE/trust-policy.json``) and only while that is valid by
the real clock, so manifests here are valid in real time and serials only go up.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.attestation.policy import SignedManifest, TrustPolicy, load_release_private_key
from openpcc.client.errors import NoVerifiedNodeError
from openpcc.client.manifest import (
    MIN_INTERVAL,
    ManifestRefresher,
    parse_source,
    refresh_due,
    refresher_from_config,
)
from openpcc.client.profile import MANIFEST_FILE, SERIALS_FILE, client_from_config, newest_policy
from openpcc.devstack.local import LocalStack
from openpcc.errors import DecodeError
from tests.harness import ROOT

# Above the stack's own manifest (serial = its start time) and rising in every test.
_SERIALS = itertools.count(int(time.time()) + 100_000)


def next_serial() -> int:
    return next(_SERIALS)


def sign(stack: LocalStack, key: ed25519.Ed25519PrivateKey | None = None, **fields: Any) -> bytes:
    """The stack's manifest with ``fields`` changed, signed (by the stack's release key
    unless ``key``), as `openpcc release sign` writes it."""
    release = stack.state / "release"
    doc = json.loads((release / "manifest.json").read_text()) | fields
    if key is None:
        key = load_release_private_key((release / "release-key.pem").read_bytes())
    return SignedManifest.sign(json.dumps(doc).encode(), key).encode()


def lifetime(start: float, seconds: int) -> dict[str, int]:
    """issued_at/expires_at: valid from a minute before ``start`` for ``seconds``."""
    return {"issued_at": int(start) - 60, "expires_at": int(start) + seconds}


def profile(stack: LocalStack, folder: Path, signed: bytes, **extra: Any) -> Path:
    """A copy of the stack's client profile trusting ``signed``, with ``extra`` keys."""
    folder.mkdir(parents=True, exist_ok=True)
    policy = folder / "trust-policy.json"
    policy.write_bytes(signed)
    cfg = json.loads(stack.config_path.read_text())
    cfg |= {"policy": str(policy), "wallet": str(folder / "wallet.json"), **extra}
    path = folder / "client.json"
    path.write_text(json.dumps(cfg))
    return path


def serve_at_gateway(stack: LocalStack, signed: bytes) -> None:
    """Publish ``signed`` where the gateway reads its manifest (atomically)."""
    path = stack.state / "trust-policy.json"
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(signed)
    os.replace(tmp, path)


def serial_of(client: Any) -> int:
    """The serial the client judges by, in both places it is held."""
    assert client._verifier.policy is client._trust
    return client._trust.manifest.serial


@asynccontextmanager
async def manifest_server() -> AsyncIterator[dict[str, Any]]:
    """A manifest host: serves ``state["body"]`` with ``state["etag"]`` (304 when the
    request's If-None-Match names it) and logs each request's If-None-Match."""
    state: dict[str, Any] = {"body": b"", "etag": None, "seen": []}

    async def handle(request: web.Request) -> web.Response:
        inm = request.headers.get("If-None-Match")
        state["seen"].append(inm)
        headers = {"ETag": state["etag"]} if state["etag"] else {}
        if inm is not None and inm == state["etag"]:
            return web.Response(status=304, headers=headers)
        return web.Response(body=state["body"], headers=headers)

    app = web.Application()
    app.router.add_get("/manifest.json", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state["url"] = f"http://127.0.0.1:{port}/manifest.json"
    try:
        yield state
    finally:
        await runner.cleanup()


def run_client(config: Path, now: list[float], body: Callable[..., Any]) -> None:
    """Run ``body(client, model)`` against a client built from ``config`` on ``now``."""

    async def go() -> None:
        client, wallet, model, _ = client_from_config(config, clock=lambda: now[0])
        try:
            await body(client, model)
        finally:
            await client.aclose()
            await wallet.aclose()

    asyncio.run(go())


# ---------------------------------------------------------------- through the gateway


def test_a_manifest_near_expiry_is_refreshed_through_the_gateway_and_kept_across_restarts(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """Within the last quarter of its lifetime the client fetches the gateway's newer
    manifest through the relay, judges nodes under it (cache dropped), persists it (0600)
    and records its serial; a restart uses it even when the configured file is older and
    expired, and a fresh process accepts an older configured file no more than before."""
    t0 = time.time()
    old_serial, new_serial = next_serial(), next_serial()
    old = sign(local_stack, serial=old_serial, **lifetime(t0, 600))
    new = sign(local_stack, serial=new_serial, **lifetime(t0, 3000))
    serve_at_gateway(local_stack, old)
    folder = tmp_path / "p"
    config = profile(local_stack, folder, old)
    now = [t0]

    async def refresh(client: Any, _model: str) -> None:
        assert len(await client.verified_nodes(refresh=True)) == 1
        assert client._refresher.stats.attempts == 0  # three quarters left: not due
        serve_at_gateway(local_stack, new)
        now[0] = t0 + 300  # 360 s of 660 gone: not yet due
        await client.verified_nodes()
        assert client._refresher.stats.attempts == 0
        now[0] = t0 + 500  # 100 s of 660 left: due
        before = client._verifier
        nodes = await client.verified_nodes()
        assert client._refresher.stats.replaced == 1, client._refresher.stats
        assert serial_of(client) == new_serial and client._verifier is not before
        assert len(nodes) == 1 and nodes[0].expires_at > t0 + 600  # judged again, under new

    run_client(config, now, refresh)
    stored = folder / MANIFEST_FILE
    assert stored.read_bytes() == new
    assert (stored.stat().st_mode & 0o777) == 0o600
    assert list(json.loads((folder / SERIALS_FILE).read_text()).values()) == [new_serial]

    # Restart after the configured manifest expired: the refreshed one is used.
    now[0] = t0 + 700

    async def restarted(client: Any, model: str) -> None:
        assert serial_of(client) == new_serial
        answer = await client.chat_completions(model, [{"role": "user", "content": "hi"}])
        assert answer["choices"]
        assert client._refresher.stats.attempts == 0

    run_client(config, now, restarted)

    # A fresh process whose configured file is older (valid, same key): it starts from the
    # refreshed one, not with a rollback error.
    profile(local_stack, folder, sign(local_stack, serial=old_serial, **lifetime(t0, 3000)))
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "status", "--config", str(config), "--json",
         "--wait", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(json.loads(out.stdout)["verified_nodes"]) == 1


def test_an_unchanged_manifest_costs_a_304_with_its_etag(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """The gateway tags its manifest with its SHA-256; the client sends that ETag back
    (If-None-Match inside the OHTTP request) and gets a 304, no body, the manifest kept."""
    t0 = time.time()
    signed = sign(local_stack, serial=next_serial(), **lifetime(t0, 600))
    serve_at_gateway(local_stack, signed)
    config = profile(local_stack, tmp_path / "p", signed)
    now = [t0 + 500]  # due from the start

    async def body(client: Any, _model: str) -> None:
        refresher = client._refresher
        assert len(await client.verified_nodes()) == 1
        assert (refresher.stats.attempts, refresher.stats.unchanged) == (1, 1)
        assert refresher.etag == '"' + hashlib.sha256(signed).hexdigest() + '"'
        now[0] += MIN_INTERVAL + 1
        assert len(await client.verified_nodes()) == 1
        assert (refresher.stats.attempts, refresher.stats.not_modified) == (2, 1)
        assert refresher.stats.replaced == refresher.stats.failed == 0

    run_client(config, now, body)
    assert not (tmp_path / "p" / MANIFEST_FILE).exists()  # nothing new to keep


def test_an_expired_manifest_is_refreshed_before_the_request_fails(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """A running client whose manifest has just expired makes one refresh attempt before
    judging nodes; with a newer manifest at the gateway the chat goes through. With
    refresh off (``"manifest_url": "off"``) the same client fails with the typed error."""
    t0 = time.time()
    old = sign(local_stack, serial=next_serial(), **lifetime(t0, 120))
    new_serial = next_serial()
    new = sign(local_stack, serial=new_serial, **lifetime(t0, 3000))
    serve_at_gateway(local_stack, old)
    now = [t0]
    chat = [{"role": "user", "content": "hi"}]

    async def without(client: Any, model: str) -> None:
        assert len(await client.verified_nodes()) == 1
        now[0] = t0 + 125
        with pytest.raises(NoVerifiedNodeError):
            await client.chat_completions(model, chat)

    run_client(profile(local_stack, tmp_path / "off", old, manifest_url="off"), now, without)

    now[0] = t0

    async def with_refresh(client: Any, model: str) -> None:
        assert len(await client.verified_nodes()) == 1  # cached verdict under the old one
        serve_at_gateway(local_stack, new)
        now[0] = t0 + 125  # expired
        answer = await client.chat_completions(model, chat)
        assert answer["choices"]
        assert serial_of(client) == new_serial

    run_client(profile(local_stack, tmp_path / "on", old), now, with_refresh)


# ----------------------------------------------------------------- from a direct URL


def test_a_direct_url_is_asked_at_most_once_a_minute_with_if_none_match(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """``manifest_url`` on a host of its own: fetched straight, If-None-Match with the
    last ETag, and never more than one attempt per 60 s of the client's clock, however
    many requests (also concurrent ones) run meanwhile."""
    t0 = time.time()
    first_serial, second_serial = next_serial(), next_serial()
    first = sign(local_stack, serial=first_serial, **lifetime(t0, 600))
    second = sign(local_stack, serial=second_serial, **lifetime(t0, 3000))
    now = [t0 + 450]  # due (165 s of 660 left) and still valid for the whole test

    async def go() -> None:
        async with manifest_server() as srv:
            srv["body"], srv["etag"] = first, '"v1"'
            config = profile(local_stack, tmp_path / "p", first, manifest_url=srv["url"])
            client, wallet, _model, _ = client_from_config(config, clock=lambda: now[0])
            try:
                await client.verified_nodes()
                assert srv["seen"] == [None]  # unchanged serial: its ETag is kept
                now[0] += 30
                await asyncio.gather(*(client.verified_nodes() for _ in range(5)))
                assert srv["seen"] == [None]  # 30 s later: no second attempt
                now[0] += 31
                await asyncio.gather(*(client.verified_nodes() for _ in range(5)))
                assert srv["seen"] == [None, '"v1"']  # 61 s: one, answered 304
                assert client._refresher.stats.not_modified == 1
                srv["body"], srv["etag"] = second, '"v2"'
                now[0] += 59
                await client.verified_nodes()
                assert len(srv["seen"]) == 2
                now[0] += 2
                assert len(await client.verified_nodes()) == 1
                assert srv["seen"] == [None, '"v1"', '"v1"']
                assert serial_of(client) == second_serial
                assert client._refresher.etag == '"v2"'
            finally:
                await client.aclose()
                await wallet.aclose()

    asyncio.run(go())
    assert (tmp_path / "p" / MANIFEST_FILE).read_bytes() == second


def test_an_older_manifest_offered_is_refused_and_the_newer_kept(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """A validly signed manifest with a lower serial than the one in use is a rollback:
    refused, the newer one kept in use and on disk."""
    t0 = time.time()
    older, held, newer = next_serial(), next_serial(), next_serial()
    now = [t0 + 500]

    async def go() -> None:
        async with manifest_server() as srv:
            srv["body"] = sign(local_stack, serial=newer, **lifetime(t0, 600))
            config = profile(
                local_stack,
                tmp_path / "p",
                sign(local_stack, serial=held, **lifetime(t0, 600)),
                manifest_url=srv["url"],
            )
            client, wallet, _model, _ = client_from_config(config, clock=lambda: now[0])
            try:
                await client.verified_nodes()
                assert serial_of(client) == newer
                srv["body"] = sign(local_stack, serial=older, **lifetime(t0, 3000))
                now[0] += MIN_INTERVAL
                assert len(await client.verified_nodes()) == 1
                assert len(srv["seen"]) == 2
                assert client._refresher.stats.refused == 1
                assert serial_of(client) == newer
            finally:
                await client.aclose()
                await wallet.aclose()

    asyncio.run(go())
    stored = TrustPolicy.from_signed(
        (tmp_path / "p" / MANIFEST_FILE).read_bytes(),
        [(local_stack.state / "release" / "release-key.pub.pem").read_bytes()],
        datetime.fromtimestamp(t0, UTC),
    )
    assert stored.manifest.serial == newer


def test_a_manifest_signed_by_another_key_is_refused(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """Newer, well-formed, but not signed by the pinned release key: refused, whether it
    names its own key or claims the pinned one's id."""
    t0 = time.time()
    held = next_serial()
    other = ed25519.Ed25519PrivateKey.generate()
    forged_doc = sign(local_stack, key=other, serial=next_serial(), **lifetime(t0, 3000))
    pinned = sign(local_stack, serial=held, **lifetime(t0, 600))
    claims_pinned = json.loads(forged_doc) | {"key_id": json.loads(pinned)["key_id"]}
    now = [t0 + 500]

    async def go() -> None:
        async with manifest_server() as srv:
            config = profile(local_stack, tmp_path / "p", pinned, manifest_url=srv["url"])
            client, wallet, _model, _ = client_from_config(config, clock=lambda: now[0])
            try:
                for forged in (forged_doc, json.dumps(claims_pinned).encode()):
                    srv["body"] = forged
                    assert len(await client.verified_nodes()) == 1
                    now[0] += MIN_INTERVAL
                assert len(srv["seen"]) == 2
                assert client._refresher.stats.refused == 2
                assert serial_of(client) == held
            finally:
                await client.aclose()
                await wallet.aclose()

    asyncio.run(go())
    assert not (tmp_path / "p" / MANIFEST_FILE).exists()
    assert list(json.loads((tmp_path / "p" / SERIALS_FILE).read_text()).values()) == [held]


# ------------------------------------------------------------- rules, without a stack


def _key_files(tmp_path: Path) -> tuple[ed25519.Ed25519PrivateKey, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    pub = tmp_path / "release-key.pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def _manifest(key: ed25519.Ed25519PrivateKey, serial: int, issued: int, expires: int) -> bytes:
    doc = {
        "format": "openpcc-release-manifest/1",
        "serial": serial,
        "issued_at": issued,
        "expires_at": expires,
        "releases": {},
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    return SignedManifest.sign(json.dumps(doc).encode(), key).encode()


def test_refresh_is_due_in_the_last_quarter_of_the_lifetime(tmp_path: Path) -> None:
    key, pub = _key_files(tmp_path)
    at = datetime.fromtimestamp(1000, UTC)
    policy = TrustPolicy.from_signed(_manifest(key, 1, 1000, 1400), [pub.read_bytes()], at)
    assert not refresh_due(policy, 1000)
    assert not refresh_due(policy, 1299)
    assert refresh_due(policy, 1300)  # 100 of 400 s left
    assert refresh_due(policy, 1400) and refresh_due(policy, 5000)  # expired
    refresher = ManifestRefresher(policy, [pub.read_bytes()], tmp_path, clock=lambda: 1300)
    assert refresher.due(1300)
    refresher.last_attempt = 1300
    assert not refresher.due(1300 + MIN_INTERVAL - 1) and refresher.due(1300 + MIN_INTERVAL)


def test_manifest_url_values_and_sigstore_profiles(tmp_path: Path) -> None:
    """Absent or "gateway": through the relay; "off": none; https anywhere, http only on
    loopback; a Sigstore profile never refreshes."""
    assert parse_source(None) == parse_source("gateway") == "gateway"
    assert parse_source("off") is None
    assert parse_source("https://example.org/m.json") == "https://example.org/m.json"
    assert parse_source("http://127.0.0.1:9/m") == "http://127.0.0.1:9/m"
    for bad in ("http://example.org/m.json", "ftp://127.0.0.1/m", "/m.json", 3, ""):
        with pytest.raises(DecodeError):
            parse_source(bad)
    key, pub = _key_files(tmp_path)
    t = int(time.time())
    policy = TrustPolicy.from_signed(
        _manifest(key, 1, t, t + 600), [pub.read_bytes()], datetime.now(UTC)
    )
    sigstore = {"policy": "m.json", "sigstore": {"bundle": "b"}, "manifest_url": "gateway"}
    assert refresher_from_config(sigstore, policy, tmp_path) is None
    assert refresher_from_config({"manifest_url": "off"}, policy, tmp_path) is None
    on = refresher_from_config({"release_pubkey": str(pub)}, policy, tmp_path)
    assert on is not None and on.source == "gateway"


def test_the_newest_valid_manifest_is_used_at_start(tmp_path: Path) -> None:
    """Configured file or refreshed copy, whichever is newer and valid now."""
    key, pub = _key_files(tmp_path)
    t = int(time.time())
    now = datetime.fromtimestamp(t, UTC)
    configured = tmp_path / "trust-policy.json"
    cfg = {"policy": str(configured), "release_pubkey": str(pub)}
    stored = tmp_path / MANIFEST_FILE

    def pick(conf: bytes, kept: bytes | None) -> int:
        configured.write_bytes(conf)
        if kept is None:
            stored.unlink(missing_ok=True)
        else:
            stored.write_bytes(kept)
        return newest_policy(cfg, tmp_path, now).manifest.serial

    assert pick(_manifest(key, 5, t, t + 600), None) == 5
    assert pick(_manifest(key, 5, t, t + 600), _manifest(key, 7, t, t + 600)) == 7
    assert pick(_manifest(key, 9, t, t + 600), _manifest(key, 7, t, t + 600)) == 9
    assert pick(_manifest(key, 5, t - 900, t - 1), _manifest(key, 7, t, t + 600)) == 7
    assert pick(_manifest(key, 5, t, t + 600), _manifest(key, 7, t - 900, t - 1)) == 5
    other = ed25519.Ed25519PrivateKey.generate()
    assert pick(_manifest(key, 5, t, t + 600), _manifest(other, 7, t, t + 600)) == 5
    assert pick(_manifest(key, 5, t, t + 600), b"{not json") == 5
    with pytest.raises(Exception, match="expired"):
        pick(_manifest(key, 5, t - 900, t - 1), None)

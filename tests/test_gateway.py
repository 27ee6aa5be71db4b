"""The gateway as operators run it: separate processes, real sockets on 127.0.0.1.

A real issuer mints the tokens; fake nodes (tests/gateway_support/fake_node.py) open
the sealed requests for real and answer with real sealed streams, so every layer the
client sees (chunked OHTTP, streamed BHTTP, sealed response) is checked end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import nodestore
from gateway.nodestore import RedisNodeStore
from gateway.registry import (
    CredentialCapError,
    NodeIdTakenError,
    NodeRegistry,
    Registration,
    RegistrationError,
    RegistryFullError,
    ReplayedRegistrationError,
    parse_registration,
)
from gateway.spent import RedisSpentStore, SpentStore, SQLiteSpentStore
from openpcc.admission import SIGNATURE_HEADER, CredentialStore
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.errors import TruncatedError
from openpcc.forwarding import forward_key, verify_forward
from openpcc.privacypass import issuance
from openpcc.privacypass.auth import (
    TOKEN_TYPE_BLIND_RSA,
    Token,
    TokenChallenge,
    parse_www_authenticate,
)
from openpcc.wire import hpke, sealed
from openpcc.wire.bhttp import Response
from openpcc.wire.bhttp_stream import StreamHead
from openpcc.wire.ohttp import KeyConfig, parse_key_configs
from tests.admission_support import AttestedIdentity, simulated_tee
from tests.gateway_support.client import (
    CHALLENGE,
    ChunkedCall,
    chunked,
    infer_request,
    inner_request,
    key_config,
    mint,
    plain,
    problem_of,
    seal_chat,
    sealed_events,
)
from tests.gateway_support.procs import (
    Proc,
    admission,
    cli,
    control,
    credential,
    start_gateway,
    start_issuer,
    start_node,
    start_redis,
)

NODE_IDS = [bytes([i]) * 16 for i in (0xA1, 0xB2, 0xC3)]


# -- processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def issuer(workdir: Path) -> Iterator[Proc]:
    proc = start_issuer(workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(workdir: Path, issuer: Proc) -> Iterator[Proc]:
    proc = start_gateway(
        workdir,
        issuer.url,
        extra=["--node-ttl", "2", "--health-interval", "0.3", "--node-timeout", "3"],
    )
    yield proc
    proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


@pytest.fixture(scope="module")
def nodes(workdir: Path, gw: Proc) -> Iterator[list[Proc]]:
    procs = [start_node(workdir, gw.extra["internal"], nid) for nid in NODE_IDS]
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture
def ready(nodes: list[Proc], gw: Proc) -> list[Proc]:
    """All fake nodes behaving, heartbeating, healthy, and listed by the gateway."""
    for n in nodes:
        control(n, "set", {"mode": "ok", "healthy": True, "heartbeat": True})
        control(n, "reset")
    wait_listed(gw, {n.extra["node_id"].hex() for n in nodes})
    return nodes


def nodes_listed(gw: Proc) -> set[str]:
    async def go() -> set[str]:
        async with aiohttp.ClientSession() as s:
            kc = await key_config(s, gw.url)
            status, resp = await plain(s, gw.url, kc, inner_request("GET", "/v1/nodes"))
            assert status == 200 and isinstance(resp, Response) and resp.status == 200
            return {n["node_id"] for n in json.loads(resp.content)["nodes"]}

    return asyncio.run(go())


def wait_listed(gw: Proc, expected: set[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = nodes_listed(gw)
        if got == expected:
            return
        assert time.monotonic() < deadline, f"listed {got}, expected {expected}"
        time.sleep(0.1)


def node_key(node: Proc) -> sealed.NodeKey:
    """The node's X25519 key: v1 envelopes (most tests; routing is the same for v2)."""
    return sealed.NodeKey(node.extra["node_id"], node.extra["public_key"])


def pq_node_key(node: Proc) -> sealed.NodeKey:
    """The node's X-Wing key: v2 envelopes."""
    return sealed.NodeKey(node.extra["node_id"], node.extra["pq_public_key"])


@pytest.fixture
async def session() -> Iterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- keys -------------------------------------------------------------------------------------


async def test_key_config_served_parsed_and_rotated(gw: Proc, session: aiohttp.ClientSession):
    """One X25519 and one X-Wing config by default, distinct ids, X-Wing first among keys
    of one generation; both open plain and chunked requests; `keys rotate` rotates both
    (or one, with --kem) and the replaced keys open requests through their grace."""
    async with session.get(gw.url + "/.well-known/ohttp-gateway") as r:
        assert r.status == 200
        assert r.content_type == "application/ohttp-keys"
        assert "max-age=" in r.headers["Cache-Control"]
        before = parse_key_configs(await r.read())
    kems = [c.kem_id for c in before]
    assert sorted(kems) == sorted([hpke.KEM_XWING, hpke.KEM_DHKEM_X25519_HKDF_SHA256])
    assert kems[0] == hpke.KEM_XWING and len({c.key_id for c in before}) == 2
    for kc in before:
        assert kc.supports(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)
        assert kc.supports(hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305)
    keys_dir = gw.extra["state"] / "ohttp-keys"
    stored = {}
    for f in keys_dir.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        doc = json.loads(f.read_text())
        stored[doc["kem_id"]] = doc
        assert len(bytes.fromhex(doc["private_key"])) == 32  # X-Wing: its seed
    assert set(stored) == {hpke.KEM_XWING, hpke.KEM_DHKEM_X25519_HKDF_SHA256}

    async def opens(cfg: KeyConfig) -> None:
        status, resp = await plain(session, gw.url, cfg, inner_request("GET", "/v1/nodes"))
        assert status == 200 and resp.status == 200, cfg.kem_id
        call = await chunked(session, gw.url, cfg, inner_request("GET", "/v1/nodes"))
        assert call.status == 200 and (await call.collect())[0] == 200, cfg.kem_id

    for cfg in before:
        await opens(cfg)

    out = cli("gateway", "keys", "rotate", "--state", str(gw.extra["state"]))
    assert out.returncode == 0, out.stderr
    assert "(X-Wing)" in out.stdout and "(X25519)" in out.stdout
    async with session.get(gw.url + "/.well-known/ohttp-gateway") as r:
        after = parse_key_configs(await r.read())
    assert len(after) == len(before) + 2
    fresh = after[:2]  # newest first: the two new keys, fresh ids
    assert {c.kem_id for c in fresh} == set(kems)
    assert not {c.key_id for c in fresh} & {c.key_id for c in before}
    out = cli("gateway", "keys", "rotate", "--state", str(gw.extra["state"]), "--kem", "x-wing")
    assert out.returncode == 0 and "(X25519)" not in out.stdout, out.stdout + out.stderr
    async with session.get(gw.url + "/.well-known/ohttp-gateway") as r:
        last = parse_key_configs(await r.read())
    assert len(last) == len(after) + 1 and last[0].kem_id == hpke.KEM_XWING
    # The newest keys and the replaced ones (grace period) all open requests.
    for cfg in (last[0], *before):
        await opens(cfg)


def test_key_ring_keeps_a_key_per_kem_and_upgrades_an_old_folder(
    tmp_path: Path, caplog, monkeypatch
):
    """A folder from before X-Wing (files without kem_id) loads as X25519 and gains an
    X-Wing key at start; rotation is per KEM; each key id opens only its own KEM; a
    read-only folder is served as it is, with a warning."""
    from gateway import keys as gateway_keys
    from gateway.keys import KEYS_DIRNAME, X25519, XWING, OhttpKeyRing, ensure_keys
    from openpcc.errors import KeyStoreError
    from openpcc.wire import ohttp

    keys_dir = tmp_path / KEYS_DIRNAME
    keys_dir.mkdir(mode=0o700)
    old = hpke.generate_key_pair()
    legacy = {
        "key_id": 9,
        "private_key": old.private_key.hex(),
        "created_at": 1,
        "expires_at": None,
    }
    (keys_dir / "9.json").write_text(json.dumps(legacy))
    ring = ensure_keys(tmp_path, now=1000)
    assert [(k.key_id, k.kem_id) for k in ring.keys] == [(10, XWING), (9, X25519)]
    assert ring.keys[1].public_key == old.public_key
    assert json.loads((keys_dir / "10.json").read_text())["kem_id"] == XWING
    assert ensure_keys(tmp_path, now=1001).keys == ring.keys  # nothing more to add
    configs = ring.configs(1000)
    for cfg in configs:
        req, _ = ohttp.encapsulate_request(cfg, b"hi")
        assert ohttp.decapsulate_request(ring.private_keys(1000), req)[0] == b"hi"
    # Rotating X-Wing alone leaves X25519 current; both stay open through the grace.
    new, _ = ring.rotate(now=2000, grace=100, kems=[XWING])
    assert [(k.key_id, k.kem_id) for k in new] == [(11, XWING)]
    assert [(k.key_id, k.expires_at) for k in ring.keys] == [(11, None), (9, None), (10, 2100)]
    assert set(ring.private_keys(2050)) == {9, 10, 11}
    assert set(ring.private_keys(2100)) == {9, 11}
    # A gateway serving X25519 only publishes and opens neither X-Wing key.
    only = OhttpKeyRing.load(tmp_path, kems=[X25519])
    assert [c.key_id for c in only.configs(2050)] == [9] and set(only.private_keys(2050)) == {9}
    # A folder that cannot be written (a mounted Secret) and has no X-Wing key: served
    # as it is, with a warning (and refused only if it has no key at all).
    ro = tmp_path / "ro"
    (ro / KEYS_DIRNAME).mkdir(parents=True)
    (ro / KEYS_DIRNAME / "9.json").write_text(json.dumps(legacy))

    def read_only(path: Path, data: bytes) -> None:
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(gateway_keys, "write_private", read_only)
    with caplog.at_level("WARNING", logger="openpcc.gateway"):
        ring = ensure_keys(ro, now=1000)
    assert [k.kem_id for k in ring.keys] == [X25519]
    assert "no X-Wing OHTTP key" in caplog.text
    with pytest.raises(KeyStoreError):
        ensure_keys(tmp_path / "empty", now=1000)


# -- registry ---------------------------------------------------------------------------------


async def test_nodes_directory_lists_bundles_as_received(
    ready: list[Proc], gw: Proc, session: aiohttp.ClientSession
):
    kc = await key_config(session, gw.url)
    call = await chunked(session, gw.url, kc, inner_request("GET", "/v1/nodes"))
    assert call.status == 200
    assert call.response.headers["Content-Type"] == "message/ohttp-chunked-res"
    status, headers, body = await call.collect()
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert abs(doc["issued_at"] - time.time()) < 5
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    for node in ready:
        entry = by_id[node.extra["node_id"].hex()]
        assert entry["public_key"] == node.extra["public_key"].hex()
        assert entry["key_id"] == sealed.key_id_for(node.extra["public_key"]).hex()
        assert entry["models"] == ["tiny"]
        # The bundle as the node sent it (clients verify it themselves).
        assert entry["bundle"]["version"] == 1 and entry["bundle"]["tee"] == "simulated-snp"


async def test_unhealthy_and_expired_nodes_are_dropped(ready: list[Proc], gw: Proc):
    a, b, _ = ready
    all_ids = {n.extra["node_id"].hex() for n in ready}
    control(a, "set", {"healthy": False})
    control(b, "set", {"heartbeat": False})
    await asyncio.to_thread(
        wait_listed, gw, all_ids - {a.extra["node_id"].hex(), b.extra["node_id"].hex()}
    )
    control(a, "set", {"healthy": True})
    control(b, "set", {"heartbeat": True})
    await asyncio.to_thread(wait_listed, gw, all_ids)


def identity(workdir: Path, node_id: bytes, pk: bytes | None = None) -> AttestedIdentity:
    """A node identity attested by the workdir's simulated TEE (which the gateways trust)."""
    return AttestedIdentity(simulated_tee(workdir / "simulated-tee"), node_id, pk or b"\xcd" * 32)


async def post_registration(
    session: aiohttp.ClientSession,
    gw: Proc,
    ident: AttestedIdentity,
    *,
    url: str = "http://127.0.0.1:9",
    cred: str | None = None,
    now: float | None = None,
    doc: dict | None = None,
    signed: tuple[bytes, str] | None = None,
) -> tuple[int, str]:
    """One registration as a node sends it; (status, problem detail)."""
    body, sig = signed or ident.signed(doc or ident.document(url, ["tiny"]), now)
    headers = {
        "Authorization": f"Bearer {cred or credential(gw.log.parent)}",
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sig,
    }
    async with session.post(gw.extra["internal"] + "/internal/nodes", data=body,
                            headers=headers) as r:  # fmt: skip
        text = await r.text()
        return r.status, (json.loads(text).get("detail", "") if r.status != 200 else "")


async def test_registration_requires_a_credential_and_a_strict_body(
    gw: Proc, workdir: Path, session: aiohttp.ClientSession
):
    ident = identity(workdir, b"\xab" * 16)
    body, sig = ident.signed(ident.document("http://127.0.0.1:9", ["tiny"]))
    url = gw.extra["internal"] + "/internal/nodes"
    good_cred = credential(workdir)
    forged = f"opnc1.{good_cred.split('.')[1]}." + "A" * 43
    for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": good_cred},
                 {"Authorization": f"Bearer {forged}"},
                 {"Authorization": "Bearer opnc1.nobody." + "A" * 43}):  # fmt: skip
        headers = {**auth, "Content-Type": "application/json", SIGNATURE_HEADER: sig}
        async with session.post(url, data=body, headers=headers) as r:
            assert r.status == 401
            assert r.content_type == "application/problem+json"
    good = ident.document("http://127.0.0.1:9", ["tiny"])
    bad_bodies = [
        {**good, "node_id": "ab" * 15},
        {**good, "node_id": "AB" * 16},
        {**good, "public_key": "cd" * 31},
        {**good, "url": "ftp://x"},
        {**good, "url": "http://u:p@host"},
        {**good, "url": "http://host/?q=1"},
        {**good, "models": []},
        {**good, "models": ["a", "a"]},
        {**good, "models": [""]},
        {**good, "bundle": [1]},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "bundle"},
    ]
    for doc in bad_bodies:
        assert (await post_registration(session, gw, ident, doc=doc))[0] == 400, doc
    headers = {"Authorization": f"Bearer {good_cred}", "Content-Type": "application/json"}
    async with session.post(url, data=b"{not json", headers=headers) as r:
        assert r.status in (400, 415)
    assert await post_registration(session, gw, ident) == (200, "")
    # Registration is not on the public listener at all.
    async with session.post(gw.url + "/internal/nodes", data=body, headers=headers) as r:
        assert r.status in (404, 405)
    # That node never passes a health check (nothing listens on port 9): never listed.
    assert "ab" * 16 not in await asyncio.to_thread(nodes_listed, gw)


async def test_only_the_attested_node_lists_itself_under_its_id(
    ready: list[Proc], gw: Proc, workdir: Path, session: aiohttp.ClientSession
):
    """The takeover of issue 18, refused: holding a credential is not enough to list a
    node id, its URL or its key; only the key the node's attested claims carry is."""
    victim = ready[0]
    vid = victim.extra["node_id"]
    # Another attested node (a real bundle, its own key) claiming the victim's id: 409
    # while the victim's entry lives, however often it tries.
    impostor = identity(workdir, vid, victim.extra["public_key"])
    for _ in range(3):
        status, detail = await post_registration(session, gw, impostor, url="http://127.0.0.1:9")
        assert status == 409 and "another attested node key" in detail
    # The victim's own bundle (as the public directory shows it) with the attacker's URL,
    # signed by the attacker: the bundle's claims name another signing key.
    copied = impostor.document("http://127.0.0.1:9", ["tiny"])
    copied["bundle"] = await asyncio.to_thread(victim_bundle, gw, vid)
    status, detail = await post_registration(session, gw, impostor, doc=copied)
    assert status == 401 and "attested node key" in detail
    # An id that is not the one the claims name.
    other = identity(workdir, b"\x5a" * 16)
    doc = other.document("http://127.0.0.1:9", ["tiny"])
    doc["node_id"] = "5b" * 16
    assert (await post_registration(session, gw, other, doc=doc))[0] == 403
    # The victim still gets its requests.
    assert vid.hex() in await asyncio.to_thread(nodes_listed, gw)
    assert not control(victim, "state")["refusals"]


def victim_bundle(gw: Proc, node_id: bytes) -> dict:
    async def go() -> dict:
        async with aiohttp.ClientSession() as s:
            kc = await key_config(s, gw.url)
            _, resp = await plain(s, gw.url, kc, inner_request("GET", "/v1/nodes"))
            assert isinstance(resp, Response)
            nodes = json.loads(resp.content)["nodes"]
            return next(n["bundle"] for n in nodes if n["node_id"] == node_id.hex())

    return asyncio.run(go())


async def test_stale_replayed_outside_and_unattested_registrations_are_refused(
    gw: Proc, workdir: Path, session: aiohttp.ClientSession, tmp_path: Path
):
    ident = identity(workdir, b"\x6c" * 16)
    # Signed two minutes ago (a copy kept for later): stale.
    status, detail = await post_registration(session, gw, ident, now=time.time() - 120)
    assert status == 401 and "60 s" in detail
    status, detail = await post_registration(session, gw, ident, now=time.time() + 120)
    assert status == 401
    # A fresh one passes once; the same bytes and signature again are a replay.
    signed = ident.signed(ident.document("http://127.0.0.1:9", ["tiny"]))
    assert (await post_registration(session, gw, ident, signed=signed))[0] == 200
    status, detail = await post_registration(session, gw, ident, signed=signed)
    assert status == 409 and "older" in detail
    # A signature over other bytes, or none.
    body, _ = ident.signed(ident.document("http://127.0.0.1:9", ["tiny"]))
    _, sig = ident.signed({"other": 1})
    assert (await post_registration(session, gw, ident, signed=(body, sig)))[0] == 401
    assert (await post_registration(session, gw, ident, signed=(body, "")))[0] == 401
    # URLs outside --node-network (loopback here), and host names (rebinding), refused.
    for url in ("http://10.1.2.3:8080", "http://192.168.0.9", "http://localhost:9",
                "http://[::1]:9", "http://node.internal:9"):  # fmt: skip
        status, detail = await post_registration(session, gw, identity(workdir, b"\x6d" * 16),
                                                 url=url)  # fmt: skip
        assert status == 403 and "inside" in detail, url
    # A bundle from a TEE the operator's manifest does not trust.
    rogue = AttestedIdentity(SimulatedTEE.create(tmp_path / "rogue-tee"), b"\x6e" * 16,
                             b"\xcd" * 32)  # fmt: skip
    status, detail = await post_registration(session, gw, rogue)
    assert status == 403 and "does not verify" in detail
    assert "6e" * 16 not in await asyncio.to_thread(nodes_listed, gw)


async def test_each_credential_lists_at_most_its_cap(
    gw: Proc, workdir: Path, session: aiohttp.ClientSession
):
    """One credential cannot fill the registry: a pool's cap binds it, and the running
    gateway picks up a new or revoked credential from its file."""
    store = CredentialStore(workdir / "node-credentials.json")
    cred = store.add("pool-of-two", 2).token
    first = [identity(workdir, bytes([0x70 + i]) * 16) for i in range(3)]
    assert (await post_registration(session, gw, first[0], cred=cred))[0] == 200
    assert (await post_registration(session, gw, first[1], cred=cred))[0] == 200
    status, detail = await post_registration(session, gw, first[2], cred=cred)
    assert status == 403 and "cap" in detail
    # Known nodes keep heartbeating under it; another credential is not affected.
    assert (await post_registration(session, gw, first[0], cred=cred))[0] == 200
    assert (await post_registration(session, gw, first[2]))[0] == 200
    out = cli("gateway", "credentials", "revoke", "pool-of-two",
              "--node-credentials", str(workdir / "node-credentials.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (await post_registration(session, gw, first[0], cred=cred))[0] == 401


def test_parse_registration_rejects_oversized_bundles():
    body = {
        "node_id": "00" * 16,
        "url": "https://node.example",
        "public_key": "11" * 32,
        "models": ["m"],
        "bundle": {"blob": "x" * (300 * 1024)},
    }
    with pytest.raises(RegistrationError):
        parse_registration(json.dumps(body).encode())


# -- issuer directory and tokens ----------------------------------------------------------------


async def test_issuer_directory_is_what_the_gateway_redeems_against(
    gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    kc = await key_config(session, gw.url)
    status, resp = await plain(session, gw.url, kc, inner_request("GET", "/v1/issuer-directory"))
    assert status == 200 and resp.status == 200
    assert dict(resp.headers)[b"content-type"] == b"application/private-token-issuer-directory"
    async with session.get(issuer.url + "/.well-known/private-token-issuer-directory") as r:
        assert resp.content == await r.read()


async def infer(
    session: aiohttp.ClientSession, gw_url: str, token: Token | bytes | None, envelope: bytes
) -> ChunkedCall:
    kc = await key_config(session, gw_url)
    return await chunked(session, gw_url, kc, infer_request(token, envelope))


async def expect_401(call: ChunkedCall) -> dict:
    assert call.status == 200  # the refusal is inside the encapsulation
    status, headers, body = await call.collect()
    assert status == 401, body
    assert headers["content-type"] == "application/problem+json"
    (challenge,) = parse_www_authenticate(headers["www-authenticate"])
    assert challenge.challenge() == CHALLENGE
    issuance.decode_token_key(challenge.token_key)
    return problem_of(body)


async def test_bad_tokens_are_refused_with_a_challenge(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    env = seal_chat([node_key(ready[0])]).envelope
    (good,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    other = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "other.example", b"", ())
    (wrong_challenge,) = await mint(session, issuer.url, issuer.extra["api_key"], 1, other)
    rogue = issuance.IssuerKey.generate()
    req, st = issuance.begin_token_request(rogue.token_key, CHALLENGE)
    unknown_key = issuance.finalize_token(st, issuance.issue(rogue, req))
    sig = bytearray(good.authenticator)
    sig[-1] ^= 1
    bad_sig = Token(good.token_type, good.nonce, good.challenge_digest, good.token_key_id,
                    bytes(sig))  # fmt: skip
    for token in (None, b"\x00\x02" + b"\x00" * 10, wrong_challenge, unknown_key, bad_sig):
        await expect_401(await infer(session, gw.url, token, env))
    # None of those spent the real token: it still works (once).
    call = await infer(session, gw.url, good, env)
    assert (await call.collect())[0] == 200
    await expect_401(await infer(session, gw.url, good, env))


async def test_double_spend_refused_on_one_gateway(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    env = seal_chat([node_key(ready[1])]).envelope
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    status, _, _ = await (await infer(session, gw.url, token, env)).collect()
    assert status == 200
    doc = await expect_401(await infer(session, gw.url, token, env))
    assert "spent" in doc["detail"]
    # Plain OHTTP path refuses it too.
    kc = await key_config(session, gw.url)
    outer, resp = await plain(session, gw.url, kc, infer_request(token, env))
    assert outer == 200 and resp.status == 401


async def test_a_token_is_never_accepted_twice_while_its_key_is_listed(
    workdir: Path, ready: list[Proc], issuer: Proc, session: aiohttp.ClientSession
):
    """Seen in an attack: with a spent TTL shorter than the token key's life, a spent
    record expired while the key was still listed and the token was accepted again. The
    gateway now refuses a key it has redeemed for longer than --spent-ttl (its first
    redemption is remembered for good), so no replay outlives the record it must meet."""
    short = start_gateway(workdir, issuer.url, name="short-ttl", extra=["--spent-ttl", "3"])
    try:
        env = seal_chat([node_key(ready[0])]).envelope
        first, replayed = await mint(session, issuer.url, issuer.extra["api_key"], 2)
        t0 = time.monotonic()
        status, _, _ = await (await infer(session, short.url, first, env)).collect()
        assert status != 401  # redeemed (no node registered here: what follows is a 503)
        assert "spent" in (await expect_401(await infer(session, short.url, first, env)))["detail"]
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))  # its record is gone now
        for token in (first, replayed):  # the replay, and any other token under that key
            doc = await expect_401(await infer(session, short.url, token, env))
            assert "longer than this gateway remembers spent tokens" in doc["detail"], doc
        assert "keep the issuer's key lifetime below --spent-ttl" in short.output()
    finally:
        short.stop()


@pytest.fixture(scope="module")
def replicas(workdir: Path, issuer: Proc, request: pytest.FixtureRequest) -> Iterator[list[Proc]]:
    redis = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/7"
    procs = [
        start_gateway(workdir, issuer.url, name=f"replica{i}", extra=["--redis", redis])
        for i in range(2)
    ]
    yield procs
    for p in procs:
        p.stop()


async def test_double_spend_refused_across_replicas_sharing_redis(
    replicas: list[Proc], issuer: Proc, session: aiohttp.ClientSession
):
    env = seal_chat([sealed.NodeKey(b"\x01" * 16, b"\x02" * 32)]).envelope
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 6)
    first, racers = tokens[0], tokens[1:]
    # Accepted on replica 0 (then 503: these replicas have no nodes), refused on replica 1.
    status, _, _ = await (await infer(session, replicas[0].url, first, env)).collect()
    assert status == 503
    await expect_401(await infer(session, replicas[1].url, first, env))

    # Each token raced 4 times over both replicas: exactly one redemption wins.
    async def attempt(url: str, token: Token) -> int:
        return (await (await infer(session, url, token, env)).collect())[0]

    for token in racers:
        results = await asyncio.gather(*(attempt(replicas[i % 2].url, token) for i in range(4)))
        assert sorted(results) == [401, 401, 401, 503], results


# -- routing and streaming ----------------------------------------------------------------------


async def read_sealed(call: ChunkedCall, opener: sealed.ResponseOpener) -> tuple[int, bytes]:
    status, body = 0, bytearray()
    async for ev in sealed_events(call, opener):
        if isinstance(ev, StreamHead):
            assert ev.status == 200
        elif isinstance(ev, sealed.ResponseHead):
            status = ev.status
        else:
            body += ev
    return status, bytes(body)


async def test_sealed_request_round_trip_chunked_and_plain(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 2)
    sr = seal_chat([node_key(n) for n in ready])
    call = await infer(session, gw.url, tokens[0], sr.envelope)
    status, body = await read_sealed(call, sr.response_opener())
    assert status == 200
    assert body == (b'first:/v1/chat/completions:{"model":"tiny","stream":true}\nsecond\nlast\n')
    # The node got the envelope byte for byte, with no header from the client side, and
    # the gateway's OpenPCC-Forward MAC under that node's key (openpcc/forwarding.py).
    got = [(n, r) for n in ready for r in control(n, "state")["requests"]]
    assert len(got) == 1 and got[0][1]["body_len"] == len(sr.envelope)
    node, req = got[0]
    names = {k.lower() for k, _ in req["headers"]}
    assert names <= {"host", "content-type", "content-length", "openpcc-forward"}, names
    mac = next(v for k, v in req["headers"] if k.lower() == "openpcc-forward")
    key = forward_key(node.extra["credential"], node.extra["node_id"])
    verify_forward(key, sr.envelope, mac, time.time())

    sr = seal_chat([node_key(ready[2])])
    kc = await key_config(session, gw.url)
    outer, resp = await plain(session, gw.url, kc, infer_request(tokens[1], sr.envelope))
    assert outer == 200 and resp.status == 200
    opener = sr.response_opener()
    events = opener.receive_data(resp.content)
    opener.end_of_input()
    assert b"".join(e for e in events if isinstance(e, bytes)).endswith(b"second\nlast\n")


async def test_streaming_is_incremental(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    node = ready[0]
    control(node, "set", {"mode": "gated"})
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    sr = seal_chat([node_key(node)])
    call = await infer(session, gw.url, token, sr.envelope)
    events = sealed_events(call, sr.response_opener())
    got: list[bytes] = []
    async with asyncio.timeout(5):  # buffering in the gateway would hang here
        async for ev in events:
            if isinstance(ev, bytes):
                got.append(ev)
                break
    assert got[0].startswith(b"first:")
    assert control(node, "state")["sent_last"] == 0  # the node still holds the rest
    control(node, "release")
    rest = [ev async for ev in events if isinstance(ev, bytes)]
    assert b"".join(rest) == b"second\nlast\n"
    assert control(node, "state")["sent_last"] == 1


async def test_client_leaving_mid_stream_leaves_the_gateway_healthy(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    node = ready[2]
    control(node, "set", {"mode": "gated"})
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    sr = seal_chat([node_key(node)])
    call = await infer(session, gw.url, token, sr.envelope)
    async with asyncio.timeout(5):
        async for ev in sealed_events(call, sr.response_opener()):
            if isinstance(ev, bytes):
                break
    call.response.close()  # the client goes away with the node still streaming
    await asyncio.sleep(0.3)
    control(node, "release")
    async with session.get(gw.url + "/healthz") as r:
        assert r.status == 200
    assert "Error handling request" not in gw.output()


async def test_routing_honours_the_first_candidate_and_moves_off_an_overloaded_one(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    """Issue 17: the client lists its conversation's node first; the gateway sends it
    there unless that node reports a queue beyond --affinity-slack (4) over the others."""
    a, b = ready[0], ready[1]
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 6)

    async def served_by() -> str:
        sr = seal_chat([node_key(a), node_key(b)])  # the client's order: a first
        status, _ = await read_sealed(
            await infer(session, gw.url, tokens.pop(), sr.envelope), sr.response_opener()
        )
        assert status == 200
        hits = [n for n in (a, b) if control(n, "state")["requests"]]
        assert len(hits) == 1
        for n in (a, b):
            control(n, "reset")
        return hits[0].name

    for _ in range(3):
        assert await served_by() == a.name
    control(a, "set", {"waiting": 50})
    await asyncio.sleep(1.0)  # the gateway's next health checks (every 0.3 s) read it
    for _ in range(3):
        assert await served_by() == b.name
    control(a, "set", {"waiting": 0})


async def test_failover_when_nodes_fail_before_the_first_byte(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    a, b, c = ready
    control(a, "set", {"mode": "status500"})
    control(b, "set", {"mode": "drop"})
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 8)
    for token in tokens:
        sr = seal_chat([node_key(a), node_key(b), node_key(c)])
        status, body = await read_sealed(
            await infer(session, gw.url, token, sr.envelope), sr.response_opener()
        )
        assert status == 200 and body.endswith(b"last\n")
    tried = {n.extra["node_id"]: len(control(n, "state")["requests"]) for n in ready}
    assert tried[c.extra["node_id"]] == 8
    assert tried[a.extra["node_id"]] + tried[b.extra["node_id"]] > 0

    # Every candidate failing before its first byte: 503.
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    sr = seal_chat([node_key(a)])
    status, _, body = await (await infer(session, gw.url, token, sr.envelope)).collect()
    assert status == 503 and problem_of(body)["status"] == 503


async def test_node_dying_mid_stream_is_a_truncation_at_the_client(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    node = ready[1]
    control(node, "set", {"mode": "die_mid"})
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    sr = seal_chat([node_key(node)])
    call = await infer(session, gw.url, token, sr.envelope)
    got: list[bytes] = []
    with pytest.raises(TruncatedError):
        async for ev in sealed_events(call, sr.response_opener()):
            if isinstance(ev, bytes):
                got.append(ev)
    assert got and got[0].startswith(b"first:")
    assert b"last" not in b"".join(got)


async def test_unusable_candidates_give_503(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    a = ready[0]
    stale = sealed.NodeKey(a.extra["node_id"], hpke.generate_key_pair().public_key)
    unknown = sealed.NodeKey(b"\x77" * 16, hpke.generate_key_pair().public_key)
    cases = [
        seal_chat([stale]),  # registered node, but not under that key
        seal_chat([unknown]),  # never registered
        seal_chat([node_key(a)], model="another-model"),  # node does not serve the model
    ]
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], len(cases))
    for sr, token in zip(cases, tokens, strict=True):
        status, _, body = await (await infer(session, gw.url, token, sr.envelope)).collect()
        assert status == 503, body
    assert control(a, "state")["requests"] == []  # nothing was forwarded


async def test_x_wing_v2_envelopes_route_by_the_attested_x_wing_key(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    """A v2 envelope names the node's X-Wing key id, which the gateway learned from the
    admitted claims (not from the registration's X25519 field): routed, answered; a v2
    envelope to a stale X-Wing key, or a v1 envelope carrying an X-Wing key id, is not."""
    a = ready[0]
    control(a, "reset")
    good = seal_chat([pq_node_key(a)])
    assert good.envelope[0] == 2
    stale = seal_chat(
        [sealed.NodeKey(a.extra["node_id"], hpke.generate_key_pair(kem_id=0x647A).public_key)]
    )
    # v1 header, but naming the X-Wing key id: key ids are per version's KEM.
    relabelled = seal_chat([node_key(a)]).envelope
    header = sealed.parse_envelope_header(relabelled)
    at = header.length - header.version.entry_len + sealed.NODE_ID_LEN
    crossed = relabelled[:at] + sealed.key_id_for(a.extra["pq_public_key"]) + relabelled[at + 8 :]
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 3)
    call = await infer(session, gw.url, tokens[0], good.envelope)
    body = b"".join(
        [ev async for ev in sealed_events(call, good.response_opener()) if isinstance(ev, bytes)]
    )
    assert body.startswith(b"first:/v1/chat/completions") and body.endswith(b"last\n")
    for env, token in ((stale.envelope, tokens[1]), (crossed, tokens[2])):
        status, _, out = await (await infer(session, gw.url, token, env)).collect()
        assert status == 503, out
    assert [r["version"] for r in control(a, "state")["requests"]] == [2]


async def test_malformed_envelope_is_400_and_costs_the_token(
    gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    status, _, body = await (await infer(session, gw.url, token, b"\x07garbage")).collect()
    assert status == 400 and problem_of(body)["status"] == 400
    await expect_401(await infer(session, gw.url, token, b"\x07garbage"))


# -- hostile input at the OHTTP layer ---------------------------------------------------------


async def test_tampered_and_hostile_ohttp_bodies_are_4xx_and_the_gateway_survives(
    gw: Proc, session: aiohttp.ClientSession
):
    from openpcc.wire.chunked import ChunkedRequestSender
    from openpcc.wire.ohttp import encapsulate_request

    kc = await key_config(session, gw.url)
    inner = inner_request("GET", "/v1/nodes")
    body, _ = encapsulate_request(kc, inner)
    tampered = bytearray(body)
    tampered[-3] ^= 0x40
    sender = ChunkedRequestSender(kc)
    chunked_body = bytearray(
        sender.seal_chunk(inner[:10]) + sender.seal_chunk(inner[10:], final=True)
    )
    chunked_tampered = bytearray(chunked_body)
    chunked_tampered[60] ^= 1
    unknown_key = KeyConfig((kc.key_id + 128) % 256, kc.kem_id, kc.public_key, kc.symmetric_suites)
    unknown_body, _ = encapsulate_request(unknown_key, inner)
    cases = [
        ("message/ohttp-req", bytes(tampered), 400),
        ("message/ohttp-req", b"", 400),
        ("message/ohttp-req", os.urandom(3), 400),
        ("message/ohttp-req", os.urandom(500), 400),
        ("message/ohttp-req", unknown_body, 400),
        ("message/ohttp-chunked-req", bytes(chunked_tampered), 400),
        ("message/ohttp-chunked-req", bytes(chunked_body[:-5]), 400),  # cut final chunk
        ("message/ohttp-chunked-req", bytes(chunked_body[:40]), 400),  # no final chunk
        ("message/ohttp-chunked-req", body[:39] + b"\x3f\xff\xff\xff", 400),  # huge length
        ("message/ohttp-chunked-req", b"", 400),
        ("application/octet-stream", body, 415),
        ("text/plain", b"hello", 415),
    ]
    for ctype, data, expected in cases:
        async with session.post(
            gw.url + "/gateway", data=data, headers={"Content-Type": ctype}
        ) as r:
            assert r.status == expected, (ctype, data[:16])
            assert r.content_type == "application/problem+json"
    async with session.post(
        gw.url + "/gateway", data=unknown_body, headers={"Content-Type": "message/ohttp-req"}
    ) as r:
        assert (await r.json())["type"].endswith("#ohttp-key")
    # Over the size limit: refused from Content-Length alone, and while streaming too.
    big = b"\x00" * (9 * 1024 * 1024)
    async with session.post(
        gw.url + "/gateway", data=big, headers={"Content-Type": "message/ohttp-req"}
    ) as r:
        assert r.status == 413

    async def stream_big():  # no Content-Length: the limit applies as bytes arrive
        for _ in range(10):
            yield b"\x00" * (1024 * 1024)

    try:
        async with session.post(
            gw.url + "/gateway",
            data=stream_big(),
            headers={"Content-Type": "message/ohttp-chunked-req"},
        ) as r:
            assert r.status in (400, 413)
    except aiohttp.ClientError:
        pass  # the gateway may close the connection on us mid-upload: also a refusal
    # Valid OHTTP around bad inner requests: errors come back encapsulated.
    for data, expected in (
        (b"\x09junk", 400),
        (inner_request("GET", "/nope"), 404),
        (inner_request("POST", "/v1/nodes"), 405),
        (inner_request("POST", "/v1/infer", [("content-type", "text/plain")]), 400),
    ):
        outer, resp = await plain(session, gw.url, kc, data)
        assert outer == 200 and resp.status == expected
        assert problem_of(resp.content)["status"] == expected
    async with session.get(gw.url + "/healthz") as r:
        assert r.status == 200


# -- what the gateway keeps -------------------------------------------------------------------


async def test_logs_metrics_and_audit_hold_only_what_the_gateway_may_see(
    ready: list[Proc], gw: Proc, issuer: Proc, session: aiohttp.ClientSession
):
    (token,) = await mint(session, issuer.url, issuer.extra["api_key"], 1)
    sr = seal_chat([node_key(ready[2])])
    status, _ = await read_sealed(
        await infer(session, gw.url, token, sr.envelope), sr.response_opener()
    )
    assert status == 200
    async with session.get(gw.url + "/metrics") as r:
        metrics = await r.text()
    assert "openpcc_gateway_redemptions_total" in metrics
    for node in ready:
        assert node.extra["node_id"].hex() not in metrics
    token_b64 = __import__("base64").urlsafe_b64encode(token.encode()).decode()
    assert token_b64[:40] not in gw.output() and "chat/completions" not in gw.output()
    records = [json.loads(line) for line in gw.extra["audit"].read_text().splitlines()]
    want = [ready[2].extra["node_id"].hex()]
    mine = [
        r
        for r in records
        if r["notes"].get("inner", {}).get("candidates") == want
        and token_b64[:40] in json.dumps(r["notes"])
    ]
    assert len(mine) == 1
    note = mine[0]["notes"]["inner"]
    assert note["model"] == "tiny" and note["path"] == "/v1/infer"
    assert note["served_by"] == ready[2].extra["node_id"].hex()
    assert b"chat/completions" not in bytes.fromhex(mine[0]["body_hex"])


# -- spent-token store contract (both backends) -------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpentStore]:
    if request.param == "sqlite":
        s: SpentStore = SQLiteSpentStore(tmp_path / "spent.sqlite3")
    else:
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/8"
        s = RedisSpentStore(url, prefix=f"test:{os.urandom(4).hex()}:")
    yield s
    await s.close()


async def test_spent_store_accepts_each_token_once(store: SpentStore):
    k1, k2, n1, n2 = b"k" * 32, b"K" * 32, b"n" * 32, b"N" * 32
    assert await store.mark_spent(k1, n1, 60)
    assert not await store.mark_spent(k1, n1, 60)
    assert await store.mark_spent(k1, n2, 60)
    assert await store.mark_spent(k2, n1, 60)
    assert not await store.mark_spent(k2, n1, 60)


async def test_spent_store_spend_decides_then_makes_durable(store: SpentStore):
    """``spend`` (what the gateway calls): fresh first, the record durable after; the same
    token again is not fresh, whichever of mark_spent and spend spent it."""
    first = await store.spend(b"d" * 32, b"n" * 32, 60)
    assert first.fresh
    await first.durable
    again = await store.spend(b"d" * 32, b"n" * 32, 60)
    assert not again.fresh
    assert not await store.mark_spent(b"d" * 32, b"n" * 32, 60)
    assert await store.mark_spent(b"d" * 32, b"m" * 32, 60)
    assert not (await store.spend(b"d" * 32, b"m" * 32, 60)).fresh
    racers = await asyncio.gather(*(store.spend(b"r" * 32, b"s" * 32, 60) for _ in range(20)))
    assert sum(r.fresh for r in racers) == 1


async def test_spent_store_racers_get_exactly_one_success(store: SpentStore):
    results = await asyncio.gather(*(store.mark_spent(b"r" * 32, b"x" * 32, 60) for _ in range(40)))
    assert sum(results) == 1


async def test_spent_store_entries_expire_with_their_ttl(store: SpentStore):
    assert await store.mark_spent(b"t" * 32, b"y" * 32, 1)
    assert not await store.mark_spent(b"t" * 32, b"y" * 32, 1)
    await asyncio.sleep(2.1)
    assert await store.mark_spent(b"t" * 32, b"y" * 32, 1)


async def test_spent_store_remembers_a_keys_first_redemption(store: SpentStore):
    first = await store.key_first_redeemed(b"f" * 32, 1000.5)
    assert first == 1000.5
    assert await store.key_first_redeemed(b"f" * 32, 2000.0) == 1000.5  # never moves
    assert await store.key_first_redeemed(b"g" * 32, 3000.25) == 3000.25
    racers = await asyncio.gather(*(store.key_first_redeemed(b"h" * 32, float(t))
                                    for t in range(1, 30)))  # fmt: skip
    assert len(set(racers)) == 1


async def test_sqlite_spent_store_is_atomic_across_connections(tmp_path: Path):
    stores = [SQLiteSpentStore(tmp_path / "shared.sqlite3") for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                asyncio.to_thread(asyncio.run, s.mark_spent(b"s" * 32, b"z" * 32, 60))
                for s in stores
            )
        )
        assert sum(results) == 1
    finally:
        for s in stores:
            await s.close()


# -- registration parser on arbitrary input ----------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        _json.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {
                "node_id": st.text(max_size=40),
                "url": st.text(max_size=40),
                "public_key": st.text(max_size=70),
                "models": st.lists(st.text(max_size=5), max_size=3),
                "bundle": _json,
            }
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_parse_registration_only_ever_raises_registration_error(body: bytes):
    try:
        reg = parse_registration(body)
    except RegistrationError:
        return
    assert len(reg.node_id) == 16 and len(reg.public_key) == 32 and reg.models


# -- shared node registry (Redis): the sync logic ----------------------------------------------


def _reg_body(node_id: str, *, url: str = "http://127.0.0.1:9", pk: str = "cd" * 32) -> bytes:
    """A body for the Redis store's own rules (admission is tested with processes)."""
    doc = {"node_id": node_id, "url": url, "public_key": pk, "models": ["tiny"], "bundle": {}}
    return json.dumps(doc).encode()


@pytest.fixture
async def node_stores(redis_url: str) -> Iterator[list[RedisNodeStore]]:
    """Two replicas' views of one shared registry, under a prefix of this test's own."""
    url, prefix = redis_url.rsplit("/", 1)[0] + "/9", f"test:{os.urandom(4).hex()}:"
    stores = [RedisNodeStore(url, prefix) for _ in range(2)]
    yield stores
    for s in stores:
        await s.close()


async def put(
    store: RedisNodeStore,
    body: bytes,
    ttl: float = 30,
    *,
    key: bytes = b"\x01" * 32,
    cred: str = "test",
    cap: int = 100,
    signed_ms: int | None = None,
) -> Registration:
    reg = dataclasses.replace(parse_registration(body), signing_key=key, credential=cred)
    await store.put(reg, body, ttl, signed_ms or time.time_ns() // 1000, cap)
    return reg


def admit_all(reg: Registration) -> Registration:
    return reg


async def test_shared_registry_sync_follows_redis_heartbeat_time(node_stores):
    a, b = node_stores
    local = NodeRegistry(ttl=30)  # not started: no health checks, entries stay unhealthy
    reg = await put(a, _reg_body("a1" * 16))
    beat = time.monotonic()
    await asyncio.sleep(0.5)
    await b.sync(local, admit_all)
    assert local.ids() == {reg.node_id}
    entry = local._nodes[reg.node_id]
    # Last seen at the heartbeat, not at the sync half a second later.
    assert abs(entry.last_seen - beat) < 0.2 and entry.reg.node_id == reg.node_id
    assert entry.reg.credential == "test"
    assert local.live() == []  # listed only after this replica's own check
    # A changed key or URL is a changed body: fetched again and marked for a new check.
    entry.healthy = True
    reg2 = await put(a, _reg_body("a1" * 16, pk="ef" * 32))
    await b.sync(local, admit_all)
    entry = local._nodes[reg.node_id]
    assert entry.reg.public_key == reg2.public_key and entry.healthy is False


async def test_shared_registry_entries_expire_everywhere(node_stores):
    a, b = node_stores
    local = NodeRegistry(ttl=0.5)
    keep, gone = "b1" * 16, "b2" * 16
    await put(a, _reg_body(keep), ttl=30)
    await put(a, _reg_body(gone), ttl=0.5)
    await b.sync(local, admit_all)
    assert local.ids() == {bytes.fromhex(keep), bytes.fromhex(gone)}
    await asyncio.sleep(0.7)
    await b.sync(local, admit_all)
    assert local.ids() == {bytes.fromhex(keep)}
    # Removed from Redis too (atomically, by the script), bodies included.
    assert await b._r.zrange(b._keys[0], 0, -1) == [keep.encode()]
    assert await b._r.hkeys(b._keys[1]) == [keep.encode()]


async def test_shared_registry_skips_bad_entries_planted_in_redis(node_stores, caplog):
    a, b = node_stores
    local = NodeRegistry(ttl=30)
    good = await put(a, _reg_body("c1" * 16))
    r, (zset, bodies, digests) = a._r, a._keys[:3]
    far = time.time() + 3600  # the scores are Redis TIME; the local clock is close enough here
    planted = {
        "c2" * 16: b"{secret-not-json",  # not JSON
        "c3" * 16: _reg_body("c4" * 16),  # valid body under another node's id
        "c5" * 16: _reg_body("c5" * 16, url="http://user:pw@host"),  # fails validation
    }
    for nid, body in planted.items():
        await r.zadd(zset, {nid: far})
        await r.hset(bodies, nid, body)
        await r.hset(digests, nid, "x")
    await r.zadd(zset, {"not-hex\xff": far, "c6" * 16: far})  # no body or digest at all
    with caplog.at_level("WARNING", logger="openpcc.gateway"):
        await b.sync(local, admit_all)
        await b.sync(local, admit_all)  # unchanged bad entries are not fetched or logged again
    assert local.ids() == {good.node_id}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5, warnings
    assert not any("secret" in w or "c2c2" in w or "user" in w for w in warnings)


async def test_shared_registry_enforces_max_nodes(node_stores, monkeypatch):
    a, _ = node_stores
    monkeypatch.setattr(nodestore, "MAX_NODES", 2)
    await put(a, _reg_body("d1" * 16))
    await put(a, _reg_body("d2" * 16))
    with pytest.raises(RegistryFullError):
        await put(a, _reg_body("d3" * 16))
    await put(a, _reg_body("d1" * 16))  # a heartbeat of a known node still passes


async def test_shared_registry_keeps_ids_bound_replays_out_and_caps_per_credential(node_stores):
    """The admission rules that need shared state hold across replicas (in Redis)."""
    a, b = node_stores
    t = time.time_ns() // 1000
    await put(a, _reg_body("e1" * 16), key=b"\x01" * 32, signed_ms=t)
    with pytest.raises(NodeIdTakenError):  # another key for a listed id, via the other replica
        await put(b, _reg_body("e1" * 16), key=b"\x02" * 32, signed_ms=t + 5)
    with pytest.raises(ReplayedRegistrationError):
        await put(b, _reg_body("e1" * 16), signed_ms=t)
    await put(b, _reg_body("e1" * 16), signed_ms=t + 5)
    await put(a, _reg_body("e2" * 16), cred="pool", cap=2)
    await put(b, _reg_body("e3" * 16), cred="pool", cap=2)
    with pytest.raises(CredentialCapError):
        await put(a, _reg_body("e4" * 16), cred="pool", cap=2)
    await put(a, _reg_body("e4" * 16), cred="other", cap=2)
    # Expiry frees the id and the cap.
    await put(a, _reg_body("e5" * 16), key=b"\x05" * 32, cred="short", cap=1, ttl=0.3)
    await asyncio.sleep(0.5)
    await put(b, _reg_body("e5" * 16), key=b"\x06" * 32, cred="short", cap=1)


# -- shared node registry: replicas as processes -----------------------------------------------

SHARED_NODE = bytes([0xD4]) * 16
SHARED_FLAGS = ["--node-ttl", "2", "--health-interval", "0.3", "--registry-sync", "0.2"]


@pytest.fixture(scope="module")
def shared(workdir: Path, issuer: Proc) -> Iterator[dict]:
    """Two replicas on a Redis of their own (stopped by one test), one node registered
    with replica 0 only."""
    redis = start_redis(workdir)
    extra = ["--redis", redis.url, "--node-timeout", "3", *SHARED_FLAGS]
    gws = [start_gateway(workdir, issuer.url, name=f"shared{i}", extra=extra) for i in range(2)]
    node = start_node(workdir, gws[0].extra["internal"], SHARED_NODE)
    state = {"redis": redis, "gateways": gws, "node": node}
    yield state
    node.stop()
    for g in gws:
        g.stop()
        assert "Traceback" not in g.output(), g.output()
    state["redis"].stop()


@pytest.fixture
def shared_ready(shared: dict) -> dict:
    control(shared["node"], "set", {"mode": "ok", "healthy": True, "heartbeat": True})
    for g in shared["gateways"]:
        wait_listed(g, {SHARED_NODE.hex()})
    return shared


def gauge(gw: Proc, series: str) -> float | None:
    text = urllib.request.urlopen(gw.url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


async def register_as(
    session: aiohttp.ClientSession, gw: Proc, ident: AttestedIdentity, url: str
) -> int:
    return (await post_registration(session, gw, ident, url=url))[0]


async def test_node_registered_with_one_replica_is_listed_and_served_by_both(
    shared_ready: dict, issuer: Proc, session: aiohttp.ClientSession
):
    g0, g1 = shared_ready["gateways"]
    # Only replica 0 ever heard from the node.
    assert gauge(g0, 'openpcc_gateway_registrations_total{outcome="ok"}')
    assert gauge(g1, 'openpcc_gateway_registrations_total{outcome="ok"}') is None
    tokens = await mint(session, issuer.url, issuer.extra["api_key"], 2)
    for g, token in zip((g0, g1), tokens, strict=True):
        sr = seal_chat([node_key(shared_ready["node"])])
        status, body = await read_sealed(
            await infer(session, g.url, token, sr.envelope), sr.response_opener()
        )
        assert status == 200 and body.endswith(b"second\nlast\n")


async def test_shared_heartbeat_expiry_removes_the_node_from_both(shared_ready: dict):
    node, gws = shared_ready["node"], shared_ready["gateways"]
    control(node, "set", {"heartbeat": False})
    for g in gws:
        await asyncio.to_thread(wait_listed, g, set())
    control(node, "set", {"heartbeat": True})
    for g in gws:
        await asyncio.to_thread(wait_listed, g, {SHARED_NODE.hex()})


async def test_shared_re_registration_at_a_new_url_is_checked_again(
    shared_ready: dict, session: aiohttp.ClientSession
):
    node, (g0, g1) = shared_ready["node"], shared_ready["gateways"]
    # The node itself moves (signed by its own key) to a URL where nothing answers, for
    # longer than the TTL: the entry stays, but no replica lists it.
    control(node, "set", {"url": "http://127.0.0.1:9"})
    for g in (g0, g1):
        await asyncio.to_thread(wait_listed, g, set())
    await asyncio.sleep(2.5)
    for g in (g0, g1):
        assert await asyncio.to_thread(nodes_listed, g) == set()
        assert gauge(g, 'openpcc_gateway_nodes{health="unhealthy"}') == 1
    # Back to its real URL: checked again, listed again.
    control(node, "set", {"url": node.url})
    for g in (g0, g1):
        await asyncio.to_thread(wait_listed, g, {SHARED_NODE.hex()})


async def test_shared_replicas_refuse_a_takeover_of_a_node_listed_by_the_other(
    shared_ready: dict, workdir: Path, session: aiohttp.ClientSession
):
    node, (_, g1) = shared_ready["node"], shared_ready["gateways"]
    impostor = identity(workdir, SHARED_NODE, node.extra["public_key"])
    status, detail = await post_registration(session, g1, impostor)
    assert status == 409 and "another attested node key" in detail


def test_shared_registry_skips_an_entry_planted_in_redis(shared_ready: dict):
    import redis

    r = redis.Redis.from_url(shared_ready["redis"].url)
    nid = "e7" * 16
    try:
        r.zadd("openpcc:gateway:nodes", {nid: time.time() + 3600})
        r.hset("openpcc:gateway:nodes:body", nid, b'{"planted": "PLANTED-CONTENT"}')
        r.hset("openpcc:gateway:nodes:digest", nid, "planted")
        time.sleep(1.0)  # five syncs
        for g in shared_ready["gateways"]:
            assert g.alive()
            assert nodes_listed(g) == {SHARED_NODE.hex()}
            out = g.output()
            assert "skipping an invalid node registration stored in Redis" in out
            assert "PLANTED" not in out and nid not in out
    finally:
        r.zrem("openpcc:gateway:nodes", nid)
        r.hdel("openpcc:gateway:nodes:body", nid)
        r.hdel("openpcc:gateway:nodes:digest", nid)
        r.close()


async def test_shared_registry_redis_down_then_back(
    shared_ready: dict, workdir: Path, session: aiohttp.ClientSession
):
    gws, redis = shared_ready["gateways"], shared_ready["redis"]
    redis.stop()
    other = identity(workdir, b"\xf8" * 16)
    for g in gws:
        assert await register_as(session, g, other, "http://127.0.0.1:9") == 503
        # Routing goes on with the last synced copy until the entries' TTL runs out ...
        assert await asyncio.to_thread(nodes_listed, g) == {SHARED_NODE.hex()}
        async with session.get(g.url + "/readyz") as r:
            assert r.status == 503
    for g in gws:  # ... which it does, as the node's heartbeats are refused meanwhile.
        await asyncio.to_thread(wait_listed, g, set())
    shared_ready["redis"] = start_redis(workdir, redis.port)
    for g in gws:
        await asyncio.to_thread(wait_listed, g, {SHARED_NODE.hex()}, 20)
        assert await register_as(session, g, other, "http://127.0.0.1:9") == 200
        async with session.get(g.url + "/readyz") as r:
            assert r.status == 200


# -- --workers N ------------------------------------------------------------------------------


def test_workers_need_a_shared_registry(workdir: Path, issuer: Proc) -> None:
    """Without --redis a node would be known only to the worker its heartbeat reached."""
    out = cli("gateway", "serve", "--issuer", issuer.url, "--workers", "2",
              "--state", str(workdir / "w-state"), *admission(workdir))  # fmt: skip
    assert out.returncode == 2 and "--workers above 1 needs --redis" in out.stderr, out.stderr


async def test_two_workers_on_one_port_share_registry_and_spent_tokens(
    workdir: Path, issuer: Proc, session: aiohttp.ClientSession
) -> None:
    """`gateway serve --workers 2 --redis`: both workers answer on one port, a node that
    registered through either is routed by both, a token spent at one is refused at the
    other, and the whole party stops on one SIGTERM."""
    redis = start_redis(workdir)
    gw2 = start_gateway(
        workdir,
        issuer.url,
        name="workers",
        extra=["--redis", redis.url, "--workers", "2", *SHARED_FLAGS],
    )
    node = start_node(workdir, gw2.extra["internal"], bytes([0xE5]) * 16)
    try:
        await asyncio.to_thread(wait_listed, gw2, {node.extra["node_id"].hex()})

        def healthy_in_every_worker() -> bool:
            """Each worker syncs the registry from Redis and health-checks on its own:
            wait until both report the node healthy (gauges carry a worker label)."""
            text = urllib.request.urlopen(gw2.url + "/metrics", timeout=5).read().decode()
            return all(
                f'openpcc_gateway_nodes{{worker="{i}",health="healthy"}} 1' in text for i in (0, 1)
            )

        deadline = time.monotonic() + 10
        while not healthy_in_every_worker():
            assert time.monotonic() < deadline, "a worker never saw the node healthy"
            await asyncio.sleep(0.2)
        tokens = await mint(session, issuer.url, issuer.extra["api_key"], 24)
        for token in tokens[:20]:  # fresh connections: the kernel spreads them over both
            async with aiohttp.ClientSession() as fresh:
                sr = seal_chat([pq_node_key(node)])
                call = await infer(fresh, gw2.url, token, sr.envelope)
                body = b"".join(
                    [e async for e in sealed_events(call, sr.response_opener())
                     if isinstance(e, bytes)]
                )  # fmt: skip
                assert body.endswith(b"last\n")

        def served() -> dict[str, float]:
            """Requests per worker; a worker that the scrape did not reach reports what it
            wrote last (every second), so this settles within about a second."""
            text = urllib.request.urlopen(gw2.url + "/metrics", timeout=5).read().decode()
            return {
                line.split("{")[1].split("}")[0]: float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("openpcc_worker_requests_total{")
            }

        deadline = time.monotonic() + 5
        while sum(served().values()) < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        counts = served()
        assert set(counts) == {'worker="0"', 'worker="1"'} and all(counts.values()), counts
        # Each spent token is refused whichever worker the replay reaches.
        for token in tokens[:4]:
            async with aiohttp.ClientSession() as fresh:
                await expect_401(
                    await infer(fresh, gw2.url, token, seal_chat([node_key(node)]).envelope)
                )
    finally:
        node.stop()
        gw2.stop()
        redis.stop()
    assert "Traceback" not in gw2.output(), gw2.output()
    assert "SIGTERM: stopping 2 worker(s)" in gw2.output()

"""The node service (`openpcc node serve`) over real sockets, as separate processes.

A recording fake OpenAI engine (tests/node_support/fake_engine.py) and a recording fake
gateway (tests/node_support/fake_gateway.py) stand on either side of the node. The
client side is the real sealing code: requests are sealed to the key the node
registered, and answers are opened with ``SealedRequest.response_opener()``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from node.evidence import simulated_measurement
from node.policy import Rejected, RequestLimits, check_request
from openpcc import audit
from openpcc.admission import AdmissionError, verify_registration
from openpcc.attestation.bundle import AttestationBundle
from openpcc.attestation.claims import report_data_for
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.attestation.snp import verify_snp
from openpcc.errors import TruncatedError
from openpcc.forwarding import (
    CLIENT_WINDOW,
    FORWARD_HEADER,
    FORWARD_WINDOW,
    SENT_AT_HEADER,
    forward_key,
    sign_forward,
)
from openpcc.wire import bhttp, hpke, sealed
from tests.harness import openpcc
from tests.node_support.procs import (
    CREDENTIAL,
    Proc,
    free_port,
    http_json,
    start_engine,
    start_gateway,
    start_node,
    wait_until,
)

MODEL = "fake-model"
SECRET = CREDENTIAL
PROMPT = "Tell me a secret about the purple elephant"


# The forward key (openpcc/forwarding.py) of each node a test posts to as its gateway.
FORWARD_KEYS: dict[str, bytes] = {}


@dataclass
class Stack:
    engine: Proc
    gateway: Proc
    node: Proc
    workdir: Path

    @property
    def node_url(self) -> str:
        return f"http://127.0.0.1:{self.node.port}"

    def registrations(self) -> list[dict]:
        return http_json(self.gateway.port, "GET", "/_control/registrations")[1]

    def engine_received(self) -> list[dict]:
        return http_json(self.engine.port, "GET", "/_control/received")[1]

    def node_key(self) -> sealed.NodeKey:
        """The node's X25519 key: requests sealed to it are v1."""
        reg = wait_until(self.registrations, 10, "a registration")[-1]["body"]
        return sealed.NodeKey(bytes.fromhex(reg["node_id"]), bytes.fromhex(reg["public_key"]))

    def pq_node_key(self) -> sealed.NodeKey:
        """The node's X-Wing key, from its attested claims: requests sealed to it are v2."""
        return pq_key_of(self.registrations)


def pq_key_of(registrations: Any) -> sealed.NodeKey:
    reg = wait_until(registrations, 10, "a registration")[-1]["body"]
    claims = AttestationBundle.from_json_obj(reg["bundle"]).claims
    assert claims.pq_public_key is not None
    return sealed.NodeKey(bytes.fromhex(reg["node_id"]), claims.pq_public_key)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("node")
    engine = start_engine(workdir, MODEL)
    gateway = start_gateway(workdir, SECRET)
    node = start_node(
        workdir,
        engine_url=f"http://127.0.0.1:{engine.port}",
        model=MODEL,
        gateway_port=gateway.port,
        secret=SECRET,
        extra=["--audit-log", str(workdir / "node-audit.jsonl"), "--max-tokens", "256"],
    )
    s = Stack(engine, gateway, node, workdir)
    FORWARD_KEYS[s.node_url] = forward_key(SECRET, s.node_key().node_id)
    try:
        yield s
    finally:
        for p in (node, gateway, engine):
            p.stop()


def chat_body(content: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def inner_request(
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: dict[str, Any] | bytes | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    content = json.dumps(body).encode() if isinstance(body, dict) else body or b""
    hdrs = headers if headers is not None else [(b"content-type", b"application/json")]
    if not any(k == SENT_AT_HEADER for k, _ in hdrs):  # what every client sends
        hdrs = [*hdrs, (SENT_AT_HEADER, str(int(time.time())).encode())]
    req = bhttp.Request(method.encode(), b"https", b"node", path.encode(), hdrs, content)
    return bhttp.encode_request(req)


def seal(
    key: sealed.NodeKey, inner: bytes, model: str = MODEL, others: int = 0
) -> sealed.SealedRequest:
    cands = [
        sealed.NodeKey(os.urandom(16), hpke.generate_key_pair().public_key) for _ in range(others)
    ]
    return sealed.seal_request([*cands, key], model, inner)


@dataclass
class Answer:
    status: int  # the cleartext HTTP status the gateway sees
    content_type: str
    raw: bytes
    head: sealed.ResponseHead | None = None
    body: bytes = b""
    error: BaseException | None = None  # transport error or truncation at the client


async def post(
    url: str,
    envelope: bytes,
    sealed_req: sealed.SealedRequest | None = None,
    *,
    headers: dict[str, str] | None = None,
    on_piece: Any = None,
    sign: bool = True,
) -> Answer:
    """POST an envelope as a gateway would (signed with the node's forward key, when the
    node has one: ``sign=False`` posts it as anyone else could); open the sealed answer
    piece by piece when one comes back."""
    hdrs = {"Content-Type": sealed.REQUEST_MEDIA_TYPE, **(headers or {})}
    if sign and url in FORWARD_KEYS:
        hdrs[FORWARD_HEADER] = sign_forward(FORWARD_KEYS[url], envelope)
    opener = sealed_req.response_opener() if sealed_req is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/sealed", data=envelope, headers=hdrs) as resp,
    ):
        ans = Answer(resp.status, resp.headers.get("Content-Type", ""), b"")
        if opener is None or resp.content_type != sealed.RESPONSE_MEDIA_TYPE:
            ans.raw = await resp.read()
            return ans
        try:
            async for chunk in resp.content.iter_any():
                ans.raw += chunk
                for ev in opener.receive_data(chunk):
                    if isinstance(ev, sealed.ResponseHead):
                        ans.head = ev
                    else:
                        ans.body += ev
                        if on_piece is not None:
                            await on_piece(ev)
            opener.end_of_input()
        except (aiohttp.ClientPayloadError, TruncatedError) as exc:
            ans.error = exc
            if ans.error is not None and not isinstance(exc, TruncatedError):
                try:
                    opener.end_of_input()
                except TruncatedError as trunc:
                    ans.error = trunc
        return ans


def problem_doc(body: bytes, status: int) -> dict:
    doc = json.loads(body)
    assert doc["status"] == status and doc["title"]
    assert set(doc) == {"type", "title", "status"}
    return doc


def sse_text(body: bytes) -> str:
    out = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ev = json.loads(line[6:])
            ch = ev["choices"][0]
            out.append(ch.get("delta", {}).get("content") or ch.get("text") or "")
    return "".join(out)


# ------------------------------------------------------------------------ registration


def test_registers_with_verifiable_bundle(stack: Stack) -> None:
    regs = wait_until(lambda: len(stack.registrations()) >= 3 and stack.registrations(), 10, "3")
    assert all(r["auth_ok"] for r in regs)
    doc = regs[-1]["body"]
    assert set(doc) == {"node_id", "url", "public_key", "models", "bundle"}
    assert doc["url"] == stack.node_url
    assert doc["models"] == [MODEL]
    node_id = (stack.workdir / "state" / "node_id").read_text().strip()
    assert doc["node_id"] == node_id and re.fullmatch(r"[0-9a-f]{32}", node_id)

    bundle = AttestationBundle.from_json_obj(doc["bundle"])
    claims = bundle.claims
    assert claims.node_id == node_id
    assert claims.hpke_public_key.hex() == doc["public_key"]
    assert claims.tee == bundle.tee == "simulated-snp"
    assert claims.pq_public_key is not None and len(claims.pq_public_key) == 1216  # X-Wing
    assert claims.release_id == "test-release"
    assert claims.gpu_evidence_digest is None
    assert claims.model_digest == hashlib.sha256(MODEL.encode()).digest()  # --engine-url mode
    assert claims.issued_at <= time.time() + 5 < claims.expires_at
    # Every registration is signed, over its exact bytes and a fresh time, by the per-boot
    # key the attested claims carry (openpcc/admission.py): the gateway admits on that.
    for r in regs:
        t_ms = verify_registration(
            claims.signing_key, r["raw"].encode(), r["signature"], time.time()
        )
        assert abs(t_ms / 1000 - r["time"]) < 5
    with pytest.raises(AdmissionError):
        verify_registration(claims.signing_key, b"{}", regs[-1]["signature"], time.time())

    tee = SimulatedTEE.load(stack.workdir / "state" / "simulated-tee")
    verdict = verify_snp(
        bundle.evidence,
        bundle.endorsements["vcek"].encode(),
        now=datetime.now(UTC),
        ark_ask_chain=bundle.endorsements["ask_ark"].encode(),
        expected_report_data=report_data_for(claims),
        trusted_roots=[tee.root_fingerprint],
    )
    assert verdict.ok, verdict.failures()
    assert verdict.platform == "simulated-snp"
    assert verdict.fields["measurement"] == simulated_measurement("test-release").hex()
    # Without the development root trusted, the same evidence does not verify.
    untrusted = verify_snp(
        bundle.evidence,
        bundle.endorsements["vcek"].encode(),
        now=datetime.now(UTC),
        ark_ask_chain=bundle.endorsements["ask_ark"].encode(),
        expected_report_data=report_data_for(claims),
    )
    assert not untrusted.ok
    # The key every heartbeat announces is the one the TEE report binds.
    assert {r["body"]["public_key"] for r in regs} == {doc["public_key"]}


def test_heartbeat_continues_after_gateway_errors(stack: Stack) -> None:
    http_json(stack.gateway.port, "POST", "/_control/fail?n=2")
    before = len(stack.registrations())
    regs = wait_until(
        lambda: (r := stack.registrations()) and len(r) >= before + 4 and r, 15, "retries"
    )
    tail = regs[before:]
    assert [r["failed"] for r in tail[:2]] == [True, True]
    assert not tail[-1]["failed"]


async def test_registration_waits_for_engine_and_gateway(tmp_path: Path) -> None:
    """Engine and gateway both down at start: not ready, no registration, then both."""
    engine_port, gateway_port = free_port(), free_port()
    node = start_node(
        tmp_path,
        engine_url=f"http://127.0.0.1:{engine_port}",
        model=MODEL,
        gateway_port=gateway_port,
        wait_ready=False,
    )
    engine = gateway = None
    try:
        assert http_json(node.port, "GET", "/healthz")[0] == 200  # alive
        assert http_json(node.port, "GET", "/readyz")[0] == 503
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{node.port}/v1/sealed",
                data=b"\x01" * 64,
                headers={"Content-Type": sealed.REQUEST_MEDIA_TYPE},
            ) as r,
        ):
            assert r.status == 503
        engine = start_engine(tmp_path, MODEL, port=engine_port)
        wait_until(lambda: http_json(node.port, "GET", "/readyz")[0] == 200, 15, "ready")
        await asyncio.sleep(1.0)  # gateway still down: the node backs off and retries
        gateway = start_gateway(tmp_path, SECRET, port=gateway_port)
        regs = wait_until(
            lambda: http_json(gateway_port, "GET", "/_control/registrations")[1], 10, "reg"
        )
        assert regs[0]["auth_ok"]
        assert "registered with the gateway" in node.output()
    finally:
        for p in (node, gateway, engine):
            if p is not None:
                p.stop()


def test_node_id_flag_and_state_reuse(tmp_path: Path) -> None:
    engine = start_engine(tmp_path, MODEL)
    gateway = start_gateway(tmp_path, SECRET)
    url = f"http://127.0.0.1:{engine.port}"
    nid = os.urandom(16).hex()
    try:
        node = start_node(
            tmp_path, engine_url=url, model=MODEL, gateway_port=gateway.port,
            extra=["--node-id", nid],
        )  # fmt: skip
        reg = wait_until(
            lambda: http_json(gateway.port, "GET", "/_control/registrations")[1], 10, "r"
        )
        assert reg[0]["body"]["node_id"] == nid
        first_key = reg[0]["body"]["public_key"]
        node.stop()
        # A restart keeps the id (given again) but makes a new key: keys never persist.
        node = start_node(
            tmp_path, engine_url=url, model=MODEL, gateway_port=gateway.port,
            extra=["--node-id", nid],
        )  # fmt: skip
        regs = wait_until(
            lambda: (
                (r := http_json(gateway.port, "GET", "/_control/registrations")[1])
                and r[-1]["body"]["public_key"] != first_key
                and r
            ),
            10,
            "new key",
        )
        assert regs[-1]["body"]["node_id"] == nid
        node.stop()
    finally:
        gateway.stop()
        engine.stop()


# ------------------------------------------------------------------------------ serving


async def test_chat_streams_incrementally(stack: Stack) -> None:
    key = stack.node_key()
    req = seal(key, inner_request(body=chat_body("GATE " + PROMPT, stream=True)), others=2)
    pieces: list[bytes] = []
    released = False

    async def on_piece(piece: bytes) -> None:
        nonlocal released
        pieces.append(piece)
        if not released:
            # The engine holds its last event until released: we must already have data.
            released = True
            async with aiohttp.ClientSession() as s:
                await s.post(f"http://127.0.0.1:{stack.engine.port}/_control/release")

    ans = await asyncio.wait_for(post(stack.node_url, req.envelope, req, on_piece=on_piece), 20)
    assert ans.error is None
    assert ans.status == 200 and ans.content_type == sealed.RESPONSE_MEDIA_TYPE
    assert ans.head is not None and ans.head.status == 200
    assert dict(ans.head.headers)[b"content-type"].startswith(b"text/event-stream")
    assert released and len(pieces) >= 2
    assert sse_text(ans.body) == "Hello from the fake engine."
    assert ans.body.endswith(b"data: [DONE]\n\n")
    assert PROMPT.encode() not in ans.raw  # sealed on the wire


async def test_non_streaming_completion_and_models(stack: Stack) -> None:
    key = stack.node_key()
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 8, "temperature": 0.5}
    req = seal(key, inner_request(path="/v1/completions", body=body))
    ans = await post(stack.node_url, req.envelope, req)
    assert ans.error is None and ans.head is not None and ans.head.status == 200
    assert json.loads(ans.body)["choices"][0]["text"] == "Hello from the fake engine."

    req = seal(key, inner_request("GET", "/v1/models", headers=[]))
    ans = await post(stack.node_url, req.envelope, req)
    assert ans.error is None and ans.head is not None and ans.head.status == 200
    assert json.loads(ans.body)["data"][0]["id"] == MODEL


async def test_engine_gets_fresh_cache_salt_and_nothing_identifying(stack: Stack) -> None:
    key = stack.node_key()
    start = len(stack.engine_received())
    identifying_inner = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer alice-api-key"),
        (b"cookie", b"session=alice"),
        (b"x-forwarded-for", b"198.51.100.7"),
        (b"user-agent", b"AliceBrowser/1.0"),
    ]
    outer = {"X-Forwarded-For": "198.51.100.7", "Authorization": "PrivateToken token=abc"}
    marker = "salt-check " + os.urandom(6).hex()
    for _ in range(2):
        body = chat_body(marker, stream=True)
        req = seal(key, inner_request(body=body, headers=identifying_inner))
        ans = await post(stack.node_url, req.envelope, req, headers=outer)
        assert ans.error is None and ans.head is not None and ans.head.status == 200
    # Filter by this test's prompt: a request of an earlier test may be recorded late.
    recs = [r for r in stack.engine_received()[start:] if marker in json.dumps(r["body"])]
    assert len(recs) == 2
    salts = [r["body"]["cache_salt"] for r in recs]
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in salts)
    assert salts[0] != salts[1]
    for r in recs:
        assert r["peer"] == "127.0.0.1" and r["path"] == "/v1/chat/completions"
        assert set(r["body"]) == {"model", "messages", "stream", "cache_salt"}
        assert r["body"]["messages"][0]["content"] == marker
        names = {k.lower() for k, _ in r["headers"]}
        assert not names & {"authorization", "cookie", "x-forwarded-for", "forwarded"}
        text = json.dumps(r["headers"])
        for leak in ("alice", "198.51.100.7", "PrivateToken", "AliceBrowser"):
            assert leak not in text
    # The node's own log never holds content.
    assert "purple elephant" not in stack.node.output()


async def test_a_client_cache_scope_becomes_one_node_keyed_namespace(stack: Stack) -> None:
    """Issue 17: the same client salt gives the engine the same cache_salt (turns of one
    conversation share the prefix cache), another salt another, and neither is the salt
    itself (keyed by the node's boot secret, so no client names a namespace). Every
    sealed answer says which node answered."""
    key = stack.node_key()
    start = len(stack.engine_received())
    marker = "scope-check " + os.urandom(6).hex()
    salt_a, salt_b = os.urandom(32).hex().encode(), os.urandom(32).hex().encode()
    for salt in (salt_a, salt_a, salt_b):
        hdrs = [(b"content-type", b"application/json"), (b"openpcc-cache-salt", salt)]
        req = seal(key, inner_request(body=chat_body(marker, stream=True), headers=hdrs))
        ans = await post(stack.node_url, req.envelope, req)
        assert ans.error is None and ans.head is not None and ans.head.status == 200
        assert dict(ans.head.headers)[b"openpcc-node-id"] == key.node_id.hex().encode()
    recs = [r for r in stack.engine_received()[start:] if marker in json.dumps(r["body"])]
    salts = [r["body"]["cache_salt"] for r in recs]
    assert len(salts) == 3 and salts[0] == salts[1] != salts[2]
    assert all(re.fullmatch(r"[0-9a-f]{64}", x) for x in salts)
    assert salt_a.decode() not in salts and salt_b.decode() not in salts


@pytest.mark.parametrize(
    "salts",
    [
        [b"AB" * 32],  # upper case
        [b"ab" * 31],  # short
        [b"ab" * 33],  # long
        [b"zz" * 32],  # not hex
        [b""],
        [b"ab" * 32, b"cd" * 32],  # two
    ],
)
async def test_malformed_cache_salts_are_refused_inside_the_seal(
    stack: Stack, salts: list[bytes]
) -> None:
    key = stack.node_key()
    start = len(stack.engine_received())
    hdrs = [(b"content-type", b"application/json"), *((b"openpcc-cache-salt", x) for x in salts)]
    req = seal(key, inner_request(body=chat_body("bad salt"), headers=hdrs))
    ans = await post(stack.node_url, req.envelope, req)
    assert ans.status == 200  # outer: the gateway learns nothing
    assert ans.head is not None and ans.head.status == 400
    assert dict(ans.head.headers)[b"openpcc-node-id"] == key.node_id.hex().encode()
    # A cache_salt field of the client's own is refused as any unknown field.
    req = seal(key, inner_request(body={**chat_body("own salt"), "cache_salt": "x" * 64}))
    ans = await post(stack.node_url, req.envelope, req)
    assert ans.head is not None and ans.head.status == 400
    assert len(stack.engine_received()) == start


@pytest.mark.parametrize(
    ("method", "path", "body", "envelope_model", "status"),
    [
        ("POST", "/v1/embeddings", chat_body(), MODEL, 404),
        ("POST", "/v1/chat/completions?x=1", chat_body(), MODEL, 404),
        ("POST", "/admin/shutdown", chat_body(), MODEL, 404),
        ("GET", "/v1/chat/completions", None, MODEL, 405),
        ("POST", "/v1/chat/completions", chat_body() | {"model": "other"}, MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body() | {"model": "other"}, "other", 400),
        ("POST", "/v1/chat/completions", chat_body(), "other", 400),
        ("GET", "/v1/models", None, "other", 400),
        ("POST", "/v1/chat/completions", chat_body(cache_salt="shared"), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(user="alice@example.com"), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(lora_request="x"), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(tools=[]), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(n=2), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(max_tokens=257), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body(temperature=3), MODEL, 400),
        ("POST", "/v1/chat/completions", chat_body("x" * 300_000), MODEL, 413),
        ("POST", "/v1/chat/completions", b"{not json", MODEL, 400),
        ("POST", "/v1/chat/completions", b'{"model":"a","model":"b"}', MODEL, 400),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, MODEL, 400),
    ],
)
async def test_disallowed_requests_are_refused_inside_the_seal(
    stack: Stack, method: str, path: str, body: Any, envelope_model: str, status: int
) -> None:
    key = stack.node_key()
    start = len(stack.engine_received())
    req = seal(key, inner_request(method, path, body), model=envelope_model)
    ans = await post(stack.node_url, req.envelope, req)
    # The gateway sees an ordinary sealed answer; only the client learns the refusal.
    assert ans.status == 200 and ans.content_type == sealed.RESPONSE_MEDIA_TYPE
    assert ans.error is None and ans.head is not None
    assert ans.head.status == status
    assert dict(ans.head.headers)[b"content-type"] == b"application/problem+json"
    problem_doc(ans.body, status)
    # The engine never saw it. The node's own readiness probe (GET /v1/models every few
    # seconds) may land meanwhile: it is not this request, whose refusal the inner 4xx
    # problem above already shows for the GET case.
    later = [
        r
        for r in stack.engine_received()[start:]
        if (r["method"], r["path"]) != ("GET", "/v1/models")
    ]
    assert later == []


async def test_not_a_candidate_is_421(stack: Stack) -> None:
    key = stack.node_key()
    inner = inner_request(body=chat_body())
    stranger = sealed.NodeKey(os.urandom(16), hpke.generate_key_pair().public_key)
    stale = sealed.NodeKey(key.node_id, hpke.generate_key_pair().public_key)
    for cand in (stranger, stale):
        req = sealed.seal_request([cand], MODEL, inner)
        ans = await post(stack.node_url, req.envelope)
        assert ans.status == 421
        assert ans.content_type.startswith("application/problem+json")
        problem_doc(ans.raw, 421)


async def test_x_wing_v2_and_legacy_v1_requests_are_both_served(stack: Stack) -> None:
    """Sealed to the attested X-Wing key (v2) or to the X25519 key (v1, deprecated but
    still accepted by default): the same answer; the metrics count each version."""
    for key in (stack.pq_node_key(), stack.node_key()):
        req = seal(key, inner_request(body=chat_body(stream=True)))
        assert req.envelope[0] == (2 if key.kem_id == hpke.KEM_XWING else 1)
        ans = await post(stack.node_url, req.envelope, req)
        assert ans.error is None and ans.head is not None and ans.head.status == 200
        assert sse_text(ans.body) == "Hello from the fake engine."
    # A v2 request sealed to a stale X-Wing key of this node id is not for this boot.
    stale = sealed.NodeKey(
        stack.node_key().node_id, hpke.generate_key_pair(kem_id=hpke.KEM_XWING).public_key
    )
    ans = await post(stack.node_url, sealed.seal_request([stale], MODEL, inner_request()).envelope)
    assert ans.status == 421
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.node.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert re.search(r'openpcc_node_sealed_versions_total\{version="2"\} [1-9]', text), text
    assert re.search(r'openpcc_node_sealed_versions_total\{version="1"\} [1-9]', text), text


async def test_a_node_past_the_v1_deprecation_refuses_x25519_requests(
    stack: Stack, tmp_path: Path
) -> None:
    gateway = start_gateway(tmp_path, SECRET)
    node = start_node(
        tmp_path,
        engine_url=f"http://127.0.0.1:{stack.engine.port}",
        model=MODEL,
        gateway_port=gateway.port,
        extra=["--no-accept-sealed-v1"],
    )
    try:
        regs = lambda: http_json(gateway.port, "GET", "/_control/registrations")[1]  # noqa: E731
        pq = pq_key_of(regs)
        body = regs()[-1]["body"]
        legacy = sealed.NodeKey(pq.node_id, bytes.fromhex(body["public_key"]))
        url = f"http://127.0.0.1:{node.port}"
        FORWARD_KEYS[url] = forward_key(SECRET, pq.node_id)
        req = seal(legacy, inner_request(body=chat_body()))
        ans = await post(url, req.envelope, req)
        assert ans.status == 400 and "v1" in problem_doc(ans.raw, 400)["title"]
        req = seal(pq, inner_request(body=chat_body()))
        ans = await post(url, req.envelope, req)
        assert ans.error is None and ans.head is not None and ans.head.status == 200
    finally:
        node.stop()
        gateway.stop()


async def test_garbage_is_400_and_node_stays_up(stack: Stack) -> None:
    key = stack.node_key()
    good = seal(key, inner_request(body=chat_body())).envelope
    tampered = bytearray(good)
    tampered[-5] ^= 0x01
    header = sealed.parse_envelope_header(good)
    wrong_wrap = bytearray(good)
    wrong_wrap[header.length - 3] ^= 0x01  # inside this node's wrapped key
    for bad in (
        b"",
        os.urandom(3000),
        b"\x02" + good[1:],
        good[: header.length + 10],  # truncated: no final chunk
        bytes(tampered),
        bytes(wrong_wrap),
        good + b"\x00",  # data after the final chunk
    ):
        ans = await post(stack.node_url, bad)
        assert ans.status == 400, bad[:16]
        problem_doc(ans.raw, 400)
    ans = await post(stack.node_url, good, headers={"Content-Type": "application/json"})
    assert ans.status == 415
    ans = await post(stack.node_url, b"\x00" * (2 * 1024 * 1024 + 1))
    assert ans.status == 413
    assert http_json(stack.node.port, "GET", "/readyz") == (
        200,
        {"status": "ok", "engine": "ready", "registered": 1, "gateways": 1,
         "node_id": stack.node_key().node_id.hex(),
         "load": {"inflight": 0, "waiting": 0, "kv_cache_usage": 0.0}},
    )  # fmt: skip
    req = seal(key, inner_request(body=chat_body()))
    ans = await post(stack.node_url, req.envelope, req)
    assert ans.error is None and ans.head is not None and ans.head.status == 200


async def test_the_node_answers_only_a_gateway_and_each_envelope_once(stack: Stack) -> None:
    """Seen in an attack: an envelope posted straight to a node was answered five times
    (five engine runs, no token spent). Now: unsigned or wrongly signed is 401, the same
    envelope again is 409, an old one (client time inside the encryption) is refused, and
    none of these reach the engine."""
    key = stack.node_key()
    start = len(stack.engine_received())
    req = seal(key, inner_request(body=chat_body()))
    for hdrs in ({}, {FORWARD_HEADER: sign_forward(os.urandom(32), req.envelope)},
                 {FORWARD_HEADER: sign_forward(FORWARD_KEYS[stack.node_url], b"other")},
                 {FORWARD_HEADER: sign_forward(FORWARD_KEYS[stack.node_url], req.envelope,
                                               now=time.time() - 2 * FORWARD_WINDOW)}):  # fmt: skip
        ans = await post(stack.node_url, req.envelope, headers=hdrs, sign=False)
        assert ans.status == 401, hdrs
        problem_doc(ans.raw, 401)
    a = await post(stack.node_url, req.envelope, req)
    assert a.error is None and a.head is not None and a.head.status == 200
    replay = await post(stack.node_url, req.envelope, req)  # signed again, freshly
    assert replay.status == 409
    problem_doc(replay.raw, 409)
    old = str(int(time.time() - CLIENT_WINDOW - 30)).encode()
    for sent_at in (old, b""):  # too old, or no time at all: a sealed 400 for the client
        hdrs = [(b"content-type", b"application/json"), (SENT_AT_HEADER, sent_at)]
        late = seal(key, inner_request(body=chat_body(), headers=hdrs))
        ans = await post(stack.node_url, late.envelope, late)
        assert ans.status == 200 and ans.head is not None and ans.head.status == 400
    chats = [r for r in stack.engine_received()[start:] if r["path"] == "/v1/chat/completions"]
    assert len(chats) == 1  # only the one genuine, first delivery


async def test_engine_dying_mid_stream_is_a_truncation(stack: Stack) -> None:
    key = stack.node_key()
    req = seal(key, inner_request(body=chat_body("DIE " + PROMPT, stream=True)))
    ans = await asyncio.wait_for(post(stack.node_url, req.envelope, req), 20)
    assert ans.status == 200 and ans.head is not None and ans.head.status == 200
    assert b"Hello" in ans.body  # data arrived before the cut
    assert isinstance(ans.error, TruncatedError)
    assert http_json(stack.node.port, "GET", "/readyz")[0] == 200


def test_audit_log_records_what_the_node_learned(stack: Stack) -> None:
    records = audit.read_audit(stack.workdir / "node-audit.jsonl")
    sealed_recs = [r for r in records if r["path"] == "/v1/sealed" and "inner" in r["notes"]]
    assert sealed_recs
    inner = sealed_recs[0]["notes"]["inner"]
    assert inner["method"] in ("POST", "GET") and inner["path"].startswith("/v1/")
    assert any(
        r["notes"]["inner"].get("json", {}).get("messages", [{}])[0].get("content") == PROMPT
        for r in sealed_recs
    )
    assert all(r["party"] == "node" and r["body_hex"] for r in sealed_recs)


def test_private_key_is_not_on_disk(stack: Stack) -> None:
    """No file the test run wrote (state dir, TEE dir, logs, audit) holds the HPKE key."""
    public = stack.node_key().public_key
    scanned = 0
    for path in stack.workdir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        scanned += 1
        # Raw windows in small files (keys, ids); hex and base64 tokens everywhere.
        small = len(data) <= 64 * 1024
        candidates = {data[i : i + 32] for i in range(len(data) - 31)} if small else set()
        text = data.decode("latin-1")
        candidates |= {bytes.fromhex(h) for h in re.findall(r"[0-9a-fA-F]{64}", text)}
        for b in re.findall(r"[A-Za-z0-9+/_-]{43}=?", text):
            try:
                raw = base64.urlsafe_b64decode(b.replace("+", "-").replace("/", "_") + "==")
            except ValueError:
                continue
            if len(raw) >= 32:
                candidates.add(raw[:32])
        for c in candidates:
            if len(c) == 32:
                pk = X25519PrivateKey.from_private_bytes(c).public_key().public_bytes_raw()
                assert pk != public, f"{path} holds the node's private key"
    assert scanned >= 4  # node_id, simulated TEE files, logs
    # The process keeps no file open in the state dir either.
    fd_dir = Path(f"/proc/{stack.node.proc.pid}/fd")
    if fd_dir.exists():
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            assert not target.startswith(str(stack.workdir / "state")), target


def test_healthz_and_metrics(stack: Stack) -> None:
    assert http_json(stack.node.port, "GET", "/healthz") == (
        200,
        {"status": "ok", "engine": "ready"},
    )
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.node.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert "openpcc_node_engine_ready 1" in text
    assert "openpcc_node_sealed_requests_total" in text
    assert PROMPT not in text


def test_cli_refuses_incomplete_configuration(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "openpcc.cli", "node", "serve", "--state", str(tmp_path)]
    for extra in ([], ["--engine-url", "http://127.0.0.1:1", "--model-name", "m",
                       "--gateway-internal", "http://127.0.0.1:2"]):  # fmt: skip
        r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in os.environ.items()
                                if not k.startswith("OPENPCC_NODE_")})  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "openpcc node serve:" in r.stderr


# ------------------------------------------------------------------------ policy, unit


def _req(body: Any, path: str = "/v1/chat/completions", method: str = "POST") -> bhttp.Request:
    content = json.dumps(body).encode() if not isinstance(body, bytes) else body
    return bhttp.Request(method.encode(), b"https", b"", path.encode(), [], content)


def test_policy_accepts_every_documented_field() -> None:
    full_chat = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "hello"},
        ],
        "max_tokens": 10,
        "max_completion_tokens": 10,
        "temperature": 0.7,
        "top_p": 0.9,
        "n": 1,
        "stop": ["\n", "END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 42,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "logprobs": True,
        "top_logprobs": 3,
    }
    limits = RequestLimits()
    fwd = check_request(_req(full_chat), served_model=MODEL, envelope_model=MODEL, limits=limits)
    assert fwd.body == full_chat and fwd.stream
    full_completion = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 5,
        "logprobs": 2,
        "stop": "y",
        "stream": False,
    }
    fwd = check_request(
        _req(full_completion, "/v1/completions"),
        served_model=MODEL,
        envelope_model=MODEL,
        limits=limits,
    )
    assert fwd.body == full_completion and not fwd.stream


@pytest.mark.parametrize(
    "body",
    [
        chat_body(messages=[]),
        chat_body(messages=[{"role": "tool", "content": "x"}]),
        chat_body(messages=[{"role": "user", "content": "x", "name": "alice"}]),
        chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]),
        chat_body(stop=["a"] * 5),
        chat_body(stream_options={"include_usage": True}),
        chat_body(stream=True, stream_options={"continuous_usage_stats": True}),
        chat_body(seed=2**64),
        chat_body(max_tokens=True),
        chat_body(top_p=0),
        chat_body(top_logprobs=20),
        chat_body(temperature=float("nan")),
        [1, 2],
        b'{"model": "fake-model", "temperature": NaN, "messages": []}',
    ],
)
def test_policy_rejects(body: Any) -> None:
    with pytest.raises(Rejected):
        check_request(_req(body), served_model=MODEL, envelope_model=MODEL, limits=RequestLimits())


def test_policy_limits_messages() -> None:
    limits = RequestLimits(max_messages=2)
    body = chat_body(messages=[{"role": "user", "content": "x"}] * 3)
    with pytest.raises(Rejected) as exc:
        check_request(_req(body), served_model=MODEL, envelope_model=MODEL, limits=limits)
    assert exc.value.status == 400


# ------------------------------------------------------------------ slow: real vLLM


@pytest.mark.slow
async def test_node_with_real_vllm(tmp_path: Path) -> None:
    """`node serve --vllm-model`: starts vLLM, streams a sealed chat, stops it all on TERM."""
    import signal

    from node.tinymodel import SERVED_NAME, make_tiny_model, model_digest

    info = make_tiny_model(tmp_path / "model", seed=0)
    gateway = start_gateway(tmp_path, SECRET)
    node = openpcc(
        "node", tmp_path,
        "node", "serve", "--host", "127.0.0.1",
        "--vllm-model", str(info["dir"]), "--vllm-log", str(tmp_path / "vllm.log"),
        "--state", str(tmp_path / "state"), "--heartbeat", "1",
        "--gateway-internal", f"http://127.0.0.1:{gateway.port}",
        "--admission-credential", SECRET,
    )  # fmt: skip
    port = node.port
    try:
        wait_until(lambda: http_json(port, "GET", "/readyz")[0] == 200, 300, "vLLM", node.proc)
        regs = wait_until(
            lambda: http_json(gateway.port, "GET", "/_control/registrations")[1], 15, "reg"
        )
        doc = regs[-1]["body"]
        assert doc["models"] == [SERVED_NAME]
        claims = AttestationBundle.from_json_obj(doc["bundle"]).claims
        assert claims.model_digest.hex() == model_digest(info["dir"])
        key = sealed.NodeKey(bytes.fromhex(doc["node_id"]), bytes.fromhex(doc["public_key"]))
        body = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 16,
            "stream": True,
            "temperature": 0,
        }
        req = sealed.seal_request([key], SERVED_NAME, inner_request(body=body))
        FORWARD_KEYS[node.url] = forward_key(SECRET, key.node_id)  # post as its gateway
        ans = await asyncio.wait_for(post(node.url, req.envelope, req), 120)
        assert ans.error is None and ans.head is not None, ans
        assert ans.head.status == 200, ans.body
        assert ans.body.rstrip().endswith(b"data: [DONE]")
        assert sse_text(ans.body)  # random weights: some text, meaningless
        await _prefix_cache_follows_the_conversation(node, key)
        for log in (tmp_path / "node.log", tmp_path / "vllm.log"):
            assert "purple elephant" not in log.read_text(errors="replace")
    finally:
        node.proc.send_signal(signal.SIGTERM)
        rc = node.proc.wait(60)
        gateway.stop()
    assert rc == 0
    # No vLLM process outlives the node.
    leftovers = subprocess.run(
        ["pgrep", "-f", "--", f"--model {info['dir']}"], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == ""


async def _prefix_cache_follows_the_conversation(node: Proc, key: sealed.NodeKey) -> None:
    """Issue 17 on real vLLM: the same client's next turn hits the prefix cache; a second
    user's identical conversation (another client salt) gets no hit at all."""
    from node.tinymodel import SERVED_NAME

    m = re.search(r"engine ready at (http://[0-9.:]+)", node.output())
    assert m, node.output()
    engine = m.group(1)

    def counters() -> tuple[float, float]:
        text = urllib.request.urlopen(engine + "/metrics", timeout=10).read().decode()
        got = {"queries": 0.0, "hits": 0.0}
        for line in text.splitlines():
            for what in got:
                if line.startswith(f"vllm:prefix_cache_{what}_total"):
                    got[what] += float(line.rsplit(" ", 1)[1])
        return got["queries"], got["hits"]

    # The tiny model's context is 512 tokens: a history of a few full KV blocks.
    system = " ".join(f"rule {i}: answer briefly and kindly." for i in range(8))
    first = [{"role": "system", "content": system}, {"role": "user", "content": "hello there"}]
    turn2 = [*first, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]

    async def turn(messages: list[dict], salt: bytes) -> tuple[float, float]:
        q0, h0 = counters()
        body = {"model": SERVED_NAME, "messages": messages, "max_tokens": 2, "temperature": 0}
        hdrs = [
            (b"content-type", b"application/json"),
            (b"openpcc-cache-salt", salt.hex().encode()),
        ]
        req = sealed.seal_request([key], SERVED_NAME, inner_request(body=body, headers=hdrs))
        ans = await asyncio.wait_for(post(node.url, req.envelope, req), 120)
        assert ans.head is not None and ans.head.status == 200, ans.body
        await asyncio.sleep(1.5)  # vLLM publishes its counters periodically
        q1, h1 = counters()
        return q1 - q0, h1 - h0

    alice, bob = os.urandom(32), os.urandom(32)
    queried, _ = await turn(first, alice)
    assert queried > 0
    _, hits_bob = await turn(first, bob)  # the same words, another user: nothing shared
    _, hits_alice = await turn(turn2, alice)  # her next turn: her history is cached
    assert hits_bob == 0, (hits_bob, queried)
    assert hits_alice >= 0.25 * queried, (hits_alice, queried)

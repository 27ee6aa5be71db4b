"""Hostile bodies to every HTTP endpoint of running services (issue 9).

One local stack (separate processes, fake engine). For each POST endpoint a hypothesis
run sends random bytes or a valid body mutated a few times, with the right or a wrong
content type, and requires: a 4xx (a 2xx only where a mutation left the body valid),
never a 5xx, an answer within a few seconds, and the service healthy afterwards.
Examples per endpoint: tests/fuzz_profiles.py (``HTTP``: 300 by default, 10 000 in CI,
100 000 long).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.fake_stack import FakeStack, fake_stack
from openpcc.admission import CredentialStore
from openpcc.forwarding import FORWARD_HEADER, SENT_AT_HEADER, forward_key, sign_forward
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.directory import IssuerDirectory
from openpcc.wire import bhttp, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestSender
from tests.fuzz_profiles import HTTP
from tests.gateway_support.client import CHALLENGE
from tests.test_fuzz_parsers import hostile

pytestmark = pytest.mark.fuzz
SLOW = 5.0  # seconds: any answer slower than this counts as a hang


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStack]:
    with fake_stack(tmp_path_factory.mktemp("httpfuzz")) as s:
        yield s


@dataclass
class Endpoint:
    service: str  # which process must stay healthy
    url: str
    content_types: list[str]
    headers: dict[str, str]
    seeds: list[bytes]
    # Headers that depend on the body: the node's OpenPCC-Forward MAC, so the hostile
    # bodies reach the envelope parser behind it, as they would from a rogue gateway.
    signed: Callable[[bytes], dict[str, str]] | None = None

    def headers_for(self, body: bytes) -> dict[str, str]:
        return {**self.headers, **(self.signed(body) if self.signed else {})}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _inner_nodes() -> bytes:
    return bhttp.encode_request(bhttp.Request(b"GET", b"https", b"gateway", b"/v1/nodes"))


def endpoints(fs: FakeStack) -> dict[str, Endpoint]:
    gw, relay = fs.url("gateway"), fs.url("relay")
    (cfg,) = ohttp.parse_key_configs(_get(gw + "/.well-known/ohttp-gateway"))[:1]
    plain, ctx = ohttp.encapsulate_request(cfg, _inner_nodes())
    sender = ChunkedRequestSender(cfg)
    inner = _inner_nodes()
    chunked_body = sender.seal_chunk(inner[:9]) + sender.seal_chunk(inner[9:], final=True)
    nodes = json.loads(
        bhttp.decode_response(ctx.decapsulate_response(_post_raw(gw + "/gateway", plain))).content
    )["nodes"]
    node = nodes[0]
    key = sealed.NodeKey(bytes.fromhex(node["node_id"]), bytes.fromhex(node["public_key"]))
    chat = bhttp.encode_request(
        bhttp.Request(b"POST", b"https", b"node", b"/v1/chat/completions",
                      [(b"content-type", b"application/json"),
                       (SENT_AT_HEADER, str(int(time.time())).encode())],
                      b'{"model":"fake-model","messages":[{"role":"user","content":"hi"}]}')
    )  # fmt: skip
    envelope = sealed.seal_request([key], "fake-model", chat).envelope
    tk = IssuerDirectory.parse(
        _get(fs.url("issuer") + "/.well-known/private-token-issuer-directory")
    ).select_key()
    treq, _ = issuance.begin_token_request(tk.token_key, CHALLENGE)
    internal = fs.url("internal")
    secret = (
        CredentialStore(fs.stack.state / "gateway" / "node-credentials.json")
        .current()["devstack"]
        .token
    )
    node_key = forward_key(secret, key.node_id)
    registration = json.dumps(
        {"node_id": "ab" * 16, "url": "http://127.0.0.1:9", "public_key": "cd" * 32,
         "models": ["fake-model"], "bundle": node["bundle"]}
    ).encode()  # fmt: skip
    return {
        "issuer token-request": Endpoint(
            "issuer", fs.url("issuer") + "/token-request",
            ["application/private-token-request", batched.REQUEST_MEDIA_TYPE],
            {"Authorization": f"Bearer {fs.api_key}"},
            [treq.encode(), batched.encode_batch_request([treq, treq])],
        ),
        "gateway ohttp": Endpoint(
            "gateway", gw + "/gateway", ["message/ohttp-req"], {}, [plain]
        ),
        "gateway chunked ohttp": Endpoint(
            "gateway", gw + "/gateway", ["message/ohttp-chunked-req"], {"Incremental": "?1"},
            [chunked_body],
        ),
        "gateway internal registration": Endpoint(
            "gateway", internal + "/internal/nodes", ["application/json"],
            {"Authorization": f"Bearer {secret}"}, [registration],
        ),
        "node sealed": Endpoint(
            "node", fs.url("node") + "/v1/sealed", ["application/openpcc-sealed-request"], {},
            [envelope], lambda body: {FORWARD_HEADER: sign_forward(node_key, body)},
        ),
        "relay": Endpoint(
            "relay", relay + "/", ["message/ohttp-req", "message/ohttp-chunked-req"], {},
            [plain, chunked_body],
        ),
    }  # fmt: skip


def _post_raw(url: str, body: bytes, ctype: str = "message/ohttp-req") -> bytes:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


class Poster:
    """One keep-alive connection per endpoint (reopened when the server closes it)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "", parts.port or 80, parts.path
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=SLOW * 2)
            t0 = time.monotonic()
            try:
                self.conn.request("POST", self.path, body=body, headers=headers)
                r = self.conn.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, time.monotonic() - t0
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:  # a fresh connection was refused too: that is a failure
                    raise
        raise AssertionError("unreachable")


NAMES = [
    "issuer token-request",
    "gateway ohttp",
    "gateway chunked ohttp",
    "gateway internal registration",
    "node sealed",
    "relay",
]


@pytest.mark.parametrize("name", NAMES)
def test_hostile_bodies_get_only_4xx_quickly_and_the_service_stays_up(
    fs: FakeStack, name: str
) -> None:
    ep = endpoints(fs)[name]
    poster = Poster(ep.url)
    junk_types = st.sampled_from(["application/octet-stream", "text/plain", ""])
    ctypes = st.one_of(st.sampled_from(ep.content_types), st.sampled_from(ep.content_types),
                       junk_types)  # fmt: skip
    seen: dict[int, int] = {}

    @HTTP
    @given(body=hostile(ep.seeds), ctype=ctypes)
    def run(body: bytes, ctype: str) -> None:
        headers = ep.headers_for(body) | ({"Content-Type": ctype} if ctype else {})
        status, took = poster.post(body, headers)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, body[:32], ctype)
        assert took < SLOW, f"{took:.1f} s for {body[:32]!r}"

    run()
    print(name, sum(seen.values()), "requests:", dict(sorted(seen.items())))
    assert any(400 <= s < 500 for s in seen), seen  # the refusals really happened
    with urllib.request.urlopen(fs.url(ep.service) + "/healthz", timeout=5) as r:
        assert r.status == 200
    # Still serving real work: a genuine request works after the barrage.
    status, _ = poster.post(
        ep.seeds[0], ep.headers_for(ep.seeds[0]) | {"Content-Type": ep.content_types[0]}
    )
    assert status < 500, status

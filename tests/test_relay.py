"""The relay contract, run against both relays: `openpcc relay serve` and infra/relay/nginx.conf.

Every test talks over real sockets on 127.0.0.1 to separate processes: the relay and a
recording fake gateway (tests/relay_support/fake_gateway.py), and asserts what the
gateway actually received. The nginx variant fails, never skips, when nginx is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openpcc.service.values import parse_origins, parse_size
from relay import cli as relay_cli
from relay.app import build_app
from relay.config import RelayConfig, parse_gateways
from relay.ratelimit import RateLimiter
from tests.relay_support.client import (
    GatewayControl,
    end_chunks,
    open_request,
    read_response,
    request,
    send_chunk,
)
from tests.relay_support.procs import (
    ROOT,
    NginxMissing,
    Proc,
    RelaySettings,
    free_port,
    start_gateway,
    start_relay,
)

VARIANTS = ["python", "nginx"]
IDENTIFYING = [
    ("Cookie", "session=alice"),
    ("Authorization", "Bearer alice-secret"),
    ("User-Agent", "AliceBrowser/1.0"),
    ("Forwarded", "for=198.51.100.7"),
    ("X-Forwarded-For", "198.51.100.7"),
    ("X-Forwarded-Host", "alice.example"),
    ("X-Real-IP", "198.51.100.7"),
    ("True-Client-IP", "198.51.100.7"),
    ("Via", "1.1 alice-proxy"),
    ("Sec-CH-UA", '"AliceBrowser";v="1"'),
    ("Sec-CH-UA-Platform", '"Linux"'),
    ("Accept-Language", "de-CH"),
    ("Accept", "*/*"),
    ("Accept-Encoding", "gzip"),
    ("Referer", "https://alice.example/"),
    ("Origin", "https://alice.example"),
    ("X-Request-Id", "alice-1"),
    ("DNT", "1"),
]
JUNK_RESPONSE_HEADERS = {"set-cookie", "x-powered-by", "alt-svc", "etag", "location"}
PAGE = "https://app.example"  # the web page's origin in the CORS tests
OTHER_PAGE = "https://other.example"
PREFLIGHT = [
    ("Access-Control-Request-Method", "POST"),
    ("Access-Control-Request-Headers", "content-type,incremental"),
]


def problem_ok(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, body
    assert headers["content-type"].startswith("application/problem+json")
    doc = json.loads(body)
    assert doc["status"] == expected and doc["title"]
    assert set(doc) == {"type", "title", "status"}  # generic: nothing about the upstream
    assert b"127.0.0.1" not in body and b"://" not in body and b"nginx" not in body


def ohttp_headers(ctype: str = "message/ohttp-req") -> list[tuple[str, str]]:
    return [*IDENTIFYING, ("Content-Type", ctype)]


def from_page(origin: str, ctype: str | None = "message/ohttp-req") -> list[tuple[str, str]]:
    """A browser's request: the identifying headers, with Origin set to the page's."""
    headers = [(k, v) for k, v in IDENTIFYING if k != "Origin"] + [("Origin", origin)]
    return headers + ([("Content-Type", ctype)] if ctype else [])


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def sent_headers(rec: dict) -> dict[str, str]:
    names = [k.lower() for k, _ in rec["headers"]]
    assert len(names) == len(set(names)), rec["headers"]
    return {k.lower(): v for k, v in rec["headers"]}


# -- processes ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay")


@pytest.fixture(scope="session")
def gateway(workdir: Path) -> Iterator[GatewayControl]:
    proc = start_gateway(workdir)
    yield GatewayControl(proc.port)
    proc.stop()


def launch(kind: str, settings: RelaySettings, workdir: Path) -> Proc:
    try:
        return start_relay(kind, settings, workdir)
    except NginxMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module", params=VARIANTS)
def relay(request: pytest.FixtureRequest, gateway: GatewayControl, workdir: Path) -> Iterator[Proc]:
    settings = RelaySettings(
        gateway.port,
        extra_args=["--gateway", f"alt=http://127.0.0.1:{gateway.port}/alt-gateway"],
    )
    proc = launch(request.param, settings, workdir)
    yield proc
    proc.stop()


@pytest.fixture
def gw(gateway: GatewayControl) -> GatewayControl:
    gateway.reset()
    return gateway


# -- forwarding --------------------------------------------------------------------------


def test_healthz(relay: Proc) -> None:
    """The same liveness answer as every other party's (and the nginx twin's)."""
    status, headers, body = request(relay.port, "GET", "/healthz", [])
    assert status == 200 and body == b'{"status": "ok"}'
    assert headers["content-type"].startswith("application/json")


def test_fixed_length_request_forwarded_exactly(relay: Proc, gw: GatewayControl) -> None:
    body = b"echo\n" + os.urandom(3000)
    status, headers, data = request(
        relay.port, "POST", "/?who=alice", ohttp_headers("Message/OHTTP-Req; x=alice"), body
    )
    assert status == 200 and data == body
    (rec,) = gw.requests()
    assert rec["path"] == "/gateway"  # no client path or query reaches the gateway
    assert sent_headers(rec) == {
        "host": f"127.0.0.1:{gw.port}",
        "content-type": "message/ohttp-req",
        "content-length": str(len(body)),
    }
    assert bytes.fromhex(rec["body"]) == body
    # Back to the client: the content type and Incremental, none of the gateway's tags.
    assert headers["content-type"] == "message/ohttp-res"
    assert headers["incremental"] == "?1"
    assert not JUNK_RESPONSE_HEADERS & headers.keys()
    assert "fake-gateway" not in headers.get("server", "")
    if relay.kind == "python":  # nginx core cannot allow-list response headers (see README)
        assert set(headers) == {"content-type", "incremental", "content-length", "date", "server"}


def test_second_request_carries_no_gateway_cookie(relay: Proc, gw: GatewayControl) -> None:
    for _ in range(2):  # the echo response sets a cookie; the relay must never send it back
        status, _, _ = request(relay.port, "POST", "/", ohttp_headers(), b"echo\nx")
        assert status == 200
    for rec in gw.requests():
        assert "cookie" not in sent_headers(rec)


def test_chunked_request_streams_to_gateway(relay: Proc, gw: GatewayControl) -> None:
    first, second = b"echo\n" + os.urandom(700), os.urandom(900)
    headers = [("Host", "relay.test"), *ohttp_headers("message/ohttp-chunked-req")]
    headers += [("Incremental", "?1"), ("Transfer-Encoding", "chunked")]
    sock = open_request(relay.port, "POST", "/", headers)
    try:
        send_chunk(sock, first)

        def got_first(state: dict) -> bool:
            reqs = state["requests"]
            return bool(reqs) and len(reqs[0]["body"]) // 2 >= len(first)

        # The gateway holds the first chunk while the client has not finished sending.
        assert gw.wait_for(got_first), "first request chunk did not reach the gateway"
        assert not gw.requests()[0]["done"]
        send_chunk(sock, second)
        end_chunks(sock)
        resp = read_response(sock)
        assert resp.status == 200 and resp.read() == first + second
    finally:
        sock.close()
    (rec,) = gw.requests()
    assert sent_headers(rec) == {
        "host": f"127.0.0.1:{gw.port}",
        "content-type": "message/ohttp-chunked-req",
        "incremental": "?1",
        "transfer-encoding": "chunked",
    }
    assert bytes.fromhex(rec["body"]) == first + second


def test_response_streams_to_client(relay: Proc, gw: GatewayControl) -> None:
    body = b"stream\n" + os.urandom(100)
    sock = open_request(
        relay.port,
        "POST",
        "/",
        [("Host", "relay.test"), *ohttp_headers(), ("Content-Length", str(len(body)))],
        body,
        timeout=5,
    )
    try:
        resp = read_response(sock)
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "message/ohttp-chunked-res"
        assert resp.getheader("Incremental") == "?1"
        first = resp.read1(64)
        # The client holds the first chunk while the gateway has not sent the last one
        # (it waits for our release, so a buffering relay would time out here).
        assert first == b"first-chunk"
        assert not gw.requests()[0]["sent_last"]
        gw.release()
        assert resp.read() == b"last-chunk"
    finally:
        sock.close()


def test_client_disconnect_cancels_upstream(relay: Proc, gw: GatewayControl) -> None:
    body = b"stream\n"
    headers = [("Host", "relay.test"), *ohttp_headers(), ("Content-Length", str(len(body)))]
    sock = open_request(relay.port, "POST", "/", headers, body, timeout=5)
    resp = read_response(sock)
    assert resp.read1(64) == b"first-chunk"
    sock.close()
    assert gw.wait_for(lambda s: s["requests"][0]["cancelled"]), "gateway never saw the hang-up"


# -- limits ------------------------------------------------------------------------------


def test_body_too_large_by_content_length(relay: Proc, gw: GatewayControl) -> None:
    headers = [("Host", "relay.test"), *ohttp_headers(), ("Content-Length", str(200_000))]
    sock = open_request(relay.port, "POST", "/", headers)  # head only: 413 before any body
    try:
        resp = read_response(sock)
        headers = {k.lower(): v for k, v in resp.getheaders()}
        problem_ok(resp.status, headers, resp.read(), 413)
    finally:
        sock.close()
    assert gw.requests() == []


def test_body_too_large_chunked(relay: Proc, gw: GatewayControl) -> None:
    chunks = [b"echo\n"] + [os.urandom(16 * 1024)] * 8  # 128 KiB > 64 KiB
    status, headers, body = request(
        relay.port, "POST", "/", ohttp_headers("message/ohttp-chunked-req"), chunks=chunks
    )
    problem_ok(status, headers, body, 413)
    # Whatever part reached the gateway, never the whole oversized body.
    assert all(len(r["body"]) // 2 <= 64 * 1024 + 16 * 1024 for r in gw.requests())


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/json", "message/ohttp-res"])
def test_unsupported_media_type(relay: Proc, gw: GatewayControl, ctype: str | None) -> None:
    headers = [("Content-Type", ctype)] if ctype else []
    status, hdrs, body = request(relay.port, "POST", "/", headers, b"echo\nx")
    problem_ok(status, hdrs, body, 415)
    assert gw.requests() == []


def test_concurrency_cap(relay: Proc, gw: GatewayControl) -> None:
    body = b"stream\n"
    socks = []
    try:
        for _ in range(2):  # the test relays admit two requests at once
            headers = [("Host", "relay.test"), *ohttp_headers(), ("Content-Length", "7")]
            sock = open_request(relay.port, "POST", "/", headers, body, timeout=5)
            socks.append((sock, read_response(sock)))
            assert socks[-1][1].read1(64) == b"first-chunk"
        status, headers, data = request(relay.port, "POST", "/", ohttp_headers(), b"echo\nx")
        problem_ok(status, headers, data, 503)
        gw.release()
        for _, resp in socks:
            assert resp.read() == b"last-chunk"
    finally:
        for sock, _ in socks:
            sock.close()


def test_upstream_slow_is_504(relay: Proc, gw: GatewayControl) -> None:
    t0 = time.monotonic()
    status, headers, body = request(relay.port, "POST", "/", ohttp_headers(), b"slow\n")
    problem_ok(status, headers, body, 504)
    assert time.monotonic() - t0 < 4.5  # the relay's 2 s read timeout, not the gateway's 5 s


@pytest.mark.parametrize("kind", VARIANTS)
def test_rate_limit_per_client(kind: str, gw: GatewayControl, workdir: Path) -> None:
    proc = launch(kind, RelaySettings(gw.port, rate=1 / 60, burst=3), workdir)
    try:
        results = [request(proc.port, "POST", "/", ohttp_headers(), b"echo\nx") for _ in range(6)]
    finally:
        proc.stop()
    assert [r[0] for r in results] == [200, 200, 200, 429, 429, 429]
    problem_ok(*results[-1], 429)
    assert len(gw.requests()) == 3


@pytest.mark.parametrize("kind", VARIANTS)
def test_upstream_down_is_502(kind: str, workdir: Path) -> None:
    proc = launch(kind, RelaySettings(free_port()), workdir)  # nothing listens there
    try:
        problem_ok(*request(proc.port, "POST", "/", ohttp_headers(), b"echo\nx"), 502)
        problem_ok(*request(proc.port, "GET", "/.well-known/ohttp-gateway", []), 502)
    finally:
        proc.stop()


# -- key configuration -------------------------------------------------------------------


def test_keys_relayed_and_cached(relay: Proc, gw: GatewayControl) -> None:
    answers = [
        request(relay.port, "GET", "/.well-known/ohttp-gateway", IDENTIFYING) for _ in range(2)
    ]
    for status, headers, body in answers:
        assert status == 200
        assert headers["content-type"] == "application/ohttp-keys"
        assert headers["cache-control"] == "max-age=60"
        assert "set-cookie" not in headers
        assert body == answers[0][2] and len(body) > 8
    gets = gw.state()["keys_gets"]
    assert len(gets) == 1, "the second GET must come from the relay's cache"
    assert sent_headers(gets[0]) == {"host": f"127.0.0.1:{gw.port}"}


def test_no_cors_by_default(relay: Proc, gw: GatewayControl) -> None:
    """Without --allow-origin (nginx: an empty origin map) a page's requests get no CORS
    header, and its preflight is the 405 any other method gets."""
    status, headers, body = request(relay.port, "OPTIONS", "/", [*from_page(PAGE), *PREFLIGHT])
    problem_ok(status, headers, body, 405)
    assert cors_headers(headers) == {} and "vary" not in headers
    status, headers, _ = request(relay.port, "POST", "/", from_page(PAGE), b"echo\nx")
    assert status == 200 and cors_headers(headers) == {} and "vary" not in headers
    status, headers, _ = request(relay.port, "GET", "/.well-known/ohttp-gateway", from_page(PAGE))
    assert status == 200 and cors_headers(headers) == {}


# -- not an open proxy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/gateway"),
        ("POST", "/_control/reset"),
        ("POST", "/nope"),
        ("POST", "//127.0.0.1/gateway"),
        ("GET", "/.well-known/other"),
        ("GET", "http://example.com/"),
        ("GET", "/"),
        ("PUT", "/"),
    ],
)
def test_not_an_open_proxy(relay: Proc, gw: GatewayControl, method: str, target: str) -> None:
    status, headers, body = request(relay.port, method, target, ohttp_headers(), b"echo\nx")
    assert status in (404, 405), (status, body)
    problem_ok(status, headers, body, status)
    assert gw.state() == {"requests": [], "keys_gets": []}


def test_connect_is_refused(relay: Proc, gw: GatewayControl) -> None:
    sock = open_request(relay.port, "CONNECT", "example.com:443", [("Host", "example.com:443")])
    try:
        resp = read_response(sock)
        assert 400 <= resp.status < 500
    finally:
        sock.close()
    assert gw.requests() == []


# -- Python relay only ---------------------------------------------------------------------


def test_named_gateway(relay: Proc, gw: GatewayControl) -> None:
    if relay.kind != "python":
        pytest.skip("named gateways are a copied location block in nginx (see README)")
    status, _, data = request(relay.port, "POST", "/alt", ohttp_headers(), b"echo\nalt")
    assert status == 200 and data == b"echo\nalt"
    assert [r["path"] for r in gw.requests()] == ["/alt-gateway"]


def test_metrics_are_aggregate(relay: Proc) -> None:
    if relay.kind != "python":
        pytest.skip("nginx core has no Prometheus endpoint")
    status, headers, body = request(relay.port, "GET", "/metrics", [])
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'openpcc_relay_requests_total{route="ohttp",outcome="ok"}' in text
    assert 'outcome="rate_limited"' in text and "openpcc_relay_in_flight" in text
    assert "127.0.0.1" not in text


def test_logs_never_contain_client_addresses(relay: Proc) -> None:
    """Runs after the rest of the module against this relay: the access log is on for the
    Python relay and must hold lines, none with an address; nginx logs nothing with one."""
    time.sleep(0.2)
    lines = relay.output().splitlines()
    if relay.kind == "python":
        assert any("openpcc.relay.access: POST / 200" in line for line in lines), lines[:5]
        lines = [line for line in lines if " relay on 127.0.0.1:" not in line]  # start banner
    else:
        for path in relay.workdir.rglob("*"):
            if not path.is_file() or path.name == "nginx.conf":
                continue
            data = path.read_bytes()
            assert b"alice" not in data and b"198.51" not in data, path
            if "cache" not in path.parts:  # cache entries are keyed by the *gateway* URL
                assert b"127.0.0.1" not in data, path
    offending = [line for line in lines if "127.0.0.1" in line or "alice" in line]
    assert offending == []


# -- CORS (opt-in: --allow-origin; nginx: the origin map) ---------------------------------


@pytest.fixture(
    scope="module",
    params=[(kind, mode) for kind in VARIANTS for mode in ("list", "any")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def cors_relay(
    request: pytest.FixtureRequest, gateway: GatewayControl, workdir: Path
) -> Iterator[Proc]:
    kind, mode = request.param
    settings = RelaySettings(
        gateway.port,
        extra_args=["--gateway", f"alt=http://127.0.0.1:{gateway.port}/alt-gateway"],
        allow_origins=[PAGE, "http://127.0.0.1:5173"] if mode == "list" else ["*"],
    )
    proc = launch(kind, settings, workdir)
    proc.extra["mode"] = mode
    yield proc
    proc.stop()


def assert_cors(proc: Proc, headers: dict[str, str], origin: str = PAGE) -> None:
    """The answer lets the page read it: its origin echoed (and Vary: Origin), or `*`."""
    if proc.extra["mode"] == "list":
        assert headers.get("access-control-allow-origin") == origin, headers
        assert headers.get("vary") == "Origin"
    else:
        assert headers.get("access-control-allow-origin") == "*", headers
        assert "vary" not in headers
    assert "access-control-allow-credentials" not in headers


@pytest.mark.parametrize("path", ["/", "/alt"])
def test_cors_preflight_answered_by_the_relay(
    cors_relay: Proc, gw: GatewayControl, path: str
) -> None:
    if path != "/" and cors_relay.kind != "python":
        pytest.skip("named gateways are a copied location block in nginx (see README)")
    status, headers, body = request(
        cors_relay.port, "OPTIONS", path, [*from_page(PAGE, None), *PREFLIGHT]
    )
    assert status == 204 and body == b""
    assert_cors(cors_relay, headers)
    assert headers["access-control-allow-methods"] == "POST"
    assert headers["access-control-allow-headers"] == "content-type, incremental"
    assert headers["access-control-max-age"] == "86400"
    assert gw.state() == {"requests": [], "keys_gets": []}  # the gateway never hears of it


def test_cors_on_relayed_answers_and_nothing_new_upstream(
    cors_relay: Proc, gw: GatewayControl
) -> None:
    body = b"echo\n" + os.urandom(100)
    status, headers, data = request(cors_relay.port, "POST", "/", from_page(PAGE), body)
    assert status == 200 and data == body
    assert_cors(cors_relay, headers)
    assert set(cors_headers(headers)) == {"access-control-allow-origin"}
    (rec,) = gw.requests()
    assert sent_headers(rec) == {  # Origin (and everything else of the page's) stays here
        "host": f"127.0.0.1:{gw.port}",
        "content-type": "message/ohttp-req",
        "content-length": str(len(body)),
    }
    status, headers, _ = request(
        cors_relay.port, "GET", "/.well-known/ohttp-gateway", from_page(PAGE, None)
    )
    assert status == 200 and headers["content-type"] == "application/ohttp-keys"
    assert_cors(cors_relay, headers)
    for rec in gw.state()["keys_gets"]:  # none if the relay's cache answered
        assert sent_headers(rec) == {"host": f"127.0.0.1:{gw.port}"}


def test_cors_on_streamed_answer(cors_relay: Proc, gw: GatewayControl) -> None:
    """The head of a streamed answer is written inside the handler: it still carries CORS."""
    headers = [("Host", "relay.test"), *from_page(PAGE), ("Content-Length", "7")]
    sock = open_request(cors_relay.port, "POST", "/", headers, b"stream\n", timeout=5)
    try:
        resp = read_response(sock)
        assert resp.status == 200 and resp.read1(64) == b"first-chunk"
        assert_cors(cors_relay, {k.lower(): v for k, v in resp.getheaders()})
        gw.release()
        assert resp.read() == b"last-chunk"
    finally:
        sock.close()


def test_cors_on_error_answers(cors_relay: Proc, gw: GatewayControl) -> None:
    port = cors_relay.port
    answers = {
        415: request(port, "POST", "/", from_page(PAGE, "text/plain"), b"echo\nx"),
        405: request(port, "PUT", "/", from_page(PAGE), b"echo\nx"),
    }
    headers = [("Host", "relay.test"), *from_page(PAGE), ("Content-Length", "200000")]
    sock = open_request(port, "POST", "/", headers)
    try:
        resp = read_response(sock)
        answers[413] = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        sock.close()
    if cors_relay.extra["mode"] == "list":  # 2 s each: once per relay kind is enough
        answers[504] = request(port, "POST", "/", from_page(PAGE), b"slow\n")
    for status, (got, headers, body) in answers.items():
        problem_ok(got, headers, body, status)
        assert_cors(cors_relay, headers)
    assert all(r["mode"] == "slow" for r in gw.requests())


def test_cors_other_origin_gets_no_allow_origin(cors_relay: Proc, gw: GatewayControl) -> None:
    if cors_relay.extra["mode"] != "list":
        pytest.skip("`*` allows every origin")
    port = cors_relay.port
    answers = [
        request(port, "OPTIONS", "/", [*from_page(OTHER_PAGE, None), *PREFLIGHT]),
        request(port, "POST", "/", from_page(OTHER_PAGE), b"echo\nx"),
        request(
            port,
            "POST",
            "/",
            [(k, v) for k, v in ohttp_headers() if k != "Origin"],  # no Origin at all
            b"echo\nx",
        ),
        request(port, "GET", "/.well-known/ohttp-gateway", from_page(OTHER_PAGE, None)),
    ]
    # The preflight fails either way: the Python relay answers 204, nginx 405.
    assert [a[0] for a in answers][1:] == [200, 200, 200]
    for _, headers, _ in answers:
        assert "access-control-allow-origin" not in headers
        if cors_relay.kind == "python":  # nginx adds Vary only with an echoed origin
            assert headers["vary"] == "Origin"
    assert len(gw.requests()) == 2  # the preflight never reached the gateway


@pytest.mark.parametrize("kind", VARIANTS)
def test_cors_on_429_and_502(kind: str, workdir: Path) -> None:
    settings = RelaySettings(free_port(), rate=1 / 60, burst=2, allow_origins=[PAGE])
    proc = launch(kind, settings, workdir)  # nothing listens at the gateway's port
    proc.extra["mode"] = "list"
    try:
        answers = [
            (502, request(proc.port, "POST", "/", from_page(PAGE), b"echo\nx")),
            (502, request(proc.port, "GET", "/.well-known/ohttp-gateway", from_page(PAGE, None))),
            (429, request(proc.port, "POST", "/", from_page(PAGE), b"echo\nx")),
        ]
    finally:
        proc.stop()
    for status, (got, headers, body) in answers:
        problem_ok(got, headers, body, status)
        assert_cors(proc, headers)


# -- units and wiring ----------------------------------------------------------------------


def test_rate_limiter_is_bounded_and_keys_by_subscriber() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, max_clients=3, clock=lambda: now[0])
    assert [limiter.check("192.0.2.1") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.check("192.0.2.1") > 0
    now[0] += 1.0
    assert limiter.check("192.0.2.1") == 0.0  # refilled
    # One IPv6 /64 is one subscriber.
    assert limiter.check("2001:db8::1") == 0.0 and limiter.check("2001:db8::2") == 0.0
    assert limiter.check("2001:db8::3") > 0
    for i in range(10):
        limiter.check(f"198.51.100.{i}")
    assert len(limiter) == 3
    assert not any(b"198.51" in k for k in limiter._buckets)


def test_config_parsing() -> None:
    (a, b) = parse_gateways(["http://gw:9/ohttp", "eu=https://eu.gw/x"], ["eu=https://k.gw/keys"])
    assert (a.post_path, a.keys_path, a.keys_url) == (
        "/",
        "/.well-known/ohttp-gateway",
        "http://gw:9/.well-known/ohttp-gateway",
    )
    assert (b.post_path, b.keys_url) == ("/eu", "https://k.gw/keys")
    for bad in (
        ["ftp://gw/"],
        ["metrics=http://gw/"],
        ["http://u:p@gw/"],
        ["http://a/", "http://b/"],
    ):
        with pytest.raises(ValueError):
            RelayConfig(gateways=parse_gateways(bad))
    assert parse_size("64k") == 65536 and parse_size("8m") == 8 << 20 and parse_size(7) == 7


def test_allow_origin_parsing_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_origins(["https://App.Example/", "http://127.0.0.1:5173"]) == (
        "https://app.example",
        "http://127.0.0.1:5173",
    )
    assert parse_origins(["https://a.example", "*"]) == ("*",)
    for bad in ("app.example", "https://a.example/path", "https://u@a.example", "null"):
        with pytest.raises(ValueError):
            parse_origins([bad])

    def parser() -> argparse.ArgumentParser:  # reads the environment, as `openpcc` does
        p = argparse.ArgumentParser()
        relay_cli.register(p.add_subparsers())
        return p

    args = parser().parse_args(["relay", "serve", "--gateway", "http://gw/"])
    assert relay_cli.config_from_args(args).allow_origins == ()
    monkeypatch.setenv("OPENPCC_RELAY_ALLOW_ORIGIN", "https://a.example, http://b.example:8080")
    args = parser().parse_args(["relay", "serve", "--gateway", "http://gw/"])
    config = relay_cli.config_from_args(args)
    assert config.allow_origins == ("https://a.example", "http://b.example:8080")
    args = parser().parse_args(["relay", "serve", "--gateway", "http://gw/", "--allow-origin", "*"])
    assert relay_cli.config_from_args(args).allow_origins == ("*",)  # the flag wins


@pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")  # app["relay"]
def test_cors_off_adds_nothing_to_the_app() -> None:
    """Without origins no hook runs per response and no OPTIONS route exists."""
    gateways = parse_gateways(["http://gw/x"])
    app = build_app(RelayConfig(gateways=gateways))
    methods = {r.method for r in app.router.routes()}
    assert len(app.on_response_prepare) == 0 and "OPTIONS" not in methods
    app = build_app(RelayConfig(gateways=gateways, allow_origins=("*",)))
    assert len(app.on_response_prepare) == 1
    assert "OPTIONS" in {r.method for r in app.router.routes()}


def test_cli_help_and_errors() -> None:
    run = [sys.executable, "-m", "openpcc.cli", "relay", "serve"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--gateway" in out.stdout and "OPENPCC_RELAY_" in out.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPCC_RELAY_")}
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 2 and "gateway" in out.stderr


def test_relay_imports_no_other_party() -> None:
    """Its footprint: aiohttp, the service kit (openpcc.service) and the core's error root
    (openpcc.errors, no imports of its own); nothing else of the core."""
    code = (
        "import sys, relay.app, relay.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tokens', 'gateway', 'node', 'pyhpke', 'gmpy2', 'cryptography', 'openpcc') "
        "and m not in ('openpcc', 'openpcc.errors') and not m.startswith('openpcc.service')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr

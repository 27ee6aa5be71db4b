"""The relay's own HTTP/1.1 server (relay/server.py), beyond the contract suite.

tests/test_relay.py is the contract both relays (ours and nginx) must meet; this module
holds the lean server to the strictness and framing its docstring promises (malformed
heads and bodies, keep-alive and pipelining, Expect, HTTP/1.0, HEAD), to its fast path
(an answer written from the gateway connection's callback, no task) and its slow path
alike, and reruns the contract's per-relay cases on the ``--http-server aiohttp``
fallback, which must keep meeting it. Real processes over loopback, as there.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given

from relay import cli as relay_cli
from tests.fuzz_profiles import HTTP
from tests.relay_support.client import (
    GatewayControl,
    end_chunks,
    open_request,
    read_response,
    request,
    send_chunk,
)
from tests.relay_support.procs import ROOT, Proc, RelaySettings, start_gateway, start_python_relay
from tests.test_relay import (  # the contract's per-relay cases, rerun below on aiohttp
    cors_headers,
    from_page,
    ohttp_headers,
    problem_ok,
    test_body_too_large_by_content_length,
    test_body_too_large_chunked,
    test_chunked_request_streams_to_gateway,
    test_client_disconnect_cancels_upstream,
    test_concurrency_cap,
    test_connect_is_refused,
    test_cors_on_error_answers,
    test_cors_on_relayed_answers_and_nothing_new_upstream,
    test_cors_on_streamed_answer,
    test_cors_other_origin_gets_no_allow_origin,
    test_cors_preflight_answered_by_the_relay,
    test_fixed_length_request_forwarded_exactly,
    test_healthz,
    test_keys_relayed_and_cached,
    test_logs_never_contain_client_addresses,
    test_metrics_are_aggregate,
    test_named_gateway,
    test_no_cors_by_default,
    test_not_an_open_proxy,
    test_response_streams_to_client,
    test_second_request_carries_no_gateway_cookie,
    test_unsupported_media_type,
    test_upstream_slow_is_504,
)

CONTRACT = [
    test_healthz, test_fixed_length_request_forwarded_exactly,
    test_second_request_carries_no_gateway_cookie, test_chunked_request_streams_to_gateway,
    test_response_streams_to_client, test_client_disconnect_cancels_upstream,
    test_body_too_large_by_content_length, test_body_too_large_chunked,
    test_unsupported_media_type, test_concurrency_cap, test_upstream_slow_is_504,
    test_keys_relayed_and_cached, test_no_cors_by_default, test_not_an_open_proxy,
    test_connect_is_refused, test_named_gateway, test_metrics_are_aggregate,
    test_logs_never_contain_client_addresses, test_cors_preflight_answered_by_the_relay,
    test_cors_on_relayed_answers_and_nothing_new_upstream, test_cors_on_streamed_answer,
    test_cors_on_error_answers, test_cors_other_origin_gets_no_allow_origin,
]  # fmt: skip
SERVERS = ["lean", "aiohttp"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relay-server")


@pytest.fixture(scope="module")
def gateway(workdir: Path) -> Iterator[GatewayControl]:
    proc = start_gateway(workdir)
    yield GatewayControl(proc.port)
    proc.stop()


@pytest.fixture
def gw(gateway: GatewayControl) -> GatewayControl:
    gateway.reset()
    return gateway


def _start(gateway: GatewayControl, workdir: Path, server: str, **kw: object) -> Proc:
    settings = RelaySettings(
        gateway.port,
        extra_args=[
            "--gateway", f"alt=http://127.0.0.1:{gateway.port}/alt-gateway",
            "--http-server", server, "--head-timeout", "2",
        ],
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return start_python_relay(settings, workdir)


# -- the contract, on the aiohttp fallback ------------------------------------------------
@pytest.fixture(scope="module")
def relay(gateway: GatewayControl, workdir: Path) -> Iterator[Proc]:
    """Named like test_relay's fixture, so its cases imported above run on aiohttp here."""
    proc = _start(gateway, workdir, "aiohttp")
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["list", "any"])
def cors_relay(
    request: pytest.FixtureRequest, gateway: GatewayControl, workdir: Path
) -> Iterator[Proc]:
    mode = request.param
    origins = ["https://app.example", "http://127.0.0.1:5173"] if mode == "list" else ["*"]
    proc = _start(gateway, workdir, "aiohttp", allow_origins=origins)
    proc.extra["mode"] = mode
    yield proc
    proc.stop()


def test_the_fallback_is_the_aiohttp_server(relay: Proc) -> None:
    assert "aiohttp server on the" in relay.output()


# -- the lean server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lean(gateway: GatewayControl, workdir: Path) -> Iterator[Proc]:
    proc = _start(gateway, workdir, "lean", max_concurrency=8)
    assert "lean server on the" in proc.output()
    yield proc
    proc.stop()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the server closes (or ``timeout``): every byte it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def post(body: bytes, extra: str = "", target: str = "/", version: str = "1.1") -> bytes:
    return (
        f"POST {target} HTTP/{version}\r\nHost: relay.test\r\n"
        f"Content-Type: message/ohttp-req\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def statuses(data: bytes) -> list[int]:
    return [int(data[i + 9 : i + 12]) for i in range(len(data)) if data.startswith(b"HTTP/1.", i)]


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\nHost: x\n\n",  # bare LF line ends
        b"POST / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
        b"POST / HTTP/1.1\r\nHost : x\r\n\r\n",  # space before the colon
        b"POST / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",  # NUL in a value
        b"POST / HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # stray CR
        b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PO(ST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/2.0\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
    ],
)
def test_malformed_heads_are_400_and_close(lean: Proc, gw: GatewayControl, head: bytes) -> None:
    got = raw(lean.port, head)
    assert statuses(got) == [400], got[:200]
    assert b"\r\nConnection: close\r\n" in got
    problem_ok(400, {"content-type": "application/problem+json"}, got.split(b"\r\n\r\n", 1)[1], 400)
    assert gw.requests() == []


def test_oversized_heads_are_431(lean: Proc, gw: GatewayControl) -> None:
    long_field = b"POST / HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    many = b"POST / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n"
    for head in (long_field, many):
        assert statuses(raw(lean.port, head)) == [431]
    assert gw.requests() == []


def test_keep_alive_pipelining_and_connection_close(lean: Proc, gw: GatewayControl) -> None:
    one, two = b"echo\n" + os.urandom(64), b"echo\n" + os.urandom(64)
    # Two requests in one segment, then a third that asks to close: three answers, in order.
    got = raw(lean.port, post(one) + post(two) + post(b"echo\nc", "Connection: close\r\n"))
    assert statuses(got) == [200, 200, 200]
    assert got.index(one) < got.index(two)
    assert got.count(b"\r\nConnection: close\r\n") == 1  # only the last one closes
    assert [bytes.fromhex(r["body"]) for r in gw.requests()] == [one, two, b"echo\nc"]


def test_fast_and_slow_paths_answer_alike(lean: Proc, gw: GatewayControl) -> None:
    """The first request may open the gateway connection (slow path, a task); later ones
    reuse it (fast path, no task): the same bytes and headers either way."""
    answers = [request(lean.port, "POST", "/", ohttp_headers(), b"echo\n%d" % i) for i in range(4)]
    for i, (status, headers, body) in enumerate(answers):
        assert status == 200 and body == b"echo\n%d" % i
        assert set(headers) == {"content-type", "incremental", "content-length", "date", "server"}
        assert headers["server"] == "openpcc-relay"


def test_client_gone_on_the_fast_path_cancels_upstream(lean: Proc, gw: GatewayControl) -> None:
    assert request(lean.port, "POST", "/", ohttp_headers(), b"echo\nwarm")[0] == 200
    gw.reset()
    with socket.create_connection(("127.0.0.1", lean.port)) as s:
        s.sendall(post(b"slow\n"))  # the gateway stays silent: the relay waits on it
        assert gw.wait_for(lambda st: bool(st["requests"]))
    assert gw.wait_for(lambda st: st["requests"][0]["cancelled"]), "gateway never saw the hang-up"
    _, _, body = request(lean.port, "GET", "/metrics", [])
    aborted = [line for line in body.splitlines() if b'outcome="client_aborted"' in line]
    assert aborted[0].endswith((b" 1", b" 2")), body.decode()


def test_expect_100_continue(lean: Proc, gw: GatewayControl) -> None:
    body = b"echo\n" + os.urandom(32)
    with socket.create_connection(("127.0.0.1", lean.port), timeout=5) as s:
        s.sendall(post(b"", "Expect: 100-continue\r\n").replace(b"Length: 0", b"Length: 37"))
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        resp = read_response(s)
        assert resp.status == 200 and resp.read() == body


def test_chunked_request_with_extensions_and_trailers(lean: Proc, gw: GatewayControl) -> None:
    headers = [("Host", "r"), *ohttp_headers("message/ohttp-chunked-req")]
    headers.append(("Transfer-Encoding", "chunked"))
    sock = open_request(lean.port, "POST", "/", headers)
    try:
        sock.sendall(b"5;ext=1\r\necho\n\r\n")
        send_chunk(sock, b"abc")
        sock.sendall(b"0\r\nX-Trailer: dropped\r\n\r\n")
        resp = read_response(sock)
        assert resp.status == 200 and resp.read() == b"echo\nabc"
    finally:
        sock.close()
    (rec,) = gw.requests()
    assert bytes.fromhex(rec["body"]) == b"echo\nabc"
    assert "x-trailer" not in {k.lower() for k, _ in rec["headers"]}


def test_malformed_chunked_body_is_400(lean: Proc, gw: GatewayControl) -> None:
    headers = [("Host", "r"), *ohttp_headers("message/ohttp-chunked-req")]
    headers.append(("Transfer-Encoding", "chunked"))
    sock = open_request(lean.port, "POST", "/", headers)
    try:
        send_chunk(sock, b"echo\n")
        time.sleep(0.2)  # the first chunk is on its way to the gateway
        sock.sendall(b"zz\r\nnot hex\r\n")
        resp = read_response(sock)
        problem_ok(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), 400)
    finally:
        sock.close()


def test_http10_gets_an_answer_and_the_close(lean: Proc, gw: GatewayControl) -> None:
    got = raw(lean.port, post(b"echo\nold", version="1.0"))
    assert statuses(got) == [200] and got.endswith(b"echo\nold")
    assert b"\r\nConnection: close\r\n" in got
    # A streamed answer to a 1.0 client is not chunked: the body runs until the close.
    with socket.create_connection(("127.0.0.1", lean.port), timeout=5) as s:
        s.sendall(post(b"stream\n", version="1.0"))
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding" not in head
        gw.release()
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
        assert (head + rest).endswith(b"first-chunklast-chunk")


def test_head_and_absolute_form_and_encoded_paths(lean: Proc, gw: GatewayControl) -> None:
    got = raw(lean.port, b"HEAD /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert statuses(got) == [405] and got.endswith(b"\r\n\r\n")  # no body to a HEAD
    assert b"\r\nAllow: GET\r\n" in got
    status, _, _ = request(lean.port, "GET", "http://relay.example/healthz", [])
    assert status == 200
    status, _, body = request(lean.port, "POST", "/%61lt?x=1", ohttp_headers(), b"echo\nalt")
    assert status == 200 and body == b"echo\nalt"
    assert [r["path"] for r in gw.requests()] == ["/alt-gateway"]


def test_request_trickled_byte_by_byte(lean: Proc, gw: GatewayControl) -> None:
    data = post(b"echo\n" + os.urandom(40))
    with socket.create_connection(("127.0.0.1", lean.port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
        resp = read_response(s)
        assert resp.status == 200 and resp.read() == data[-45:]


def test_413_while_the_body_still_comes_is_read_not_reset(lean: Proc, gw: GatewayControl) -> None:
    """An early final answer while the client still sends: the relay reads the rest off
    (lingering close), so the client gets the 413 rather than a reset."""
    sock = open_request(lean.port, "POST", "/", [("Host", "r"), *ohttp_headers(),
                                                 ("Content-Length", str(100_000))])  # fmt: skip
    try:
        resp = read_response(sock)
        assert resp.status == 413
        for _ in range(10):  # keeps sending: nothing breaks on our side
            sock.sendall(b"x" * 4096)
    finally:
        sock.close()
    headers = [("Host", "r"), *ohttp_headers("message/ohttp-chunked-req")]
    sock = open_request(lean.port, "POST", "/", [*headers, ("Transfer-Encoding", "chunked")])
    try:
        for _ in range(20):  # 80 KiB > the relay's 64 KiB, in 4 KiB chunks
            send_chunk(sock, os.urandom(4096))
        end_chunks(sock)
        resp = read_response(sock)
        assert resp.status == 413
    finally:
        sock.close()


def test_cors_off_means_no_cors_lines(lean: Proc, gw: GatewayControl) -> None:
    status, headers, _ = request(
        lean.port, "POST", "/", from_page("https://app.example"), b"echo\nx"
    )
    assert status == 200 and cors_headers(headers) == {} and "vary" not in headers


@pytest.mark.fuzz
def test_hostile_request_bytes_get_http_or_a_close_and_break_nothing(
    lean: Proc, gw: GatewayControl
) -> None:
    """Mutated requests (heads and bodies, chunked and not, pipelined): whatever comes
    back is HTTP/1.1, nothing reaches the event loop's error handler, the relay serves on."""
    from tests.test_fuzz_parsers import hostile

    chunked = (
        b"POST / HTTP/1.1\r\nHost: r\r\nContent-Type: message/ohttp-chunked-req\r\n"
        b"Transfer-Encoding: chunked\r\nIncremental: ?1\r\n\r\n"
        b"5\r\necho\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n"
    )
    seeds = [
        post(b"echo\n" + bytes(range(40))),
        chunked,
        post(b"echo\na") + post(b"echo\nb"),
        b"GET /.well-known/ohttp-gateway HTTP/1.1\r\nHost: r\r\n\r\n",
        b"OPTIONS / HTTP/1.1\r\nHost: r\r\nOrigin: https://app.example\r\n\r\n",
    ]

    @HTTP
    @given(data=hostile(seeds))
    def run(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", lean.port), timeout=5) as s:
            out = b""
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)  # the client is done: the relay closes after
                while chunk := s.recv(65536):
                    out += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:100]

    run()
    assert request(lean.port, "GET", "/healthz", [])[0] == 200
    assert request(lean.port, "POST", "/", ohttp_headers(), b"echo\nafter")[0] == 200
    log = lean.output()
    assert "event loop:" not in log and "handler failed" not in log, log[-2000:]
    assert "Traceback" not in log and "unexpected relay failure" not in log, log[-2000:]


# -- flags ------------------------------------------------------------------------------
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    relay_cli.register(parser.add_subparsers())
    return parser.parse_args(["relay", "serve", "--gateway", "http://gw/", *argv])


def test_uvloop_is_the_default_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENPCC_RELAY_UVLOOP", raising=False)
    monkeypatch.delenv("OPENPCC_RELAY_HTTP_SERVER", raising=False)
    config = relay_cli.config_from_args(_parse())
    assert config.uvloop is True and config.http_server == "lean"
    assert relay_cli.config_from_args(_parse("--uvloop")).uvloop is True  # the old flag
    assert relay_cli.config_from_args(_parse("--no-uvloop")).uvloop is False
    monkeypatch.setenv("OPENPCC_RELAY_UVLOOP", "0")
    assert relay_cli.config_from_args(_parse()).uvloop is False
    monkeypatch.setenv("OPENPCC_RELAY_HTTP_SERVER", "aiohttp")
    assert relay_cli.config_from_args(_parse()).http_server == "aiohttp"

    from relay.server import event_loop_is_uvloop

    have = importlib_util_has("uvloop")
    assert event_loop_is_uvloop(True) is have and event_loop_is_uvloop(False) is False
    monkeypatch.setenv("OPENPCC_EVENT_LOOP", "asyncio")  # the service kit's switch
    assert event_loop_is_uvloop(True) is False


def importlib_util_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_bad_http_server_is_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "relay", "serve", "--gateway", "http://gw/",
         "--http-server", "twisted"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "http-server must be lean or aiohttp" in out.stderr


def test_lean_relay_loads_no_aiohttp() -> None:
    """The default server needs the standard library (and uvloop where installed) only."""
    code = (
        "import sys, relay.server, relay.cli, relay.core;"
        "sys.exit(1 if any(m.split('.')[0] == 'aiohttp' for m in sys.modules) else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


assert len(CONTRACT) == 23  # every per-relay contract case is imported (and so rerun here)

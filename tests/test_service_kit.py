"""The service kit's connection hygiene, on all four parties as real processes.

One local local_stack (fake engine) runs with short limits set through each party's
``OPENPCC_<PARTY>_*`` variables. For every party: idle sockets and half-sent request heads
are closed after the head timeout while a normal request is answered at once; a request
body trickled below the minimum rate gets 408 (or its connection closed) soon after the
grace period. The relay also caps open connections per client address, and a client at
another address is still served. Timing asserts have at least 5x headroom.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from openpcc.devstack.local import LocalStack
from openpcc.devstack.processes import free_port
from openpcc.service.limits import ConnectionLimits
from openpcc.wire import ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestSender

HEAD_TIMEOUT = 1.0
BODY_GRACE = 1.0
MAX_PER_CLIENT = 6
PARTY_ENV = {
    "relay": "OPENPCC_RELAY_",
    "gateway": "OPENPCC_GATEWAY_",
    "issuer": "OPENPCC_ISSUER_",
    "node": "OPENPCC_NODE_",
}
# A body-reading route of each party, with what makes it read the body.
BODY_ROUTE = {
    "relay": ("/", {"Content-Type": "message/ohttp-chunked-req"}),
    "gateway": ("/gateway", {"Content-Type": "message/ohttp-chunked-req"}),
    "issuer": ("/token-request", {"Content-Type": "application/private-token-request"}),
    "node": ("/v1/sealed", {"Content-Type": sealed.REQUEST_MEDIA_TYPE}),
}


METRICS_PORTS = {party: free_port() for party in PARTY_ENV}
STACK_ENV = {  # for conftest.local_stack: short limits, metrics on their own listeners
    **{prefix + "HEAD_TIMEOUT": str(HEAD_TIMEOUT) for prefix in PARTY_ENV.values()},
    **{prefix + "BODY_GRACE": str(BODY_GRACE) for prefix in PARTY_ENV.values()},
    **{prefix + "BODY_MIN_RATE": "1000" for prefix in PARTY_ENV.values()},
    **{prefix + "KEEPALIVE_TIMEOUT": "30" for prefix in PARTY_ENV.values()},
    **{prefix + "METRICS_PORT": str(METRICS_PORTS[p]) for p, prefix in PARTY_ENV.items()},
    "OPENPCC_RELAY_MAX_PER_CLIENT": str(MAX_PER_CLIENT),
}


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        return r.status == 200


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), or None if it stayed open."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - t0
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - t0
    except TimeoutError:
        return None


@pytest.mark.parametrize("party", list(PARTY_ENV))
def test_idle_and_half_sent_heads_are_closed_and_others_served(
    local_stack: LocalStack, party: str
) -> None:
    url = local_stack.urls[party]
    idle, partial = [], []
    try:
        for _ in range(2):  # 4 sockets: under the relay's per-address cap
            idle.append(socket.create_connection(_address(url)))
            s = socket.create_connection(_address(url))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            partial.append(s)
        assert _healthy(url)  # served while the slow sockets are open
        for s in idle + partial:
            took = _closed_within(s, 10 * HEAD_TIMEOUT)
            assert took is not None, f"{party} kept a socket without a whole request head"
        assert _healthy(url)
    finally:
        for s in idle + partial:
            s.close()


@pytest.mark.parametrize("party", list(PARTY_ENV))
def test_a_trickled_body_is_cut_off(local_stack: LocalStack, party: str) -> None:
    url = local_stack.urls[party]
    path, headers = BODY_ROUTE[party]
    if party == "issuer":
        key = (local_stack.state / "demo-api-key").read_text().strip()
        headers = {**headers, "Authorization": f"Bearer {key}"}
    start = b""
    if party in ("relay", "gateway"):
        # A real chunked-OHTTP prefix, then zero bytes (the final chunk's content until
        # the end), so the gateway keeps reading instead of refusing the first bytes.
        with urllib.request.urlopen(url + "/.well-known/ohttp-gateway", timeout=5) as r:
            config = ohttp.parse_key_configs(r.read())[0]  # X-Wing: a 1127-byte prefix
        start = ChunkedRequestSender(config).header() + b"\x00"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(start) + 200}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(_address(url)) as s:
        s.sendall(head.encode() + start)
        s.settimeout(0.2)
        t0 = time.monotonic()
        answer = b""
        while time.monotonic() - t0 < 10 * (BODY_GRACE + 1):
            try:
                s.sendall(b"\x00" * 4)  # 20 bytes/s, far below 1000
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
        took = time.monotonic() - t0
    assert took < 10 * (BODY_GRACE + 1), f"{party} kept reading a trickled body"
    if answer:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert _healthy(url)


def test_relay_caps_connections_per_client_address(local_stack: LocalStack) -> None:
    url = local_stack.urls["relay"]
    host, port = _address(url)
    held = [socket.create_connection((host, port)) for _ in range(MAX_PER_CLIENT)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection((host, port))
        with extra:
            assert _closed_within(extra, 5) is not None, "the cap let one more connection in"
        # Another client address is not affected by this one's connections.
        other = socket.create_connection((host, port), source_address=("127.0.0.2", 0))
        with other:
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            other.settimeout(5)
            assert other.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slots come back once the sockets close
        try:
            if _healthy(url):
                break
        except OSError:
            time.sleep(0.1)
    assert _healthy(url)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="head-timeout must be positive"):
        ConnectionLimits(head_timeout=0)
    with pytest.raises(ValueError, match="max-per-client"):
        ConnectionLimits(max_per_client=-1)


def test_every_party_takes_the_hygiene_flags(tmp_path: Path) -> None:
    import subprocess
    import sys

    for group in ("relay", "gateway", "issuer", "node"):
        out = subprocess.run(
            [sys.executable, "-m", "openpcc.cli", group, "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        for flag in ("--head-timeout", "--keepalive-timeout", "--body-timeout",
                     "--body-min-rate", "--max-per-client"):  # fmt: skip
            assert flag in out.stdout, (group, flag)
        assert f"{PARTY_ENV[group]}HEAD_TIMEOUT" in out.stdout.replace("\n", "").replace(" ", "")


def test_units_raise_the_descriptor_limit() -> None:
    """Open connections cost descriptors: the units lift systemd's 1024 soft default."""
    from tests.conftest import ROOT

    for party in ("relay", "gateway", "issuer", "node"):
        unit = (ROOT / "infra" / "systemd" / f"openpcc-{party}.service").read_text()
        values = [int(line.split("=", 1)[1]) for line in unit.splitlines()
                  if line.startswith("LimitNOFILE=")]  # fmt: skip
        assert values and values[0] >= 65536, party


def test_one_status_per_error_type() -> None:
    """As h11's error_status_hint: the status lives on the type, problem_for uses it."""
    import json as _json

    from openpcc import errors
    from openpcc.service.http import problem_for

    hints = {
        errors.OpenPCCError: 500,
        errors.DecodeError: 400,
        errors.TruncatedError: 400,
        errors.LimitExceededError: 413,
        errors.DecryptError: 400,
        errors.VerificationError: 403,
        errors.KeyStoreError: 500,
    }
    for cls, status in hints.items():
        assert cls.status_hint == status, cls
    resp = problem_for(errors.LimitExceededError("secret input"), "at most 10 bytes")
    assert resp.status == 413 and resp.content_type == "application/problem+json"
    assert resp.body is not None
    doc = _json.loads(bytes(resp.body))  # type: ignore[arg-type]
    assert doc == {"type": "about:blank", "title": "Content Too Large", "status": 413,
                   "detail": "at most 10 bytes"}  # fmt: skip
    assert b"secret" not in bytes(resp.body)  # type: ignore[arg-type]


def test_every_service_error_is_an_openpcc_error() -> None:
    from gateway.nodestore import RegistryFullError
    from gateway.registry import RegistrationError
    from node.engine import EngineError
    from node.policy import Rejected
    from openpcc.errors import OpenPCCError
    from relay.upstream import UpstreamError, UpstreamTimeout

    for cls in (RegistrationError, RegistryFullError, EngineError, Rejected, UpstreamError):
        assert issubclass(cls, OpenPCCError), cls
    assert RegistryFullError.status_hint == 503 and UpstreamTimeout.status_hint == 504
    assert Rejected(404, "Not Found").status_hint == 404


@pytest.mark.parametrize("party", list(PARTY_ENV))
def test_metrics_on_their_own_listener(local_stack: LocalStack, party: str) -> None:
    """--metrics-port: counters only there; the public listener answers 404 for them."""
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(local_stack.urls[party] + "/metrics", timeout=5)
    assert exc.value.code == 404
    url = f"http://127.0.0.1:{METRICS_PORTS[party]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read()
    assert r.status == 200 and b"# TYPE openpcc_" in body
    assert _healthy(local_stack.urls[party])  # the rest of the public listener is unchanged


def test_port_file_names_every_listener(local_stack: LocalStack) -> None:
    """--port 0 --port-file: the file the stack read its ports from names each listener
    with the port it is bound to (the kernel's choice where 0 was asked)."""
    for svc in local_stack.procs.services:
        party = "node" if svc.name.startswith("node") else svc.name
        want = {"public", "metrics"} | ({"internal"} if party == "gateway" else set())
        assert set(svc.ports) == want, (svc.name, svc.ports)
        assert svc.ports["metrics"] == METRICS_PORTS[party]
        assert svc.url == f"http://127.0.0.1:{svc.ports['public']}"
        for port in svc.ports.values():
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass

"""Operations contract of every service, each a separate process: liveness (/healthz)
is "the process is up", readiness (/readyz) is "its dependencies answer", and SIGTERM
drains: the listener closes, an answer already streaming completes, exit status 0.

That is what Kubernetes (probes, rolling updates) and systemd (stop) rely on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ops_support import Stack, get


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    s.simulated_tee()
    try:
        yield s
    finally:
        s.stop()


def _status(url: str) -> int:
    return get(url)[0]


# ------------------------------------------------------------------ readiness


def test_issuer_ready_only_with_its_store(stack: Stack, redis_url: str) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    down = stack.issuer("issuer-down", stack.dir / "i1", dead_redis)
    assert _status(down.url + "/healthz") == 200
    assert _status(down.url + "/readyz") == 503
    up = stack.issuer("issuer-up", stack.dir / "i2", redis_url)
    assert _status(up.url + "/readyz") == 200
    sqlite = stack.issuer("issuer-sqlite", stack.dir / "i3")
    assert _status(sqlite.url + "/readyz") == 200


def test_gateway_ready_only_with_directory_and_spent_store(stack: Stack, redis_url: str) -> None:
    no_issuer = stack.gateway("gw-no-issuer", stack.dir / "g1", _dead_url())
    assert _status(no_issuer.url + "/healthz") == 200
    status, body = get(no_issuer.url + "/readyz")
    assert status == 503 and json.loads(body)["issuer_directory"] is False
    issuer = stack.issuer("issuer", stack.dir / "issuer")
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    no_redis = stack.gateway("gw-no-redis", stack.dir / "g2", issuer.url, dead_redis)
    status, body = get(no_redis.url + "/readyz")
    assert status == 503 and json.loads(body) == {
        "status": "unavailable",
        "issuer_directory": True,
        "spent_store": False,
    }
    ok = stack.gateway("gw-ok", stack.dir / "g3", issuer.url, redis_url)
    assert _status(ok.url + "/readyz") == 200
    assert _status(ok.internal + "/readyz") == 200


def test_node_ready_when_its_engine_answers(stack: Stack) -> None:
    """Alive at once; ready (what each gateway's health check asks) once the engine
    answers, whether or not every gateway took its registration: one gateway down must
    not make the node unready for the others."""
    issuer = stack.issuer("issuer", stack.dir / "issuer")
    engine_port = free_port()  # the engine comes later, on this port
    node = stack.node("node", f"http://127.0.0.1:{engine_port}", [_dead_url()], wait="/healthz")
    assert json.loads(get(node.url + "/healthz")[1]) == {"status": "ok", "engine": "not ready"}
    status, body = get(node.url + "/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["engine"] == "not ready" and doc["reason"], doc
    # The engine comes up, the gateway still does not answer: ready, 0 of 1 registered.
    stack.engine(port=engine_port)
    stack.wait("node", "/readyz", timeout=15)
    doc = json.loads(get(node.url + "/readyz")[1])
    assert doc == {
        "status": "ok", "engine": "ready", "registered": 0, "gateways": 1,
        "node_id": doc["node_id"],
        "load": {"inflight": 0, "waiting": 0, "kv_cache_usage": 0.0},
    }  # fmt: skip
    # A real gateway: the node registers, the gateway's check passes, it is listed.
    gw = stack.gateway("gateway", stack.dir / "gw", issuer.url)
    node2 = stack.node("node2", f"http://127.0.0.1:{engine_port}", [gw.internal])
    deadline = time.monotonic() + 15
    while json.loads(get(node2.url + "/readyz")[1]).get("registered") != 1:
        assert time.monotonic() < deadline, node2.output()
        time.sleep(0.1)


def test_relay_ready_once_started(stack: Stack) -> None:
    relay = stack.relay("relay", _dead_url())  # the gateway's health is not the relay's
    assert _status(relay.url + "/healthz") == 200
    assert _status(relay.url + "/readyz") == 200


# ------------------------------------------------------------------ SIGTERM drain


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("party", ["relay", "gateway", "node"])
async def test_sigterm_lets_a_streaming_answer_finish(stack: Stack, party: str) -> None:
    from tests.ops_support import chat

    issuer = stack.issuer("issuer", stack.dir / "issuer")
    gateway = stack.gateway("gateway", stack.dir / "gateway", issuer.url)
    relay = stack.relay("relay", gateway.url)
    engine = stack.engine()
    stack.node("node", engine.url, [gateway.internal])
    key = stack.account(stack.dir / "issuer", "drain", 100)
    policy = stack.release(gateway.url, issuer.url)
    config = stack.client_config("c", relay.url, issuer.url, key, policy)

    # GATE: the fake engine streams all words but the last, then waits for a release.
    task = asyncio.create_task(chat(config, "GATE please"))
    deadline = time.monotonic() + 30
    while not any(r["body"] for r in json.loads(get(engine.url + "/_control/received")[1])):
        assert time.monotonic() < deadline and not task.done(), "request never reached the engine"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)  # the first words are on their way back

    target = stack.services[party]
    os.killpg(target.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not _refuses_connections(target.url):  # stopped accepting new connections
        assert time.monotonic() < deadline, target.output()
        await asyncio.sleep(0.05)
    assert target.proc.poll() is None, "exited instead of draining"
    assert not task.done()

    req = urllib.request.Request(engine.url + "/_control/release", method="POST")
    await asyncio.to_thread(urllib.request.urlopen, req)
    answer = await asyncio.wait_for(task, 30)
    assert answer == "Hello from the fake engine."
    assert await asyncio.to_thread(target.proc.wait, 20) == 0, target.output()

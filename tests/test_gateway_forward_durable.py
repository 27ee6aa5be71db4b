"""The gateway sends no byte of a node's answer before the token's spent record is durable.

Issue 19 overlaps the spent store's fsync with the node's work: the gateway forwards as
soon as the store has decided a token is fresh (gateway/spent.py, ``Spend``). What keeps
a crash from letting a token be answered twice is this rule in gateway/forward.py: the
node's first byte waits for ``Accepted.settle``; if the record cannot be made durable the
client gets ``503 token store unavailable`` and nothing of the answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway.forward import Forwarder
from gateway.outer import Sink
from gateway.redeem import Accepted
from gateway.tally import Tally
from openpcc.wire import sealed


class _Conn:
    status = 200
    media_type = sealed.RESPONSE_MEDIA_TYPE
    complete = False

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.closed = False

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    def close(self) -> None:
        self.closed = True


class _Client:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.released: list[_Conn] = []

    async def post(self, *_: Any) -> _Conn:
        return self.conn

    def release(self, conn: _Conn) -> None:
        self.released.append(conn)


class _Sink(Sink):
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.answer: tuple[int, bytes] | None = None

    async def respond(self, status: int, headers: list[Any], body: bytes) -> None:
        self.log.append(f"respond {status}")
        self.answer = (status, body)

    async def start(self, status: int, headers: list[Any]) -> None:
        self.log.append(f"start {status}")

    async def write(self, data: bytes, *, more: bool = False) -> None:
        self.log.append(f"write {data.decode()}")

    async def end(self) -> None:
        self.log.append("end")


class _Redeemer:
    """What Accepted uses of gateway/redeem.py's Redeemer."""

    def __init__(self) -> None:
        self.tally = Tally(_Metrics())  # type: ignore[arg-type]
        self.failed: list[str] = []

    def store_failed(self, exc: BaseException) -> tuple[int, list[Any], bytes]:
        self.failed.append(type(exc).__name__)
        return 503, [], json.dumps({"detail": "token store unavailable"}).encode()


class _Trace:
    enabled = False

    def record(self, *_: Any) -> None:
        pass

    def cpu(self) -> float:
        return 0.0


class _Metrics:
    def inc(self, *_: Any, **__: Any) -> None:
        pass


def _forwarder(conn: _Conn) -> tuple[Forwarder, _Client]:
    fwd = Forwarder.__new__(Forwarder)  # only _forward's own collaborators are needed
    client = _Client(conn)
    fwd.client = client  # type: ignore[assignment]
    fwd.trace = _Trace()  # type: ignore[assignment]
    fwd.metrics = _Metrics()  # type: ignore[assignment]
    fwd.tally = Tally(_Metrics())  # type: ignore[arg-type]
    fwd.first_byte_timeout = 5.0
    fwd._keys = {}
    fwd.forward_secret = lambda reg: b"s" * 32
    return fwd, client


class _Reg:
    node_id = b"\x01" * 16
    url = "http://127.0.0.1:1"


class _Ex:
    t0 = 0.0


async def test_the_first_byte_waits_for_the_durable_record() -> None:
    log: list[str] = []
    durable: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    fwd, _ = _forwarder(_Conn([b"one", b"two"]))
    accepted = Accepted(_Redeemer(), durable)  # type: ignore[arg-type]
    task = asyncio.create_task(fwd._forward(_Ex(), _Reg(), b"env", _Sink(log), accepted))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert log == []  # the node has answered; the client has been sent nothing
    log.append("durable")
    durable.set_result(True)
    assert await task
    assert log == ["durable", "start 200", "write one", "write two", "end"]


async def test_a_record_that_cannot_be_made_durable_gets_503_and_no_answer() -> None:
    log: list[str] = []
    durable: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    durable.set_exception(OSError("disk I/O error"))
    conn = _Conn([b"one", b"two"])
    fwd, client = _forwarder(conn)
    redeemer = _Redeemer()
    accepted = Accepted(redeemer, durable)  # type: ignore[arg-type]
    sink = _Sink(log)
    assert await fwd._forward(_Ex(), _Reg(), b"env", sink, accepted)  # type: ignore[arg-type]
    assert log == ["respond 503"]
    assert sink.answer is not None and b"token store unavailable" in sink.answer[1]
    assert conn.closed and not client.released  # the node's answer is dropped, not pooled
    assert redeemer.failed == ["OSError"]

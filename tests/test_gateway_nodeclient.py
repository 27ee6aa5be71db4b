"""gateway/nodeclient.py: the gateway's HTTP/1.1 client for its nodes.

Against a scripted raw-socket node: the exact request bytes (no header of its own beyond
Host and Content-Length), each framing (length, chunked, until close, interim 100),
keep-alive reuse only after a cleanly ended answer, every malformed answer a NodeError,
a node that closes before answering NodeUnreachable, silence a NodeTimeout, and
back-pressure. Then a parser fuzz: any answer bytes, cut anywhere, end in a body or a
NodeError, never another exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import nodeclient
from gateway.nodeclient import NodeClient, NodeConnection, NodeError, NodeTimeout, NodeUnreachable
from openpcc.service import http1
from tests.fuzz_profiles import PARSER

LINES = b"Content-Type: application/openpcc-sealed-request\r\nOpenPCC-Forward: t=1, mac=00\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/openpcc-sealed-response\r\n"


class Node:
    """A raw TCP node: each connection reads one request at a time and plays the next
    scripted answer (bytes, or a callable that gets the writer)."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/base"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(writer)
                else:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node()
    n.server = await asyncio.start_server(n._serve, "127.0.0.1", 0)
    yield n
    n.server.close()


async def _body(conn: NodeConnection) -> bytes:
    out = b""
    while chunk := await conn.read():
        out += chunk
    return out


async def test_request_bytes_length_answer_and_reuse(node: Node) -> None:
    client = NodeClient(2.0, 5.0)
    node.answers = [OK + b"Content-Length: 5\r\n\r\nhello", OK + b"Content-Length: 2\r\n\r\nhi"]
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"ENVELOPE")
    assert (conn.status, conn.media_type, conn.complete) == (
        200, "application/openpcc-sealed-response", True
    )  # fmt: skip
    assert await _body(conn) == b"hello"
    client.release(conn)
    port = node.url.split(":")[2].split("/")[0]
    assert node.requests[0] == (
        b"POST /base/v1/sealed HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n"
        + LINES + b"Content-Length: 8\r\n\r\nENVELOPE"
    )  # fmt: skip
    conn2 = await client.post(node.url, b"/v1/sealed", LINES, b"E2")
    assert conn2 is conn and await _body(conn2) == b"hi"  # the same kept-alive connection
    client.release(conn2)
    assert node.connections == 1
    await client.close()


async def test_chunked_answer_streams_as_it_comes(node: Node) -> None:
    gate = asyncio.Event()

    async def answer(w: asyncio.StreamWriter) -> None:
        w.write(OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await gate.wait()
        w.write(b"6;ext=1\r\nsecond\r\n0\r\nTrailer: x\r\n\r\n")
        await w.drain()

    node.answers = [answer, OK + b"Content-Length: 0\r\n\r\n"]
    client = NodeClient(2.0, 5.0)
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert await conn.read() == b"first" and not conn.complete  # before the rest exists
    gate.set()
    assert await _body(conn) == b"second"
    client.release(conn)
    again = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert again is conn and await _body(again) == b""
    await client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        OK + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
        OK + b"Content-Length: 2\r\n\r\nokEXTRA",
        OK + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["http10", "connection-close", "extra-bytes", "both-framings"],
)
async def test_answers_that_end_the_connection_are_not_reused(node: Node, answer: bytes) -> None:
    node.answers = [answer, OK + b"Content-Length: 0\r\n\r\n"]
    client = NodeClient(2.0, 5.0)
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert await _body(conn) == b"ok"
    client.release(conn)
    again = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert again is not conn
    client.release(again)
    await client.close()


async def test_until_close_and_interim_answers(node: Node) -> None:
    async def until_close(w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"\r\nall of it")
        await w.drain()
        w.close()

    node.answers = [until_close]
    client = NodeClient(2.0, 5.0)
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert conn.status == 200 and await _body(conn) == b"all of it"
    assert not conn.reusable
    client.release(conn)
    await client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * http1.MAX_HEAD + b"\r\n\r\n",
    ],
    ids=[
        "status",
        "header",
        "stray-cr",
        "two-lengths",
        "negative",
        "coding",
        "chunk-size",
        "chunk-end",
        "upgrade",
        "huge-head",
    ],
)
async def test_malformed_answers_are_node_errors(node: Node, answer: bytes) -> None:
    node.answers = [answer]
    client = NodeClient(2.0, 5.0)
    with pytest.raises(NodeError):
        conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
        try:
            await _body(conn)
        finally:
            client.release(conn)
    await client.close()


async def test_closed_before_answering_is_unreachable_after_is_an_error(node: Node) -> None:
    async def close_now(w: asyncio.StreamWriter) -> None:
        w.close()

    async def close_mid_body(w: asyncio.StreamWriter) -> None:
        w.write(OK + b"Content-Length: 10\r\n\r\nhalf")
        await w.drain()
        w.close()

    node.answers = [close_now, close_mid_body]
    client = NodeClient(2.0, 5.0)
    with pytest.raises(NodeUnreachable):
        await client.post(node.url, b"/v1/sealed", LINES, b"x")
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert await conn.read() == b"half"
    with pytest.raises(NodeError) as err:
        await conn.read()
    assert not isinstance(err.value, NodeUnreachable)
    client.release(conn)
    await client.close()


async def test_refused_connection_and_silence(node: Node) -> None:
    client = NodeClient(2.0, 0.3)
    with pytest.raises(NodeUnreachable):
        await client.post("http://127.0.0.1:9/x", b"/v1/sealed", LINES, b"x")

    async def silent(w: asyncio.StreamWriter) -> None:
        w.write(OK + b"Content-Length: 10\r\n\r\nsome")
        await w.drain()
        await asyncio.sleep(2)

    node.answers = [silent]
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    assert await conn.read() == b"some"
    with pytest.raises(NodeTimeout):
        await conn.read()
    client.release(conn)
    await client.close()


async def test_a_slow_reader_pauses_the_node(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodeclient, "HIGH_WATER", 64 * 1024)
    size = 4 * 1024 * 1024

    async def big(w: asyncio.StreamWriter) -> None:
        w.write(OK + b"Content-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            w.write(b"z" * 65536)
            await w.drain()

    node.answers = [big]
    client = NodeClient(2.0, 5.0)
    conn = await client.post(node.url, b"/v1/sealed", LINES, b"x")
    await asyncio.sleep(0.3)  # the node writes while nobody reads
    assert conn._paused and conn._buffered < size
    assert len(await _body(conn)) == size
    client.release(conn)
    await client.close()


# -- the answer parser on arbitrary bytes ------------------------------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _valid() -> st.SearchStrategy[bytes]:
    body = st.binary(max_size=40)
    length = body.map(lambda b: OK + b"Content-Length: %d\r\n\r\n" % len(b) + b)
    chunked = st.lists(st.binary(min_size=1, max_size=9), max_size=4).map(
        lambda cs: OK + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in cs) + b"0\r\n\r\n"
    )  # fmt: skip
    return st.one_of(length, chunked)


def _mutate(data: bytes, where: int, junk: bytes) -> bytes:
    at = where % (len(data) + 1)
    return data[:at] + junk + data[at + len(junk) :]


@pytest.mark.fuzz
@PARSER
@given(
    st.one_of(
        st.binary(max_size=300),
        _valid(),
        st.tuples(_valid(), st.integers(0, 400), st.binary(min_size=1, max_size=6)).map(
            lambda t: _mutate(*t)
        ),
    ),
    st.lists(st.integers(1, 64), max_size=8),
    st.booleans(),
)
def test_fuzz_any_answer_bytes_end_in_a_body_or_a_node_error(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        conn = NodeConnection(loop, 5.0)
        conn.connection_made(_Transport())
        conn.send(b"request")
        feed: Callable[[], None]
        pieces, at = [], 0
        for n in cuts:
            pieces.append(data[at : at + n])
            at += n
        pieces.append(data[at:])

        def feed() -> None:
            for piece in pieces:
                if piece:
                    conn.data_received(piece)
            if eof or not conn.complete:
                conn.connection_lost(None)

        loop.call_soon(feed)
        try:
            await conn.head()
            await _body(conn)
        except NodeError:
            assert not conn.reusable
        conn.close()

    asyncio.run(run())

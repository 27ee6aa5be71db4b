"""A raw HTTP/1.1 client over a plain socket: exact headers, chunk-by-chunk control."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any


def open_request(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | None = None,
    timeout: float = 10.0,
) -> socket.socket:
    """Send the request head (exactly ``headers``, nothing added) and ``body`` if given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    sock.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
    return sock


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def end_chunks(sock: socket.socket) -> None:
    sock.sendall(b"0\r\n\r\n")


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    resp = http.client.HTTPResponse(sock, method="POST")
    resp.begin()
    return resp


def request(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | None = None,
    chunks: Iterable[bytes] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One whole exchange; returns (status, headers with lower-cased names, body)."""
    hdrs = list(headers)
    if body is not None:
        hdrs.append(("Content-Length", str(len(body))))
    if chunks is not None:
        hdrs.append(("Transfer-Encoding", "chunked"))
    sock = open_request(port, method, target, [("Host", "relay.test"), *hdrs], body)
    try:
        if chunks is not None:
            try:
                for chunk in chunks:
                    send_chunk(sock, chunk)
                end_chunks(sock)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the relay may answer (413) and close before we finish
        resp = read_response(sock)
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        sock.close()


class GatewayControl:
    """Reads the fake gateway's record directly (never through the relay)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def _post(self, path: str) -> None:
        urllib.request.urlopen(urllib.request.Request(self.base + path, method="POST")).read()

    def reset(self) -> None:
        self._post("/_control/reset")

    def release(self) -> None:
        self._post("/_control/release")

    def state(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(self.base + "/_control/state").read())

    def requests(self) -> list[dict[str, Any]]:
        return self.state()["requests"]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state()):
                return True
            time.sleep(0.02)
        return False

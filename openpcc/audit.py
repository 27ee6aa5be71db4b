"""Opt-in recording of exactly what a party received, for the privacy audit.

Off by default. When a service runs with ``--audit-log FILE`` (tests and ``openpcc
demo`` only), every request it handles is appended to FILE as one JSON line: the peer
address, method, path, headers and the body bytes it read. The privacy audit test and
the demo read these files to show each party's own view, not the client's memory of
it. Never enable it in production: by design it holds what the logs must not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

AUDIT_KEY = "openpcc.audit"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuditLog:
    def __init__(self, path: Path, party: str) -> None:
        self.path = path
        self.party = party
        self._lock = threading.Lock()

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
            record = _Record()
            request[AUDIT_KEY] = record
            try:
                return await handler(request)
            finally:
                self._write(request, record)

        return audit

    def _write(self, request: web.Request, record: _Record) -> None:
        line = {
            "party": self.party,
            "time": time.time(),
            "peer": request.remote,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_hex": bytes(record.body).hex(),
            "notes": record.notes,
        }
        with self._lock, self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


class _Record:
    __slots__ = ("body", "notes")

    def __init__(self) -> None:
        self.body = bytearray()
        self.notes: dict[str, object] = {}


def saw_body(request: web.Request, data: bytes) -> None:
    """Handlers call this with every body byte they read (a no-op unless auditing)."""
    record = request.get(AUDIT_KEY)
    if record is not None:
        record.body += data


def note(request: web.Request, key: str, value: object) -> None:
    """Record a decrypted value the party learned (e.g. the gateway's inner request)."""
    record = request.get(AUDIT_KEY)
    if record is not None:
        record.notes[key] = value


def read_audit(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Incremental Server-Sent Events parsing for OpenAI-style streams (sans-IO)."""

from __future__ import annotations

import json
from typing import Any

from openpcc.errors import DecodeError, LimitExceededError

DONE = object()


class SSEParser:
    """Feed bytes, get decoded ``data:`` payloads (JSON objects, or DONE for ``[DONE]``).

    The sans-IO contract of every decoder here: ``receive_data`` and ``end_of_input``
    both return the list of what completed.
    """

    def __init__(self, max_event: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._max = max_event

    def end_of_input(self) -> list[Any]:
        """An event cut off before its blank line is not dispatched (WHATWG HTML §9.2.6)."""
        self._buf.clear()
        return []

    def receive_data(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                if len(self._buf) > self._max:
                    raise LimitExceededError("server-sent event too large")
                return out
            raw = bytes(self._buf[:end])
            del self._buf[: end + 2]
            data_lines = [
                line[5:].lstrip(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")
            ]
            if not data_lines:
                continue
            payload = b"\n".join(data_lines)
            if payload == b"[DONE]":
                out.append(DONE)
                continue
            try:
                out.append(json.loads(payload))
            except ValueError as exc:
                raise DecodeError("stream event is not JSON") from exc

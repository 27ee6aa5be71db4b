"""One answer, unwrapped layer by layer: chunked OHTTP, the gateway's Binary HTTP stream,
and the node's sealed response (sans-IO, like every decoder it composes).

Each layer's ``receive_data`` and ``end_of_input`` return the list of what completed, and
this object passes both through the same path. That is the point: the final chunked-OHTTP
chunk may carry content (the draft allows it), and what it carries must reach the next
layer like any other chunk's. ``clients/js/src/unwrap.js`` is the same in JavaScript.
"""

from __future__ import annotations

from dataclasses import dataclass

from openpcc.errors import TruncatedError
from openpcc.wire import sealed
from openpcc.wire.bhttp_stream import ResponseStreamDecoder, StreamHead
from openpcc.wire.chunked import ChunkedResponseReceiver


@dataclass(frozen=True)
class GatewayHead:
    """The gateway's own status: 200 when the node's sealed answer follows."""

    status: int


@dataclass(frozen=True)
class GatewayBody:
    """Body of a gateway refusal (a problem document); never node data."""

    data: bytes


@dataclass(frozen=True)
class NodeHead:
    status: int
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class NodeData:
    data: bytes


Event = GatewayHead | GatewayBody | NodeHead | NodeData


class NodeTruncatedError(TruncatedError):
    """The outer layers ended cleanly, the node's authenticated end of stream did not come."""


class ResponseUnwrapper:
    def __init__(self, receiver: ChunkedResponseReceiver, opener: sealed.ResponseOpener) -> None:
        self._receiver = receiver
        self._stream = ResponseStreamDecoder()
        self._opener = opener
        self.gateway_status: int | None = None

    def receive_data(self, data: bytes) -> list[Event]:
        return self._outer(self._receiver.receive_data(data))

    def end_of_input(self) -> list[Event]:
        """The transport ended. TruncatedError if any layer is incomplete; the node layer's
        own end is required only when the gateway said 200 (NodeTruncatedError)."""
        events = self._outer(self._receiver.end_of_input())
        events += self._gateway(self._stream.end_of_input())
        if self.gateway_status == 200:
            try:
                events += self._node(self._opener.end_of_input())
            except TruncatedError as exc:
                raise NodeTruncatedError(
                    "the node's authenticated end of stream never arrived"
                ) from exc
        return events

    def _outer(self, plaintexts: list[bytes]) -> list[Event]:
        events: list[Event] = []
        for plain in plaintexts:
            events += self._gateway(self._stream.receive_data(plain))
        return events

    def _gateway(self, stream_events: list[object]) -> list[Event]:
        events: list[Event] = []
        for ev in stream_events:
            if isinstance(ev, StreamHead):
                self.gateway_status = ev.status
                events.append(GatewayHead(ev.status))
            elif isinstance(ev, bytes):
                if self.gateway_status == 200:
                    events += self._node(self._opener.receive_data(ev))
                else:
                    events.append(GatewayBody(ev))
        return events

    @staticmethod
    def _node(items: list[sealed.ResponseHead | bytes]) -> list[Event]:
        return [
            NodeHead(i.status, i.headers) if isinstance(i, sealed.ResponseHead) else NodeData(i)
            for i in items
        ]

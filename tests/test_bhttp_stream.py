"""Incremental BHTTP responses: byte-at-a-time parsing equals the one-shot decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.errors import OpenPCCError, StateError, TruncatedError
from openpcc.wire import bhttp
from openpcc.wire.bhttp_stream import (
    ResponseStreamDecoder,
    ResponseStreamEncoder,
    StreamEnd,
    StreamHead,
)
from tests.conftest import load_vector


def _encode(status: int, headers, chunks, trailers) -> bytes:
    enc = ResponseStreamEncoder()
    return enc.head(status, headers) + b"".join(enc.data(c) for c in chunks) + enc.end(trailers)


def test_rfc_indeterminate_response_vector_streams() -> None:
    ex = next(
        e
        for e in load_vector("bhttp/rfc9292_examples.json")["examples"]
        if e["decoded"]["framing_indicator"] == 3
    )
    data = bytes.fromhex(ex["bhttp"])
    dec = ResponseStreamDecoder()
    events = []
    for b in data:
        events += dec.receive_data(bytes([b]))
    events += dec.end_of_input()
    heads = [e for e in events if isinstance(e, StreamHead)]
    assert heads[-1].status == ex["decoded"]["status"]
    content = b"".join(e for e in events if isinstance(e, bytes))
    assert content == bytes.fromhex(ex["decoded"]["content_hex"])
    assert dec.complete


def test_each_chunk_is_surfaced_as_soon_as_it_is_complete() -> None:
    enc = ResponseStreamEncoder()
    dec = ResponseStreamDecoder()
    assert dec.receive_data(enc.head(200, [(b"content-type", b"text/event-stream")])) == [
        StreamHead(200, [(b"content-type", b"text/event-stream")])
    ]
    assert dec.receive_data(enc.data(b"data: 1\n\n")) == [b"data: 1\n\n"]
    assert dec.receive_data(enc.data(b"data: 2\n\n")) == [b"data: 2\n\n"]
    assert dec.receive_data(enc.end()) == [StreamEnd([])]
    with pytest.raises(StateError):
        enc.data(b"late")


def test_truncated_content_is_detected() -> None:
    data = _encode(200, [], [b"abc", b"def"], [])
    for cut in range(len(data) - 1):  # the last byte is the trailer terminator
        dec = ResponseStreamDecoder()
        dec.receive_data(data[:cut])
        with pytest.raises(TruncatedError):
            dec.end_of_input()


fields = st.lists(
    st.tuples(
        st.sampled_from([b"a", b"x-y", b"content-type"]),
        st.binary(max_size=10).map(lambda b: b.hex().encode()),
    ),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(200, 599),
    fields,
    st.lists(st.binary(min_size=1, max_size=50), max_size=6),
    fields,
    st.integers(1, 17),
)
def test_stream_round_trip_matches_one_shot_decoder(
    status, headers, chunks, trailers, step
) -> None:
    data = _encode(status, headers, chunks, trailers)
    one_shot = bhttp.decode_response(data)
    dec = ResponseStreamDecoder()
    events = []
    for i in range(0, len(data), step):
        events += dec.receive_data(data[i : i + step])
    events += dec.end_of_input()
    assert events[0] == StreamHead(one_shot.status, one_shot.headers)
    assert b"".join(e for e in events if isinstance(e, bytes)) == one_shot.content
    assert events[-1] == StreamEnd(one_shot.trailers)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_input_raises_only_typed_errors(data: bytes) -> None:
    dec = ResponseStreamDecoder()
    try:
        dec.receive_data(data)
        dec.end_of_input()
    except OpenPCCError:
        pass

"""The sealed-request layer against its project-generated vector, and hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.errors import DecryptError, OpenPCCError, TruncatedError, UnsupportedError
from openpcc.wire import bhttp, hpke, sealed
from tests.vectors.make_sealed import build

VECTOR = json.loads((Path(__file__).parent / "vectors" / "sealed_request_v1.json").read_text())
H = bytes.fromhex


def node(i: int) -> tuple[bytes, bytes, bytes]:
    return (
        H(VECTOR["node_ids"][i]),
        H(VECTOR["node_private_keys"][i]),
        H(VECTOR["node_public_keys"][i]),
    )


def test_implementation_reproduces_the_stored_vector() -> None:
    assert build() == VECTOR


@pytest.mark.parametrize("i", [0, 1, 2])
def test_every_candidate_opens_the_same_request(i: int) -> None:
    nid, sk, pk = node(i)
    opened = sealed.open_request(H(VECTOR["envelope"]), nid, sk, pk)
    assert opened.model == "tiny"
    req = bhttp.decode_request(opened.bhttp_request)
    assert req == bhttp.decode_request(H(VECTOR["bhttp_request"]))
    assert len(opened.bhttp_request) == 1024  # padded to the first bucket


def test_response_opens_incrementally_one_byte_at_a_time() -> None:
    envelope = H(VECTOR["envelope"])
    header = sealed.parse_envelope_header(envelope)
    assert header.model == "tiny" and header.context.hex() == VECTOR["context"]
    assert [c.node_id.hex() for c in header.candidates] == VECTOR["node_ids"]
    opener = sealed.ResponseOpener(
        H(VECTOR["data_key"]), H(VECTOR["request_nonce"]), header.context
    )
    stream = b"".join(H(p) for p in VECTOR["response_parts"])
    events: list[object] = []
    for b in stream:
        events += opener.receive_data(bytes([b]))
    opener.end_of_input()
    head = events[0]
    assert isinstance(head, sealed.ResponseHead) and head.status == 200
    assert head.headers == [(b"content-type", b"text/event-stream")]
    assert (
        b"".join(e for e in events[1:] if isinstance(e, bytes)).decode() == VECTOR["response_body"]
    )


def test_every_response_chunk_is_a_padding_bucket() -> None:
    for part in VECTOR["response_parts"][1:]:
        raw = H(part)
        assert len(raw) - 1 - 2 - 16 in sealed.RESPONSE_BUCKETS


def _opener() -> sealed.ResponseOpener:
    ctx = H(VECTOR["context"])
    return sealed.ResponseOpener(H(VECTOR["data_key"]), H(VECTOR["request_nonce"]), ctx)


def test_truncation_at_every_offset_is_detected() -> None:
    stream = b"".join(H(p) for p in VECTOR["response_parts"])
    for cut in range(len(stream)):
        opener = _opener()
        opener.receive_data(stream[:cut])
        with pytest.raises(TruncatedError):
            opener.end_of_input()


def test_dropped_or_reordered_chunks_fail() -> None:
    nonce_and_head, data, end = (H(p) for p in VECTOR["response_parts"])
    for stream in (nonce_and_head + end, nonce_and_head + end + data):
        with pytest.raises(OpenPCCError):
            opener = _opener()
            opener.receive_data(stream)
            opener.end_of_input()


def test_flipping_any_envelope_byte_never_yields_the_request() -> None:
    envelope = H(VECTOR["envelope"])
    header = sealed.parse_envelope_header(envelope)
    entry = sealed.NODE_ID_LEN + sealed.KEY_ID_LEN + 32 + sealed.WRAPPED_LEN
    first = header.length - 3 * entry
    # Other candidates' enc/wrapped key are theirs alone: node 0 never reads them.
    others = {p for i in (1, 2) for p in range(first + i * entry + 24, first + (i + 1) * entry)}
    nid, sk, pk = node(0)
    original = sealed.open_request(envelope, nid, sk, pk).bhttp_request
    for pos in range(len(envelope)):
        bad = bytearray(envelope)
        bad[pos] ^= 0x01
        if pos in others:
            assert sealed.open_request(bytes(bad), nid, sk, pk).bhttp_request == original
            continue
        with pytest.raises(OpenPCCError):
            sealed.open_request(bytes(bad), nid, sk, pk)


def test_gateway_cannot_drop_a_candidate_or_swap_the_model() -> None:
    envelope = H(VECTOR["envelope"])
    header = sealed.parse_envelope_header(envelope)
    # Rebuild the header with candidate 2 removed: node 0's unwrap must fail.
    fixed = envelope[: 7 + 16]
    m = header.model.encode()
    rebuilt = fixed + bytes([len(m)]) + m + bytes([2])
    for c in header.candidates[:2]:
        rebuilt += c.node_id + c.key_id + c.enc + c.wrapped_key
    rebuilt += envelope[header.length :]
    nid, sk, pk = node(0)
    with pytest.raises(DecryptError):
        sealed.open_request(rebuilt, nid, sk, pk)
    swapped = fixed + bytes([len(b"huge")]) + b"huge" + envelope[7 + 16 + 1 + len(m) :]
    with pytest.raises(DecryptError):
        sealed.open_request(swapped, nid, sk, pk)


def test_node_that_is_not_a_candidate_or_has_a_new_key_is_refused() -> None:
    envelope = H(VECTOR["envelope"])
    other = hpke.generate_key_pair()
    with pytest.raises(UnsupportedError):
        sealed.open_request(envelope, b"\x99" * 16, other.private_key, other.public_key)
    nid, _, _ = node(0)
    with pytest.raises(UnsupportedError):
        sealed.open_request(envelope, nid, other.private_key, other.public_key)


def test_round_trip_with_large_request_and_response() -> None:
    kp = hpke.generate_key_pair()
    nk = sealed.NodeKey(b"\x01" * 16, kp.public_key)
    body = bytes(range(256)) * 400  # ~100 KB: several request chunks
    request = bhttp.encode_request(bhttp.Request(b"POST", b"https", b"n", b"/x", [], body))
    sreq = sealed.seal_request([nk], "m", request)
    opened = sealed.open_request(sreq.envelope, nk.node_id, kp.private_key, kp.public_key)
    assert bhttp.decode_request(opened.bhttp_request).content == body
    answer = b"y" * 50_000
    stream = opened.sealer.head(200, []) + opened.sealer.data(answer) + opened.sealer.end()
    opener = sreq.response_opener()
    events = opener.receive_data(stream)
    opener.end_of_input()
    assert b"".join(e for e in events if isinstance(e, bytes)) == answer


def test_buckets() -> None:
    assert sealed.pad_bucket(1, sealed.REQUEST_BUCKETS) == 1024
    assert sealed.pad_bucket(1025, sealed.REQUEST_BUCKETS) == 4096
    assert sealed.pad_bucket(3 * 1048576 + 1, sealed.REQUEST_BUCKETS) == 4 * 1048576


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_envelopes_raise_only_typed_errors(data: bytes) -> None:
    nid, sk, pk = node(0)
    with pytest.raises(OpenPCCError):
        sealed.open_request(data, nid, sk, pk)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_mutated_responses_raise_only_typed_errors(junk: bytes, pos: int) -> None:
    stream = bytearray(b"".join(H(p) for p in VECTOR["response_parts"]))
    stream[pos % len(stream) : pos % len(stream) + len(junk)] = junk
    opener = _opener()
    try:
        opener.receive_data(bytes(stream))
        opener.end_of_input()
    except OpenPCCError:
        return
    assert bytes(stream) == b"".join(H(p) for p in VECTOR["response_parts"])

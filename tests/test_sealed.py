"""The sealed-request layer against its project-generated vectors (v1 X25519, v2 X-Wing),
and hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.errors import (
    DecryptError,
    EncodeError,
    OpenPCCError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire import bhttp, hpke, sealed
from tests.vectors.make_sealed import build, build_v2

VECTORS = {
    v: json.loads((Path(__file__).parent / "vectors" / f"sealed_request_v{v}.json").read_text())
    for v in (1, 2)
}
VECTOR = VECTORS[1]
H = bytes.fromhex
both = pytest.mark.parametrize("v", [1, 2], ids=["v1-x25519", "v2-xwing"])


def node(i: int, v: int = 1) -> tuple[bytes, bytes, bytes]:
    vec = VECTORS[v]
    return (
        H(vec["node_ids"][i]),
        H(vec["node_private_keys" if v == 1 else "node_seeds"][i]),
        H(vec["node_public_keys"][i]),
    )


def test_implementation_reproduces_the_stored_vector() -> None:
    assert build() == VECTOR


def test_implementation_reproduces_the_stored_v2_vector_around_its_encapsulations() -> None:
    """X-Wing encapsulation is random: with the stored enc ‖ wrapped keys spliced in,
    every other byte (header, context, request chunks, response) is recomputed equal."""
    v2 = VECTORS[2]
    assert build_v2([H(w) for w in v2["wraps"]]) == v2
    fresh = build_v2()  # fresh encapsulations: only the wraps differ
    assert fresh["wraps"] != v2["wraps"]
    assert {k: x for k, x in fresh.items() if k not in ("wraps", "envelope")} == {
        k: x for k, x in v2.items() if k not in ("wraps", "envelope")
    }


def test_v2_header_layout() -> None:
    envelope = H(VECTORS[2]["envelope"])
    assert envelope[0] == 2 and envelope[1:7] == bytes.fromhex("647a00010001")
    header = sealed.parse_envelope_header(envelope)
    assert header.version is sealed.V2 and header.kem_id == hpke.KEM_XWING
    assert [len(c.enc) for c in header.candidates] == [1120] * 3
    assert [c.key_id.hex() for c in header.candidates] == [
        sealed.key_id_for(H(pk)).hex() for pk in VECTORS[2]["node_public_keys"]
    ]
    assert header.length == 7 + 16 + 1 + 4 + 1 + 3 * (16 + 8 + 1120 + 32)


@both
@pytest.mark.parametrize("i", [0, 1, 2])
def test_every_candidate_opens_the_same_request(v: int, i: int) -> None:
    nid, sk, pk = node(i, v)
    opened = sealed.open_request(H(VECTORS[v]["envelope"]), nid, sk, pk)
    assert opened.model == "tiny"
    req = bhttp.decode_request(opened.bhttp_request)
    assert req == bhttp.decode_request(H(VECTORS[v]["bhttp_request"]))
    assert len(opened.bhttp_request) == 1024  # padded to the first bucket


@both
def test_response_opens_incrementally_one_byte_at_a_time(v: int) -> None:
    vec = VECTORS[v]
    envelope = H(vec["envelope"])
    header = sealed.parse_envelope_header(envelope)
    assert header.model == "tiny" and header.context.hex() == vec["context"]
    assert [c.node_id.hex() for c in header.candidates] == vec["node_ids"]
    opener = sealed.ResponseOpener(H(vec["data_key"]), H(vec["request_nonce"]), header.context)
    stream = b"".join(H(p) for p in vec["response_parts"])
    events: list[object] = []
    for b in stream:
        events += opener.receive_data(bytes([b]))
    opener.end_of_input()
    head = events[0]
    assert isinstance(head, sealed.ResponseHead) and head.status == 200
    assert head.headers == [(b"content-type", b"text/event-stream")]
    assert b"".join(e for e in events[1:] if isinstance(e, bytes)).decode() == vec["response_body"]


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


@both
def test_flipping_any_envelope_byte_never_yields_the_request(v: int) -> None:
    envelope = H(VECTORS[v]["envelope"])
    header = sealed.parse_envelope_header(envelope)
    entry = header.version.entry_len
    first = header.length - 3 * entry
    # Other candidates' enc/wrapped key are theirs alone: node 0 never reads them.
    others = {p for i in (1, 2) for p in range(first + i * entry + 24, first + (i + 1) * entry)}
    nid, sk, pk = node(0, v)
    original = sealed.open_request(envelope, nid, sk, pk).bhttp_request
    for pos in range(len(envelope)):
        bad = bytearray(envelope)
        bad[pos] ^= 0x01
        if pos in others:
            assert sealed.open_request(bytes(bad), nid, sk, pk).bhttp_request == original
            continue
        with pytest.raises(OpenPCCError):
            sealed.open_request(bytes(bad), nid, sk, pk)


@both
def test_gateway_cannot_drop_a_candidate_or_swap_the_model(v: int) -> None:
    envelope = H(VECTORS[v]["envelope"])
    header = sealed.parse_envelope_header(envelope)
    # Rebuild the header with candidate 2 removed: node 0's unwrap must fail.
    fixed = envelope[: 7 + 16]
    m = header.model.encode()
    rebuilt = fixed + bytes([len(m)]) + m + bytes([2])
    for c in header.candidates[:2]:
        rebuilt += c.node_id + c.key_id + c.enc + c.wrapped_key
    rebuilt += envelope[header.length :]
    nid, sk, pk = node(0, v)
    with pytest.raises(DecryptError):
        sealed.open_request(rebuilt, nid, sk, pk)
    swapped = fixed + bytes([len(b"huge")]) + b"huge" + envelope[7 + 16 + 1 + len(m) :]
    with pytest.raises(DecryptError):
        sealed.open_request(swapped, nid, sk, pk)


@both
def test_node_that_is_not_a_candidate_or_has_a_new_key_is_refused(v: int) -> None:
    envelope = H(VECTORS[v]["envelope"])
    other = hpke.generate_key_pair(kem_id=sealed.VERSIONS[v].suite.kem_id)
    with pytest.raises(UnsupportedError):
        sealed.open_request(envelope, b"\x99" * 16, other.private_key, other.public_key)
    nid, _, _ = node(0, v)
    with pytest.raises(UnsupportedError):
        sealed.open_request(envelope, nid, other.private_key, other.public_key)


def test_a_node_key_of_the_other_kem_does_not_open_it() -> None:
    """A node holding both keys must pass the one of the envelope's version."""
    for v, w in ((1, 2), (2, 1)):
        nid, _, _ = node(0, v)
        _, sk, pk = node(0, w)
        with pytest.raises(UnsupportedError):
            sealed.open_request(H(VECTORS[v]["envelope"]), nid, sk, pk)


def test_version_and_suite_bytes_are_bound() -> None:
    """Relabel a v2 envelope as v1 (or a v1 as v2, or change the KEM id): never parses
    as the other; a wrong suite for the version is refused before any key is used."""
    for v in (1, 2):
        env = bytearray(H(VECTORS[v]["envelope"]))
        env[0] = 3 - v
        with pytest.raises(OpenPCCError):
            sealed.parse_envelope_header(bytes(env))
        env = bytearray(H(VECTORS[v]["envelope"]))
        env[0] = 9
        with pytest.raises(UnsupportedError, match="version 9"):
            sealed.parse_envelope_header(bytes(env))


def test_one_envelope_never_mixes_kems() -> None:
    x = hpke.generate_key_pair()
    w = hpke.generate_key_pair(kem_id=hpke.KEM_XWING)
    with pytest.raises(EncodeError, match="one KEM"):
        sealed.seal_request(
            [
                sealed.NodeKey(b"\x01" * 16, x.public_key),
                sealed.NodeKey(b"\x02" * 16, w.public_key),
            ],
            "m",
            b"r",
        )
    with pytest.raises(EncodeError, match="32 or 1216"):
        sealed.NodeKey(b"\x01" * 16, b"\x02" * 33)


@pytest.mark.parametrize("kem", [hpke.KEM_DHKEM_X25519_HKDF_SHA256, hpke.KEM_XWING])
def test_round_trip_with_large_request_and_response(kem: int) -> None:
    kp = hpke.generate_key_pair(kem_id=kem)
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
    for v in (1, 2):
        nid, sk, pk = node(0, v)
        with pytest.raises(OpenPCCError):
            sealed.open_request(data, nid, sk, pk)
        with pytest.raises(OpenPCCError):  # a valid header prefix, then junk
            sealed.open_request(H(VECTORS[v]["envelope"])[:30] + data, nid, sk, pk)


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

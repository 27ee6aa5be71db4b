"""openpcc.wire.chunked: the draft-08 example byte for byte, streaming, truncation, tampering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.errors import (
    DecodeError,
    DecryptError,
    EncodeError,
    LimitExceededError,
    OpenPCCError,
    StateError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire import chunked, hpke
from openpcc.wire.chunked import (
    ChunkedRequestReceiver,
    ChunkedRequestSender,
)
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite
from openpcc.wire.varint import encode_varint
from tests.conftest import load_vector

V = load_vector("chunked-ohttp/draft-ietf-ohai-chunked-ohttp-08_example.json")
h = bytes.fromhex
KEYS = {V["key_id"]: h(V["gateway_private_key"])}
CONFIG = KeyConfig.parse(h(V["key_config"]))
REQ_CHUNKS = [h(c) for c in V["request_plaintext_chunks"]]
RES_CHUNKS = [h(c) for c in V["response_plaintext_chunks"]]
REQUEST = h(V["encapsulated_request"])
RESPONSE = h(V["encapsulated_response"])


def _vector_sender() -> ChunkedRequestSender:
    return ChunkedRequestSender(CONFIG, ephemeral=h(V["client_ephemeral_private_key"]))


def _seal_all(sender, chunks: list[bytes]) -> bytes:
    out = [sender.seal_chunk(c) for c in chunks[:-1]]
    out.append(sender.seal_chunk(chunks[-1], final=True))
    return b"".join(out)


def _feed(receiver, data: bytes, step: int | None = None) -> list[bytes]:
    """Feed ``data`` (in ``step``-sized pieces), then end the input."""
    got: list[bytes] = []
    step = step or max(1, len(data))
    for i in range(0, len(data), step):
        got += receiver.receive_data(data[i : i + step])
    # end_of_input lists the final chunk's plaintext when it has any; the vectors list
    # every chunk's, an empty final one too.
    got += receiver.end_of_input() or [b""]
    return got


def _new_config(aead_id: int = 1):
    kp = hpke.generate_key_pair()
    cfg = KeyConfig(3, 0x20, kp.public_key, (SymmetricSuite(1, aead_id),))
    return cfg, {3: kp.private_key}


# --------------------------------------------------------------------------- the example


def test_constants() -> None:
    assert V["media_types"]["request"] == chunked.MEDIA_TYPE_CHUNKED_REQUEST
    assert V["media_types"]["response"] == chunked.MEDIA_TYPE_CHUNKED_RESPONSE
    assert chunked.REQUEST_INFO_LABEL.decode() == V["hpke_info_ascii_prefix"]
    assert chunked.RESPONSE_EXPORT_LABEL.decode() == V["response_export_label_ascii"]
    assert chunked.FINAL_CHUNK_AAD.hex() == "66696e616c"
    assert chunked.DRAFT_VERSION == "draft-ietf-ohai-chunked-ohttp-08"


def test_request_byte_for_byte() -> None:
    s = _vector_sender()
    parts = V["encapsulated_request_parts"]
    header = s.header()
    assert header.hex() == parts["hdr"] + parts["enc"]
    framed = [s.seal_chunk(REQ_CHUNKS[0]), s.seal_chunk(REQ_CHUNKS[1])]
    framed.append(s.seal_chunk(REQ_CHUNKS[2], final=True))
    for got, want in zip(framed, parts["chunks"], strict=True):
        assert got.hex() == want["length_varint"] + want["sealed"]
    assert (header + b"".join(framed)).hex() == V["encapsulated_request"]
    assert len(REQUEST) == V["lengths_bytes"]["encapsulated_request"]
    assert s.finished


def test_header_is_prepended_when_not_taken() -> None:
    assert _seal_all(_vector_sender(), REQ_CHUNKS) == REQUEST


def test_gateway_opens_request_and_seals_response_byte_for_byte() -> None:
    r = ChunkedRequestReceiver(KEYS)
    assert _feed(r, REQUEST) == REQ_CHUNKS
    assert r.complete and r.header is not None and r.header.key_id == 1
    ctx = r.hpke_context
    assert ctx is not None
    assert ctx.export(chunked.RESPONSE_EXPORT_LABEL, 16).hex() == V["response_secret"]
    rs = r.response_sender(nonce=h(V["response_nonce"]))
    assert rs.header().hex() == V["encapsulated_response_parts"]["response_nonce"]
    framed = [rs.seal_chunk(RES_CHUNKS[0]), rs.seal_chunk(RES_CHUNKS[1])]
    framed.append(rs.seal_chunk(RES_CHUNKS[2], final=True))
    for got, want in zip(framed, V["encapsulated_response_parts"]["chunks"], strict=True):
        assert got.hex() == want["length_varint"] + want["sealed"]
    assert (h(V["response_nonce"]) + b"".join(framed)) == RESPONSE


def test_response_chunk_nonces() -> None:
    from openpcc.wire.ohttp import response_aead

    r = ChunkedRequestReceiver(KEYS)
    r.receive_data(REQUEST)
    assert r.hpke_context is not None
    _, base = response_aead(r.hpke_context, chunked.RESPONSE_EXPORT_LABEL, h(V["response_nonce"]))
    assert base.hex() == V["response_aead_nonce"]
    for i, want in enumerate(V["response_chunk_nonces"]):
        got = (int.from_bytes(base, "big") ^ i).to_bytes(12, "big")
        assert got.hex() == want


def test_client_opens_response() -> None:
    s = _vector_sender()
    _seal_all(s, REQ_CHUNKS)
    rr = s.response_receiver()
    assert _feed(rr, RESPONSE) == RES_CHUNKS
    assert rr.complete


@pytest.mark.parametrize("step", [1, 2, 3, 7, 40])
def test_any_split_gives_same_result(step: int) -> None:
    assert _feed(ChunkedRequestReceiver(KEYS), REQUEST, step) == REQ_CHUNKS
    s = _vector_sender()
    s.header()
    assert _feed(s.response_receiver(), RESPONSE, step) == RES_CHUNKS


def test_chunks_released_as_soon_as_complete() -> None:
    r = ChunkedRequestReceiver(KEYS)
    first_end = 39 + 1 + 28
    assert r.receive_data(REQUEST[: first_end - 1]) == []
    assert r.receive_data(REQUEST[first_end - 1 : first_end]) == [REQ_CHUNKS[0]]
    assert not r.final_started
    rest = r.receive_data(REQUEST[first_end:])
    assert rest == [REQ_CHUNKS[1]] and r.final_started and not r.complete
    assert r.end_of_input() == [] and r.complete


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("which", ["request", "response"])
def test_truncation_at_every_offset_is_detected(which: str) -> None:
    wire = REQUEST if which == "request" else RESPONSE
    for cut in range(len(wire)):
        if which == "request":
            r = ChunkedRequestReceiver(KEYS)
        else:
            s = _vector_sender()
            s.header()
            r = s.response_receiver()
        r.receive_data(wire[:cut])
        with pytest.raises((TruncatedError, DecryptError)):
            r.end_of_input()
        assert not r.complete, cut
        with pytest.raises(StateError):
            r.receive_data(b"x")


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=5),
    final=st.binary(max_size=50),
    data=st.data(),
)
def test_truncation_property(chunks: list[bytes], final: bytes, data: st.DataObject) -> None:
    cfg, keys = _new_config()
    wire = _seal_all(ChunkedRequestSender(cfg), [*chunks, final])
    cut = data.draw(st.integers(0, len(wire) - 1))
    r = ChunkedRequestReceiver(keys)
    r.receive_data(wire[:cut])
    with pytest.raises((TruncatedError, DecryptError)):
        r.end_of_input()
    assert not r.complete


# --------------------------------------------------------------------------- order, finality


def _request_frames(n: int = 3) -> tuple[bytes, list[bytes], dict]:
    cfg, keys = _new_config()
    s = ChunkedRequestSender(cfg)
    head = s.header()
    frames = [s.seal_chunk(bytes([i + 1]) * 5) for i in range(n)]
    frames.append(s.seal_chunk(b"end", final=True))
    return head, frames, keys


def test_reordered_request_chunks_fail() -> None:
    head, f, keys = _request_frames()
    r = ChunkedRequestReceiver(keys)
    with pytest.raises(DecryptError):
        r.receive_data(head + f[1] + f[0] + f[2] + f[3])


def test_duplicated_request_chunk_fails() -> None:
    head, f, keys = _request_frames()
    r = ChunkedRequestReceiver(keys)
    assert r.receive_data(head + f[0]) == [b"\x01" * 5]
    with pytest.raises(DecryptError):
        r.receive_data(f[0])


def test_dropped_final_chunk_is_truncation() -> None:
    head, f, keys = _request_frames()
    r = ChunkedRequestReceiver(keys)
    assert len(r.receive_data(head + b"".join(f[:-1]))) == 3
    with pytest.raises(TruncatedError):
        r.end_of_input()


def test_dropped_middle_chunk_fails() -> None:
    head, f, keys = _request_frames()
    with pytest.raises(DecryptError):
        _feed(ChunkedRequestReceiver(keys), head + f[0] + f[2] + f[3])


def _response_frames():
    cfg, keys = _new_config()
    s = ChunkedRequestSender(cfg)
    wire = _seal_all(s, [b"req"])
    r = ChunkedRequestReceiver(keys)
    _feed(r, wire)
    rs = r.response_sender()
    head = rs.header()
    frames = [rs.seal_chunk(bytes([i + 1]) * 4) for i in range(3)]
    frames.append(rs.seal_chunk(b"fin", final=True))
    return s, head, frames


def test_reordered_and_duplicated_response_chunks_fail() -> None:
    s, head, f = _response_frames()
    with pytest.raises(DecryptError):
        s.response_receiver().receive_data(head + f[1] + f[0])
    rr = s.response_receiver()
    assert rr.receive_data(head + f[0]) == [b"\x01" * 4]
    with pytest.raises(DecryptError):
        rr.receive_data(f[0])
    ok = s.response_receiver()
    assert _feed(ok, head + b"".join(f)) == [b"\x01" * 4, b"\x02" * 4, b"\x03" * 4, b"fin"]


def test_final_flag_flipped_fails() -> None:
    # A final chunk re-framed as non-final: opened with AAD "" -> fails.
    head, f, keys = _request_frames(1)
    sealed_final = f[-1][1:]
    r = ChunkedRequestReceiver(keys)
    with pytest.raises(DecryptError):
        r.receive_data(head + f[0] + encode_varint(len(sealed_final)) + sealed_final)
    # A non-final chunk re-framed as final: opened with AAD "final" -> fails.
    sealed_first = f[0][1:]
    r = ChunkedRequestReceiver(keys)
    r.receive_data(head + b"\x00" + sealed_first)
    with pytest.raises(DecryptError):
        r.end_of_input()
    # Same for responses.
    s, rhead, rf = _response_frames()
    with pytest.raises(DecryptError):
        s.response_receiver().receive_data(rhead + encode_varint(19) + rf[-1][1:])
    rr = s.response_receiver()
    rr.receive_data(rhead + b"\x00" + rf[0][1:])
    with pytest.raises(DecryptError):
        rr.end_of_input()


def test_non_minimal_varint_length_is_accepted() -> None:
    # The draft leaves the length encoding unauthenticated: any varint form is valid.
    head, f, keys = _request_frames(1)
    sealed = f[0][1:]
    long_form = (0x4000 | len(sealed)).to_bytes(2, "big")
    assert _feed(ChunkedRequestReceiver(keys), head + long_form + sealed + f[1]) == [
        b"\x01" * 5,
        b"end",
    ]


# --------------------------------------------------------------------------- sender rules


def test_empty_non_final_chunk_rejected_by_sender() -> None:
    s = _vector_sender()
    with pytest.raises(EncodeError):
        s.seal_chunk(b"")
    cfg, keys = _new_config()
    r = ChunkedRequestReceiver(keys)
    _feed(r, _seal_all(ChunkedRequestSender(cfg), [b"x"]))
    with pytest.raises(EncodeError):
        r.response_sender().seal_chunk(b"")


def test_empty_non_final_chunk_rejected_by_receiver() -> None:
    cfg, keys = _new_config()
    s = ChunkedRequestSender(cfg)
    head = s.header()
    empty = s.hpke_context.seal(b"", b"")  # what a buggy peer would send
    r = ChunkedRequestReceiver(keys)
    with pytest.raises(DecodeError):
        r.receive_data(head + encode_varint(len(empty)) + empty)
    r = ChunkedRequestReceiver(keys)
    with pytest.raises(DecodeError):
        r.receive_data(head + b"\x05abcde")


def test_nothing_after_final() -> None:
    s = _vector_sender()
    s.seal_chunk(b"x", final=True)
    with pytest.raises(StateError):
        s.seal_chunk(b"y")
    with pytest.raises(StateError):
        s.seal_chunk(b"", final=True)
    with pytest.raises(StateError):
        s.header()
    r = ChunkedRequestReceiver(KEYS)
    _feed(r, REQUEST)
    with pytest.raises(StateError):
        r.receive_data(b"")
    with pytest.raises(StateError):
        r.end_of_input()


def test_response_sender_needs_header() -> None:
    r = ChunkedRequestReceiver(KEYS)
    with pytest.raises(StateError):
        r.response_sender()
    r.receive_data(REQUEST[:39])
    r.response_sender()  # fine once hdr || enc is in, before the body


# --------------------------------------------------------------------------- limits, bad headers


def test_chunk_size_limits() -> None:
    cfg, keys = _new_config()
    s = ChunkedRequestSender(cfg, max_chunk_size=8)
    with pytest.raises(EncodeError):
        s.seal_chunk(b"x" * 9)
    big = ChunkedRequestSender(cfg)
    wire = big.header() + big.seal_chunk(b"x" * 9)
    with pytest.raises(LimitExceededError):
        ChunkedRequestReceiver(keys, max_chunk_size=8).receive_data(wire)
    # A huge announced length is refused before any buffering.
    r = ChunkedRequestReceiver(keys, max_chunk_size=8)
    with pytest.raises(LimitExceededError):
        r.receive_data(wire[:39] + encode_varint(1 << 40))
    # The final chunk is buffered to EOF, so it is bounded too.
    big2 = ChunkedRequestSender(cfg)
    wire2 = big2.header() + big2.seal_chunk(b"y" * 30, final=True)
    r2 = ChunkedRequestReceiver(keys, max_chunk_size=8)
    with pytest.raises(LimitExceededError):
        r2.receive_data(wire2)
    # Exactly at the limit is fine.
    ok = ChunkedRequestSender(cfg)
    wire3 = _seal_all(ok, [b"z" * 8, b"w" * 8])
    assert _feed(ChunkedRequestReceiver(keys, max_chunk_size=8), wire3, 1) == [b"z" * 8, b"w" * 8]


def test_response_counter_does_not_wrap() -> None:
    cfg, keys = _new_config()
    s = ChunkedRequestSender(cfg)
    r = ChunkedRequestReceiver(keys)
    r.receive_data(s.header())
    rs = r.response_sender()
    rs._counter = 1 << 96  # white-box: pretend 2^96 chunks were sent
    with pytest.raises(StateError):
        rs.seal_chunk(b"x")


def test_unknown_key_or_suite_in_header() -> None:
    with pytest.raises(UnsupportedError):
        ChunkedRequestReceiver({9: KEYS[1]}).receive_data(REQUEST[:7])
    bad = bytearray(REQUEST)
    bad[6] = 2  # AES-256-GCM: not implemented
    with pytest.raises(UnsupportedError):
        ChunkedRequestReceiver(KEYS).receive_data(bytes(bad))


def test_plain_ohttp_request_is_not_a_chunked_one() -> None:
    # Different HPKE info labels keep the two media types apart.
    from openpcc.wire import ohttp

    req, _ = ohttp.encapsulate_request(CONFIG, b"\x01hello")
    with pytest.raises(OpenPCCError):
        _feed(ChunkedRequestReceiver(KEYS), req)


# --------------------------------------------------------------------------- property tests


@settings(max_examples=60, deadline=None)
@given(
    aead=st.sampled_from([1, 3]),
    req_chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    req_final=st.binary(max_size=300),
    res_chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    res_final=st.binary(max_size=300),
    step=st.integers(1, 64),
)
def test_round_trip_random_chunkings(
    aead: int,
    req_chunks: list[bytes],
    req_final: bytes,
    res_chunks: list[bytes],
    res_final: bytes,
    step: int,
) -> None:
    cfg, keys = _new_config(aead)
    s = ChunkedRequestSender(cfg, aead_id=aead)
    wire = _seal_all(s, [*req_chunks, req_final])
    r = ChunkedRequestReceiver(keys)
    assert _feed(r, wire, step) == [*req_chunks, req_final]
    assert r.complete
    rs = r.response_sender()
    rwire = _seal_all(rs, [*res_chunks, res_final])
    assert (
        len(rwire)
        == (16 if aead == 1 else 32)
        + sum(len(encode_varint(len(c) + 16)) + len(c) + 16 for c in res_chunks)
        + 1
        + len(res_final)
        + 16
    )
    rr = s.response_receiver()
    assert _feed(rr, rwire, step) == [*res_chunks, res_final]
    assert rr.complete


def _hostile_stream(base: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)).map(
            lambda t: base[: t[0]] + bytes([base[t[0]] ^ t[1]]) + base[t[0] + 1 :]
        ),
        st.tuples(st.integers(0, len(base)), st.binary(max_size=30)).map(
            lambda t: base[: t[0]] + t[1] + base[t[0] :]
        ),
    )


@settings(max_examples=300, deadline=None)
@given(data=_hostile_stream(REQUEST), step=st.integers(1, 50))
def test_request_receiver_hostile(data: bytes, step: int) -> None:
    r = ChunkedRequestReceiver(KEYS, max_chunk_size=4096)
    try:
        _feed(r, data, step)
    except OpenPCCError:
        assert not r.complete


@settings(max_examples=300, deadline=None)
@given(data=_hostile_stream(RESPONSE), step=st.integers(1, 50))
def test_response_receiver_hostile(data: bytes, step: int) -> None:
    s = _vector_sender()
    s.header()
    r = s.response_receiver(max_chunk_size=4096)
    try:
        got = _feed(r, data, step)
    except OpenPCCError:
        assert not r.complete
    else:
        # Only an authentic stream may complete, and then with the real content.
        assert b"".join(got) == b"".join(RES_CHUNKS)

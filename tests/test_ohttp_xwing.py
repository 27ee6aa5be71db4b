"""The outer layer with X-Wing (KEM 0x647A): OHTTP (RFC 9458) and chunked OHTTP key configs,
round trips, sizes, tampering and truncation, and the binding of a key id to its KEM.

The X25519 paths are pinned byte for byte by the RFC 9458 and draft-08 vectors
(tests/test_ohttp.py, tests/test_chunked_ohttp.py), which this slice leaves unchanged.
X-Wing has no OHTTP vectors (pycryptodome has no deterministic X-Wing encapsulation);
its HPKE layer is pinned by the official vectors in tests/test_hpke_xwing.py, and the
OHTTP framing by interop with @hpke/hybridkem-x-wing (clients/js/test/ohttp_xwing.test.js).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import limits
from openpcc.errors import DecryptError, OpenPCCError, TruncatedError, UnsupportedError
from openpcc.wire import hpke, ohttp
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

XWING = hpke.KEM_XWING
X25519 = hpke.KEM_DHKEM_X25519_HKDF_SHA256
PREFIX = 7 + 1120  # hdr ‖ enc
SUITES = (SymmetricSuite(1, 1), SymmetricSuite(1, 3))


def _xwing(key_id: int = 5) -> tuple[KeyConfig, dict[int, hpke.PrivateKey]]:
    kp = hpke.generate_key_pair(kem_id=XWING)
    cfg = KeyConfig(key_id, XWING, kp.public_key, SUITES)
    return cfg, {key_id: hpke.load_private_key(kp.private_key, kem_id=XWING)}


CFG, KEYS = _xwing()


def test_key_config_sizes_and_lists() -> None:
    raw = CFG.encode()
    assert len(raw) == 3 + 1216 + 2 + 8
    assert raw[:3] == b"\x05\x64\x7a"
    assert KeyConfig.parse(raw) == CFG
    x25519 = KeyConfig(6, X25519, hpke.generate_key_pair().public_key, SUITES)
    body = ohttp.encode_key_configs([CFG, x25519])
    assert ohttp.parse_key_configs(body) == [CFG, x25519]
    for cut in range(0, len(raw), 97):
        with pytest.raises(TruncatedError):
            KeyConfig.parse(raw[:cut])
    assert ohttp.MAX_REQUEST_PREFIX_LEN == PREFIX


@pytest.mark.parametrize("aead_id", [1, 3])
def test_plain_round_trip(aead_id: int) -> None:
    req, client = ohttp.encapsulate_request(CFG, b"request", aead_id=aead_id)
    assert req[:7] == struct.pack(">BHHH", 5, XWING, 1, aead_id)
    assert len(req) == PREFIX + len(b"request") + 16
    bhttp, server = ohttp.decapsulate_request(KEYS, req)
    assert bhttp == b"request" and server.header.kem_id == XWING
    assert client.hpke_context.enc == req[7:PREFIX] == server.hpke_context.enc
    res = server.encapsulate_response(b"response")
    assert len(res) == ohttp.response_nonce_len(aead_id) + len(b"response") + 16
    assert client.decapsulate_response(res) == b"response"


def test_raw_seed_in_the_key_map_is_x25519_not_x_wing() -> None:
    """A raw 32-byte value in a key map is an X25519 key, as it always was: a request
    naming X-Wing for it is refused before any KEM work, never read as a seed."""
    kp = hpke.generate_key_pair(kem_id=XWING)
    req, _ = ohttp.encapsulate_request(KeyConfig(5, XWING, kp.public_key, SUITES), b"x")
    with pytest.raises(UnsupportedError):
        ohttp.decapsulate_request({5: kp.private_key}, req)


def test_a_key_id_is_one_kem() -> None:
    x_kp = hpke.generate_key_pair()
    mixed = {5: KEYS[5], 6: x_kp.private_key}
    x_req, _ = ohttp.encapsulate_request(KeyConfig(6, X25519, x_kp.public_key, SUITES), b"x")
    xw_req, _ = ohttp.encapsulate_request(CFG, b"x")
    # Each opens under its own id.
    assert ohttp.decapsulate_request(mixed, x_req)[0] == b"x"
    assert ohttp.decapsulate_request(mixed, xw_req)[0] == b"x"
    # A header naming the other KEM for a key id: UnsupportedError (the gateway's 400
    # "key configuration not acceptable"), plain and chunked alike.
    swapped = [
        struct.pack(">BHHH", 6, XWING, 1, 1) + xw_req[7:],  # X-Wing request, X25519 key id
        struct.pack(">BHHH", 5, X25519, 1, 1) + x_req[7:],  # X25519 request, X-Wing key id
    ]
    for req in swapped:
        with pytest.raises(UnsupportedError):
            ohttp.decapsulate_request(mixed, req)
        with pytest.raises(UnsupportedError):
            ChunkedRequestReceiver(mixed).receive_data(req[:7])


def test_tampering_and_truncation_plain() -> None:
    req, client = ohttp.encapsulate_request(CFG, b"secret request")
    # ML-KEM ciphertext (implicit rejection), the X25519 part of enc, the header (bound
    # through the HPKE info), the ciphertext: each fails to open.
    for i in (7, 500, 7 + 1087, 7 + 1088, PREFIX - 1, PREFIX + 3, len(req) - 1):
        bad = bytearray(req)
        bad[i] ^= 0x01
        with pytest.raises(DecryptError):
            ohttp.decapsulate_request(KEYS, bytes(bad))
    bad = bytearray(req)
    bad[6] = 3  # aead id 1 -> 3: another suite, same key
    with pytest.raises(DecryptError):
        ohttp.decapsulate_request(KEYS, bytes(bad))
    for cut in (0, 6, 7, 100, PREFIX - 1, PREFIX, PREFIX + 15):
        with pytest.raises(TruncatedError):
            ohttp.decapsulate_request(KEYS, req[:cut])
    _, server = ohttp.decapsulate_request(KEYS, req)
    res = server.encapsulate_response(b"answer")
    for i in (0, 15, 16, len(res) - 1):
        bad = bytearray(res)
        bad[i] ^= 0x80
        with pytest.raises(DecryptError):
            client.decapsulate_response(bytes(bad))


def _feed(receiver, data: bytes, step: int) -> list[bytes]:
    got: list[bytes] = []
    for i in range(0, len(data), step):
        got += receiver.receive_data(data[i : i + step])
    return got + receiver.end_of_input()


def test_chunked_round_trip_and_the_prefix_across_reads() -> None:
    s = ChunkedRequestSender(CFG)
    wire = s.seal_chunk(b"one") + s.seal_chunk(b"two" * 100) + s.seal_chunk(b"end", final=True)
    assert wire[:7] == struct.pack(">BHHH", 5, XWING, 1, 1)
    assert len(wire) == PREFIX + (1 + 3 + 16) + (2 + 300 + 16) + (1 + 3 + 16)
    # Nothing is opened before all of hdr ‖ enc is in: a prefix cut anywhere waits.
    r = ChunkedRequestReceiver(KEYS)
    assert r.receive_data(wire[: PREFIX - 1]) == [] and r.hpke_context is None
    assert r.receive_data(wire[PREFIX - 1 : PREFIX]) == [] and r.hpke_context is not None
    assert r.receive_data(wire[PREFIX:]) == [b"one", b"two" * 100]
    assert r.end_of_input() == [b"end"] and r.complete
    for step in (1, 13, 560, 1127, 4096):
        r = ChunkedRequestReceiver(KEYS)
        assert _feed(r, wire, step) == [b"one", b"two" * 100, b"end"]
    rs = r.response_sender()
    rwire = rs.seal_chunk(b"a") + rs.seal_chunk(b"", final=True)
    rr = s.response_receiver()
    assert _feed(rr, rwire, 7) == [b"a"] and rr.complete


def test_chunked_truncation_and_tampering() -> None:
    s = ChunkedRequestSender(CFG)
    wire = s.seal_chunk(b"one") + s.seal_chunk(b"end", final=True)
    for cut in (0, 7, 600, PREFIX, PREFIX + 1, PREFIX + 10, len(wire) - 1):
        r = ChunkedRequestReceiver(KEYS)
        with pytest.raises(OpenPCCError):
            _feed(r, wire[:cut], 97)
        assert not r.complete
    for i in (9, PREFIX - 1, PREFIX + 5, len(wire) - 2):
        bad = bytearray(wire)
        bad[i] ^= 0x04
        with pytest.raises(OpenPCCError):
            _feed(ChunkedRequestReceiver(KEYS), bytes(bad), 64)


@settings(max_examples=15, deadline=None)
@given(
    aead=st.sampled_from([1, 3]),
    chunks=st.lists(st.binary(min_size=1, max_size=200), max_size=4),
    final=st.binary(max_size=200),
    step=st.integers(1, 1500),
)
def test_chunked_round_trip_property(aead: int, chunks: list[bytes], final: bytes, step: int):
    s = ChunkedRequestSender(CFG, aead_id=aead)
    wire = b"".join(s.seal_chunk(c) for c in chunks) + s.seal_chunk(final, final=True)
    r = ChunkedRequestReceiver(KEYS)
    assert _feed(r, wire, step) == [*chunks, *([final] if final else [])]
    rs = r.response_sender()
    rr = s.response_receiver()
    assert _feed(rr, rs.seal_chunk(b"r") + rs.seal_chunk(final, final=True), step) == [
        b"r",
        *([final] if final else []),
    ]


def test_gateway_body_limit_counts_the_x_wing_prefix() -> None:
    """The largest inner request, in one final chunk (as the clients send it), behind the
    X-Wing prefix, fits the gateway's default outer body limit."""
    largest = PREFIX + 1 + limits.MAX_INNER_REQUEST + 16
    assert largest <= limits.DEFAULT_MAX_BODY
    assert limits.DEFAULT_MAX_BODY - largest < 128 * 1024  # and the slack stays small

"""Claims document: exact canonical encoding, strict parsing, binding and GPU nonce."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.attestation.claims import (
    CLAIMS_LABEL,
    Claims,
    check_claims,
    gpu_evidence_digest_for,
    gpu_nonce_for,
    report_data_for,
)
from openpcc.errors import DecodeError, EncodeError, LimitExceededError, OpenPCCError

T0 = 1_780_000_000  # 2026-05-28T20:26:40Z


def example(**kw) -> Claims:
    base = {
        "node_id": "node-a1",
        "hpke_public_key": bytes(range(32)),
        "tee": "sev-snp",
        "gpu_evidence_digest": b"\xaa" * 32,
        "model_digest": b"\xbb" * 32,
        "release_id": "openpcc-2026.11.0",
        "issued_at": T0,
        "expires_at": T0 + 3600,
        "signing_key": b"\xcc" * 32,
    }
    base.update(kw)
    return Claims(**base)


GOLDEN = (
    b'{"expires_at":1780003600,'
    b'"gpu_evidence_digest":"' + b"aa" * 32 + b'",'
    b'"hpke_public_key":"000102030405060708090a0b0c0d0e0f'
    b'101112131415161718191a1b1c1d1e1f",'
    b'"issued_at":1780000000,'
    b'"model_digest":"' + b"bb" * 32 + b'",'
    b'"node_id":"node-a1",'
    b'"release_id":"openpcc-2026.11.0",'
    b'"signing_key":"' + b"cc" * 32 + b'",'
    b'"tee":"sev-snp"}'
)


def test_golden_encoding_and_binding():
    c = example()
    assert c.encode() == GOLDEN
    assert Claims.decode(GOLDEN) == c
    assert CLAIMS_LABEL == b"OpenPCC attestation v1 claims\x00"
    rd = report_data_for(c)
    assert len(rd) == 64
    assert rd == hashlib.sha512(b"OpenPCC attestation v1 claims\x00" + GOLDEN).digest()


def test_no_gpu_is_null():
    c = example(gpu_evidence_digest=None)
    assert b'"gpu_evidence_digest":null' in c.encode()
    assert Claims.decode(c.encode()) == c


def test_gpu_nonce_ignores_only_the_gpu_digest():
    c = example()
    n = gpu_nonce_for(c)
    assert len(n) == 32
    assert gpu_nonce_for(c.with_gpu_evidence_digest(None)) == n
    assert gpu_nonce_for(c.with_gpu_evidence_digest(b"\x01" * 32)) == n
    without = json.dumps(
        {k: v for k, v in json.loads(GOLDEN).items() if k != "gpu_evidence_digest"},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    assert n == hashlib.sha256(b"OpenPCC attestation v1 gpu nonce\x00" + without).digest()
    for change in (
        {"node_id": "node-b"},
        {"hpke_public_key": b"\x01" * 32},
        {"tee": "tdx"},
        {"model_digest": b"\xcc" * 32},
        {"release_id": "other"},
        {"issued_at": T0 + 1},
        {"expires_at": T0 + 7200},
    ):
        assert gpu_nonce_for(replace(c, **change)) != n, change
        assert report_data_for(replace(c, **change)) != report_data_for(c)
    assert report_data_for(c.with_gpu_evidence_digest(None)) != report_data_for(c)


def test_gpu_evidence_digest():
    a, b = b"\x01\x02", b"\x03"
    d = gpu_evidence_digest_for([a, b])
    assert (
        d
        == hashlib.sha256(
            b"OpenPCC attestation v1 gpu evidence\x00" + b"\0\0\0\x02" + a + b"\0\0\0\x01" + b
        ).digest()
    )
    assert d != gpu_evidence_digest_for([a + b]) != gpu_evidence_digest_for([b, a])


@pytest.mark.parametrize(
    "bad",
    [
        GOLDEN.replace(b",", b", ", 1),  # whitespace
        b" " + GOLDEN,
        GOLDEN + b"\n",
        GOLDEN.replace(b'"tee":"sev-snp"', b'"tee":"sev-snp","tee":"sev-snp"'),  # duplicate
        GOLDEN.replace(b'"tee":"sev-snp"}', b'"tee":"sev-snp","extra":1}'),  # unknown
        GOLDEN.replace(b'"node_id":"node-a1",', b""),  # missing
        GOLDEN.replace(b"aa" * 32, b"AA" * 32),  # upper-case hex
        GOLDEN.replace(b"aa" * 32, b"aa" * 31),  # wrong length
        GOLDEN.replace(b"aa" * 32, b"a" * 63),  # odd length
        GOLDEN.replace(b"1780000000", b"1780000000.0"),  # float
        GOLDEN.replace(b"1780000000", b"1.78e9"),
        GOLDEN.replace(b"1780000000", b'"1780000000"'),  # string
        GOLDEN.replace(b"1780000000", b"true"),  # bool
        GOLDEN.replace(b"1780000000", b"-1"),
        GOLDEN.replace(b"1780000000", b"NaN"),
        GOLDEN.replace(b"1780000000", b"9" * 5000),
        GOLDEN.replace(b'"sev-snp"', b'"sgx"'),  # unknown TEE
        GOLDEN.replace(b'"node-a1"', b'"node a1"'),  # not an id
        GOLDEN.replace(b'"node-a1"', b'"n\\u00f6de"'),
        GOLDEN.replace(b'"node-a1"', '"nöde"'.encode()),
        GOLDEN.replace(b'"node-a1"', b'"node\\u002da1"'),  # escaped but same value
        GOLDEN.replace(b'"node-a1"', b"null"),
        b"[]",
        b"null",
        b"",
        b"{" * 10000,
        b"[" * 3000,  # deep nesting: RecursionError inside json
        b"\xff\xfe",
    ],
)
def test_strict_decode_rejects(bad):
    with pytest.raises(DecodeError):
        Claims.decode(bad)


def test_oversized_claims():
    with pytest.raises(LimitExceededError):
        Claims.decode(b" " * 5000)


def test_constructor_validates():
    with pytest.raises(EncodeError):
        example(hpke_public_key=b"\0" * 31)
    with pytest.raises(EncodeError):
        example(issued_at=True)
    with pytest.raises(EncodeError):
        example(release_id="")


def test_check_claims_window_and_lifetime():
    c = example()
    inside = datetime.fromtimestamp(T0 + 60, UTC)
    assert all(ch.ok for ch in check_claims(c, inside))
    expired = check_claims(c, datetime.fromtimestamp(T0 + 3600, UTC))
    assert [ch.name for ch in expired if not ch.ok] == ["claims_window"]
    assert "expired" in expired[0].detail
    early = datetime.fromtimestamp(T0 - 600, UTC)
    assert not check_claims(c, early)[0].ok
    skewed = datetime.fromtimestamp(T0 - 120, UTC)  # inside the 5-minute skew
    assert check_claims(c, skewed)[0].ok
    long = example(expires_at=T0 + 2 * 86400)
    assert [ch.name for ch in check_claims(long, inside) if not ch.ok] == ["claims_lifetime"]
    assert all(ch.ok for ch in check_claims(long, inside, max_lifetime=timedelta(days=3)))
    backwards = example(expires_at=T0)
    assert not check_claims(backwards, datetime.fromtimestamp(T0 - 1, UTC))[1].ok
    with pytest.raises(ValueError):
        check_claims(c, datetime(2026, 1, 1))


_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,20}", fullmatch=True)
_claims = st.builds(
    Claims,
    node_id=_ids,
    hpke_public_key=st.binary(min_size=32, max_size=32),
    tee=st.sampled_from(["sev-snp", "tdx", "simulated-snp"]),
    gpu_evidence_digest=st.none() | st.binary(min_size=32, max_size=32),
    model_digest=st.binary(min_size=32, max_size=32),
    release_id=_ids,
    issued_at=st.integers(0, 2**53 - 1),
    expires_at=st.integers(0, 2**53 - 1),
    signing_key=st.binary(min_size=32, max_size=32),
)


@settings(max_examples=200)
@given(_claims)
def test_roundtrip(c):
    assert Claims.decode(c.encode()) == c


@settings(max_examples=300)
@given(_claims, st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_mutated_claims_raise_only_openpcc_errors(c, edits):
    raw = bytearray(c.encode())
    for off, val in edits:
        raw[off % len(raw)] = val
    try:
        d = Claims.decode(bytes(raw))
    except OpenPCCError:
        return
    assert d.encode() == bytes(raw)


@settings(max_examples=300)
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_random_claims_bytes(data):
    with contextlib.suppress(OpenPCCError):
        Claims.decode(data)


# --- the optional X-Wing key (sealed requests v2) ------------------------------------------

PQ = bytes(range(256)) * 4 + bytes(192)  # 1216 bytes


def test_pq_key_is_optional_absent_not_null_and_keeps_old_bytes():
    """Claims without an X-Wing key keep the exact bytes they had before the field
    existed (so their REPORT_DATA is unchanged); with one, it is one more sorted key."""
    assert example().encode() == GOLDEN and example().pq_public_key is None
    c = example(pq_public_key=PQ)
    data = c.encode()
    assert b'"pq_public_key":"' + PQ.hex().encode() + b'"' in data
    assert data.index(b'"node_id"') < data.index(b'"pq_public_key"') < data.index(b'"release_id"')
    assert Claims.decode(data) == c
    assert len(data) < 4096
    assert report_data_for(c) != report_data_for(example())
    assert gpu_nonce_for(c) != gpu_nonce_for(example())  # the GPU nonce commits to it too
    with pytest.raises(DecodeError):  # null is not a spelling of "absent"
        Claims.decode(GOLDEN.replace(b'"release_id"', b'"pq_public_key":null,"release_id"'))
    with pytest.raises(DecodeError):
        Claims.decode(data.replace(PQ.hex().encode(), PQ[:-1].hex().encode()))
    with pytest.raises(EncodeError):
        example(pq_public_key=b"\x01" * 32)

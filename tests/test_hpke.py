"""openpcc.wire.hpke against the official RFC 9180 vectors, plus error mapping."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.errors import DecodeError, DecryptError, EncodeError, StateError, UnsupportedError
from openpcc.wire import hpke
from tests.conftest import load_vector

VECTORS = load_vector("hpke/rfc9180_x25519_hkdfsha256_base_aes128gcm_chacha20poly1305.json")
IDS = [f"aead{v['aead_id']}" for v in VECTORS]
h = bytes.fromhex


def _suite(v: dict) -> hpke.Suite:
    return hpke.Suite(v["kem_id"], v["kdf_id"], v["aead_id"])


def test_vector_file_has_both_suites() -> None:
    assert sorted(v["aead_id"] for v in VECTORS) == [1, 3]
    for v in VECTORS:
        assert (v["mode"], v["kem_id"], v["kdf_id"]) == (0, 0x20, 1)
        assert len(v["encryptions"]) == 257


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_derive_key_pair(v: dict) -> None:
    s = _suite(v)
    r = hpke.derive_key_pair(h(v["ikmR"]), suite=s)
    assert (r.private_key.hex(), r.public_key.hex()) == (v["skRm"], v["pkRm"])
    e = hpke.derive_key_pair(h(v["ikmE"]), suite=s)
    assert (e.private_key.hex(), e.public_key.hex()) == (v["skEm"], v["pkEm"])
    assert hpke.public_key_from_private(h(v["skRm"])) == h(v["pkRm"])


@pytest.mark.parametrize("v", VECTORS, ids=IDS)
def test_seal_open_export(v: dict) -> None:
    s = _suite(v)
    info = h(v["info"])
    sender = hpke.setup_sender(h(v["pkRm"]), info, suite=s, ephemeral=h(v["skEm"]))
    assert sender.enc.hex() == v["enc"] == v["pkEm"]
    receiver = hpke.setup_receiver(h(v["skRm"]), sender.enc, info, suite=s)
    for seq, e in enumerate(v["encryptions"]):
        assert sender.seq == receiver.seq == seq
        ct = sender.seal(h(e["pt"]), h(e["aad"]))
        assert ct.hex() == e["ct"], f"seal #{seq}"
        assert receiver.open(ct, h(e["aad"])).hex() == e["pt"], f"open #{seq}"
    for x in v["exports"]:
        for ctx in (sender, receiver):
            assert ctx.export(h(x["exporter_context"]), x["L"]).hex() == x["exported_value"]


def test_suite_params() -> None:
    assert (hpke.aead_nk(1), hpke.aead_nn(1), hpke.aead_nt(1)) == (16, 12, 16)
    assert (hpke.aead_nk(3), hpke.aead_nn(3), hpke.aead_nt(3)) == (32, 12, 16)
    assert hpke.kdf_nh(1) == 32 and hpke.kem_nenc(0x20) == hpke.kem_npk(0x20) == 32
    for bad in ((0x10, 1, 1), (0x20, 2, 1), (0x20, 1, 2), (0x20, 1, 0xFFFF)):
        with pytest.raises(UnsupportedError):
            hpke.Suite(*bad)
    with pytest.raises(UnsupportedError):
        hpke.aead_nk(7)


def test_generated_keys_round_trip() -> None:
    kp = hpke.generate_key_pair()
    assert len(kp.private_key) == len(kp.public_key) == 32
    assert kp.private_key.hex() not in repr(kp)
    s = hpke.setup_sender(kp.public_key, b"info")
    r = hpke.setup_receiver(kp.private_key, s.enc, b"info")
    assert r.open(s.seal(b"hello", b"a"), b"a") == b"hello"
    assert s.export(b"x", 32) == r.export(b"x", 32)


def test_wrong_info_or_aad_is_decrypt_error() -> None:
    kp = hpke.generate_key_pair()
    s = hpke.setup_sender(kp.public_key, b"info")
    ct = s.seal(b"pt", b"aad")
    with pytest.raises(DecryptError):
        hpke.setup_receiver(kp.private_key, s.enc, b"other").open(ct, b"aad")
    with pytest.raises(DecryptError):
        hpke.setup_receiver(kp.private_key, s.enc, b"info").open(ct, b"bad")


def test_failed_open_poisons_context() -> None:
    # pyhpke advances its nonce even when open fails; we refuse further use instead
    # of silently desynchronising.
    kp = hpke.generate_key_pair()
    s = hpke.setup_sender(kp.public_key, b"")
    c1 = s.seal(b"one")
    r = hpke.setup_receiver(kp.private_key, s.enc, b"")
    with pytest.raises(DecryptError):
        r.open(c1[:-1] + bytes([c1[-1] ^ 1]))
    with pytest.raises(StateError):
        r.open(c1)


def test_message_limit_is_enforced() -> None:
    kp = hpke.generate_key_pair()
    s = hpke.setup_sender(kp.public_key, b"")
    s._seq = (1 << 96) - 1  # white-box: jump to the RFC 9180 limit
    with pytest.raises(StateError):
        s.seal(b"x")


def test_bad_keys_and_enc() -> None:
    kp = hpke.generate_key_pair()
    with pytest.raises(DecodeError):
        hpke.load_public_key(b"\x00" * 31)
    with pytest.raises(DecodeError):
        hpke.load_private_key(b"\x00" * 33)
    with pytest.raises(DecodeError):
        hpke.setup_receiver(kp.private_key, b"\x01" * 31, b"")
    # A low-order point gives an all-zero DH output, which X25519 refuses.
    with pytest.raises(DecryptError):
        hpke.setup_receiver(kp.private_key, b"\x00" * 32, b"")
    with pytest.raises(DecodeError):
        hpke.setup_sender(b"\x00" * 32, b"")
    with pytest.raises(EncodeError):
        hpke.setup_sender(kp.public_key, b"").export(b"", 255 * 32 + 1)
    with pytest.raises(EncodeError):
        hpke.derive_key_pair(b"short")


@settings(max_examples=50, deadline=None)
@given(enc=st.binary(max_size=40), ct=st.binary(max_size=64), aead=st.sampled_from([1, 3]))
def test_random_input_raises_only_openpcc_errors(enc: bytes, ct: bytes, aead: int) -> None:
    kp = hpke.generate_key_pair()
    s = hpke.Suite(aead_id=aead)
    with contextlib.suppress(DecodeError, DecryptError):
        hpke.setup_receiver(kp.private_key, enc, b"", suite=s).open(ct)

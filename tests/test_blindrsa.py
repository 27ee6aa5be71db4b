"""RFC 9474 blind RSA: the four Appendix A vectors, then properties and error paths."""

from __future__ import annotations

import gmpy2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openpcc.errors import DecodeError, EncodeError, VerificationError
from openpcc.privacypass import blindrsa
from openpcc.privacypass.blindrsa import VARIANTS
from tests.conftest import load_vector

VECTORS = load_vector("blind-rsa/rfc9474_appendix_a.json")["vectors"]


def _h(v: dict, k: str) -> bytes:
    return bytes.fromhex(v[k])


def _i(v: dict, k: str) -> int:
    return int(v[k], 16)


def _key(v: dict) -> blindrsa.PrivateKey:
    p, q, n, e, d = (_i(v, k) for k in ("p", "q", "n", "e", "d"))
    assert p * q == n
    nums = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, n),
    )
    return blindrsa.PrivateKey(nums.private_key())


@pytest.fixture(scope="module")
def key2048() -> blindrsa.PrivateKey:
    return blindrsa.PrivateKey.generate(2048)


def test_four_named_variants() -> None:
    assert set(VARIANTS) == {v["name"] for v in VECTORS}
    assert len(VECTORS) == 4


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_rfc9474_vector(v: dict) -> None:
    sk = _key(v)
    pk = sk.public_key
    variant = VARIANTS[v["name"]]
    assert variant.salt_len == v["salt_length"]
    msg_prefix = _h(v, "msg_prefix") or None
    prepared = blindrsa.prepare(_h(v, "msg"), variant, prefix=msg_prefix)
    assert prepared == _h(v, "prepared_msg")
    encoded = blindrsa.emsa_pss_encode(prepared, pk.modulus_bits - 1, _h(v, "salt"))
    assert encoded == _h(v, "encoded_msg")
    blinded, inv = blindrsa.blind(
        pk, prepared, variant, r=_h(v, "blind_r_derived"), salt=_h(v, "salt")
    )
    assert blinded == _h(v, "blinded_msg")
    assert inv == _h(v, "inv")
    blind_sig = blindrsa.blind_sign(sk, blinded)
    assert blind_sig == _h(v, "blind_sig")
    sig = blindrsa.finalize(pk, prepared, blind_sig, inv, variant)
    assert sig == _h(v, "sig")
    blindrsa.verify(pk, prepared, sig, variant)
    # and independently, as standard RSASSA-PSS by cryptography
    pk.key.verify(
        sig,
        prepared,
        padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=v["salt_length"]),
        hashes.SHA384(),
    )


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_rfc9474_vector_r_as_int(v: dict) -> None:
    pk = _key(v).public_key
    blinded, inv = blindrsa.blind(
        pk,
        _h(v, "prepared_msg"),
        VARIANTS[v["name"]],
        r=_i(v, "blind_r_derived"),
        salt=_h(v, "salt"),
    )
    assert (blinded, inv) == (_h(v, "blinded_msg"), _h(v, "inv"))


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=lambda v: v.name)
def test_round_trip_random(key2048: blindrsa.PrivateKey, variant: blindrsa.BlindRSAVariant) -> None:
    pk = key2048.public_key
    msg = blindrsa.prepare(b"hello blind world", variant)
    assert len(msg) == 17 + (32 if variant.randomized else 0)
    blinded, inv = blindrsa.blind(pk, msg, variant)
    sig = blindrsa.finalize(pk, msg, blindrsa.blind_sign(key2048, blinded), inv, variant)
    blindrsa.verify(pk, msg, sig, variant)
    blindrsa.verify(pk.key, msg, sig, variant)  # raw cryptography key accepted too
    with pytest.raises(VerificationError):
        blindrsa.verify(pk, msg + b"x", sig, variant)


def test_blinding_is_randomized(key2048: blindrsa.PrivateKey) -> None:
    v = blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC
    a, _ = blindrsa.blind(key2048.public_key, b"m", v)
    b, _ = blindrsa.blind(key2048.public_key, b"m", v)
    assert a != b


def test_pss_signature_does_not_verify_as_psszero(key2048: blindrsa.PrivateKey) -> None:
    pk = key2048.public_key
    v = blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC
    blinded, inv = blindrsa.blind(pk, b"m", v)
    sig = blindrsa.finalize(pk, b"m", blindrsa.blind_sign(key2048, blinded), inv, v)
    with pytest.raises(VerificationError):
        blindrsa.verify(pk, b"m", sig, blindrsa.RSABSSA_SHA384_PSSZERO_DETERMINISTIC)


def test_finalize_rejects_wrong_signature(key2048: blindrsa.PrivateKey) -> None:
    pk = key2048.public_key
    v = blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC
    _blinded, inv = blindrsa.blind(pk, b"m", v)
    other, _ = blindrsa.blind(pk, b"other", v)
    with pytest.raises(VerificationError):
        blindrsa.finalize(pk, b"m", blindrsa.blind_sign(key2048, other), inv, v)
    with pytest.raises(DecodeError):
        blindrsa.finalize(pk, b"m", b"\x01" * 10, inv, v)
    with pytest.raises(VerificationError):
        blindrsa.verify(pk, b"m", b"\x00" * 255, v)


def test_blind_sign_input_checks(key2048: blindrsa.PrivateKey) -> None:
    k = key2048.public_key.modulus_len
    with pytest.raises(DecodeError):
        blindrsa.blind_sign(key2048, b"\x00" * (k - 1))
    with pytest.raises(DecodeError):  # m >= n
        blindrsa.blind_sign(key2048, b"\xff" * k)
    n = key2048.public_key.n
    with pytest.raises(DecodeError):
        blindrsa.blind_sign(key2048, n.to_bytes(k, "big"))
    assert blindrsa.blind_sign(key2048, (n - 1).to_bytes(k, "big"))


def test_blind_sign_fault_check(key2048: blindrsa.PrivateKey, monkeypatch) -> None:
    """A faulty CRT half must never leave the function (Bellcore attack)."""
    real = blindrsa._rsasp1_crt
    monkeypatch.setattr(blindrsa, "_rsasp1_crt", lambda sk, m: real(sk, m) + 1)
    blinded, _ = blindrsa.blind(key2048.public_key, b"m", blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC)
    with pytest.raises(VerificationError, match="fault"):
        blindrsa.blind_sign(key2048, blinded)


def test_blind_sign_matches_textbook_rsa(key2048: blindrsa.PrivateKey) -> None:
    nums = key2048.key.private_numbers()
    n = nums.public_numbers.n
    m = 0x1234567890ABCDEF << 1000
    sig = blindrsa.blind_sign(key2048, m.to_bytes(256, "big"))
    assert int.from_bytes(sig, "big") == pow(m, nums.d, n)


def test_blind_sign_accepts_raw_cryptography_key(key2048: blindrsa.PrivateKey) -> None:
    m = (12345).to_bytes(256, "big")
    assert blindrsa.blind_sign(key2048.key, m) == blindrsa.blind_sign(key2048, m)


def test_prepare_and_blind_argument_errors(key2048: blindrsa.PrivateKey) -> None:
    pk = key2048.public_key
    det = blindrsa.RSABSSA_SHA384_PSS_DETERMINISTIC
    rnd = blindrsa.RSABSSA_SHA384_PSS_RANDOMIZED
    with pytest.raises(EncodeError):
        blindrsa.prepare(b"m", det, prefix=b"\x00" * 32)
    with pytest.raises(EncodeError):
        blindrsa.prepare(b"m", rnd, prefix=b"\x00" * 31)
    assert blindrsa.prepare(b"m", det) == b"m"
    with pytest.raises(EncodeError):
        blindrsa.blind(pk, b"m", det, salt=b"\x00" * 47)
    with pytest.raises(EncodeError):
        blindrsa.blind(pk, b"m", blindrsa.RSABSSA_SHA384_PSSZERO_DETERMINISTIC, salt=b"\x00")
    with pytest.raises(EncodeError):
        blindrsa.blind(pk, b"m", det, r=0)
    with pytest.raises(EncodeError):
        blindrsa.blind(pk, b"m", det, r=pk.n)
    p = key2048.key.private_numbers().p
    with pytest.raises(EncodeError, match="blinding error"):
        blindrsa.blind(pk, b"m", det, r=p)


def test_emsa_pss_encode_too_small_modulus() -> None:
    with pytest.raises(EncodeError):
        blindrsa.emsa_pss_encode(b"m", 8 * 97, b"\x00" * 48)


def test_emsa_pss_encode_matches_openssl_pss(key2048: blindrsa.PrivateKey) -> None:
    """Recover EM from an OpenSSL PSS signature, pull out its salt, re-encode: equal."""
    pk = key2048.public_key
    msg = b"cross-check"
    sig = key2048.key.sign(
        msg, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384()
    )
    em = pow(int.from_bytes(sig, "big"), pk.e, pk.n).to_bytes(pk.modulus_len, "big")
    h = em[-49:-1]
    db = bytes(a ^ b for a, b in zip(em[:-49], blindrsa._mgf1_sha384(h, len(em) - 49), strict=True))
    salt = db[-48:]
    assert blindrsa.emsa_pss_encode(msg, pk.modulus_bits - 1, salt) == em


def test_crt_values_consistent(key2048: blindrsa.PrivateKey) -> None:
    assert key2048._p * key2048._q == key2048._n
    assert (key2048._qinv * key2048._q) % key2048._p == 1
    assert gmpy2.is_prime(key2048._p)


def test_key_wrappers() -> None:
    with pytest.raises(EncodeError):
        blindrsa.PublicKey("nope")  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        blindrsa.PublicKey.from_der(b"\x30\x00")
    with pytest.raises(DecodeError):
        blindrsa.PrivateKey.from_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
    sk = blindrsa.PrivateKey.generate(2048)
    again = blindrsa.PrivateKey.from_pem(sk.to_pkcs8_pem())
    assert again.public_key == sk.public_key
    assert repr(sk) == "PrivateKey(bits=2048)"
    assert blindrsa.PublicKey.from_der(sk.public_key.to_pkcs1_der()) == sk.public_key


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(msg=st.binary(max_size=200), which=st.sampled_from(sorted(VARIANTS)))
def test_property_round_trip(key2048: blindrsa.PrivateKey, msg: bytes, which: str) -> None:
    variant = VARIANTS[which]
    pk = key2048.public_key
    prepared = blindrsa.prepare(msg, variant)
    blinded, inv = blindrsa.blind(pk, prepared, variant)
    sig = blindrsa.finalize(pk, prepared, blindrsa.blind_sign(key2048, blinded), inv, variant)
    pk.key.verify(sig, prepared, variant.pss_padding(), hashes.SHA384())


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=0, max_size=300))
def test_property_blind_sign_hostile_input(key2048: blindrsa.PrivateKey, data: bytes) -> None:
    try:
        out = blindrsa.blind_sign(key2048, data)
    except DecodeError:
        return
    assert len(out) == 256

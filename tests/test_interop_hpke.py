"""HPKE and OHTTP against the real hpke-js@1.8.0 (tests/interop/hpke.mjs), both AEADs;
HPKE with both KEMs: DHKEM(X25519) and X-Wing (MLKEM768-X25519, 0x647A, through
@hpke/hybridkem-x-wing@0.7.0), multi-message seal/open and Export, which OHTTP needs."""

from __future__ import annotations

import os

import pytest

from openpcc.wire import hpke, ohttp
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite
from tests.conftest import load_vector, run_node

pytestmark = pytest.mark.interop
AEADS = pytest.mark.parametrize("aead", [1, 3], ids=["aes128gcm", "chacha20poly1305"])
KEMS = pytest.mark.parametrize(
    "kem", [hpke.KEM_DHKEM_X25519_HKDF_SHA256, hpke.KEM_XWING], ids=["x25519", "x-wing"]
)
INFO = b"openpcc interop info"
MSGS = [(b"", b""), (b"aad-1", b"hello hpke-js"), (b"", os.urandom(3000)), (b"x" * 70, b"\x00")]
EXPORTS = [(b"", 32), (b"ctx", 16), (b"longer exporter context", 77)]


def _suite(kem: int, aead: int) -> hpke.Suite:
    return hpke.Suite(kem, hpke.KDF_HKDF_SHA256, aead)


@KEMS
@AEADS
def test_hpke_js_opens_ours(kem: int, aead: int) -> None:
    kp = hpke.generate_key_pair(kem_id=kem)
    sender = hpke.setup_sender(kp.public_key, INFO, suite=_suite(kem, aead))
    msgs = [{"aad": aad.hex(), "ct": sender.seal(pt, aad).hex()} for aad, pt in MSGS]
    out = run_node(
        "hpke.mjs",
        {
            "op": "open",
            "kem": kem,
            "aead": aead,
            "sk": kp.private_key.hex(),
            "enc": sender.enc.hex(),
            "info": INFO.hex(),
            "msgs": msgs,
            "exports": [{"ctx": c.hex(), "L": n} for c, n in EXPORTS],
        },
    )
    assert out["pts"] == [pt.hex() for _, pt in MSGS]
    assert out["exports"] == [sender.export(c, n).hex() for c, n in EXPORTS]


@KEMS
@AEADS
def test_we_open_hpke_js(kem: int, aead: int) -> None:
    kp = hpke.generate_key_pair(kem_id=kem)
    out = run_node(
        "hpke.mjs",
        {
            "op": "seal",
            "kem": kem,
            "aead": aead,
            "pk": kp.public_key.hex(),
            "info": INFO.hex(),
            "msgs": [{"aad": aad.hex(), "pt": pt.hex()} for aad, pt in MSGS],
            "exports": [{"ctx": c.hex(), "L": n} for c, n in EXPORTS],
        },
    )
    enc = bytes.fromhex(out["enc"])
    assert len(enc) == hpke.kem_nenc(kem)  # 32, or 1120 for X-Wing
    receiver = hpke.setup_receiver(kp.private_key, enc, INFO, suite=_suite(kem, aead))
    for (aad, pt), ct in zip(MSGS, out["cts"], strict=True):
        assert receiver.open(bytes.fromhex(ct), aad) == pt
    assert out["exports"] == [receiver.export(c, n).hex() for c, n in EXPORTS]


def _config() -> tuple[KeyConfig, bytes]:
    kp = hpke.generate_key_pair()
    suites = (SymmetricSuite(1, 1), SymmetricSuite(1, 3))
    return KeyConfig(5, 0x20, kp.public_key, suites), kp.private_key


@AEADS
def test_js_client_to_our_gateway(aead: int) -> None:
    config, sk = _config()
    eph = hpke.generate_key_pair()
    bhttp = os.urandom(500)
    base = {
        "op": "ohttp_client",
        "key_config": config.encode().hex(),
        "aead": aead,
        "bhttp": bhttp.hex(),
        "ske": eph.private_key.hex(),
        "pke": eph.public_key.hex(),
    }
    request = bytes.fromhex(run_node("hpke.mjs", base)["request"])
    # Same ephemeral key injected on our side: byte-identical framing.
    ours, _ = ohttp.encapsulate_request(config, bhttp, aead_id=aead, ephemeral=eph.private_key)
    assert request == ours
    got, server = ohttp.decapsulate_request({5: sk}, request)
    assert got == bhttp
    response = server.encapsulate_response(b"\x01\x40\xc8 response body")
    out = run_node("hpke.mjs", {**base, "response": response.hex()})
    assert bytes.fromhex(out["response_bhttp"]) == b"\x01\x40\xc8 response body"


@AEADS
def test_our_client_to_js_gateway(aead: int) -> None:
    config, sk = _config()
    request, client = ohttp.encapsulate_request(config, b"GET / please", aead_id=aead)
    nonce = os.urandom(ohttp.response_nonce_len(aead))
    out = run_node(
        "hpke.mjs",
        {
            "op": "ohttp_gateway",
            "sk": sk.hex(),
            "request": request.hex(),
            "response_bhttp": b"200 OK body".hex(),
            "response_nonce": nonce.hex(),
        },
    )
    assert bytes.fromhex(out["request_bhttp"]) == b"GET / please"
    response = bytes.fromhex(out["response"])
    assert response[: len(nonce)] == nonce
    assert client.decapsulate_response(response) == b"200 OK body"


def test_js_gateway_reproduces_rfc9458_appendix_a() -> None:
    v = load_vector("ohttp/rfc9458_appendix_a.json")
    out = run_node(
        "hpke.mjs",
        {
            "op": "ohttp_gateway",
            "sk": v["gateway_private_key"],
            "request": v["encapsulated_request"],
            "response_bhttp": v["response_bhttp"],
            "response_nonce": v["response_nonce"],
        },
    )
    assert out["request_bhttp"] == v["request_bhttp"]
    assert out["response"] == v["encapsulated_response"]

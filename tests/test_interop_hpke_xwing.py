"""HPKE with X-Wing (MLKEM768-X25519, 0x647A) against the real @hpke/hybridkem-x-wing@0.7.0
with hpke-js@1.8.0 (tests/interop/hpke.mjs), both AEADs, both directions.

The OHTTP framing with an X-Wing key config comes with the gateway's X-Wing keys; this is
the HPKE layer it stands on: multi-message seal/open and Export, which OHTTP responses need.
"""

from __future__ import annotations

import os

import pytest

from openpcc.wire import hpke
from tests.conftest import run_node

pytestmark = pytest.mark.interop
AEADS = pytest.mark.parametrize("aead", [1, 3], ids=["aes128gcm", "chacha20poly1305"])
XWING = hpke.KEM_XWING
INFO = b"openpcc interop info (x-wing)"
MSGS = [(b"", b""), (b"aad-1", b"hello x-wing"), (b"", os.urandom(3000)), (b"x" * 70, b"\x00")]
EXPORTS = [(b"", 32), (b"message/bhttp response", 16), (b"longer exporter context", 77)]


def _suite(aead: int) -> hpke.Suite:
    return hpke.Suite(XWING, hpke.KDF_HKDF_SHA256, aead)


@AEADS
def test_js_opens_our_xwing_seals(aead: int) -> None:
    kp = hpke.generate_key_pair(kem_id=XWING)
    sender = hpke.setup_sender(kp.public_key, INFO, suite=_suite(aead))
    msgs = [{"aad": aad.hex(), "ct": sender.seal(pt, aad).hex()} for aad, pt in MSGS]
    out = run_node(
        "hpke.mjs",
        {
            "op": "open",
            "kem": XWING,
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


@AEADS
def test_we_open_js_xwing_seals(aead: int) -> None:
    kp = hpke.generate_key_pair(kem_id=XWING)
    out = run_node(
        "hpke.mjs",
        {
            "op": "seal",
            "kem": XWING,
            "aead": aead,
            "pk": kp.public_key.hex(),
            "info": INFO.hex(),
            "msgs": [{"aad": aad.hex(), "pt": pt.hex()} for aad, pt in MSGS],
            "exports": [{"ctx": c.hex(), "L": n} for c, n in EXPORTS],
        },
    )
    enc = bytes.fromhex(out["enc"])
    assert len(enc) == hpke.kem_nenc(XWING) == 1120
    receiver = hpke.setup_receiver(kp.private_key, enc, INFO, suite=_suite(aead))
    for (aad, pt), ct in zip(MSGS, out["cts"], strict=True):
        assert receiver.open(bytes.fromhex(ct), aad) == pt
    assert out["exports"] == [receiver.export(c, n).hex() for c, n in EXPORTS]

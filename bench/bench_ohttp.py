"""OHTTP and chunked OHTTP cost, against a raw-crypto floor measured in the same run.

The floor is the least any X25519 + HKDF + AES-128-GCM hybrid encryption of the
same body must cost, done with ``cryptography`` directly (no HPKE labels, no
framing). ``*_ratio`` = our code / floor; it shows the overhead of pyhpke and
our framing, independent of the machine.

Chunked rows stream 64 KB in 1 KB and 16 KB chunks and report microseconds
per KB, with raw AES-GCM per KB as their floor. Request rows include the HPKE
setup of the stream (one X25519 exchange, ~1.5 us/KB at 64 KB); response rows
include the response key derivation.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bench._harness import per_call_seconds
from openpcc.wire import hpke, ohttp
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

BODY = os.urandom(2048)
STREAM_KB = 64


def _floor_encap(pk: Any) -> bytes:
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(pk)
    okm = HKDF(hashes.SHA256(), 28, None, b"floor").derive(shared)
    return AESGCM(okm[:16]).encrypt(okm[16:], BODY, b"")


def _floor_decap(sk: X25519PrivateKey, epk: Any, ct: bytes) -> bytes:
    shared = sk.exchange(epk)
    okm = HKDF(hashes.SHA256(), 28, None, b"floor").derive(shared)
    return AESGCM(okm[:16]).decrypt(okm[16:], ct, b"")


def _floor_response(secret: bytes) -> bytes:
    # Both ends derive the key (as in OHTTP), then one seal and one open.
    salt = os.urandom(48)
    okm = HKDF(hashes.SHA256(), 28, salt, b"floor").derive(secret)
    ct = AESGCM(okm[:16]).encrypt(okm[16:], BODY, b"")
    okm2 = HKDF(hashes.SHA256(), 28, salt, b"floor").derive(secret)
    return AESGCM(okm2[:16]).decrypt(okm2[16:], ct, b"")


def _chunked_rows(config: KeyConfig, keys: dict[int, bytes], chunk: int) -> dict[str, float]:
    data = os.urandom(STREAM_KB * 1024)
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]

    def seal_request() -> bytes:
        s = ChunkedRequestSender(config)
        out = [s.seal_chunk(p) for p in pieces[:-1]]
        out.append(s.seal_chunk(pieces[-1], final=True))
        return b"".join(out)

    wire = seal_request()

    def open_request() -> None:
        r = ChunkedRequestReceiver(keys)
        r.receive_data(wire)
        r.end_of_input()

    r0 = ChunkedRequestReceiver(keys)
    r0.receive_data(wire[:39])

    def seal_response() -> bytes:
        s = r0.response_sender()
        out = [s.seal_chunk(p) for p in pieces[:-1]]
        out.append(s.seal_chunk(pieces[-1], final=True))
        return b"".join(out)

    # For opening responses, the client context must match: build a fresh pair.
    client = ChunkedRequestSender(config)
    gw = ChunkedRequestReceiver(keys)
    gw.receive_data(client.header())
    rs = gw.response_sender()
    rwire = b"".join(
        [rs.seal_chunk(p) for p in pieces[:-1]] + [rs.seal_chunk(pieces[-1], final=True)]
    )

    def open_response() -> None:
        rr = client.response_receiver()
        rr.receive_data(rwire)
        rr.end_of_input()

    kb = float(STREAM_KB)
    return {
        f"chunked_request_seal_{chunk // 1024}KB_chunks_us_per_KB": per_call_seconds(seal_request)
        / kb,
        f"chunked_request_open_{chunk // 1024}KB_chunks_us_per_KB": per_call_seconds(open_request)
        / kb,
        f"chunked_response_seal_{chunk // 1024}KB_chunks_us_per_KB": per_call_seconds(seal_response)
        / kb,
        f"chunked_response_open_{chunk // 1024}KB_chunks_us_per_KB": per_call_seconds(open_response)
        / kb,
    }


def run() -> dict[str, Any]:
    kp = hpke.generate_key_pair()
    config = KeyConfig(1, 0x20, kp.public_key, (SymmetricSuite(1, 1), SymmetricSuite(1, 3)))
    keys = {1: kp.private_key}
    request, client = ohttp.encapsulate_request(config, BODY)
    _, server0 = ohttp.decapsulate_request(keys, request)
    response = server0.encapsulate_response(BODY)

    sk = X25519PrivateKey.from_private_bytes(kp.private_key)
    pk = sk.public_key()
    floor_eph = X25519PrivateKey.generate()
    shared = floor_eph.exchange(pk)
    okm = HKDF(hashes.SHA256(), 28, None, b"floor").derive(shared)
    floor_ct = AESGCM(okm[:16]).encrypt(okm[16:], BODY, b"")
    epk = floor_eph.public_key()

    def response_round_trip() -> bytes:
        # A fresh ServerContext on the same HPKE context: one response each.
        server = ohttp.ServerContext(server0.hpke_context, server0.header)
        return client.decapsulate_response(server.encapsulate_response(BODY))

    rows = {
        "encapsulate_request_2KB": per_call_seconds(
            lambda: ohttp.encapsulate_request(config, BODY)
        ),
        "floor_encap_2KB": per_call_seconds(lambda: _floor_encap(pk)),
        "decapsulate_request_2KB": per_call_seconds(
            lambda: ohttp.decapsulate_request(keys, request)
        ),
        "floor_decap_2KB": per_call_seconds(lambda: _floor_decap(sk, epk, floor_ct)),
        "response_encaps_decaps_2KB": per_call_seconds(response_round_trip),
        "floor_response_2KB": per_call_seconds(lambda: _floor_response(os.urandom(16))),
        "client_decapsulate_response_2KB": per_call_seconds(
            lambda: client.decapsulate_response(response)
        ),
    }
    us = {f"{k}_us": round(v * 1e6, 2) for k, v in rows.items()}

    aes = AESGCM(os.urandom(16))
    nonce = os.urandom(12)
    kb = os.urandom(1024)
    chunk_rows: dict[str, float] = {
        "floor_aesgcm_seal_us_per_KB": per_call_seconds(lambda: aes.encrypt(nonce, kb, b""))
    }
    for size in (1024, 16 * 1024):
        chunk_rows.update(_chunked_rows(config, keys, size))
    chunk_us = {k: round(v * 1e6, 3) for k, v in chunk_rows.items()}

    def ratio(a: str, b: str) -> float:
        return round(rows[a] / rows[b], 2)

    summary = {
        "encapsulate_request_2KB_us": us["encapsulate_request_2KB_us"],
        "encapsulate_vs_floor_ratio": ratio("encapsulate_request_2KB", "floor_encap_2KB"),
        "decapsulate_request_2KB_us": us["decapsulate_request_2KB_us"],
        "decapsulate_vs_floor_ratio": ratio("decapsulate_request_2KB", "floor_decap_2KB"),
        "response_encaps_decaps_2KB_us": us["response_encaps_decaps_2KB_us"],
        "response_vs_floor_ratio": ratio("response_encaps_decaps_2KB", "floor_response_2KB"),
        **chunk_us,
    }
    return {
        "description": (
            "OHTTP (RFC 9458) request/response for a 2 KB body and chunked OHTTP "
            "(draft-08) per-KB cost, vs a raw X25519+HKDF+AES-GCM floor in the same run"
        ),
        "suite": "DHKEM(X25519,HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM",
        "rows_us": {**us, **chunk_us},
        "summary": summary,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run()["summary"], indent=2))

"""The outer layer's KEM: OHTTP request size and cost with X25519 vs X-Wing, same run.

Issue 20 (outer layer): the gateway publishes an X-Wing (MLKEM768-X25519, KEM 0x647A)
key config beside its X25519 one and clients use it when the manifest pins it. This
measures what that costs per request, each KEM against the other in one run:

* sizes: ``hdr ‖ enc`` is 39 bytes with X25519 and 1127 with X-Wing (enc 32 vs 1120), so
  every request grows by 1088 bytes; shown for a 2 KiB body and for the smallest real
  chat request (the sealed envelope at its smallest padding bucket, three candidates,
  a token, in one final chunk of chunked OHTTP, as both clients send it);
* time, one core, keys parsed once as the client (public key, cached) and the gateway
  (key ring) hold them: client encapsulation, gateway decapsulation, plain 2 KiB and the
  chunked chat request; the response (its key schedule salts with the whole enc);
* one-off costs: the gateway loading an X-Wing key from its seed (ML-KEM key
  expansion, at start and on reload), and a client parsing the gateway's public key
  (first use).

``python -m bench.bench_ohttp_kem`` writes ``bench/results/ohttp_kem.json``.
"""

from __future__ import annotations

import os
from typing import Any

from bench._harness import per_call_seconds
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, Token, format_authorization
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

BODY = os.urandom(2048)
SUITES = (SymmetricSuite(1, 1), SymmetricSuite(1, 3))
KEMS = {"x25519": hpke.KEM_DHKEM_X25519_HKDF_SHA256, "xwing": hpke.KEM_XWING}


def _chat_request() -> bytes:
    """The inner BHTTP of the smallest chat request: a sealed envelope (1 KiB bucket,
    three candidates) behind a token, as the clients build it."""
    nodes = [sealed.NodeKey(os.urandom(16), hpke.generate_key_pair().public_key) for _ in range(3)]
    chat = bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"node",
            b"/v1/chat/completions",
            [(b"content-type", b"application/json")],
            b'{"model":"m","messages":[{"role":"user","content":"Hello"}],"stream":true}',
        )
    )
    envelope = sealed.seal_request(nodes, "m", chat).envelope
    token = Token(TOKEN_TYPE_BLIND_RSA, os.urandom(32), os.urandom(32), os.urandom(32), b"\0" * 256)
    return bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"gateway",
            b"/v1/infer",
            [
                (b"authorization", format_authorization(token).encode()),
                (b"content-type", sealed.REQUEST_MEDIA_TYPE.encode()),
            ],
            envelope,
        )
    )


def _rows(kem: int, chat: bytes) -> dict[str, float]:
    kp = hpke.generate_key_pair(kem_id=kem)
    config = KeyConfig(1, kem, kp.public_key, SUITES)
    keys = {1: hpke.load_private_key(kp.private_key, kem_id=kem)}  # as the key ring holds it
    request, client = ohttp.encapsulate_request(config, BODY)
    _, server0 = ohttp.decapsulate_request(keys, request)

    def chunked_seal() -> bytes:
        return ChunkedRequestSender(config).seal_chunk(chat, final=True)

    chunked_wire = chunked_seal()

    def chunked_open() -> None:
        r = ChunkedRequestReceiver(keys)
        r.receive_data(chunked_wire)
        r.end_of_input()

    def response_round_trip() -> bytes:
        server = ohttp.ServerContext(server0.hpke_context, server0.header)
        return client.decapsulate_response(server.encapsulate_response(BODY))

    def load_private() -> object:
        return hpke.load_private_key(kp.private_key, kem_id=kem)

    def parse_public() -> object:
        if kem == hpke.KEM_XWING:
            hpke._xwing_public.cache_clear()  # the client caches it: measure the first use
        return hpke.load_public_key(kp.public_key, kem_id=kem)

    return {
        "config_bytes": len(config.encode()),
        "plain_request_2KiB_bytes": len(request),
        "chunked_chat_request_bytes": len(chunked_wire),
        "encapsulate_request_2KiB_us": per_call_seconds(
            lambda: ohttp.encapsulate_request(config, BODY)
        )
        * 1e6,
        "decapsulate_request_2KiB_us": per_call_seconds(
            lambda: ohttp.decapsulate_request(keys, request)
        )
        * 1e6,
        "chunked_chat_request_seal_us": per_call_seconds(chunked_seal) * 1e6,
        "chunked_chat_request_open_us": per_call_seconds(chunked_open) * 1e6,
        "response_encaps_decaps_2KiB_us": per_call_seconds(response_round_trip) * 1e6,
        "gateway_load_private_key_us": per_call_seconds(load_private) * 1e6,
        "client_parse_public_key_us": per_call_seconds(parse_public) * 1e6,
    }


def run() -> dict[str, Any]:
    chat = _chat_request()
    rows = {name: _rows(kem, chat) for name, kem in KEMS.items()}
    x, q = rows["x25519"], rows["xwing"]
    rounded = {
        name: {k: (round(v, 1) if k.endswith("_us") else int(v)) for k, v in r.items()}
        for name, r in rows.items()
    }

    def added(key: str) -> float:
        return round(q[key] - x[key], 1)

    summary = {
        "request_bytes_added": int(q["plain_request_2KiB_bytes"] - x["plain_request_2KiB_bytes"]),
        "chunked_chat_request_bytes": {
            "x25519": int(x["chunked_chat_request_bytes"]),
            "xwing": int(q["chunked_chat_request_bytes"]),
        },
        "client_encapsulate_added_us": added("encapsulate_request_2KiB_us"),
        "gateway_decapsulate_added_us": added("decapsulate_request_2KiB_us"),
        "chunked_chat_seal_plus_open_added_us": round(
            added("chunked_chat_request_seal_us") + added("chunked_chat_request_open_us"), 1
        ),
        "response_added_us": added("response_encaps_decaps_2KiB_us"),
    }
    return {
        "description": (
            "outer layer (OHTTP, chunked OHTTP) with X25519 vs X-Wing: request sizes and "
            "per-request cost on one core, both KEMs in the same run"
        ),
        "suites": "KEM 0x0020 / 0x647A, HKDF-SHA256, AES-128-GCM",
        "chat_inner_request_bytes": len(chat),
        "rows": rounded,
        "summary": summary,
    }


if __name__ == "__main__":
    import json

    from bench._harness import write_result

    result = run()
    path = write_result("ohttp_kem", result)
    print(json.dumps({"rows": result["rows"], "summary": result["summary"]}, indent=2))
    print(f"-> {path}")

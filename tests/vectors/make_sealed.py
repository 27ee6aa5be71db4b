"""Generate tests/vectors/sealed_request_v1.json and sealed_request_v2.json.

The files are the project's own test vectors for the sealed-request layer (there is no
official one): `python -m tests.vectors.make_sealed` rewrites them, and
tests/test_sealed.py checks the implementation still reproduces them byte for byte.

v1 (X25519) is fully deterministic from fixed seeds. v2 (X-Wing) is not: pycryptodome
offers no deterministic X-Wing encapsulation, so the generator draws each candidate's
enc ‖ wrapped key once, stores them, and rebuilding injects the stored ones
(``build_v2(wraps=...)``); every other byte is recomputed, and the tests open the
stored wraps with the nodes' fixed seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openpcc.wire import bhttp, hpke, sealed

PATH = Path(__file__).with_name("sealed_request_v1.json")
PATH_V2 = Path(__file__).with_name("sealed_request_v2.json")
BODY = b'{"model":"tiny","messages":[{"role":"user","content":"hello"}],"stream":true}'


def _request() -> bytes:
    return bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"node",
            b"/v1/chat/completions",
            [(b"content-type", b"application/json")],
            BODY,
        )
    )


def _response(data_key: bytes, request_nonce: bytes, context: bytes) -> list[bytes]:
    sealer = sealed.ResponseSealer(data_key, request_nonce, context, nonce=bytes(range(32, 48)))
    return [
        sealer.head(200, [(b"content-type", b"text/event-stream")]),
        sealer.data(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'),
        sealer.end(b"data: [DONE]\n\n"),
    ]


def build_v2(wraps: list[bytes] | None = None) -> dict[str, Any]:
    """The X-Wing vector; ``wraps`` (stored enc ‖ wrapped key per node) makes it exact."""
    seeds = [bytes([0xB0 + i]) * 32 for i in range(3)]
    publics = [hpke.public_key_from_private(s, kem_id=hpke.KEM_XWING) for s in seeds]
    node_ids = [bytes([0x20 + i]) * sealed.NODE_ID_LEN for i in range(3)]
    data_key = bytes(range(16))
    request_nonce = bytes(range(16, 32))
    request = _request()
    sreq = sealed.seal_request(
        [sealed.NodeKey(nid, pk) for nid, pk in zip(node_ids, publics, strict=True)],
        "tiny",
        request,
        data_key=data_key,
        request_nonce=request_nonce,
        wraps=wraps,
    )
    header = sealed.parse_envelope_header(sreq.envelope)
    parts = _response(data_key, request_nonce, sreq.context)
    return {
        "description": (
            "OpenPCC sealed request v2, X-Wing (project-generated, fixed seeds and stored "
            "encapsulations; not official)"
        ),
        "node_seeds": [s.hex() for s in seeds],
        "node_public_keys": [pk.hex() for pk in publics],
        "node_ids": [n.hex() for n in node_ids],
        "wraps": [(c.enc + c.wrapped_key).hex() for c in header.candidates],
        "data_key": data_key.hex(),
        "request_nonce": request_nonce.hex(),
        "response_nonce": bytes(range(32, 48)).hex(),
        "model": "tiny",
        "bhttp_request": request.hex(),
        "context": sreq.context.hex(),
        "envelope": sreq.envelope.hex(),
        "response_parts": [p.hex() for p in parts],
        "response_head": {"status": 200, "headers": [["content-type", "text/event-stream"]]},
        "response_body": ('data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'),
    }


def build() -> dict[str, Any]:
    nodes = [hpke.derive_key_pair(bytes([0xA0 + i]) * 32) for i in range(3)]
    node_ids = [bytes([0x10 + i]) * sealed.NODE_ID_LEN for i in range(3)]
    ephemerals = [hpke.derive_key_pair(bytes([0xE0 + i]) * 32).private_key for i in range(3)]
    data_key = bytes(range(16))
    request_nonce = bytes(range(16, 32))
    response_nonce = bytes(range(32, 48))
    request = _request()
    sreq = sealed.seal_request(
        [sealed.NodeKey(nid, kp.public_key) for nid, kp in zip(node_ids, nodes, strict=True)],
        "tiny",
        request,
        data_key=data_key,
        request_nonce=request_nonce,
        ephemerals=ephemerals,
    )
    parts = _response(data_key, request_nonce, sreq.context)
    return {
        "description": "OpenPCC sealed request v1 (project-generated, fixed seeds; not official)",
        "node_private_keys": [kp.private_key.hex() for kp in nodes],
        "node_public_keys": [kp.public_key.hex() for kp in nodes],
        "node_ids": [n.hex() for n in node_ids],
        "ephemeral_private_keys": [e.hex() for e in ephemerals],
        "data_key": data_key.hex(),
        "request_nonce": request_nonce.hex(),
        "response_nonce": response_nonce.hex(),
        "model": "tiny",
        "bhttp_request": request.hex(),
        "context": sreq.context.hex(),
        "envelope": sreq.envelope.hex(),
        "response_parts": [p.hex() for p in parts],
        "response_head": {"status": 200, "headers": [["content-type", "text/event-stream"]]},
        "response_body": ('data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'),
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {PATH}")
    # Keep the stored X-Wing encapsulations when the file exists (a rewrite must not
    # change the vector); draw new ones only for a new file.
    old = json.loads(PATH_V2.read_text())["wraps"] if PATH_V2.exists() else None
    PATH_V2.write_text(
        json.dumps(build_v2(None if old is None else [bytes.fromhex(w) for w in old]), indent=1)
        + "\n"
    )
    print(f"wrote {PATH_V2}")

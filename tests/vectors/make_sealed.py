"""Generate tests/vectors/sealed_request_v1.json from fixed seeds.

The file is the project's own test vector for the sealed-request layer (there is no
official one): `python -m tests.vectors.make_sealed` rewrites it, and
tests/test_sealed.py checks the implementation still reproduces it byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openpcc.wire import bhttp, hpke, sealed

PATH = Path(__file__).with_name("sealed_request_v1.json")


def build() -> dict[str, Any]:
    nodes = [hpke.derive_key_pair(bytes([0xA0 + i]) * 32) for i in range(3)]
    node_ids = [bytes([0x10 + i]) * sealed.NODE_ID_LEN for i in range(3)]
    ephemerals = [hpke.derive_key_pair(bytes([0xE0 + i]) * 32).private_key for i in range(3)]
    data_key = bytes(range(16))
    request_nonce = bytes(range(16, 32))
    response_nonce = bytes(range(32, 48))
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hello"}],"stream":true}'
    request = bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"node",
            b"/v1/chat/completions",
            [(b"content-type", b"application/json")],
            body,
        )
    )
    sreq = sealed.seal_request(
        [sealed.NodeKey(nid, kp.public_key) for nid, kp in zip(node_ids, nodes, strict=True)],
        "tiny",
        request,
        data_key=data_key,
        request_nonce=request_nonce,
        ephemerals=ephemerals,
    )
    sealer = sealed.ResponseSealer(data_key, request_nonce, sreq.context, nonce=response_nonce)
    parts = [
        sealer.head(200, [(b"content-type", b"text/event-stream")]),
        sealer.data(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'),
        sealer.end(b"data: [DONE]\n\n"),
    ]
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

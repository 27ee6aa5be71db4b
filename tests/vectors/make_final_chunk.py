"""Generate tests/vectors/final_chunk_content_v1.json: a gateway answer whose final chunked
OHTTP chunk carries content (draft-ietf-ohai-chunked-ohttp allows it).

Project-generated, not official. Built on two vectors both clients already reproduce: the
draft-08 example's request (so a client rebuilds the same HPKE context from the draft's
ephemeral key) and the node's sealed answer of sealed_request_v1.json. The gateway's
indeterminate-length Binary HTTP answer (head, the node's sealed bytes, end) is split so
that the last part of the node's bytes and the Binary HTTP end travel in the final chunk.
`python -m tests.vectors.make_final_chunk` rewrites it; tests/test_unwrap.py and
clients/js/test/unwrap.test.js check both clients reproduce and decode it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openpcc.wire import sealed
from openpcc.wire.bhttp_stream import ResponseStreamEncoder
from openpcc.wire.chunked import ChunkedRequestReceiver

HERE = Path(__file__).parent
PATH = HERE / "final_chunk_content_v1.json"
DRAFT = HERE / "chunked-ohttp" / "draft-ietf-ohai-chunked-ohttp-08_example.json"
SEALED = HERE / "sealed_request_v1.json"
RESPONSE_NONCE = bytes(range(0x60, 0x70))


def build() -> dict[str, Any]:
    draft = json.loads(DRAFT.read_text())
    node = json.loads(SEALED.read_text())
    receiver = ChunkedRequestReceiver(
        {draft["key_id"]: bytes.fromhex(draft["gateway_private_key"])}
    )
    receiver.receive_data(bytes.fromhex(draft["encapsulated_request"]))
    receiver.end_of_input()
    sender = receiver.response_sender(nonce=RESPONSE_NONCE)
    node_bytes = b"".join(bytes.fromhex(p) for p in node["response_parts"])
    split = len(node_bytes) // 2
    encoder = ResponseStreamEncoder()
    head = encoder.head(200, [(b"content-type", sealed.RESPONSE_MEDIA_TYPE.encode())])
    first = head + encoder.data(node_bytes[:split])
    final = encoder.data(node_bytes[split:]) + encoder.end()
    wire = sender.header() + sender.seal_chunk(first) + sender.seal_chunk(final, final=True)
    return {
        "description": "Gateway answer whose final chunked-OHTTP chunk carries content "
        "(project-generated from the draft-08 example request and sealed_request_v1.json; "
        "not official)",
        "request_from": "chunked-ohttp/draft-ietf-ohai-chunked-ohttp-08_example.json",
        "node_answer_from": "sealed_request_v1.json",
        "response_nonce": RESPONSE_NONCE.hex(),
        "plaintext_chunks": [first.hex(), final.hex()],
        "encapsulated_response": wire.hex(),
        "gateway_status": 200,
        "node_status": 200,
        "node_body": node["response_body"],
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(build(), indent=1) + "\n")

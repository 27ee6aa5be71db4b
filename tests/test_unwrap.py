"""The client's ResponseUnwrapper: every layer's end of input goes through the same path.

The vector tests/vectors/final_chunk_content_v1.json is a gateway answer whose final
chunked-OHTTP chunk carries the last of the node's sealed bytes and the Binary HTTP end.
Dropping that content (what the client did before: it decoded the final chunk and threw
the events away) reports a false truncation. clients/js/test/unwrap.test.js decodes the
same bytes in JavaScript.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openpcc.client.unwrap import (
    GatewayBody,
    GatewayHead,
    NodeData,
    NodeHead,
    NodeTruncatedError,
    ResponseUnwrapper,
)
from openpcc.errors import DecryptError, TruncatedError
from openpcc.wire import sealed
from openpcc.wire.bhttp_stream import ResponseStreamEncoder
from openpcc.wire.chunked import (
    ChunkedRequestReceiver,
    ChunkedRequestSender,
    ChunkedResponseSender,
)
from openpcc.wire.ohttp import KeyConfig
from tests.conftest import load_vector
from tests.vectors.make_final_chunk import build

HERE = Path(__file__).parent / "vectors"
VECTOR = json.loads((HERE / "final_chunk_content_v1.json").read_text())
DRAFT = load_vector("chunked-ohttp/draft-ietf-ohai-chunked-ohttp-08_example.json")
NODE = json.loads((HERE / "sealed_request_v1.json").read_text())
h = bytes.fromhex


def _unwrapper() -> ResponseUnwrapper:
    """The client's state after sending the draft-08 request sealed to sealed_request_v1's
    nodes: its OHTTP response receiver and its sealed-response opener."""
    sender = ChunkedRequestSender(
        KeyConfig.parse(h(DRAFT["key_config"])), ephemeral=h(DRAFT["client_ephemeral_private_key"])
    )
    chunks = [h(c) for c in DRAFT["request_plaintext_chunks"]]
    for c in chunks[:-1]:
        sender.seal_chunk(c)
    sender.seal_chunk(chunks[-1], final=True)
    opener = sealed.ResponseOpener(
        h(NODE["data_key"]), h(NODE["request_nonce"]), h(NODE["context"])
    )
    return ResponseUnwrapper(sender.response_receiver(), opener)


def _gateway_sender() -> ChunkedResponseSender:
    """The gateway's side of the same exchange: it opened the draft-08 request."""
    receiver = ChunkedRequestReceiver({DRAFT["key_id"]: h(DRAFT["gateway_private_key"])})
    receiver.receive_data(h(DRAFT["encapsulated_request"]))
    receiver.end_of_input()
    return receiver.response_sender()


def _run(wire: bytes, step: int) -> list[object]:
    u = _unwrapper()
    events: list[object] = []
    for i in range(0, len(wire), step):
        events += u.receive_data(wire[i : i + step])
    events += u.end_of_input()
    return events


def test_generator_reproduces_the_stored_vector() -> None:
    assert build() == VECTOR


def test_the_final_chunk_really_carries_node_bytes() -> None:
    final = h(VECTOR["plaintext_chunks"][-1])
    assert len(final) > 2 and final.endswith(b"\x00\x00")  # node data, then the BHTTP end


@pytest.mark.parametrize("step", [1, 7, 64, 1 << 20])
def test_content_in_the_final_chunk_reaches_the_node_layer(step: int) -> None:
    events = _run(h(VECTOR["encapsulated_response"]), step)
    assert events[0] == GatewayHead(200)
    heads = [e for e in events if isinstance(e, NodeHead)]
    assert [hd.status for hd in heads] == [VECTOR["node_status"]]
    body = b"".join(e.data for e in events if isinstance(e, NodeData))
    assert body.decode() == VECTOR["node_body"]
    assert not any(isinstance(e, GatewayBody) for e in events)


def test_events_of_the_end_alone() -> None:
    """Everything after the first chunk arrives only at end of input."""
    u = _unwrapper()
    wire = h(VECTOR["encapsulated_response"])
    first_chunk_end = len(wire) - (len(h(VECTOR["plaintext_chunks"][-1])) + 16)
    early = u.receive_data(wire[:first_chunk_end])
    late = u.receive_data(wire[first_chunk_end:]) + u.end_of_input()
    assert any(isinstance(e, NodeData) for e in late), late
    body = b"".join(e.data for e in early + late if isinstance(e, NodeData))
    assert body.decode() == VECTOR["node_body"]


def test_cut_anywhere_is_truncation() -> None:
    """Cut before the final chunk: TruncatedError; inside it: it fails to authenticate."""
    wire = h(VECTOR["encapsulated_response"])
    for cut in range(0, len(wire), 5):
        u = _unwrapper()
        with pytest.raises((TruncatedError, DecryptError)):
            u.receive_data(wire[:cut])
            u.end_of_input()


def test_outer_complete_but_node_end_missing_is_node_truncation() -> None:
    """A gateway that ends its own layers cleanly after a node died mid-answer."""
    sender = _gateway_sender()
    node_bytes = b"".join(h(p) for p in NODE["response_parts"])
    enc = ResponseStreamEncoder()
    head = enc.head(200, [(b"content-type", sealed.RESPONSE_MEDIA_TYPE.encode())])
    wire = sender.header() + sender.seal_chunk(head + enc.data(node_bytes[:-20]))
    wire += sender.seal_chunk(enc.end(), final=True)
    u = _unwrapper()
    u.receive_data(wire)
    with pytest.raises(NodeTruncatedError):
        u.end_of_input()


def test_a_gateway_refusal_is_its_body_not_node_data() -> None:
    sender = _gateway_sender()
    enc = ResponseStreamEncoder()
    problem = b'{"title":"Unauthorized","status":401}'
    final = enc.head(401, [(b"content-type", b"application/problem+json")])
    final += enc.data(problem) + enc.end()
    wire = sender.header() + sender.seal_chunk(final, final=True)  # all of it in the final
    events = _run(wire, 3)
    assert events[0] == GatewayHead(401)
    assert b"".join(e.data for e in events if isinstance(e, GatewayBody)) == problem

"""Binary HTTP encode/decode cost for a typical chat-completions request and its response.

The request is what the client seals for a node: ~2 KB of OpenAI-style JSON and
ten headers. Reported in microseconds per operation; the known-length encoding
is the baseline the other rows are compared against (same run, same machine).
"""

from __future__ import annotations

import json
from typing import Any

from bench._harness import per_call_seconds
from openpcc.wire.bhttp import (
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def chat_request() -> Request:
    messages = [{"role": "system", "content": "You are a concise, helpful assistant."}]
    for i in range(5):
        messages.append({"role": "user", "content": f"Question {i}: " + "lorem ipsum " * 20})
        messages.append({"role": "assistant", "content": f"Answer {i}: " + "dolor sit " * 5})
    body = json.dumps(
        {"model": "llama-3.1-8b-instruct", "stream": True, "max_tokens": 512, "messages": messages}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"accept", b"text/event-stream"),
        (b"accept-encoding", b"identity"),
        (b"user-agent", b"openpcc/0.1.0 python/3.11"),
        (b"x-request-id", b"0f9d3c2e-8a51-4b8e-9a43-6c1f2d7e5b10"),
        (b"openai-beta", b"none"),
        (b"x-stainless-lang", b"python"),
        (b"x-stainless-retry-count", b"0"),
        (b"cache-control", b"no-store"),
        (b"x-openpcc-bucket", b"4096"),
    ]
    return Request(
        b"POST", b"https", b"node.openpcc.internal", b"/v1/chat/completions", headers, body
    )


def chat_response() -> Response:
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 200}}],
            "usage": {"prompt_tokens": 420, "completion_tokens": 200, "total_tokens": 620},
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"server", b"openpcc-node")]
    return Response(200, headers, body)


def run() -> dict[str, Any]:
    req = chat_request()
    resp = chat_response()
    known = encode_request(req)
    indet = encode_request(req, indeterminate=True, chunk_size=256)
    resp_raw = encode_response(resp)
    rows = {
        "encode_request_known_us": per_call_seconds(lambda: encode_request(req)),
        "encode_request_indeterminate_256B_chunks_us": per_call_seconds(
            lambda: encode_request(req, indeterminate=True, chunk_size=256)
        ),
        "decode_request_known_us": per_call_seconds(lambda: decode_request(known)),
        "decode_request_indeterminate_256B_chunks_us": per_call_seconds(
            lambda: decode_request(indet)
        ),
        "encode_response_known_us": per_call_seconds(lambda: encode_response(resp)),
        "decode_response_known_us": per_call_seconds(lambda: decode_response(resp_raw)),
    }
    us = {k: round(v * 1e6, 2) for k, v in rows.items()}
    base = rows["encode_request_known_us"]
    return {
        "summary": {
            **us,
            "request_bytes": len(known),
            "request_body_bytes": len(req.content),
            "request_headers": len(req.headers),
            "response_bytes": len(resp_raw),
        },
        "ratio_to_encode_request_known": {k: round(v / base, 2) for k, v in rows.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))

"""A recording, OpenAI-compatible fake engine for the node tests (run as its own process).

``python -m tests.node_support.fake_engine MODEL[,MODEL...] --port-file F`` serves
``/health``, ``/v1/models`` (listing every MODEL), ``/v1/chat/completions`` and
``/v1/completions`` on 127.0.0.1. It records every request (peer, method, path, headers,
JSON body) for ``GET /_control/received``, and streams Server-Sent Events slowly.
Prompt keywords steer it:

* ``GATE``: hold the last event until ``POST /_control/release`` (proves the node
  forwards chunks as they come instead of buffering the answer);
* ``DIE``: send two events, then cut the connection (an engine crash mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

CHUNK_DELAY = 0.05
WORDS = ["Hello", " from", " the", " fake", " engine", "."]


def _text(body: dict) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content")
            parts.append(c if isinstance(c, str) else json.dumps(c))
        return " ".join(parts)
    return str(body.get("prompt", ""))


def build_app(model: str) -> web.Application:
    received: list[dict] = []
    release = asyncio.Event()

    async def record(request: web.Request) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = {"_raw": raw.decode("latin-1")}
        rec = {
            "time": time.time(),
            "peer": request.remote,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": body,
        }
        received.append(rec)
        return rec

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        await record(request)
        data = [{"id": name, "object": "model"} for name in model.split(",")]
        return web.json_response({"object": "list", "data": data})

    async def generate(request: web.Request) -> web.StreamResponse:
        rec = await record(request)
        body = rec["body"] or {}
        chat = request.path.endswith("/chat/completions")
        text = _text(body)
        if not body.get("stream"):
            content = "".join(WORDS)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": content}}
                if chat
                else {"index": 0, "text": content}
            )
            return web.json_response({"id": "fake-1", "object": "x", "choices": [choice]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i, word in enumerate(WORDS):
            if "DIE" in text and i == 2:
                assert request.transport is not None
                request.transport.abort()  # the engine "crashes" mid-answer
                return resp
            if "GATE" in text and i == len(WORDS) - 1:
                await asyncio.wait_for(release.wait(), 30)
                release.clear()
            delta = {"delta": {"content": word}} if chat else {"text": word}
            event = {"id": "fake-1", "choices": [{"index": 0, **delta}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(CHUNK_DELAY)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def get_received(_request: web.Request) -> web.Response:
        return web.json_response(received)

    async def do_release(_request: web.Request) -> web.Response:
        release.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/_control/received", get_received)
    app.router.add_post("/_control/release", do_release)
    return app


if __name__ == "__main__":
    from tests.harness import fake_args, run_fake

    run_fake(build_app(fake_args()[0]))

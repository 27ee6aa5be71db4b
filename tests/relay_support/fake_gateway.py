"""A recording fake OHTTP gateway, run as its own process:
``python -m tests.relay_support.fake_gateway --port-file F``.

It records exactly which headers (raw, in order) and bytes reach it, when each body
chunk arrives, and whether the relay hung up; the test reads that record over
``/_control/state``, which the relay must never expose. The first body line picks
a behaviour:

- ``echo``   read the body, answer it back (fixed length) with headers a relay must drop
- ``stream`` answer chunked: one chunk now, the last only after ``/_control/release``
- ``slow``   say nothing for 5 s (longer than the test relays' read timeout)
- ``fast``   answer a fixed small body at once (benchmark upstream)
- ``ticks``  N 16-byte records, each stamped with time.monotonic() when sent (benchmark)
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

from aiohttp import web

KEYS = bytes.fromhex("0001") + b"\x00\x20" + bytes(range(32)) + b"\x00\x04\x00\x01\x00\x01"
JUNK_HEADERS = {
    "Set-Cookie": "track=client-42; Path=/",
    "X-Powered-By": "fake-gateway",
    "Alt-Svc": 'h3=":443"',
    "ETag": '"client-42"',
    "Location": "http://elsewhere.example/",
    "Server": "fake-gateway/1.0",
}

state: dict[str, Any] = {}


def reset() -> None:
    state.update(requests=[], keys_gets=[], release=asyncio.Event())


def record(request: web.Request) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "method": request.method,
        "path": request.path_qs,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body": "",
        "chunks": [],
        "mode": None,
        "sent_first": False,
        "sent_last": False,
        "cancelled": False,
        "done": False,
    }
    return rec


async def gateway(request: web.Request) -> web.StreamResponse:
    rec = record(request)
    state["requests"].append(rec)
    body = bytearray()
    try:
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            body += chunk
            rec["chunks"].append([len(chunk), time.monotonic()])
            rec["body"] = body.hex()
        rec["mode"] = mode = bytes(body).split(b"\n", 1)[0].decode("latin-1")
        if mode == "fast":
            return web.Response(body=b"x" * 64, content_type="message/ohttp-res")
        if mode == "echo":
            headers = {"Incremental": "?1", "Cache-Control": "no-store", **JUNK_HEADERS}
            return web.Response(body=bytes(body), headers=headers, content_type="message/ohttp-res")
        if mode == "slow":
            await asyncio.sleep(5)
            return web.Response(body=b"too late", content_type="message/ohttp-res")
        resp = web.StreamResponse(headers={"Incremental": "?1", **JUNK_HEADERS})
        resp.content_type = "message/ohttp-chunked-res"
        await resp.prepare(request)
        if mode.startswith("ticks"):
            count, gap = int(mode.split()[1]), float(mode.split()[2])
            for i in range(count):
                await resp.write(struct.pack("<dQ", time.monotonic(), i))
                await asyncio.sleep(gap)
        else:
            await resp.write(b"first-chunk")
            rec["sent_first"] = True
            await asyncio.wait_for(state["release"].wait(), 10)
            await resp.write(b"last-chunk")
            rec["sent_last"] = True
        await resp.write_eof()
        return resp
    except asyncio.CancelledError:
        rec["cancelled"] = True
        raise
    finally:
        rec["done"] = True


async def keys(request: web.Request) -> web.Response:
    state["keys_gets"].append(record(request))
    return web.Response(
        body=KEYS,
        content_type="application/ohttp-keys",
        headers={"Cache-Control": "max-age=60", "Set-Cookie": "k=1"},
    )


async def control_state(_request: web.Request) -> web.Response:
    return web.json_response({k: v for k, v in state.items() if k != "release"})


async def control_release(_request: web.Request) -> web.Response:
    state["release"].set()
    return web.Response(text="released")


async def control_reset(_request: web.Request) -> web.Response:
    state["release"].set()  # let anything still waiting finish
    reset()
    return web.Response(text="reset")


async def on_start(_app: web.Application) -> None:
    reset()
    print("ready", flush=True)


def main() -> None:
    app = web.Application(client_max_size=1 << 30)
    app.on_startup.append(on_start)
    for path in ("/gateway", "/alt-gateway"):
        app.router.add_post(path, gateway)
    app.router.add_get("/.well-known/ohttp-gateway", keys)
    app.router.add_get("/_control/state", control_state)
    app.router.add_post("/_control/release", control_release)
    app.router.add_post("/_control/reset", control_reset)
    from tests.harness import run_fake

    run_fake(app, handler_cancellation=True)


if __name__ == "__main__":
    main()

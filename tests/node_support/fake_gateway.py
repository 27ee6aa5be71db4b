"""A recording stand-in for the gateway's internal registration endpoint (own process).

``python -m tests.node_support.fake_gateway CREDENTIAL --port-file F``: ``POST /internal/nodes``
records the bearer credential check, the JSON body, the raw body and the node's signature
header, and answers 204 (401 on a wrong credential);
``POST /_control/fail?n=N`` makes the next N registrations fail with 503;
``GET /_control/registrations`` returns what was recorded.
"""

from __future__ import annotations

import json
import time

from aiohttp import web


def build_app(secret: str) -> web.Application:
    registrations: list[dict] = []
    fail = {"n": 0}

    async def register(request: web.Request) -> web.Response:
        raw = await request.read()
        auth_ok = request.headers.get("Authorization") == f"Bearer {secret}"
        registrations.append(
            {"time": time.time(), "auth_ok": auth_ok, "failed": fail["n"] > 0,
             "body": json.loads(raw), "raw": raw.decode(),
             "signature": request.headers.get("OpenPCC-Node-Signature")}
        )  # fmt: skip
        if not auth_ok:
            return web.json_response({"title": "unauthorized"}, status=401)
        if fail["n"] > 0:
            fail["n"] -= 1
            return web.json_response({"title": "unavailable"}, status=503)
        return web.Response(status=204)

    async def get_registrations(_request: web.Request) -> web.Response:
        return web.json_response(registrations)

    async def set_fail(request: web.Request) -> web.Response:
        fail["n"] = int(request.query.get("n", "1"))
        return web.json_response(fail)

    app = web.Application()
    app.router.add_post("/internal/nodes", register)
    app.router.add_get("/_control/registrations", get_registrations)
    app.router.add_post("/_control/fail", set_fail)
    return app


if __name__ == "__main__":
    from tests.harness import fake_args, run_fake

    run_fake(build_app(fake_args()[0]))

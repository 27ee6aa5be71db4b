"""A fake OpenPCC node for the gateway tests, run as its own process.

It opens sealed requests for real (``sealed.open_request``) and answers with a real
sealed stream, so the tests check the gateway end to end without vLLM. It heartbeats
to the gateway like a node does: with its admission credential, a simulated-TEE bundle
whose claims carry its signing key, and each registration signed with that key.
Behaviour is switched over ``/_control/*`` (which the gateway never calls):

- ``ok``: head, first data chunk, the rest and the authenticated end.
- ``gated``: as ``ok``, but after the first chunk wait for ``/_control/release`` (at most
  ``--hold`` seconds). This lets tests prove the gateway forwards incrementally: the
  client must get the first chunk while the node still holds the last one back.
- ``status500``: answer 500 before any byte.  ``drop``: close the socket at once.
- ``die_mid``: head and one chunk, then cut the connection.
- ``healthy``: ``/readyz`` answers 200 (true) or 503 (false).
- ``url``: register this URL instead of its own (a takeover or a pointer elsewhere).
- ``waiting``: the engine queue its ``/readyz`` reports (an overloaded node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from openpcc.admission import SIGNATURE_HEADER
from openpcc.wire import bhttp, hpke, sealed
from tests.admission_support import AttestedIdentity, simulated_tee


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node_id = bytes.fromhex(args.node_id)
        self.sk = bytes.fromhex(args.private_key)
        self.pk = hpke.public_key_from_private(self.sk)
        # X-Wing (sealed v2), as a real node has beside its X25519 key, unless --no-pq.
        self.pq_sk = bytes.fromhex(args.pq_seed) if args.pq_seed else None
        self.pq_pk = (
            hpke.public_key_from_private(self.pq_sk, kem_id=hpke.KEM_XWING) if self.pq_sk else None
        )
        self.mode = "ok"
        self.url: str | None = None
        self.waiting = 0  # the engine queue /readyz reports (load-aware routing)
        self.refusals: list[int] = []
        self.identity = AttestedIdentity(
            simulated_tee(Path(args.tee_dir)), self.node_id, self.pk, self.pq_pk
        )
        self.healthy = True
        self.heartbeat = True
        self.release = asyncio.Event()
        self.requests: list[dict] = []
        self.sent_last = 0  # how many times the final chunk was written


async def sealed_handler(request: web.Request) -> web.StreamResponse:
    st: State = request.app["state"]
    body = await request.read()
    st.requests.append(
        {"headers": [[k, v] for k, v in request.headers.items()], "body_len": len(body)}
    )
    if st.mode == "drop":
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if st.mode == "status500":
        return web.Response(status=500, text="boom")
    v2 = body[:1] == bytes([sealed.VERSION_2]) and st.pq_sk is not None
    st.requests[-1]["version"] = 2 if v2 else 1
    try:
        opened = sealed.open_request(
            body, st.node_id, st.pq_sk if v2 else st.sk, st.pq_pk if v2 else st.pk
        )
    except Exception as exc:
        return web.Response(status=421 if "candidate" in str(exc) or "key" in str(exc) else 400)
    inner = bhttp.decode_request(opened.bhttp_request)
    resp = web.StreamResponse(status=200, headers={"Content-Type": sealed.RESPONSE_MEDIA_TYPE})
    await resp.prepare(request)
    s = opened.sealer
    await resp.write(s.head(200, [(b"content-type", b"text/event-stream")]))
    await resp.write(s.data(b"first:" + inner.path + b":" + inner.content.rstrip(b"\x00") + b"\n"))
    if st.mode == "die_mid":
        await asyncio.sleep(0.2)
        assert request.transport is not None
        request.transport.abort()
        return resp
    if st.mode == "gated":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.release.wait(), st.args.hold)
    st.release.clear()
    await resp.write(s.data(b"second\n"))
    await resp.write(s.end(b"last\n"))
    st.sent_last += 1
    await resp.write_eof()
    return resp


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})  # alive, as a node's /healthz


async def readyz(request: web.Request) -> web.Response:
    """What the gateway's health check asks, as of a node."""
    st: State = request.app["state"]
    if not st.healthy:
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "engine": "ready", "node_id": st.args.node_id,
                              "load": {"inflight": 0, "waiting": st.waiting,
                                       "kv_cache_usage": 0.0}})  # fmt: skip


async def control(request: web.Request) -> web.Response:
    st: State = request.app["state"]
    what = request.match_info["what"]
    if what == "set":
        doc = await request.json()
        st.mode = doc.get("mode", st.mode)
        st.healthy = doc.get("healthy", st.healthy)
        st.heartbeat = doc.get("heartbeat", st.heartbeat)
        st.url = doc.get("url", st.url)
        st.waiting = doc.get("waiting", st.waiting)
    elif what == "release":
        st.release.set()
    elif what == "reset":
        st.requests.clear()
        st.sent_last = 0
        st.release.clear()
    return web.json_response(
        {
            "mode": st.mode,
            "requests": st.requests,
            "sent_last": st.sent_last,
            "public_key": st.pk.hex(),
            "refusals": st.refusals,
        }
    )


async def heartbeat(app: web.Application, port: int) -> None:
    st: State = app["state"]
    a = st.args
    async with aiohttp.ClientSession() as session:
        while True:
            if st.heartbeat:
                doc = st.identity.document(st.url or f"http://127.0.0.1:{port}", [a.model])
                body, signature = st.identity.signed(doc)
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.post(
                        a.gateway + "/internal/nodes",
                        data=body,
                        headers={
                            "Authorization": f"Bearer {a.credential}",
                            "Content-Type": "application/json",
                            SIGNATURE_HEADER: signature,
                        },
                    ) as r:
                        if r.status != 200:
                            st.refusals.append(r.status)
                            print("registration refused", r.status, await r.text(),
                                  file=sys.stderr)  # fmt: skip
            await asyncio.sleep(a.interval)


def main() -> None:
    from tests.harness import fake_args, run_fake

    p = argparse.ArgumentParser()
    p.add_argument("--node-id", required=True)
    p.add_argument("--private-key", required=True)
    p.add_argument("--pq-seed", default="", help="X-Wing seed (hex); none: X25519 only")
    p.add_argument("--model", default="tiny")
    p.add_argument("--gateway", required=True, help="gateway internal base URL")
    p.add_argument("--credential", required=True)
    p.add_argument("--tee-dir", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--hold", type=float, default=10.0)
    args = p.parse_args(fake_args())
    app = web.Application()
    app["state"] = State(args)
    app.router.add_post("/v1/sealed", sealed_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/_control/{what}", control)
    tasks: set[asyncio.Task[None]] = set()

    async def bound(port: int) -> None:
        tasks.add(asyncio.create_task(heartbeat(app, port)))

    run_fake(app, on_bound=bound)


if __name__ == "__main__":
    main()

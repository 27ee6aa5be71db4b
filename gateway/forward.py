"""Routing and forwarding: pick a usable candidate node, post it the sealed envelope, and
stream its sealed answer back as it comes.

Until a node's first byte the gateway may try the next candidate (the node has acted on
nothing it can show); from then on every byte goes straight to the client, and a node that
dies mid-stream ends the inner message cleanly but without the node's sealed final chunk,
so the client's sealed layer reports the truncation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from gateway.limits import MAX_ENVELOPE
from gateway.nodeclient import NodeClient, NodeError, NodeUnreachable
from gateway.outer import Exchange, NodeStreamError, Sink, inner_problem
from gateway.redeem import Accepted, Redeemer
from gateway.registry import NodeRegistry, Registration
from gateway.tally import Tally, key
from openpcc.errors import OpenPCCError
from openpcc.forwarding import FORWARD_HEADER, forward_key, sign_forward
from openpcc.service.http import Metrics
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp, sealed

log = logging.getLogger("openpcc.gateway")
_RANDOM = random.SystemRandom()  # tie breaks: os.urandom, one instance for all
DEFAULT_AFFINITY_SLACK = 4
_SEALED_LINE = b"Content-Type: " + sealed.REQUEST_MEDIA_TYPE.encode() + b"\r\n"
_FORWARD = FORWARD_HEADER.encode()
_RESPONSE_TYPE = sealed.RESPONSE_MEDIA_TYPE.encode()
_STREAMING = key("node_attempts_total", outcome="streaming")
_SENT = key("response_bytes_total")


def route(
    usable: list[Registration],
    first: bytes | None,
    load: Callable[[bytes], int],
    slack: int,
    rng: random.Random = _RANDOM,
) -> list[Registration]:
    """The order to try ``usable`` nodes in (docs/PROTOCOL.md, "Routing").

    The client's first candidate (``first``, where its cache for this conversation is)
    leads unless its load exceeds the least-loaded candidate's by more than ``slack``;
    the rest, or all then, go least-loaded first (power of k choices), ties at random.
    """
    keyed = [(load(r.node_id), rng.random(), r) for r in usable]
    keyed.sort(key=lambda x: (x[0], x[1]))
    order = [r for _, _, r in keyed]
    if first is not None and keyed:
        lowest = keyed[0][0]
        lead = next((x for x in keyed if x[2].node_id == first), None)
        if lead is not None and lead[0] <= lowest + slack:
            order.remove(lead[2])
            order.insert(0, lead[2])
    return order


class Forwarder:
    """``/v1/infer``: redeem, route, forward. ``client`` is set by the gateway's start."""

    def __init__(
        self,
        registry: NodeRegistry,
        redeemer: Redeemer,
        metrics: Metrics,
        trace: StageTrace,
        first_byte_timeout: float,
        *,
        forward_secret: Callable[[Registration], bytes | None],
        affinity_slack: int = DEFAULT_AFFINITY_SLACK,
        tally: Tally,
    ) -> None:
        self.registry = registry
        self.affinity_slack = affinity_slack
        self.inflight: dict[bytes, int] = {}  # this gateway's forwards in progress, per node
        # OpenPCC-Forward (openpcc/forwarding.py): nodes open only what a gateway forwarded,
        # signed under a per-node key derived from the credential the node was admitted
        # with (two HMACs per forward). None: the credential was revoked.
        self.forward_secret = forward_secret
        self.redeemer = redeemer
        self.metrics = metrics
        self.tally = tally
        self.trace = trace
        self.first_byte_timeout = first_byte_timeout
        self.client: NodeClient | None = None  # set by the gateway's start
        self._keys: dict[tuple[bytes, bytes], bytes] = {}  # (credential, node id) -> key

    async def infer(self, ex: Exchange, inner: bhttp.Request, sink: Sink) -> None:
        ctypes = [v for k, v in inner.headers if k == b"content-type"]
        if ctypes != [sealed.REQUEST_MEDIA_TYPE.encode()]:
            await sink.respond(
                *inner_problem(
                    400, "Bad Request", "content-type must be " + sealed.REQUEST_MEDIA_TYPE
                )
            )
            return
        envelope = inner.content
        if len(envelope) > MAX_ENVELOPE:
            await sink.respond(
                *inner_problem(413, "Content Too Large", f"envelope over {MAX_ENVELOPE} bytes")
            )
            return
        t = time.perf_counter()
        accepted = await self.redeemer.redeem(inner)
        self.trace.record("redeem", time.perf_counter() - t)
        if not isinstance(accepted, Accepted):
            await sink.respond(*accepted)
            return
        try:
            header = sealed.parse_envelope_header(envelope)
        except OpenPCCError:
            await sink.respond(*inner_problem(400, "Bad Request", "malformed sealed envelope"))
            return
        wanted = [(c.node_id, c.key_id) for c in header.candidates]
        note = ex.note
        if note is not None:
            note["model"] = header.model
            note["candidates"] = [c.node_id.hex() for c in header.candidates]
        usable = self.registry.candidates(header.model, wanted, header.version)
        if len(usable) > 1:
            first = header.candidates[0].node_id
            usable = route(usable, first, self._load, self.affinity_slack)
        for reg in usable:
            nid = reg.node_id
            self.inflight[nid] = self.inflight.get(nid, 0) + 1
            try:
                done = await self._forward(ex, reg, envelope, sink, accepted)
            finally:
                left = self.inflight[nid] - 1
                if left:
                    self.inflight[nid] = left
                else:
                    del self.inflight[nid]
            if done:
                if note is not None:
                    note["served_by"] = reg.node_id.hex()
                return
        self.metrics.inc("node_attempts_total", outcome="none_left")
        await accepted.settle()  # counted as redeemed, or as the store's failure
        await sink.respond(
            *inner_problem(503, "Service Unavailable", "no usable candidate node for this request")
        )

    def _load(self, node_id: bytes) -> int:
        """Requests this gateway has in flight to the node, plus its reported queue."""
        return self.inflight.get(node_id, 0) + self.registry.waiting(node_id)

    def _forward_lines(self, reg: Registration, envelope: bytes) -> bytes:
        """The request's own header lines: the media type and the forward MAC."""
        secret = self.forward_secret(reg) or b""
        key = self._keys.get((secret, reg.node_id))
        if key is None:  # two HMACs, once per node and credential
            if len(self._keys) > 4096:
                self._keys.clear()
            key = self._keys[(secret, reg.node_id)] = forward_key(secret, reg.node_id)
        return _SEALED_LINE + b"%s: %s\r\n" % (_FORWARD, sign_forward(key, envelope).encode())

    async def _forward(
        self, ex: Exchange, reg: Registration, envelope: bytes, sink: Sink, accepted: Accepted
    ) -> bool:
        """Try one node. False if it failed before its first byte (the caller tries the next).
        The node's first byte goes to the client only once the token's spent record is
        durable (``accepted.settle``): the store's fsync overlaps the node's work."""
        client = self.client
        assert client is not None
        self.trace.record("upstream_sent", time.perf_counter() - ex.t0)
        lines = self._forward_lines(reg, envelope)
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                conn = await client.post(reg.url, b"/v1/sealed", lines, envelope)
                try:
                    ok = conn.status == 200 and conn.media_type == sealed.RESPONSE_MEDIA_TYPE
                    first = await conn.read() if ok else b""
                except BaseException:
                    client.release(conn)
                    raise
        except NodeUnreachable:  # no connection, or closed before any answer byte
            self.registry.mark_unreachable(reg.node_id)
            self.metrics.inc("node_attempts_total", outcome="unreachable")
            return False
        except (NodeError, TimeoutError, OSError):
            self.metrics.inc("node_attempts_total", outcome="failed_before_first_byte")
            return False
        if not first:
            client.release(conn)
            self.metrics.inc("node_attempts_total", outcome=f"refused_{conn.status // 100}xx")
            return False
        if not await accepted.settle():  # not durable: no answer for this token
            conn.close()
            assert accepted.refusal is not None
            await sink.respond(*accepted.refusal)
            return True
        # Committed: from here on every byte goes straight to the client.
        self.tally.add(_STREAMING)
        trace, t0 = self.trace, ex.t0
        t, c = time.perf_counter(), trace.cpu()
        trace.record("upstream_wait", t - t0)
        clean = False
        sent = 0  # counted once per answer, not per chunk
        try:
            await sink.start(200, [(b"content-type", _RESPONSE_TYPE)])
            chunk = first
            while chunk:
                sent += len(chunk)
                # The node's answer is complete: its end follows without waiting.
                await sink.write(chunk, more=conn.complete)
                if trace.enabled:
                    now = time.perf_counter()
                    if t0:
                        trace.record("first_out", now - t0)
                    else:
                        cpu = trace.cpu() - c  # read before either line is written
                        trace.record("chunk", now - t)
                        trace.record("chunk_cpu", cpu)
                    t0 = 0.0
                try:
                    chunk = await conn.read()
                except (NodeError, TimeoutError, OSError):
                    break
                if trace.enabled:
                    t, c = time.perf_counter(), trace.cpu()
            else:
                clean = True
        except NodeStreamError:
            pass
        finally:
            client.release(conn)
            self.tally.add(_SENT, sent)
        if not clean:
            self.metrics.inc("node_attempts_total", outcome="died_mid_stream")
            log.info(
                "node %s stopped mid-stream; client will see a truncated answer",
                reg.node_id.hex()[:8],
            )
        await sink.end()
        return True

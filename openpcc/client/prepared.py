"""HPKE sender setups made before a request needs them, each used once.

An HPKE sender setup (the KEM encapsulation and key schedule) does not depend on the
message: only on the receiver's key and the ``info``. The client makes one per
candidate node (the data-key wraps of the sealed envelope) and one for the outer
chunked OHTTP request on every request; with X-Wing that is about 3 ms of CPU, all of it
before the first byte leaves. So the client keeps a few ready for the gateway's key
config and for each verified node, made after a request's answer has ended, and a
request takes them instead.

They are made on the event loop, one setup per step (0.25 ms X25519, 1 ms X-Wing),
yielding between steps, and none while any request is between its start and its first
byte: a request arriving mid-refill waits at most one step, and its sealing never shares
the interpreter with a refill. (The first design ran the batch in a worker thread, which
shares the GIL with the loop; for a streamed answer's wake-ups the two measure alike,
bench/bench_prepared.py: p99 2.0 vs 2.2 ms late while 3 X-Wing setups run every 33 ms,
0.34 ms with none.)

Each setup is used for exactly one request (a fresh ephemeral per request, as RFC 9180
requires), never persisted, and dropped when its key is no longer current; a miss
simply sets up on the request path as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from openpcc.wire import hpke, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestSender

log = logging.getLogger("openpcc.client")
T = TypeVar("T")
_Key = tuple[bytes, ...]


class PreparedSenders:
    """Per key, up to ``depth`` ready setups; ``refill`` tops them up in steps on the loop."""

    def __init__(self, depth: int = 2, max_nodes: int = 32) -> None:
        self.depth = depth
        self.max_nodes = max_nodes  # a refill prepares wraps for at most this many nodes
        self._outer: dict[_Key, deque[ChunkedRequestSender]] = {}
        self._wraps: dict[_Key, deque[hpke.SenderContext]] = {}
        self._task: asyncio.Task[None] | None = None
        self._live: tuple[set[_Key], set[_Key]] = (set(), set())
        self._waiting = 0  # requests between their start and their first byte
        self._quiet: asyncio.Event | None = None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _outer_key(config: ohttp.KeyConfig) -> _Key:
        return (config.encode(),)

    @staticmethod
    def _wrap_key(node: sealed.NodeKey) -> _Key:
        return (node.node_id, node.public_key)

    def _take(self, pool: dict[_Key, deque[T]], key: _Key, make: Callable[[], T]) -> T:
        ready = pool.get(key)
        if ready:
            self.hits += 1
            return ready.popleft()
        self.misses += 1
        return make()

    def outer(self, config: ohttp.KeyConfig) -> ChunkedRequestSender:
        """A chunked OHTTP request sender to ``config`` (prepared if one is ready)."""
        return self._take(
            self._outer, self._outer_key(config), lambda: ChunkedRequestSender(config)
        )

    def wraps(self, nodes: Sequence[sealed.NodeKey]) -> list[hpke.SenderContext]:
        """One data-key wrap setup per candidate, for ``sealed.seal_request(senders=)``."""
        return [
            self._take(self._wraps, self._wrap_key(n), lambda n=n: sealed.wrap_sender(n))
            for n in nodes
        ]

    def _missing(
        self, config: ohttp.KeyConfig | None, nodes: Sequence[sealed.NodeKey]
    ) -> list[tuple[str, _Key, Callable[[], object]]]:
        todo: list[tuple[str, _Key, Callable[[], object]]] = []
        if config is not None:
            key = self._outer_key(config)
            have = len(self._outer.get(key, ()))
            todo += [("outer", key, lambda: ChunkedRequestSender(config))] * (self.depth - have)
        for n in list(nodes)[: self.max_nodes]:
            key = self._wrap_key(n)
            have = len(self._wraps.get(key, ()))
            todo += [("wrap", key, lambda n=n: sealed.wrap_sender(n))] * (self.depth - have)
        return todo

    def _hold(self, delta: int) -> None:
        self._waiting += delta
        if self._quiet is not None:
            if self._waiting:
                self._quiet.clear()
            else:
                self._quiet.set()

    def refill(self, config: ohttp.KeyConfig | None, nodes: Sequence[sealed.NodeKey]) -> None:
        """Top up, on the loop in steps, for ``config`` and ``nodes`` (the current ones:
        the setups for keys not among them are dropped). Returns at once; one refill at a
        time."""
        live_outer = {self._outer_key(config)} if config is not None else set()
        live_wraps = {self._wrap_key(n) for n in nodes}
        self._live = (live_outer, live_wraps)
        for pool, live in ((self._outer, live_outer), (self._wraps, live_wraps)):
            for key in [k for k in pool if k not in live]:
                del pool[key]
        if self._task is not None and not self._task.done():
            return
        todo = self._missing(config, nodes)
        if todo:
            self._task = asyncio.get_running_loop().create_task(self._run(todo))

    async def _run(self, todo: list[tuple[str, _Key, Callable[[], object]]]) -> None:
        if self._quiet is None:
            self._quiet = asyncio.Event()
            if self._waiting == 0:
                self._quiet.set()
        for kind, key, make in todo:
            await self._quiet.wait()
            outer = kind == "outer"
            if key not in self._live[0 if outer else 1]:
                continue  # its key was rotated out while this refill waited
            try:
                item = make()
            except Exception as exc:  # a key that fails now fails on the request path, typed
                log.debug("preparing HPKE senders failed: %s", type(exc).__name__)
                return
            pool: dict[_Key, deque] = self._outer if outer else self._wraps  # type: ignore[type-arg]
            pool.setdefault(key, deque()).append(item)
            await asyncio.sleep(0)  # one setup per step: what is ready runs in between

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._outer.clear()
        self._wraps.clear()


class FirstBytePending:
    """Held from a request's start to its first byte (``release``, or the exit): no setup
    step of ``pool`` runs meanwhile. ``pool`` None: holds nothing."""

    def __init__(self, pool: PreparedSenders | None) -> None:
        self._pool = pool

    def __enter__(self) -> FirstBytePending:
        if self._pool is not None:
            self._pool._hold(+1)
        return self

    def release(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool._hold(-1)

    def __exit__(self, *exc: object) -> None:
        self.release()

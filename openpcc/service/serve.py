"""One serve loop for every party, and the connection hygiene that comes with it.

aiohttp alone keeps a connection that never finishes its request head for its keep-alive
timeout (about an hour), puts no deadline or minimum rate on a request body, and lets
one address open as many connections as it likes: a handful of slow or idle sockets can
hold a service's slots or file descriptors. nginx's twin has ``client_header_timeout``,
``keepalive_timeout``, ``client_body_timeout`` and ``limit_conn``; this module gives every
party the same, with flags and ``OPENPCC_<PARTY>_*`` variables (``add_connection_args``):

- request head (line and headers) complete within ``head_timeout`` of the connection's
  start or of its first byte after an answer, else the connection is closed;
- an idle keep-alive connection is closed after ``keepalive_timeout``;
- a request body must arrive within ``body_timeout`` and, after ``body_grace``, at no
  less than ``body_min_rate`` bytes/s on average, else its reader gets
  ``BodyTooSlowError`` (a ``TimeoutError``, so the parties' existing read-timeout paths
  answer 408) and the guard answers 408 if the handler did not;
- at most ``max_per_client`` open connections per client address (0: no cap), for the
  relay, the one party whose peer address is a client's.

``serve`` runs listeners until SIGINT/SIGTERM, then closes them, lets in-flight requests
finish for ``shutdown_timeout`` seconds, and runs ``on_stop``. The hygiene lives in the
accept path and one middleware; nothing is added to the handlers' hot loops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from openpcc.lifecycle import watch_parent
from openpcc.service.http import problem
from openpcc.service.limits import (
    ConnectionLimits,
    MetricsListener,
    ServeSettings,
    serve_settings_from_args,
)
from openpcc.service.logs import setup_logging

T = TypeVar("T")


class BodyTooSlowError(TimeoutError):
    """The request body missed its total deadline or its minimum rate."""


def serve_settings(
    build: Callable[[], T], args: argparse.Namespace, command: str
) -> tuple[T, ServeSettings]:
    """A party's config (``build()``) and the serve loop's settings from parsed arguments,
    then the one logging setup. A bad value ends the command with one line
    (``openpcc <command>: <reason>``, exit 2), never a traceback."""
    try:
        config = build()
        settings = serve_settings_from_args(args)
    except ValueError as exc:
        print(f"openpcc {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging()
    return config, settings


def write_port_file(path: Path, ports: dict[str, int]) -> None:
    """Atomically (write, then rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ports) + "\n")
    os.replace(tmp, path)


def split_metrics(listener: Listener, where: MetricsListener) -> list[Listener]:
    """With a metrics port: a small app serving the public app's ``GET /metrics``
    handler there, and the public listener answering 404 for it."""
    if not where.metrics_port:
        return [listener]
    metrics_handler = next(
        (
            r.handler
            for r in listener.app.router.routes()
            if r.method == "GET" and r.resource is not None and r.resource.canonical == "/metrics"
        ),
        None,
    )
    if metrics_handler is None:
        raise ValueError(f"{listener.name} listener has no GET /metrics to move")

    @web.middleware
    async def hide(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/metrics":
            return problem(404, "Not Found", "metrics are served on their own listener")
        return await handler(request)

    listener.app.middlewares.append(hide)
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", metrics_handler)
    return [listener, Listener(metrics_app, where.metrics_host, where.metrics_port, "metrics")]


@dataclass(frozen=True)
class Listener:
    app: web.Application
    host: str
    port: int
    name: str = "public"


# ------------------------------------------------------------------ accept path


class _Guard:
    """Shared by every connection of one listener: the limits and per-address counts."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.per_client: Counter[str] = Counter()


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler plus the request-head deadline and address cap."""

    def __init__(self, guard: _Guard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard
        self._peer: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        guard = self._guard
        cap = guard.limits.max_per_client
        if cap:
            peer = transport.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) and peer else None
            if address is not None:
                if guard.per_client[address] >= cap:
                    self.force_close()
                    return
                guard.per_client[address] += 1
                self._peer = address
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._peer is not None:
            counts = self._guard.per_client
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_head_timer()  # a whole head arrived
        elif self._head_timer is None and not self._request_in_progress and not self._messages:
            self._arm_head_timer()  # the first bytes of the next head on a kept connection

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._guard.limits.head_timeout, self._head_expired
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._request_in_progress and not self._messages:
            self.force_close()


class _GuardedSite(web.TCPSite):
    """A TCP site whose connections get ``_GuardedHandler``.

    aiohttp builds its handlers in ``web.Server.__call__`` from private fields; the
    factory below does the same with the guarded class (tests/test_service_kit.py fails
    if an aiohttp release changes that).
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: _Guard) -> None:
        super().__init__(runner, host, port)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> _GuardedHandler:
            return _GuardedHandler(guard, server, loop=server._loop, **server._kwargs)

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, reuse_address=True
        )

    def bound_port(self) -> int:
        """The port the socket got (the kernel's choice for port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])


# ------------------------------------------------------------------ request bodies


def body_guard(limits: ConnectionLimits) -> Any:
    """Middleware: a body still arriving gets a watchdog (one timer a second, only while
    it arrives); a body that is too slow ends its reads with BodyTooSlowError."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        content = request.content
        if not request.body_exists or content.at_eof():
            return await handler(request)
        watch = _BodyWatch(content, limits)
        try:
            return await handler(request)
        except BodyTooSlowError as exc:
            return problem(408, "Request Timeout", str(exc))
        finally:
            watch.cancel()

    return guard


class _BodyWatch:
    def __init__(self, content: Any, limits: ConnectionLimits) -> None:
        self._content = content
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(1.0, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        content, limits = self._content, self._limits
        if content.at_eof() or content.exception() is not None:
            return
        elapsed = self._loop.time() - self._start
        if elapsed >= limits.body_timeout:
            why = f"request body not complete after {limits.body_timeout:g} s"
        elif elapsed >= limits.body_grace and content.total_bytes < limits.body_min_rate * elapsed:
            why = f"request body slower than {limits.body_min_rate:g} bytes/s"
        else:
            self._timer = self._loop.call_later(1.0, self._check)
            return
        content.set_exception(BodyTooSlowError(why))


# ------------------------------------------------------------------ the loop


def serve(
    listeners: Sequence[Listener],
    *,
    settings: ServeSettings,
    shutdown_timeout: float = 30.0,
    use_uvloop: bool = False,
    on_start: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    on_bound: Callable[[dict[str, int]], Awaitable[None] | None] | None = None,
    exit_code: Callable[[], int] | None = None,
    **runner_kwargs: Any,
) -> int:
    """Run ``listeners`` until SIGINT/SIGTERM; the exit status is ``exit_code()`` or 0.

    A metrics port in ``settings`` moves the first listener's ``/metrics`` there.
    ``on_bound(ports)`` runs once every listener is bound, with the port each got (by
    listener name: what ``--port 0`` chose); then the port file, if any, is written.

    ``runner_kwargs`` go to every ``web.AppRunner`` (``access_log``, ``handler_cancellation``
    ...); ``access_log`` defaults to None: no party keeps a per-request record by default.
    """
    if listeners:
        listeners = [*split_metrics(listeners[0], settings.metrics), *listeners[1:]]
    main = _serve(listeners, settings, shutdown_timeout, on_start, on_stop, on_bound,
                  runner_kwargs)  # fmt: skip
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
    return exit_code() if exit_code is not None else 0


async def _serve(
    listeners: Sequence[Listener],
    settings: ServeSettings,
    shutdown_timeout: float,
    on_start: Callable[[], Awaitable[None]] | None,
    on_stop: Callable[[], Awaitable[None]] | None,
    on_bound: Callable[[dict[str, int]], Awaitable[None] | None] | None,
    runner_kwargs: dict[str, Any],
) -> None:
    limits = settings.limits
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    def orphaned() -> None:
        logging.getLogger("openpcc.service").warning(
            "the process that started us is gone; stopping"
        )
        stop.set()

    watch_parent(loop, orphaned)  # started by `openpcc up` (a Lifeline): go down with it
    kwargs = {"access_log": None, **runner_kwargs}
    runners: list[web.AppRunner] = []
    try:
        if on_start is not None:
            await on_start()
        ports: dict[str, int] = {}
        for listener in listeners:
            listener.app.middlewares.insert(0, body_guard(limits))
            runner = web.AppRunner(
                listener.app,
                handle_signals=False,
                keepalive_timeout=limits.keepalive_timeout,
                shutdown_timeout=shutdown_timeout,
                **kwargs,
            )
            await runner.setup()
            runners.append(runner)
            site = _GuardedSite(runner, listener.host, listener.port, _Guard(limits))
            await site.start()
            ports[listener.name] = site.bound_port()
        if on_bound is not None:
            result = on_bound(ports)
            if inspect.isawaitable(result):
                await result
        if settings.report.port_file is not None:
            write_port_file(settings.report.port_file, ports)
        await stop.wait()
    finally:
        # Drain: close the listeners, let in-flight streams finish (up to
        # shutdown_timeout), and only then stop what the handlers use.
        await asyncio.gather(*(r.cleanup() for r in runners))
        if on_stop is not None:
            await on_stop()

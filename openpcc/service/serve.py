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
accept path and one middleware; nothing is added to the handlers' hot loops. With
``workers=N`` it runs N processes on the same ports (``openpcc/service/workers.py``). It
runs on uvloop where the package is installed (``OPENPCC_EVENT_LOOP=asyncio`` opts out):
less CPU per request and per wake-up for the same code.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from openpcc.lifecycle import watch_parent
from openpcc.service.http import problem
from openpcc.service.limits import (
    ConnectionLimits,
    MetricsListener,
    PortReport,
    ServeSettings,
    serve_settings_from_args,
)
from openpcc.service.logs import setup_logging
from openpcc.service.workers import (
    DUMP_INTERVAL,
    MAX_WORKERS,
    Supervisor,
    WorkerShare,
    reserve_ports,
)

EVENT_LOOP_ENV = "OPENPCC_EVENT_LOOP"

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


AppLike = web.Application | Callable[[], web.Application]


@dataclass(frozen=True)
class Listener:
    """``app`` may be a factory, called in the process that serves it: with workers,
    each builds its own app (its own database connections) after the fork."""

    app: AppLike
    host: str
    port: int
    name: str = "public"

    def built(self) -> Listener:
        app = self.app
        return self if isinstance(app, web.Application) else replace(self, app=app())


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

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, guard: _Guard, reuse_port: bool
    ) -> None:
        super().__init__(runner, host, port)
        self._guard = guard
        self._reuse = reuse_port

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> _GuardedHandler:
            return _GuardedHandler(guard, server, loop=server._loop, **server._kwargs)

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, reuse_address=True, reuse_port=self._reuse or None
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


def use_uvloop_default() -> bool:
    """uvloop where it is installed, unless ``OPENPCC_EVENT_LOOP=asyncio``."""
    if os.environ.get(EVENT_LOOP_ENV, "").strip().lower() == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def serve(
    listeners: Sequence[Listener],
    *,
    settings: ServeSettings,
    shutdown_timeout: float = 30.0,
    use_uvloop: bool | None = None,
    workers: int = 1,
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
    ``use_uvloop``: None picks uvloop where installed (``use_uvloop_default``).

    ``workers > 1``: that many processes serve the same ports (``workers.py``); each
    builds its apps from factories and runs ``on_start``/``on_bound``/``on_stop`` and
    ``exit_code`` for itself; the port file is written once all listen.

    ``runner_kwargs`` go to every ``web.AppRunner`` (``access_log``, ``handler_cancellation``
    ...); ``access_log`` defaults to None: no party keeps a per-request record by default.
    """
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}")
    if use_uvloop is None:
        use_uvloop = use_uvloop_default()
    hooks = (shutdown_timeout, use_uvloop, on_start, on_stop, on_bound, exit_code, runner_kwargs)
    if workers == 1:
        return _run_process(listeners, settings, *hooks)
    if any(isinstance(x.app, web.Application) for x in listeners):
        raise ValueError("with workers, each Listener.app must be a factory (built after the fork)")
    addresses = [(x.name, x.host, x.port) for x in listeners]
    if settings.metrics.metrics_port:
        addresses.append(("metrics", settings.metrics.metrics_host, settings.metrics.metrics_port))
    try:
        ports, held = reserve_ports(addresses)
    except OSError as exc:
        where = ", ".join(f"{host}:{port}" for _, host, port in addresses)
        logging.getLogger("openpcc.service").error("cannot listen on %s: %s", where, exc)
        return 1
    quiet = replace(settings, report=PortReport())  # the parent writes the port file

    def run_worker(share: WorkerShare, ready: Callable[[], None]) -> int:
        mine = [replace(x, port=ports[x.name]) for x in listeners]
        return _run_process(mine, quiet, *hooks, reuse_port=True, share=share, ready=ready)

    def listening(bound: dict[str, int]) -> None:
        logging.getLogger("openpcc.service").info(
            "%d workers listening on %s", workers, ", ".join(f"{k} {v}" for k, v in bound.items())
        )
        if settings.report.port_file is not None:
            write_port_file(settings.report.port_file, bound)

    return Supervisor(workers, ports, held, run_worker, listening, shutdown_timeout).run()


def _run_process(
    listeners: Sequence[Listener],
    settings: ServeSettings,
    shutdown_timeout: float,
    use_uvloop: bool,
    on_start: Callable[[], Awaitable[None]] | None,
    on_stop: Callable[[], Awaitable[None]] | None,
    on_bound: Callable[[dict[str, int]], Awaitable[None] | None] | None,
    exit_code: Callable[[], int] | None,
    runner_kwargs: dict[str, Any],
    *,
    reuse_port: bool = False,
    share: WorkerShare | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    listeners = [x.built() for x in listeners]
    if listeners:
        listeners = [*split_metrics(listeners[0], settings.metrics), *listeners[1:]]
    if share is not None:
        share.attach(listeners)

    async def bound(ports: dict[str, int]) -> None:
        if on_bound is not None:
            result = on_bound(ports)
            if inspect.isawaitable(result):
                await result
        if ready is not None:
            ready()

    main = _serve(listeners, settings, shutdown_timeout, on_start, on_stop, bound,
                  runner_kwargs, reuse_port, share)  # fmt: skip
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
    on_bound: Callable[[dict[str, int]], Awaitable[None]],
    runner_kwargs: dict[str, Any],
    reuse_port: bool,
    share: WorkerShare | None,
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
    dumper: asyncio.Task[None] | None = None
    try:
        if on_start is not None:
            await on_start()
        ports: dict[str, int] = {}
        for listener in listeners:
            app = listener.app
            assert isinstance(app, web.Application)
            app.middlewares.insert(0, body_guard(limits))
            runner = web.AppRunner(
                app,
                handle_signals=False,
                keepalive_timeout=limits.keepalive_timeout,
                shutdown_timeout=shutdown_timeout,
                **kwargs,
            )
            await runner.setup()
            runners.append(runner)
            site = _GuardedSite(runner, listener.host, listener.port, _Guard(limits), reuse_port)
            await site.start()
            ports[listener.name] = site.bound_port()
        if share is not None:
            dumper = asyncio.create_task(_dump_every(share))
        await on_bound(ports)
        if settings.report.port_file is not None:
            write_port_file(settings.report.port_file, ports)
        await stop.wait()
    finally:
        # Drain: close the listeners, let in-flight streams finish (up to
        # shutdown_timeout), and only then stop what the handlers use.
        if dumper is not None:
            dumper.cancel()
        await asyncio.gather(*(r.cleanup() for r in runners))
        if on_stop is not None:
            await on_stop()


async def _dump_every(share: WorkerShare) -> None:
    """Each worker's counters on disk every second, for whichever worker is scraped."""
    while True:
        with contextlib.suppress(OSError):
            share.dump()
        await asyncio.sleep(DUMP_INTERVAL)

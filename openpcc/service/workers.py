"""``--workers N``: one party served by N processes on the same port (``SO_REUSEPORT``).

Why processes: a party's Python work holds the GIL, so one process uses about one core;
N processes, each with its own event loop, its own connections to the shared state
(SQLite in WAL mode or Redis) and its own socket on the port, use N. The kernel spreads
new connections over the N sockets.

How (``serve_workers``, called by ``serve.serve`` when ``workers > 1``):

- the parent binds every listener's address once with ``SO_REUSEPORT`` and never
  listens on it: that learns the port ``--port 0`` chose, and keeps the port reserved
  while workers come and go (a bound socket that is not listening gets no connections);
- it forks N workers; each builds its apps (``Listener.app`` may be a factory, called in
  the worker: no database connection crosses a fork), binds the same ports with
  ``SO_REUSEPORT`` and runs the ordinary serve loop; the port file is written once
  every worker is listening;
- SIGTERM or SIGINT to the parent reaches every worker, which drains as a single
  process does (``--shutdown-timeout``); the parent exits when all have, non-zero if
  any did; a worker that outlives its drain by 10 s is killed;
- a worker that dies while serving is logged and started again after a second; if
  workers die more than ``MAX_RESTARTS`` times in ``RESTART_WINDOW`` seconds, or one
  dies before it ever listened, the parent stops the others and exits 1 (a crash loop
  or a broken start is the supervisor's — systemd's, Kubernetes' — to see, not ours to
  hide);
- workers go down with the parent however it ends (a pipe they watch, and Linux's
  parent-death signal), and the parent with whoever started it.

``/metrics`` answers for the whole party whichever worker the scrape reaches: each
worker writes its counters to a private folder every second (and when scraped); the
answer sums counters over workers (those of workers that died stay counted, so a
counter never goes down), gives each worker's gauges a ``worker`` label, and adds
``openpcc_worker_requests_total{worker}``: requests each worker answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from openpcc.lifecycle import PARENT_FD_ENV, die_with_parent
from openpcc.service.http import Metrics, number

log = logging.getLogger("openpcc.service")

MAX_WORKERS = 256
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_DELAY = 1.0
DUMP_INTERVAL = 1.0
KILL_GRACE = 10.0
WORKER_REQUESTS = "openpcc_worker_requests_total"


# ------------------------------------------------------------------ in each worker


@dataclass
class WorkerShare:
    """One worker's place among its siblings: its index and the metrics folder."""

    index: int
    folder: Path
    requests: int = 0
    metrics: Metrics | None = field(default=None, repr=False)

    def attach(self, listeners: Sequence[Any]) -> None:
        """Count requests on the first listener; serve the merged /metrics wherever the
        party's /metrics handler is (its own listener with --metrics-port)."""
        for listener in listeners:
            for route in listener.app.router.routes():
                resource = route.resource
                if route.method != "GET" or resource is None or resource.canonical != "/metrics":
                    continue
                owner = getattr(route.handler, "__self__", None)
                if isinstance(owner, Metrics):
                    self.metrics = owner
                    listener.app.middlewares.append(self._merged_metrics)
        if listeners:
            listeners[0].app.middlewares.insert(0, self._count)
        if self.metrics is None:
            log.warning("no Metrics behind GET /metrics: each worker answers for itself")

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        return await handler(request)

    @web.middleware
    async def _merged_metrics(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/metrics" or request.method != "GET":
            return await handler(request)
        self.dump()
        text = merge_dumps(self.folder)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    def dump(self) -> None:
        """This worker's counters, atomically (a reader never sees half a file)."""
        text = self.metrics.render() if self.metrics is not None else ""
        doc = {"pid": os.getpid(), "requests": self.requests, "text": text}
        path = self.folder / f"{self.index}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)


def _parse(text: str) -> tuple[dict[str, str], dict[str, str], dict[tuple[str, str], float]]:
    """Our own Prometheus text (``Metrics.render``): kinds, help lines, series."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    series: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            kinds[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, *rest = line.split(" ", 3)
            helps[name] = rest[0] if rest else ""
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name, brace, labels = key.partition("{")
            series[(name, brace + labels)] = float(value)
    return kinds, helps, series


def _with_worker(labels: str, index: str) -> str:
    inner = labels[1:-1] if labels else ""
    return "{" + ",".join(x for x in (f'worker="{index}"', inner) if x) + "}"


def merge_dumps(folder: Path) -> str:
    """One exposition for all workers: live ``<i>.json`` and dead ``gone-*.json``."""
    kinds: dict[str, str] = {}
    helps: dict[str, str] = {}
    sums: dict[str, dict[str, float]] = {}
    requests: dict[str, float] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a worker writing its first file: next scrape
        live = not path.stem.startswith("gone-")
        worker = path.stem
        k, h, series = _parse(doc.get("text", ""))
        kinds.update(k)
        helps.update(h)
        for (name, labels), value in series.items():
            if kinds.get(name) == "counter":
                table = sums.setdefault(name, {})
                table[labels] = table.get(labels, 0.0) + value
            elif live:
                sums.setdefault(name, {})[_with_worker(labels, worker)] = value
        for index, count in doc.get("requests_by_worker", {}).items():
            requests[index] = requests.get(index, 0.0) + count
        if live:
            requests[worker] = requests.get(worker, 0.0) + doc.get("requests", 0)
    lines = []
    for name in sorted(sums):
        if name in helps:
            lines.append(f"# HELP {name} {helps[name]}")
        lines.append(f"# TYPE {name} {kinds.get(name, 'untyped')}")
        lines += [f"{name}{labels} {number(v)}" for labels, v in sorted(sums[name].items())]
    lines.append(f"# HELP {WORKER_REQUESTS} HTTP requests each worker process answered")
    lines.append(f"# TYPE {WORKER_REQUESTS} counter")
    for index, count in sorted(requests.items()):
        lines.append(f'{WORKER_REQUESTS}{{worker="{index}"}} {number(count)}')
    return "\n".join(lines) + "\n"


def _retire_dump(folder: Path, index: int) -> None:
    """A dead worker's counters join ``gone-<i>.json`` (summed), so totals never drop."""
    path = folder / f"{index}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    gone = folder / f"gone-{index}.json"
    try:
        old = json.loads(gone.read_text())
    except (OSError, ValueError):
        old = {"text": "", "requests_by_worker": {}}
    kinds, helps, series = _parse(old["text"])
    k2, h2, s2 = _parse(doc.get("text", ""))
    kinds.update(k2)
    helps.update(h2)
    for key, value in s2.items():
        if kinds.get(key[0]) == "counter":
            series[key] = series.get(key, 0.0) + value
    lines = []
    for name in sorted({n for n, _ in series}):
        if name in helps:
            lines.append(f"# HELP {name} {helps[name]}")
        lines.append(f"# TYPE {name} {kinds[name]}")
        lines += [f"{n}{lab} {number(v)}" for (n, lab), v in sorted(series.items()) if n == name]
    by_worker = old.get("requests_by_worker", {})
    by_worker[str(index)] = by_worker.get(str(index), 0) + doc.get("requests", 0)
    tmp = gone.with_suffix(".tmp")
    tmp.write_text(json.dumps({"text": "\n".join(lines) + "\n", "requests_by_worker": by_worker}))
    os.replace(tmp, gone)
    path.unlink(missing_ok=True)


# ------------------------------------------------------------------ in the parent


def reserve_ports(addresses: Sequence[tuple[str, str, int]]) -> tuple[dict[str, int], list[Any]]:
    """Bind (never listen) each ``(name, host, port)`` with ``SO_REUSEPORT``; port 0 gets
    the kernel's choice, which every address of that name then shares."""
    ports: dict[str, int] = {}
    held: list[socket.socket] = []
    try:
        for name, host, port in addresses:
            infos = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], ports.get(name, port), *addr[2:]))
                ports.setdefault(name, sock.getsockname()[1])
    except OSError:
        for sock in held:
            sock.close()
        raise
    return ports, held


@dataclass
class _Worker:
    index: int
    pid: int
    ready_fd: int | None
    ready: bool = False


class Supervisor:
    """The parent of N workers; ``run`` returns the service's exit status."""

    def __init__(
        self,
        workers: int,
        ports: dict[str, int],
        held: list[Any],
        run_worker: Callable[[WorkerShare, Callable[[], None]], int],
        on_listening: Callable[[dict[str, int]], None],
        shutdown_timeout: float,
    ) -> None:
        self.count = workers
        self.ports = ports
        self.held = held
        self.run_worker = run_worker
        self.on_listening = on_listening
        self.shutdown_timeout = shutdown_timeout
        self.folder = Path(tempfile.mkdtemp(prefix="openpcc-workers-"))
        self.workers: dict[int, _Worker] = {}
        self.restarts: list[float] = []
        self.pending: dict[int, float] = {}  # index -> when to start it again
        self.stop_signal: int | None = None
        self.listening = False
        self.failed = False
        self.codes: list[int] = []

    # -- process creation

    def _fork(self, index: int) -> None:
        ready_r, ready_w = os.pipe()
        life_r, life_w = self._lifeline
        preexec = die_with_parent()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(ready_r)
                os.close(life_w)
                os.close(self._wake_r)
                os.close(self._wake_w)
                for w in self.workers.values():
                    if w.ready_fd is not None:
                        os.close(w.ready_fd)
                for sock in self.held:
                    sock.close()
                if self._parent_fd is not None:
                    os.close(self._parent_fd)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if preexec is not None:
                    preexec()  # SIGTERM when the parent dies
                os.environ[PARENT_FD_ENV] = str(life_r)  # and the serve loop watches it

                def ready() -> None:
                    os.write(ready_w, b"R")
                    os.close(ready_w)

                code = self.run_worker(WorkerShare(index, self.folder), ready)
            except SystemExit as exc:
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(code)
        os.close(ready_w)
        self.workers[pid] = _Worker(index, pid, ready_r)

    # -- the loop

    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lifeline = os.pipe()  # workers see EOF when we are gone
        parent_fd = os.environ.pop(PARENT_FD_ENV, None)
        self._parent_fd = int(parent_fd) if parent_fd and parent_fd.isdigit() else None
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        handlers = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        }
        try:
            for index in range(self.count):
                self._fork(index)
            self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for fd in (self._wake_r, self._wake_w, *self._lifeline):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in self.held:
                sock.close()
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.failed:
            return 1
        return max(self.codes, default=0)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum != signal.SIGCHLD and self.stop_signal is None:
            self.stop_signal = signum

    def _loop(self) -> None:
        stopping_since: float | None = None
        while True:
            now = time.monotonic()
            if (self.stop_signal is not None or self.failed) and stopping_since is None:
                stopping_since = now
                why = signal.Signals(self.stop_signal).name if self.stop_signal else "failure"
                log.info("%s: stopping %d worker(s)", why, len(self.workers))
                self.pending.clear()
                self._signal_all(signal.SIGTERM)
            if stopping_since is not None:
                if not self.workers:
                    return
                if now > stopping_since + self.shutdown_timeout + KILL_GRACE:
                    self._signal_all(signal.SIGKILL)
            for index, when in list(self.pending.items()):
                if now >= when:
                    del self.pending[index]
                    self._fork(index)
            self._wait(stopping_since is not None)
            self._reap(stopping_since is not None)
            if (
                not self.listening
                and all(w.ready for w in self.workers.values())
                and (len(self.workers) == self.count)
            ):
                self.listening = True
                self.on_listening(self.ports)

    def _wait(self, stopping: bool) -> None:
        fds = [self._wake_r]
        fds += [w.ready_fd for w in self.workers.values() if w.ready_fd is not None]
        if self._parent_fd is not None and not stopping:
            fds.append(self._parent_fd)
        timeout = 0.5 if (self.pending or stopping) else 5.0
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select(fds, [], [], timeout)
            for fd in readable:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(fd, 512):
                            pass
                elif fd == self._parent_fd:
                    log.warning("the process that started us is gone; stopping")
                    self._parent_fd = None
                    self.stop_signal = self.stop_signal or signal.SIGTERM
                else:
                    self._ready(fd)

    def _ready(self, fd: int) -> None:
        worker = next(w for w in self.workers.values() if w.ready_fd == fd)
        data = os.read(fd, 16)
        os.close(fd)
        worker.ready_fd = None
        worker.ready = data.startswith(b"R")

    def _reap(self, stopping: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.ready_fd is not None:
                os.close(worker.ready_fd)
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                self.codes.append(0 if code == 0 else 1)
                continue
            _retire_dump(self.folder, worker.index)
            if not worker.ready and not self.listening:
                log.error("worker %d exited (%d) before listening; stopping", worker.index, code)
                self.failed = True
                continue
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW]
            self.restarts.append(now)
            if len(self.restarts) > MAX_RESTARTS:
                log.error(
                    "worker %d exited (%d); %d workers died within %d s: stopping",
                    worker.index, code, len(self.restarts), RESTART_WINDOW,
                )  # fmt: skip
                self.failed = True
                continue
            log.warning(
                "worker %d (pid %d) exited (%d); starting it again", worker.index, pid, code
            )
            self.pending[worker.index] = now + RESTART_DELAY

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

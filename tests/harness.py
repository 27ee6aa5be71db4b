"""The tests' one process harness: every child a separate process on loopback that binds
port 0 and reports the port it got.

Why port 0: a port picked here and bound later by the child races with everything else
on the host (seen in CI: two services on one port, and one service's health check
answered by the other). A party started with ``--port 0 --port-file F`` lets the kernel
pick, then writes ``{"public": PORT, ...}`` to F once every listener is bound
(openpcc/service/serve.py); the test fakes do the same through ``run_fake``, and an
app served inside the test's own loop through ``serve_app``. ``free_port`` remains for
what cannot report a port it chose (redis-server, nginx, ``openpcc proxy``, a separate
``--metrics-port``), for a URL that must stay dead, and for a party that a test starts
after its clients (they must know the port first).

One process class (``Proc``), one way to start (``spawn``), one wait for HTTP
(``wait_http``); the party starters in ``tests/*_support`` are thin uses of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpcc.devstack.processes import free_port, read_port_file
from openpcc.lifecycle import Lifeline

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Every child goes down with the test process, however it ends (openpcc/lifecycle.py):
# a killed pytest worker leaves no party behind holding ports.
LIFELINE = Lifeline()


@dataclass
class Proc:
    """A child process, its combined output in ``log``, the ports it reported."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None  # nginx's prefix
    url_form: str = "http://{host}:{port}"

    @property
    def kind(self) -> str:  # the relay suites' "python" / "nginx"
        return self.name

    @property
    def port(self) -> int:
        return self.ports["public"]

    @property
    def url(self) -> str:
        return self.url_form.format(host=HOST, port=self.port)

    @property
    def internal(self) -> str:
        """The gateway's node-registration listener."""
        return f"http://{HOST}:{self.ports['internal']}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the child's process group (vLLM and other grandchildren too), then
        SIGKILL what is left after ``timeout``; the child's exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def spawn(
    name: str,
    cmd: list[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    report: bool = True,
    timeout: float = 30.0,
    ports: dict[str, int] | None = None,
) -> Proc:
    """Start ``cmd`` with its output in ``workdir/<name>.log``.

    ``report``: append ``--port-file`` and wait until the child wrote it (it is then
    listening); else ``ports`` are the ones it was told to bind."""
    log = workdir / f"{name}.log"
    port_file = workdir / f"{name}.ports.json"
    port_file.unlink(missing_ok=True)
    if report:
        cmd = [*cmd, "--port-file", str(port_file)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **LIFELINE.env(), **(env or {})},
            start_new_session=True,
            **LIFELINE.popen_kwargs(),
        )
    p = Proc(name, proc, log, dict(ports or {}))
    if report:
        p.ports = _wait_port_file(p, port_file, timeout)
    return p


def _wait_port_file(p: Proc, path: Path, timeout: float) -> dict[str, int]:
    ports = read_port_file(path, p.proc, timeout)
    if ports is None:
        p.stop()
        raise AssertionError(f"{p.name} did not report its ports:\n{p.output()[-4000:]}")
    return ports


def openpcc(
    name: str,
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    internal: bool = False,
    wait: str | None = "/healthz",
    timeout: float = 30.0,
) -> Proc:
    """``python -m openpcc.cli <args> --port 0`` (and ``--internal-port 0``), waited for
    until ``wait`` answers 200."""
    cmd = [sys.executable, "-m", "openpcc.cli", *args, "--port", "0"]
    if internal:
        cmd += ["--internal-port", "0"]
    p = spawn(name, cmd, workdir, env=env, timeout=timeout)
    if wait is not None:
        wait_http(p.url + wait, p, timeout=timeout)
    return p


def fake(
    name: str,
    workdir: Path,
    module: str,
    *args: str,
    wait: str | None = None,
    port: int = 0,
) -> Proc:
    """A test fake (``python -m tests.<module> <args>``), which reports through run_fake.

    ``port``: a fixed one, for a test that starts a client of the fake before the fake
    (a node whose gateway comes up later)."""
    cmd = [sys.executable, "-m", f"tests.{module}", *args, "--port", str(port)]
    p = spawn(name, cmd, workdir)
    if wait is not None:
        wait_http(p.url + wait, p)
    return p


def wait_http(
    url: str, proc: Proc | None = None, *, status: int = 200, timeout: float = 30.0
) -> None:
    """Until GET ``url`` answers ``status``; fails with the child's log when it exits or
    the time is up."""
    deadline = time.monotonic() + timeout
    while get(url, timeout=1)[0] != status:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.proc.returncode}):\n{proc.output()}")
        if time.monotonic() > deadline:
            where = f":\n{proc.output()[-4000:]}" if proc is not None else ""
            raise AssertionError(f"{url} never answered {status}{where}")
        time.sleep(0.05)


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """An ``openpcc`` admin command (account add, keys rotate ...)."""
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def start_redis(workdir: Path, port: int | None = None) -> Proc:
    """A redis-server of one test's own, so it can be stopped and started again on
    ``port`` (redis cannot report a port it chose: ``--port 0`` turns TCP off)."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = port or free_port()
    cmd = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
           "--dir", str(workdir)]  # fmt: skip
    p = spawn(f"redis-{port}", cmd, workdir, report=False, ports={"public": port})
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                break
        except OSError:
            if p.proc.poll() is not None or time.monotonic() > deadline:
                p.stop()
                raise AssertionError(f"redis-server did not start:\n{p.output()}") from None
            time.sleep(0.05)
    p.url_form = "redis://{host}:{port}/0"
    return p


# ------------------------------------------------------------------ in this process


@contextlib.asynccontextmanager
async def serve_app(app: Any, **runner_kwargs: Any) -> AsyncIterator[str]:
    """Serve an aiohttp ``app`` in the test's own event loop on port 0; yields its URL."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, **runner_kwargs)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        yield f"http://{HOST}:{_bound_port(site)}"
    finally:
        await runner.cleanup()


def _bound_port(site: Any) -> int:
    server = site._server  # aiohttp keeps the asyncio server private
    assert server is not None
    return int(server.sockets[0].getsockname()[1])


# ------------------------------------------------------------------ inside a fake


def run_fake(
    app: Any,
    argv: list[str] | None = None,
    on_bound: Callable[[int], Awaitable[None]] | None = None,
    **runner_kwargs: Any,
) -> None:
    """Serve a fake's aiohttp ``app`` on loopback (``--port``, default 0) until
    SIGTERM/SIGINT, and report the port as the parties do (``--port-file F``)."""
    from aiohttp import web

    from openpcc.lifecycle import watch_parent
    from openpcc.service.serve import write_port_file

    argv = sys.argv if argv is None else argv
    port_file = Path(argv[argv.index("--port-file") + 1])
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None, **runner_kwargs)
        await runner.setup()
        site = web.TCPSite(runner, HOST, port)
        await site.start()
        bound = _bound_port(site)
        if on_bound is not None:
            await on_bound(bound)
        write_port_file(port_file, {"public": bound})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watch_parent(loop, stop.set)  # the test process died: do not outlive it
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def fake_args(argv: list[str] | None = None) -> list[str]:
    """A fake's own arguments: ``argv`` without the program, ``--port`` and ``--port-file``."""
    args = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--port-file", "--port"):
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    return args

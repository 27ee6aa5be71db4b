"""`openpcc up` / `openpcc demo`: the whole local stack as separate processes.

Each party runs as its own `openpcc ... serve` process on loopback, exactly as an
operator would run it; this module only picks ports, creates the demo account, the
development trust root and the signed release manifest, waits for readiness, and
stops everything (process groups) on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openpcc.errors import OpenPCCError
from openpcc.lifecycle import Lifeline, signals_held

_HANDED_OUT: set[int] = set()
_RANDOM = random.Random()
_LOW, _HIGH = 20000, 32768


def free_port() -> int:
    """A loopback port nobody listens on, and not one this process handed out before.

    Only for what cannot bind port 0 and report it (nginx, Redis, ``openpcc proxy``, a
    URL that must stay dead): every party takes ``--port 0 --port-file`` instead.
    Why the memory: ports for a whole stack are picked before any service binds, and
    the same free port could come up twice. Two services then race for it, and the
    loser's health check is answered by the winner (seen in CI: the relay exited on
    EADDRINUSE while the issuer answered its /healthz). Why random and not bind(0): the
    kernel hands bind(0) the same port again and again, and parallel test workers each
    keep to their own residue class (``_partition``).
    """
    index, count = _partition()
    while True:
        # Below Linux's ephemeral range (32768-60999): no outgoing connection takes the
        # port between this check and the service's bind.
        port = _RANDOM.randrange(_LOW + index, _HIGH, count)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def _partition() -> tuple[int, int]:
    """``OPENPCC_PORT_PARTITION=i/n``: this process (and its children) take only ports
    that are i modulo n, so n test workers running side by side never pick the same one."""
    spec = os.environ.get("OPENPCC_PORT_PARTITION", "")
    index, _, count = spec.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        return 0, 1
    return (i, n) if 0 <= i < n else (0, 1)


def openpcc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "openpcc.cli", *args]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def internal(self) -> str:
        """The gateway's node-registration listener."""
        return f"http://127.0.0.1:{self.ports['internal']}"


@dataclass
class Processes:
    """Started services, stopped in reverse order (SIGTERM to the group, then SIGKILL).

    They go down with this process however it ends (openpcc/lifecycle.py): ``stop`` on
    a signal it can catch, the kernel's parent-death signal and a lifeline pipe on one it
    cannot (SIGKILL, a crash)."""

    services: list[Service] = field(default_factory=list)
    lifeline: Lifeline = field(default_factory=Lifeline)

    def start(
        self,
        name: str,
        args: list[str],
        log: Path,
        *,
        url: str | None = None,
        internal: bool = False,
        env: dict[str, str] | None = None,
        health: str = "/healthz",
        timeout: float = 60,
        progress: Callable[[str], None] | None = None,
    ) -> Service:
        """Start ``openpcc <args>`` and wait until ``health`` answers 200.

        Without ``url``, the party binds port 0 (and ``--internal-port 0`` with
        ``internal``) and reports what it got in a port file: no port is picked here
        that another process could take first. ``url``: a command that is not a party
        on the service kit (``openpcc proxy``), told its port."""
        port_file = log.with_name(log.stem + ".ports.json")
        port_file.unlink(missing_ok=True)
        if url is None:
            args = [*args, "--port", "0", "--port-file", str(port_file)]
            if internal:
                args += ["--internal-port", "0"]
        fh = log.open("ab")
        proc = subprocess.Popen(
            openpcc_cmd(*args),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.lifeline.env(), **(env or {})},
            start_new_session=True,
            **self.lifeline.popen_kwargs(),
        )
        fh.close()
        svc = Service(name, proc, url or "", log)
        self.services.append(svc)
        if url is None:
            svc.ports = _read_ports(svc, port_file, timeout)
            svc.url = f"http://127.0.0.1:{svc.ports['public']}"
        wait_healthy(svc, health, timeout, progress)
        return svc

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM each group, newest first; SIGKILL what is left after ``grace`` seconds.
        Signals are held meanwhile: a second Ctrl-C must not leave half the stack up."""
        with signals_held():
            for svc in reversed(self.services):
                if svc.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(svc.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for svc in reversed(self.services):
                try:
                    svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(svc.proc.pid, signal.SIGKILL)
                    svc.proc.wait()
            self.services.clear()


def _read_ports(svc: Service, path: Path, timeout: float) -> dict[str, int]:
    """The ports a party bound, from the file it writes once listening."""
    ports = read_port_file(path, svc.proc, timeout)
    if ports is not None:
        return ports
    if svc.proc.poll() is not None:
        raise StackStartError(
            f"{svc.name} exited with {svc.proc.returncode}; log {svc.log}:\n"
            + svc.log.read_text()[-3000:]
        )
    raise StackStartError(f"{svc.name} not listening after {timeout:.0f} s (log {svc.log})")


def read_port_file(
    path: Path, proc: subprocess.Popen[bytes], timeout: float
) -> dict[str, int] | None:
    """``{"public": PORT, ...}`` once the child (``--port-file path``) listens; None if it
    exits first or ``timeout`` passes. Atomic on the writer's side (write_port_file)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


class StackStartError(OpenPCCError, RuntimeError):
    """A party did not come up; the message is the one line to show the operator."""


def _reason(answer: urllib.error.HTTPError) -> str:
    """The ``reason`` of a party's 503 health answer (the node's: why its engine is not
    ready), else the status."""
    try:
        reason = json.loads(answer.read()).get("reason")
    except (ValueError, AttributeError, OSError):
        reason = None
    return str(reason) if reason else f"HTTP {answer.code}"


def wait_healthy(
    svc: Service, path: str, timeout: float, progress: Callable[[str], None] | None = None
) -> None:
    """Wait for 200 on ``path``; while a party answers 503 with a reason, report it every
    REPORT_EVERY seconds and end with it on timeout (one line, no traceback)."""
    from openpcc.progress import Every

    t0 = time.monotonic()
    every = Every(now=False)
    reason: str | None = None
    while True:
        if svc.proc.poll() is not None:
            raise StackStartError(
                f"{svc.name} exited with {svc.proc.returncode}; log {svc.log}:\n"
                + svc.log.read_text()[-3000:]
            )
        try:
            with urllib.request.urlopen(svc.url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as answer:
            reason = _reason(answer)
        except OSError:
            pass
        now = time.monotonic()
        if now - t0 > timeout:
            why = f": {reason}" if reason else f" (log {svc.log})"
            raise StackStartError(f"{svc.name} not ready after {timeout:.0f} s{why}")
        if progress is not None and reason and every.due():
            progress(f"{svc.name}: {reason} ({now - t0:.0f} s)")
        time.sleep(0.2)


def run_cli(*args: str) -> str:
    """Run an `openpcc` admin command; return its stdout (raises with its output on failure)."""
    out = subprocess.run(openpcc_cmd(*args), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"openpcc {' '.join(args[:3])} failed:\n{out.stdout}{out.stderr}")
    return out.stdout

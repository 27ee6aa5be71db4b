"""Supervise the inference engine (vLLM's OpenAI server) that the node forwards to.

The node decrypts a request inside the TEE and hands it to vLLM on loopback. vLLM is a
separate process tree (API server, EngineCore, workers), so the node owns its lifetime:
start it with flags that keep prompts out of its logs and keep it offline, wait until it
really serves, restart it if it dies (bounded, with backoff), and kill the whole process
group on stop so nothing holding decrypted prompts outlives the node.

``ExternalEngine`` offers the same interface for an engine someone else runs
(``--engine-url``), so the node's code does not care which one it has.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self

from openpcc.engine_models import (
    EngineModelError,
    base_url,
    not_listed_line,
    parse_model_list,
)
from openpcc.errors import OpenPCCError
from openpcc.lifecycle import die_with_parent
from openpcc.progress import Every

log = logging.getLogger(__name__)

LABEL_FILE = "OPENPCC_TEST_MODEL.txt"  # same name as node.tinymodel.LABEL_FILE
TINY_SERVED_NAME = "openpcc-tiny-random"

# Flags that would put prompts or outputs into vLLM's log: refused in extra_args.
_FORBIDDEN_ARGS = ("--enable-log-requests", "--enable-log-outputs", "--enable-log-deltas")

# Environment for the vLLM process tree. Logging is pinned to INFO (vLLM logs prompt
# inputs only at DEBUG with request logging on; we turn both off), and everything that
# would talk to the network from inside the TEE is switched off.
_FORCED_ENV = {
    "VLLM_LOGGING_LEVEL": "INFO",
    "VLLM_DEBUG_LOG_API_SERVER_RESPONSE": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
# Defaults an operator may override from the node's own environment.
_DEFAULT_ENV = {
    # GiB reserved for the KV cache on the CPU backend; vLLM's default (4 GiB or
    # more) is wasteful for the test model on a small machine.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


class EngineError(OpenPCCError, RuntimeError):
    """The engine could not be started, or gave up restarting."""

    status_hint = 503


class Engine(Protocol):
    """What the node needs from an engine, supervised or external."""

    ready: asyncio.Event

    @property
    def url(self) -> str: ...

    @property
    def restarts(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def healthy(self) -> bool: ...

    @property
    def problem(self) -> str | None:
        """Why it is not ready, one line (None while it is): /readyz and `up` show it."""
        ...


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (vLLM binds it itself, so this is best effort)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_served_name(model_dir: Path | str) -> str:
    """The tiny test model gets its fixed name; any other model its directory name."""
    model_dir = Path(model_dir)
    if (model_dir / LABEL_FILE).exists():
        return TINY_SERVED_NAME
    return model_dir.resolve().name


async def _probe(url: str, served_name: str | None, timeout: float = 5.0) -> str | None:
    """None when ``/health`` answers 200 and ``/v1/models`` lists ``served_name``;
    otherwise one line saying why not (the same line `openpcc up` prints)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url + "/health") as r:
                if r.status != 200:
                    return f"engine at {url} answered /health with HTTP {r.status}"
            async with s.get(url + "/v1/models") as r:
                if r.status != 200:
                    return f"engine at {url} answered /v1/models with HTTP {r.status}"
                body = await r.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"engine at {url} does not answer: {exc or type(exc).__name__}"
    try:
        models = parse_model_list(body)
    except EngineModelError as exc:
        return f"engine at {url}: {exc}"
    if served_name is None or served_name in models:
        return None
    return not_listed_line(url, models, served_name)


class VLLMEngine:
    """vLLM's OpenAI server as a supervised child process group on loopback.

    ``ready`` is set while the server answers; it is cleared while a crashed server is
    being restarted, so the node can refuse work (and the gateway try another node)
    instead of queueing prompts behind a restart.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        max_model_len: int = 512,
        dtype: str = "auto",
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        log_path: Path | str | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        stop_timeout: float = 20.0,
        max_restarts: int = 5,
        restart_window: float = 600.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        health_interval: float = 10.0,
        health_failures: int = 3,
    ) -> None:
        for arg in extra_args:
            if arg.split("=", 1)[0] in _FORBIDDEN_ARGS:
                raise ValueError(f"{arg}: vLLM must never log prompts or outputs")
        self.model_dir = Path(model_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.served_model_name = served_model_name or default_served_name(self.model_dir)
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.extra_args = tuple(extra_args)
        self.python = python
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.health_interval = health_interval
        self.health_failures = health_failures

        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self.start_seconds: float | None = None  # how long the last (re)start took
        self._restarts = 0
        self._restart_times: collections.deque[float] = collections.deque()
        self._proc: asyncio.subprocess.Process | None = None
        self._pgid: int | None = None
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None
        self._health: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        # Without a log file, the last lines stay in memory only, for error messages.
        self._tail: collections.deque[str] = collections.deque(maxlen=60)

    # -- public surface -----------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the OpenAI server (no trailing slash, no ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def restarts(self) -> int:
        """How many times the supervisor has restarted a dead server."""
        return self._restarts

    @property
    def problem(self) -> str | None:
        """Why it is not ready, for /readyz and `openpcc up` (None while it is)."""
        if self.ready.is_set():
            return None
        if self.failed is not None:
            return "vLLM gave up restarting"
        return "vLLM is starting" if self._restarts == 0 else "vLLM is restarting"

    @property
    def pid(self) -> int | None:
        """PID of the API server process (its process group has the same id)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        """Process group of the whole vLLM tree (API server, EngineCore, workers)."""
        return self._pgid

    def command(self) -> list[str]:
        """The argv that starts vLLM (also shown in docs and logs)."""
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--served-model-name",
            self.served_model_name,
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            "--no-enable-log-requests",
            # Statistics stay on: without them vLLM's /metrics never updates its queue,
            # KV-cache and prefix-cache figures, which the node's load report reads. They
            # are aggregates (its periodic log line has counts and rates, no request data).
            "--disable-uvicorn-access-log",
            "--disable-fastapi-docs",
            *self.extra_args,
        ]

    def child_env(self) -> dict[str, str]:
        """Environment for vLLM: defaults < node environment < ``env`` < forced values."""
        out = dict(_DEFAULT_ENV)
        out.update(os.environ)
        out.update(self.env)
        out.update(_FORCED_ENV)
        return out

    async def start(self) -> None:
        """Spawn vLLM and return once it serves; start the crash monitor."""
        if self._proc is not None:
            raise RuntimeError("engine already started")
        self._stopping = False
        self.failed = None
        await self._spawn_and_wait()
        self._monitor = asyncio.create_task(self._watch(), name="vllm-monitor")
        if self.health_interval > 0:
            self._health = asyncio.create_task(self._health_loop(), name="vllm-health")

    async def stop(self) -> None:
        """Stop supervising and kill the whole vLLM process group (TERM, then KILL)."""
        self._stopping = True
        self.ready.clear()
        for task in (self._monitor, self._health):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._monitor = self._health = None
        await self._terminate()

    async def healthy(self) -> bool:
        """One readiness probe (``/health`` and ``/v1/models``)."""
        return await _probe(self.url, self.served_model_name) is None

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the server is ready (e.g. after a restart); raise if it gave up."""

        async def _wait() -> None:
            while not self.ready.is_set():
                if self.failed is not None:
                    raise EngineError("vLLM gave up restarting") from self.failed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ready.wait(), 1.0)

        await asyncio.wait_for(_wait(), timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- process handling ---------------------------------------------------------

    def _open_log(self) -> IO[bytes] | int:
        if self.log_path is None:
            return asyncio.subprocess.PIPE
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        f = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        f.write(f"--- openpcc: starting vLLM at {stamp} (restart {self._restarts})\n".encode())
        f.flush()
        return f

    async def _spawn(self) -> None:
        out = self._open_log()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.child_env(),
                start_new_session=True,  # own process group: killpg reaches every child
                preexec_fn=die_with_parent(),  # a node killed outright takes vLLM along
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._pgid = self._proc.pid
        log.info("vLLM started (pid %d, %s)", self._proc.pid, self.url)
        if self._proc.stdout is not None:
            self._pump = asyncio.create_task(self._pump_output(self._proc.stdout))

    async def _pump_output(self, stream: asyncio.StreamReader) -> None:
        """Keep the last lines of output in memory (never on disk) for error reports."""
        while line := await stream.readline():
            self._tail.append(line.decode(errors="replace").rstrip())

    def _log_tail(self) -> str:
        if self.log_path is not None:
            try:
                lines = self.log_path.read_text(errors="replace").splitlines()[-40:]
            except OSError:
                lines = []
            return "\n".join(lines) + f"\n(full log: {self.log_path})"
        return "\n".join(self._tail)

    async def _spawn_and_wait(self) -> None:
        """Spawn, then poll readiness until it serves, dies, or the timeout passes."""
        t0 = time.monotonic()
        await self._spawn()
        assert self._proc is not None
        deadline = t0 + self.startup_timeout
        while True:
            if self._proc.returncode is not None:
                rc = self._proc.returncode
                await self._terminate()
                raise EngineError(f"vLLM exited with {rc} while starting:\n{self._log_tail()}")
            if await self.healthy():
                break
            if time.monotonic() > deadline:
                await self._terminate()
                raise EngineError(
                    f"vLLM not ready after {self.startup_timeout:.0f} s:\n{self._log_tail()}"
                )
            await asyncio.sleep(0.5)
        self.start_seconds = time.monotonic() - t0
        log.info("vLLM ready after %.1f s", self.start_seconds)
        self.ready.set()

    async def _terminate(self) -> None:
        """SIGTERM the group, wait, SIGKILL what is left, and wait until the group is gone.

        State is cleared only at the end, so a cancelled stop can simply be retried.
        """
        proc, pgid = self._proc, self._pgid
        if pgid is not None:
            if proc is not None and proc.returncode is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout)
                except TimeoutError:
                    log.warning("vLLM ignored SIGTERM for %.0f s; killing", self.stop_timeout)
            # Children (EngineCore, workers) may outlive the API server: kill them all.
            _killpg(pgid, signal.SIGKILL)
            if proc is not None:
                await proc.wait()
            deadline = time.monotonic() + 10
            while _group_alive(pgid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._proc is proc:
            self._proc = None
            self._pgid = None

    async def _watch(self) -> None:
        """Restart vLLM when it exits on its own, at most ``max_restarts`` per window."""
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            rc = await proc.wait()
            if self._stopping:
                return
            self.ready.clear()
            log.error("vLLM exited unexpectedly (rc %s); restarting", rc)
            await self._terminate()
            while not self._stopping:
                now = time.monotonic()
                while self._restart_times and now - self._restart_times[0] > self.restart_window:
                    self._restart_times.popleft()
                if len(self._restart_times) >= self.max_restarts:
                    self.failed = EngineError(
                        f"vLLM died {len(self._restart_times)} times in "
                        f"{self.restart_window:.0f} s; giving up"
                    )
                    log.error("%s", self.failed)
                    return
                delay = min(self.backoff_max, self.backoff_initial * 2 ** len(self._restart_times))
                self._restart_times.append(now)
                await asyncio.sleep(delay)
                self._restarts += 1
                try:
                    await self._spawn_and_wait()
                    break
                except EngineError as exc:
                    log.error("vLLM restart failed: %s", str(exc).splitlines()[0])

    async def _health_loop(self) -> None:
        """Kill a server that is alive but stops answering; ``_watch`` restarts it."""
        misses = 0
        while not self._stopping:
            await asyncio.sleep(self.health_interval)
            if not self.ready.is_set() or self._proc is None:
                misses = 0
                continue
            if await self.healthy():
                misses = 0
                continue
            misses += 1
            if misses >= self.health_failures and self._pgid is not None:
                log.error("vLLM failed %d health checks; killing it", misses)
                self.ready.clear()
                _killpg(self._pgid, signal.SIGKILL)
                misses = 0


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in the group."""
    try:
        import psutil  # comes with vLLM
    except ImportError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for p in psutil.process_iter(["status"]):
        # A process may exit between the listing and getpgid (seen in the suite).
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


class ExternalEngine:
    """An OpenAI-compatible server run by someone else (``--engine-url``).

    Same interface as :class:`VLLMEngine`; start only waits for it to answer and stop
    does nothing, because its lifetime is not ours to manage.
    """

    def __init__(
        self,
        url: str,
        *,
        served_model_name: str | None = None,
        startup_timeout: float | None = None,
    ) -> None:
        self._url = base_url(url)
        self.served_model_name = served_model_name
        self.startup_timeout = startup_timeout
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        # Why the engine is not ready (None while it is): /readyz shows it, `up` prints it.
        self.problem: str | None = "not checked yet"

    @property
    def url(self) -> str:
        return self._url

    @property
    def restarts(self) -> int:
        return 0

    async def start(self) -> None:
        """Wait until the external server answers and lists our model.

        Until then the reason is logged every REPORT_EVERY seconds; with a
        ``startup_timeout`` the wait ends in EngineError carrying that reason.
        """
        t0 = time.monotonic()
        every = Every()
        while not await self.healthy():
            now = time.monotonic()
            if self.startup_timeout is not None and now - t0 > self.startup_timeout:
                raise EngineError(f"engine not ready: {self.problem}")
            if every.due():
                log.warning("%s", self.problem)
            await asyncio.sleep(0.5)
        self.ready.set()

    async def stop(self) -> None:
        self.ready.clear()

    async def healthy(self) -> bool:
        self.problem = await _probe(self._url, self.served_model_name)
        return self.problem is None

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

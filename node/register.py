"""Registration with the gateway, repeated as the heartbeat (docs/PROTOCOL.md, Node API).

The gateway forgets a node after three missed heartbeats, so the node re-registers
every interval, and only while its engine is ready: a node whose vLLM is down should
drop out of the directory rather than attract requests it will fail. When the gateway
is unreachable the node retries sooner, with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("openpcc.node.register")

REGISTER_PATH = "/internal/nodes"


@dataclass(frozen=True)
class RegistrationConfig:
    gateway_internal: str  # base URL, e.g. http://10.0.0.2:9001
    secret: str
    heartbeat: float = 10.0
    timeout: float = 5.0
    min_backoff: float = 0.25


class Registrar:
    """Background heartbeat loop; ``document`` builds the current registration body."""

    def __init__(
        self,
        config: RegistrationConfig,
        document: Callable[[], Awaitable[dict[str, Any]]],
        engine_ready: Callable[[], bool],
    ) -> None:
        self.config = config
        self._document = document
        self._engine_ready = engine_ready
        self._task: asyncio.Task[None] | None = None
        self.registered = 0  # successful registrations, for /metrics
        self.failures = 0

    @property
    def endpoint(self) -> str:
        return self.config.gateway_internal.rstrip("/") + REGISTER_PATH

    async def register_once(self, session: aiohttp.ClientSession) -> bool:
        """One POST; True on a 2xx. Failures are logged without the secret or the bundle."""
        body = await self._document()
        headers = {"Authorization": f"Bearer {self.config.secret}"}
        try:
            async with session.post(self.endpoint, json=body, headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True
                log.warning("gateway refused registration: HTTP %d", resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("gateway unreachable for registration (%s)", type(exc).__name__)
        return False

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        backoff = self.config.min_backoff
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if not self._engine_ready():
                    await asyncio.sleep(min(self.config.min_backoff * 4, self.config.heartbeat))
                    continue
                try:
                    ok = await self.register_once(session)
                except Exception as exc:  # keep heartbeating whatever one attempt hit
                    log.error("registration attempt failed: %s", type(exc).__name__)
                    ok = False
                if ok:
                    if self.registered == 0 or backoff != self.config.min_backoff:
                        log.info("registered with the gateway")
                    self.registered += 1
                    backoff = self.config.min_backoff
                    await asyncio.sleep(self.config.heartbeat)
                else:
                    self.failures += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.heartbeat)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="node-registrar")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

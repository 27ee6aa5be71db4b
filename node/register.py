"""Registration with the gateway, repeated as the heartbeat (docs/PROTOCOL.md, Node API).

Each registration carries the node's admission credential (who may ask) and is signed by
the node's attested signing key over the exact body and the time (openpcc/admission.py),
so only this node can list itself under its id and a copy goes stale within a minute.

The gateway forgets a node after three missed heartbeats, so the node re-registers
every interval, and only while its engine is ready: a node whose vLLM is down should
drop out of the directory rather than attract requests it will fail. When the gateway
is unreachable the node retries sooner, with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from openpcc.admission import SIGNATURE_HEADER

log = logging.getLogger("openpcc.node.register")

REGISTER_PATH = "/internal/nodes"


@dataclass(frozen=True)
class RegistrationConfig:
    gateway_internal: str  # base URL, e.g. http://10.0.0.2:9001
    credential: str  # opnc1.NAME.SECRET
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
        sign: Callable[[bytes], str],
    ) -> None:
        self.config = config
        self._document = document
        self._sign = sign
        self._engine_ready = engine_ready
        self._task: asyncio.Task[None] | None = None
        self.registered = 0  # successful registrations, for /metrics
        self.failures = 0

    @property
    def endpoint(self) -> str:
        return self.config.gateway_internal.rstrip("/") + REGISTER_PATH

    async def register_once(self, session: aiohttp.ClientSession) -> bool:
        """One POST; True on a 2xx. Failures are logged without the credential or the bundle
        (the gateway's reason is logged: it names the rule, never a secret)."""
        body = json.dumps(await self._document(), separators=(",", ":")).encode()
        headers = {
            "Authorization": f"Bearer {self.config.credential}",
            "Content-Type": "application/json",
            SIGNATURE_HEADER: self._sign(body),
        }
        try:
            async with session.post(self.endpoint, data=body, headers=headers) as resp:
                answer = await resp.read()
                if 200 <= resp.status < 300:
                    return True
                try:
                    reason = str(json.loads(answer).get("detail", ""))[:300]
                except (ValueError, AttributeError):
                    reason = ""
                log.warning("gateway refused registration: HTTP %d %s", resp.status, reason)
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

"""The issuer directory the gateway redeems against: fetched, refreshed, bounded.

The gateway trusts exactly the token keys the issuer lists right now. It refetches
when the issuer's ``max-age`` runs out (clamped to [min_refresh, max_refresh]), keeps
the last good copy when a fetch fails, and refetches early (at most once per
``min_refresh``) when a token names a key it does not know, which is what a key
rotation looks like from here before the cache expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from openpcc.bodies import read_at_most
from openpcc.errors import OpenPCCError
from openpcc.privacypass.auth import (
    TOKEN_TYPE_BLIND_RSA,
    PrivateTokenChallenge,
    TokenChallenge,
    format_www_authenticate,
)
from openpcc.privacypass.directory import (
    MAX_DIRECTORY_BYTES,
    MEDIA_TYPE,
    WELL_KNOWN_PATH,
    IssuerDirectory,
)

log = logging.getLogger("openpcc.gateway")


def parse_max_age(cache_control: str | None) -> int | None:
    """``max-age`` from a Cache-Control value; None when absent or unusable."""
    if not cache_control:
        return None
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0
        if name == "max-age":
            try:
                return max(0, int(value.strip().strip('"')))
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class DirectorySnapshot:
    raw: bytes  # exactly what the issuer sent (clients compare it byte for byte)
    directory: IssuerDirectory
    keys: dict[bytes, bytes]  # token_key_id (SHA-256 of the SPKI) -> SPKI, type 2 only
    fetched_at: float


class IssuerDirectoryCache:
    def __init__(
        self,
        issuer_url: str,
        issuer_name: str,
        *,
        min_refresh: float = 10.0,
        max_refresh: float = 3600.0,
        timeout: float = 5.0,
    ) -> None:
        self.url = issuer_url.rstrip("/") + WELL_KNOWN_PATH
        self.challenge = TokenChallenge(TOKEN_TYPE_BLIND_RSA, issuer_name, b"", ())
        self.challenge_bytes = self.challenge.encode()
        self.min_refresh = min_refresh
        self.max_refresh = max_refresh
        self.timeout = timeout
        self.snapshot: DirectorySnapshot | None = None
        self._next_fetch = 0.0
        self._last_attempt = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self._next_fetch - time.monotonic()))
            if time.monotonic() >= self._next_fetch:
                await self.refresh()

    async def refresh(self) -> bool:
        """Fetch once; on failure keep the old snapshot and retry with backoff."""
        async with self._lock:
            self._last_attempt = time.monotonic()
            try:
                snap, max_age = await self._fetch()
            except (OpenPCCError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._failures += 1
                delay = min(self.max_refresh, self.min_refresh * 2 ** min(self._failures, 8))
                if self.snapshot is None:
                    delay = min(delay, 2.0 * self._failures)  # nothing to redeem with: hurry
                self._next_fetch = time.monotonic() + delay
                log.warning(
                    "issuer directory fetch failed (%s); retry in %.0f s", type(exc).__name__, delay
                )
                return False
            self._failures = 0
            self.snapshot = snap
            age = self.max_refresh if max_age is None else max_age
            self._next_fetch = time.monotonic() + min(self.max_refresh, max(self.min_refresh, age))
            return True

    async def _fetch(self) -> tuple[DirectorySnapshot, int | None]:
        assert self._session is not None
        async with self._session.get(
            self.url, headers={"Accept": MEDIA_TYPE}, allow_redirects=False
        ) as r:
            if r.status != 200:
                raise ValueError(f"issuer answered {r.status}")
            raw = await read_at_most(r.content, MAX_DIRECTORY_BYTES)
            if len(raw) > MAX_DIRECTORY_BYTES:
                raise ValueError("issuer directory too large")
            max_age = parse_max_age(r.headers.get("Cache-Control"))
        directory = IssuerDirectory.parse(raw)
        keys = {
            hashlib.sha256(e.token_key).digest(): e.token_key
            for e in directory.token_keys
            if e.token_type == TOKEN_TYPE_BLIND_RSA
        }
        return DirectorySnapshot(raw, directory, keys, time.time()), max_age

    async def key_for(self, token_key_id: bytes) -> bytes | None:
        """The listed token key with this id; refetches early (rate-limited) if unknown."""
        snap = self.snapshot
        if snap is not None and token_key_id in snap.keys:
            return snap.keys[token_key_id]
        if time.monotonic() - self._last_attempt >= self.min_refresh:
            await self.refresh()
            snap = self.snapshot
            if snap is not None:
                return snap.keys.get(token_key_id)
        return None

    def www_authenticate(self) -> str | None:
        """The challenge a client should get a token for, under the current issuing key."""
        snap = self.snapshot
        if snap is None:
            return None
        try:
            entry = snap.directory.select_key(TOKEN_TYPE_BLIND_RSA)
        except OpenPCCError:
            return None
        return format_www_authenticate(PrivateTokenChallenge(self.challenge_bytes, entry.token_key))

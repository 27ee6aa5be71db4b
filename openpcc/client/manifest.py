"""Keeping the client's release manifest current: refreshed before it expires.

Why: a manifest is valid for a window (docs/ATTESTATION.md) and the operator re-signs it
before ``expires_at`` (and on every key rotation). A client that only knows the manifest
it started with, a proxy or an app backend running for weeks, would stop trusting every
node at ``expires_at``; so it fetches the newest signed manifest ahead of that, judges it
exactly as at load, and swaps it in (``Client.use_policy``).

The rule:

* due once less than a quarter of the manifest's lifetime (``expires_at - issued_at``)
  remains, or once it has expired (``refresh_due``);
* at most one attempt per ``MIN_INTERVAL`` (60 s) by the client's clock, whatever its
  outcome, so a broken source is not hammered by a busy proxy;
* made lazily, in the request path, before nodes are verified; a failed attempt is
  logged and the request goes on under the manifest in use. Only an expired manifest
  fails the request, after its one attempt, with the usual refusal;
* accepted only if it verifies under the profile's pinned release key(s) at the client's
  clock and its serial is at least the one in use: higher replaces it, equal keeps it,
  lower is a rollback (refused, logged, the old one kept); and the profile's serial
  record (``release-serials.json``) must not know a higher one. The accepted bytes are
  then written to ``release-manifest.json`` beside ``client.json`` (0600), which the next
  start prefers to an older configured file (``profile.newest_policy``).

Sources (``manifest_url`` in client.json): absent or ``"gateway"``: ``GET
/v1/release-manifest`` inside OHTTP through the relay, so the gateway learns only that
some client refreshed, and hands everybody the same bytes; an ``https://`` URL
(``http://`` only on loopback, for tests): fetched directly, which shows that host the
client's address; ``"off"``: never refresh. Each request carries ``If-None-Match`` with
the last ETag, so an unchanged manifest costs a 304 and no body.

Only the Ed25519 form refreshes. A Sigstore profile keeps the manifest it was given: its
proof is a second file (the bundle) that no source here serves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from openpcc.attestation.policy import MAX_MANIFEST_SIZE, TrustPolicy
from openpcc.bodies import read_at_most
from openpcc.client.serials import SERIALS_FILE, remember_serial
from openpcc.errors import DecodeError, LimitExceededError, OpenPCCError

if TYPE_CHECKING:
    from openpcc.client.client import Client, KeyPins, NodeVerifier

log = logging.getLogger("openpcc.client")


GATEWAY = "gateway"
OFF = "off"
MANIFEST_PATH = "/v1/release-manifest"  # the gateway's inner route
MIN_INTERVAL = 60.0  # seconds between two attempts, by the client's clock
FETCH_TIMEOUT = 15.0  # one attempt, all in: a slow source must not hold requests long
MAX_SIGNED = 2 * MAX_MANIFEST_SIZE  # what SignedManifest.decode accepts


def refresh_due(policy: TrustPolicy, now: float) -> bool:
    """True once less than a quarter of the manifest's lifetime remains (or none)."""
    m = policy.manifest
    return now >= m.expires_at - (m.expires_at - m.issued_at) / 4


def parse_source(value: Any) -> str | None:
    """``manifest_url`` from client.json: ``GATEWAY``, an absolute URL, or None (off)."""
    if value is None or value == GATEWAY:
        return GATEWAY
    if value == OFF:
        return None
    if not isinstance(value, str):
        raise DecodeError('client config manifest_url: "gateway", "off" or an https:// URL')
    url = urlsplit(value)
    if url.scheme == "https" and url.hostname:
        return value
    if url.scheme == "http" and url.hostname and _loopback(url.hostname):
        return value
    raise DecodeError('client config manifest_url: "gateway", "off" or an https:// URL')


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RefreshStats:
    """What the refresher did since the client started (for diagnostics and tests)."""

    attempts: int = 0
    replaced: int = 0  # a newer manifest taken into use
    not_modified: int = 0  # 304 for the ETag sent
    unchanged: int = 0  # 200 with the serial already in use
    refused: int = 0  # did not verify, or older (rollback)
    failed: int = 0  # the source did not answer usefully


class ManifestRefresher:
    """Holds the manifest a client trusts and fetches a newer one when due (module doc)."""

    def __init__(
        self,
        policy: TrustPolicy,
        release_keys: Sequence[bytes],
        profile_dir: Path,
        *,
        source: str = GATEWAY,
        clock: Callable[[], float] = time.time,
        make_verifier: Callable[[TrustPolicy], NodeVerifier] | None = None,
        min_interval: float = MIN_INTERVAL,
        timeout: float = FETCH_TIMEOUT,
    ) -> None:
        if policy.key_id == "unsigned":
            raise ValueError("an unsigned (test) policy has no expiry to refresh before")
        self.policy = policy
        self.source = source
        self.etag: str | None = None
        self.last_attempt: float | None = None
        self.stats = RefreshStats()
        self._keys = list(release_keys)
        self._serials = profile_dir / SERIALS_FILE
        self._clock = clock
        self._make_verifier = make_verifier or _bundle_verifier
        self._min_interval = min_interval
        self._timeout = timeout
        self._lock = asyncio.Lock()

    def due(self, now: float) -> bool:
        """Cheap, for every request: the manifest is due and no attempt was made lately."""
        if self.last_attempt is not None and now - self.last_attempt < self._min_interval:
            return False
        return refresh_due(self.policy, now)

    async def refresh_if_due(self, client: Client) -> tuple[KeyPins, NodeVerifier] | None:
        """One attempt when due; the new (trust, verifier) if a newer manifest was taken,
        else None. Never raises for the source or the manifest: the caller goes on with
        the policy in use, which refuses nodes by itself once it has expired."""
        if not self.due(self._clock()):
            return None
        async with self._lock:  # concurrent requests: one attempt, the others wait for it
            now = self._clock()
            if not self.due(now):
                return None
            self.last_attempt = now
            self.stats.attempts += 1
            try:
                async with asyncio.timeout(self._timeout):
                    status, etag, body = await self._fetch(client)
            except (OpenPCCError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.stats.failed += 1
                log.warning("release manifest refresh from %s failed: %s", self._where(), exc)
                return None
            if status == 304:
                self.stats.not_modified += 1
                return None
            if status != 200:
                self.stats.failed += 1
                log.warning("release manifest refresh: %s answered %d", self._where(), status)
                return None
            try:
                policy = self._accept(body, etag, now)
            except OpenPCCError as exc:
                self.stats.refused += 1
                log.warning("refused the release manifest from %s: %s", self._where(), exc)
                return None
            if policy is None:
                return None
            return policy, self._make_verifier(policy)

    def _accept(self, body: bytes, etag: str | None, now: float) -> TrustPolicy | None:
        """Verify like a profile's manifest, refuse a rollback, remember and persist."""
        policy = TrustPolicy.from_signed(body, self._keys, datetime.fromtimestamp(now, UTC))
        held, offered = self.policy.manifest.serial, policy.manifest.serial
        if offered < held:
            self.stats.refused += 1
            log.warning(
                "refused release manifest serial %d from %s: older than serial %d in use "
                "(rollback); keeping it",
                offered,
                self._where(),
                held,
            )
            return None
        if offered == held:
            self.stats.unchanged += 1
            self.etag = etag
            return None
        remember_serial(policy, self._serials, manifest=body)  # raises on a rollback
        self.policy, self.etag = policy, etag
        self.stats.replaced += 1
        log.info("release manifest refreshed: serial %d -> %d", held, offered)
        return policy

    async def _fetch(self, client: Client) -> tuple[int, str | None, bytes]:
        """(status, ETag, body) from the source, with If-None-Match of the last ETag."""
        if self.source == GATEWAY:
            headers = [] if self.etag is None else [(b"if-none-match", self.etag.encode())]
            status, got, body = await client._inner_get(MANIFEST_PATH, headers)
            etag = got.get(b"etag")
            return status, etag.decode("latin-1") if etag is not None else None, body
        req = {} if self.etag is None else {"If-None-Match": self.etag}
        # No redirects: only the configured host is to learn this client's address.
        async with client._http().get(self.source, headers=req, allow_redirects=False) as r:
            body = await read_at_most(r.content, MAX_SIGNED) if r.status == 200 else b""
            if len(body) > MAX_SIGNED:
                raise LimitExceededError(f"release manifest larger than {MAX_SIGNED} bytes")
            return r.status, r.headers.get("ETag"), body

    def _where(self) -> str:
        return "the gateway" if self.source == GATEWAY else self.source


def _bundle_verifier(policy: TrustPolicy) -> NodeVerifier:
    from openpcc.client.attest import BundleVerifier

    return BundleVerifier(policy)


def refresher_from_config(
    cfg: Mapping[str, Any],
    policy: TrustPolicy,
    profile_dir: Path,
    *,
    clock: Callable[[], float] = time.time,
) -> ManifestRefresher | None:
    """The refresher a client profile asks for, or None: ``"manifest_url": "off"``, or a
    Sigstore profile (not supported: its bundle is not served with the manifest)."""
    source = parse_source(cfg.get("manifest_url"))
    if cfg.get("sigstore") is not None:
        if "manifest_url" in cfg and source is not None:
            log.warning("manifest_url ignored: only an Ed25519 (release_pubkey) profile refreshes")
        return None
    if source is None:
        return None
    keys = [Path(cfg["release_pubkey"]).read_bytes()]
    return ManifestRefresher(policy, keys, profile_dir, source=source, clock=clock)

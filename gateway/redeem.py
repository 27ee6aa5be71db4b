"""Token redemption: one Privacy Pass token (RFC 9577) checked and spent, or the inner
problem that says why not. The spent-token store answers "first time?" atomically, so a
token is accepted once across every gateway replica."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

from gateway.issuerdir import IssuerDirectoryCache
from gateway.outer import inner_problem
from gateway.spent import SpentStore
from gateway.tally import Tally, key
from openpcc.errors import OpenPCCError
from openpcc.privacypass import issuance
from openpcc.privacypass.auth import parse_authorization_token
from openpcc.service.http import Metrics
from openpcc.wire import bhttp

log = logging.getLogger("openpcc.gateway")
# Seconds before --spent-ttl at which a key is refused (at most a tenth of it): room for
# the clocks of replicas and of Redis, which expires the spent records, to disagree.
KEY_AGE_MARGIN = 60
_OK = key("redemptions_total", outcome="ok")


class Redeemer:
    def __init__(
        self,
        issuer: IssuerDirectoryCache,
        spent: SpentStore,
        metrics: Metrics,
        spent_ttl: int,
        *,
        tally: Tally,
    ) -> None:
        self.issuer = issuer
        self.spent = spent
        self.metrics = metrics
        self.tally = tally  # the counts every accepted token adds (flushed on scrape)
        self.spent_ttl = spent_ttl
        self._warned: set[bytes] = set()
        self._first: dict[bytes, float] = {}  # token key id -> first redeemed (the store's)
        self._max_key_age = spent_ttl - min(KEY_AGE_MARGIN, spent_ttl // 10)

    def _key_too_old(self, key_id: bytes) -> tuple[int, list[bhttp.Field], bytes]:
        """A key accepted longer than spent tokens are remembered would let a token be
        spent twice (gateway/spent.py): refuse it, and tell the operator once per key."""
        if key_id not in self._warned:
            self._warned.add(key_id)
            log.warning(
                "token key %s has been redeemed for longer than --spent-ttl (%d s): its "
                "tokens are refused; keep the issuer's key lifetime below --spent-ttl",
                key_id.hex()[:16], self.spent_ttl,
            )  # fmt: skip
        self.metrics.inc("redemptions_total", outcome="key_too_old")
        return self._unauthorized(
            "token key in use longer than this gateway remembers spent tokens"
        )

    def _unauthorized(self, detail: str) -> tuple[int, list[bhttp.Field], bytes]:
        challenge = self.issuer.www_authenticate()
        extra = [(b"www-authenticate", challenge.encode())] if challenge else []
        return inner_problem(401, "Unauthorized", detail, extra)

    async def redeem(self, inner: bhttp.Request) -> Accepted | tuple[int, list[bhttp.Field], bytes]:
        """Check and spend the token: Accepted, else the inner error response."""
        auth = [v for k, v in inner.headers if k == b"authorization"]
        if len(auth) != 1:
            self.metrics.inc("redemptions_total", outcome="missing")
            return self._unauthorized("send exactly one Authorization: PrivateToken header")
        if self.issuer.snapshot is None:
            self.metrics.inc("redemptions_total", outcome="no_directory")
            return inner_problem(503, "Service Unavailable", "issuer directory unavailable")
        try:
            token = parse_authorization_token(auth[0].decode("latin-1"))
        except OpenPCCError:
            self.metrics.inc("redemptions_total", outcome="malformed")
            return self._unauthorized("malformed or unsupported PrivateToken")
        key = await self.issuer.key_for(token.token_key_id)
        if key is None:
            self.metrics.inc("redemptions_total", outcome="unknown_key")
            return self._unauthorized("token issued under a key the issuer does not list")
        try:
            issuance.verify_token(key, token, expected_challenge=self.issuer.challenge_bytes)
        except OpenPCCError:
            self.metrics.inc("redemptions_total", outcome="invalid")
            return self._unauthorized("token is for another challenge or its signature is bad")
        try:
            first = self._first.get(token.token_key_id)
            if first is None:  # never changes once stored: one store call per key
                first = await self.spent.key_first_redeemed(token.token_key_id, time.time())
                self._first[token.token_key_id] = first
            if time.time() - first >= self._max_key_age:
                return self._key_too_old(token.token_key_id)
            spend = await self.spent.spend(token.token_key_id, token.nonce, self.spent_ttl)
        except Exception as exc:  # the store is down: refuse rather than risk double spend
            return self.store_failed(exc)
        if not spend.fresh:
            self.metrics.inc("redemptions_total", outcome="spent")
            return self._unauthorized("token already spent")
        return Accepted(self, spend.durable)

    def store_failed(self, exc: BaseException) -> tuple[int, list[bhttp.Field], bytes]:
        log.error("spent-token store failed: %s", type(exc).__name__)
        self.metrics.inc("redemptions_total", outcome="store_error")
        return inner_problem(503, "Service Unavailable", "token store unavailable")


class Accepted:
    """A fresh token whose spent record may not be durable yet: ``settle`` before the
    client is sent anything of the answer (gateway/spent.py, Spend)."""

    __slots__ = ("_durable", "_redeemer", "refusal")

    def __init__(self, redeemer: Redeemer, durable: Awaitable[object]) -> None:
        self._redeemer = redeemer
        self._durable: Awaitable[object] | None = durable
        self.refusal: tuple[int, list[bhttp.Field], bytes] | None = None

    async def settle(self) -> bool:
        """True once the record is durable; else False, with ``refusal`` the 503 to send."""
        if self._durable is not None:
            durable, self._durable = self._durable, None
            try:
                await durable
            except Exception as exc:
                self.refusal = self._redeemer.store_failed(exc)
            else:
                self._redeemer.tally.add(_OK)
        return self.refusal is None

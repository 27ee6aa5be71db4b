"""Token wallet: the client side of Privacy Pass issuance (DESIGN.md §3 step 1).

The wallet buys tokens from the issuer in batches, ahead of use, so that the moment a
token is spent says nothing about when it was issued. Three rules shape it:

* **Never reuse.** A token is removed from the store file (atomically, fsynced, under a
  file lock) *before* it can be handed out: a background task leases tokens from the
  file into an in-memory reserve, and ``take()`` pops from that reserve without any
  file I/O. A crash can lose the reserve (at most ``reserve`` tokens); it can never
  make a handed-out token come back.
* **Key consistency.** The issuer must not give one user a personal key unnoticed. The
  wallet learns the key from a directory obtained through a caller-provided fetcher (in
  production: through the OHTTP relay, anonymously), asks for tokens only under a key
  that directory lists, verifies every token against that key, and refuses directories
  with more than ``max_keys`` type-2 keys in force. See ``docs/wallet.md``.
* **The API key stays secret.** It is sent only to the issuer's own origin and never
  appears in an error message or log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import fcntl
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import aiohttp

from openpcc.bodies import read_at_most
from openpcc.client.errors import ClientError
from openpcc.errors import OpenPCCError, VerificationError
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import (
    TOKEN_TYPE_BLIND_RSA,
    Token,
    TokenChallenge,
    b64url_decode,
    b64url_encode,
    challenge_digest,
)
from openpcc.privacypass.directory import (
    MAX_DIRECTORY_BYTES,
    WELL_KNOWN_PATH,
    IssuerDirectory,
    TokenKeyEntry,
)

__all__ = [
    "STORE_FORMAT",
    "DirectoryFetcher",
    "IssuerAuthError",
    "IssuerError",
    "KeyConsistencyError",
    "QuotaExceededError",
    "TokenWallet",
    "WalletError",
    "WalletStoreError",
]

log = logging.getLogger("openpcc.wallet")

STORE_FORMAT: Final = "openpcc-token-wallet/1"
TOKEN_REQUEST_MEDIA_TYPE: Final = "application/private-token-request"
TOKEN_RESPONSE_MEDIA_TYPE: Final = "application/private-token-response"
DEFAULT_RETRY_AFTER: Final = 60.0
_MAX_RESPONSE: Final = 8 + batched.MAX_BATCH * (3 + issuance.NK)
# Refresh the directory in the background once it is this share of directory_ttl old,
# so that takes meet a fresh copy instead of waiting for the fetch.
_REFRESH_AHEAD: Final = 0.75
# A background reserve refill that failed (e.g. disk full) is retried at most this often.
_RESERVE_RETRY_S: Final = 1.0

DirectoryFetcher = Callable[[], Awaitable[bytes]]


# --------------------------------------------------------------------------- errors


class WalletError(ClientError):
    """Base of the wallet's errors."""


class WalletStoreError(WalletError):
    """The token store file is unreadable or malformed; it is left untouched for inspection."""


class IssuerError(WalletError):
    """The issuer failed or misbehaved; the message says what to do."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class IssuerAuthError(IssuerError):
    """The issuer rejected the API key (HTTP 401): unknown, mistyped or revoked."""


class QuotaExceededError(IssuerError):
    """The account's token quota is used up; ``retry_after`` seconds until it refills."""

    def __init__(self, retry_after: float, message: str) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=429)


class KeyConsistencyError(IssuerError):
    """The directory or the issuer's signatures could single this user out; nothing is used."""


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class _Entry:
    key_id: bytes
    token: Token


class _TokenStore:
    """One JSON file, mode 0600, replaced atomically; a sibling ``.lock`` file serialises
    read-modify-write across processes sharing the wallet, so no two takers get the same
    token."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.tmp_path = path.with_name(f".{path.name}.tmp")
        self._counted: tuple[tuple[int, int, int], int] | None = None  # (file stamp, count)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:  # first use: create the folder (each syscall here
                # is a GIL hand-over that a busy event loop can delay by milliseconds)
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise WalletStoreError(f"cannot open token store {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> list[dict[str, Any]]:
        """The stored items, undecoded. Why: decoding every token on each transaction
        cost ~30 µs a token of CPU under the GIL, which stalled the event loop's takes;
        an item is decoded (and fully checked) only when a transaction looks at it, and
        the others are written back exactly as read."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise WalletStoreError(f"cannot read token store {self.path}: {exc}") from exc
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("format") != STORE_FORMAT:
                raise ValueError(f"not a {STORE_FORMAT} file")
            items = obj["tokens"]
            if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("key_id"), str) and "token" in i
                for i in items
            ):
                raise ValueError("tokens must be a list of {key_id, token} objects")
            return items
        except (ValueError, KeyError, TypeError) as exc:
            raise self._malformed(exc) from None

    def _malformed(self, exc: Exception) -> WalletStoreError:
        return WalletStoreError(
            f"token store {self.path} is malformed ({exc}); move it away to start afresh"
        )

    def _decode(self, item: dict[str, Any]) -> _Entry:
        try:
            key_id = bytes.fromhex(item["key_id"])
            token = Token.decode(b64url_decode(item["token"]))
            if token.token_key_id != key_id:
                raise ValueError("token does not carry the key id it is filed under")
            return _Entry(key_id, token)
        except (ValueError, KeyError, TypeError, OpenPCCError) as exc:
            raise self._malformed(exc) from None

    @staticmethod
    def _encode(token: Token) -> dict[str, Any]:
        return {"key_id": token.token_key_id.hex(), "token": b64url_encode(token.encode())}

    def _write(self, items: Sequence[dict[str, Any]]) -> None:
        try:
            self._write_atomic(items)
        except OSError as exc:
            # E.g. disk full: the file still holds the old list; free what the tmp took.
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()
            raise WalletStoreError(f"cannot write token store {self.path}: {exc}") from exc

    def _write_atomic(self, items: Sequence[dict[str, Any]]) -> None:
        # One line through json's C encoder: indent= (one token a line, as the file used
        # to be) selects the pure-Python encoder, ~20 µs a token under the GIL.
        body = json.dumps({"format": STORE_FORMAT, "tokens": items}).encode() + b"\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(self.tmp_path, flags, 0o600)
        except FileExistsError:  # left over from a crash
            self.tmp_path.unlink()
            fd = os.open(self.tmp_path, flags, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp_path, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself must survive a crash, or a token comes back
        finally:
            os.close(dfd)

    def count(self) -> int:
        """Tokens in the file. One stat while the file is unchanged since the last count
        (`openpcc chat` asks every turn, on its event loop): every write replaces the file
        (a new inode and size), and another process's write does too."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise WalletStoreError(f"cannot read token store {self.path}: {exc}") from exc
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._counted is not None and self._counted[0] == stamp:
            return self._counted[1]
        n = len(self._read())
        self._counted = (stamp, n)  # a write between the stat and the read: next call rereads
        return n

    def pop(self, usable: Callable[[_Entry], bool], n: int = 1) -> tuple[list[_Entry], int, int]:
        """Remove and return up to ``n`` of the oldest usable tokens in one transaction
        (unusable ones met on the way go too); also how many were dropped and how many
        are left. It returns only after the file without them is durable."""
        with self._locked():
            items = self._read()
            taken: list[_Entry] = []
            dropped = i = 0
            while i < len(items) and len(taken) < n:
                entry = self._decode(items[i])
                i += 1
                if usable(entry):
                    taken.append(entry)
                else:
                    dropped += 1
            if i:
                self._write(items[i:])
            return taken, dropped, len(items) - i

    def extend(self, tokens: Sequence[Token]) -> int:
        """Append ``tokens``; returns how many the file holds now."""
        with self._locked():
            items = self._read()
            items.extend(self._encode(t) for t in tokens)
            self._write(items)
            return len(items)

    def retain(self, usable: Callable[[_Entry], bool]) -> tuple[int, int]:
        """Drop unusable tokens; returns how many were dropped and how many are left."""
        with self._locked():
            items = self._read()
            kept = [i for i in items if usable(self._decode(i))]
            if len(kept) != len(items):
                self._write(kept)
            return len(items) - len(kept), len(kept)


# --------------------------------------------------------------------------- directory


@dataclass(frozen=True)
class _KeyView:
    """What the wallet took from one accepted directory."""

    entry: TokenKeyEntry  # the key new tokens are requested under
    key_ids: frozenset[bytes]  # every listed type-2 key: tokens under others are dropped
    request_url: str
    fetched_at: float  # monotonic


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


# --------------------------------------------------------------------------- wallet


class TokenWallet:
    """Holds unspent tokens for one issuer account and one TokenChallenge.

    ``challenge`` defaults to what the OpenPCC gateway redeems: type 2, ``issuer_name``
    (default: the host of ``issuer_url``, as ``openpcc gateway serve`` assumes), empty
    redemption context and origin info. ``directory_fetcher`` returns the issuer
    directory's bytes; pass ``Client.issuer_directory`` so the fetch goes through the
    relay and the issuer cannot tailor it to this user. The default fetches it from the
    issuer directly, which the issuer can see and could personalise.
    """

    def __init__(
        self,
        issuer_url: str,
        api_key: str,
        store_path: str | os.PathLike[str],
        *,
        challenge: TokenChallenge | None = None,
        issuer_name: str | None = None,
        batch_size: int = 100,
        low_water: int = 20,
        reserve: int = 128,
        max_keys: int = 3,
        directory_fetcher: DirectoryFetcher | None = None,
        session: aiohttp.ClientSession | None = None,
        directory_ttl: float = 300.0,
        refill_jitter: float = 10.0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 1 <= batch_size <= batched.MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{batched.MAX_BATCH}")
        if low_water < 0:
            raise ValueError("low_water must be at least 0")
        if reserve < 1:
            raise ValueError("reserve must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        if _origin(issuer_url)[0] not in ("http", "https") or not _origin(issuer_url)[1]:
            raise ValueError("issuer_url must be an absolute http(s) URL")
        if not api_key:
            raise ValueError("api_key must not be empty")
        self.issuer_url = issuer_url.rstrip("/")
        if challenge is None:
            name = issuer_name or urlsplit(issuer_url).hostname
            if not name:
                raise ValueError("cannot derive issuer_name from issuer_url; pass it")
            challenge = TokenChallenge(TOKEN_TYPE_BLIND_RSA, name, b"", ())
        if challenge.token_type != TOKEN_TYPE_BLIND_RSA:
            raise ValueError("only token type 0x0002 (blind RSA) is supported")
        self.challenge = challenge
        self._challenge_bytes = challenge.encode()
        self._digest = challenge_digest(self._challenge_bytes)
        self._api_key = api_key
        self.batch_size = batch_size
        # A refill must lift the count above low-water, so it stays below one batch.
        self.low_water = min(low_water, batch_size - 1)
        self.max_keys = max_keys
        self.directory_ttl = directory_ttl
        self.refill_jitter = refill_jitter
        self._fetcher = directory_fetcher or self._fetch_directory_direct
        self._session = session
        self._own_session = session is None
        self._timeout = timeout
        self._clock = clock
        self._store = _TokenStore(Path(store_path).expanduser())
        # The reserve: tokens already removed from the file (durably) and not yet handed
        # out, so that take() is a pop from memory. Why: the file transaction (lock,
        # read, write, two fsyncs: 2-50 ms) used to run inside every ~10th take, and at
        # 64 concurrent requests the others queued behind it. Now a background task
        # ("a reserve refill") leases tokens from the file into the reserve, and it
        # never adds a token to the reserve before the file without it is fsynced and
        # renamed in place: a crash loses at most the reserve and never resurrects a
        # token that left the process. The reserve's target starts at 0 (a one-shot
        # CLI run takes exactly one token) and grows when takers find it empty
        # (doubling, or to twice as many as waited) up to ``reserve``, and is refilled
        # in the background when under 3/4 full; aclose() files what is left back. The
        # loop only pops from ``_held`` and the worker thread only appends to it (deque
        # operations are thread-safe).
        self.reserve = reserve
        self._held: deque[_Entry] = deque()
        self._target = 0
        self._waiters = 0  # takers waiting for a reserve refill
        self._starved = False  # a taker found the reserve empty since the last refill began
        self._round: asyncio.Task[None] | None = None  # the reserve refill in flight
        self._round_retry_at = 0.0  # monotonic; after a failed background refill
        self._io: set[asyncio.Future[int]] = set()  # file transactions in flight
        self._stored: int | None = None  # tokens in the file after our last transaction
        self._keys: _KeyView | None = None
        self._lock = asyncio.Lock()  # one issuer refill at a time
        self._dir_lock = asyncio.Lock()  # one directory fetch at a time (never held by refills)
        self._dir_task: asyncio.Task[None] | None = None
        self._dir_retry_at = 0.0  # monotonic; after a failed background refresh
        self._bg: asyncio.Task[None] | None = None
        self._bg_sending = False  # past its jitter delay: may have quota in flight
        self._round_sending = False  # a reserve refill is asking the issuer
        self._batch_ok = True  # False after the issuer answered 415 to a batch
        self._quota_until = 0.0
        self._closed = False
        self._issuer_error: OpenPCCError | None = None
        self._reserve_error: OpenPCCError | None = None

    @property
    def last_refill_error(self) -> OpenPCCError | None:
        """The last error background work hit (it cannot raise to anyone): a reserve
        refill from the file (e.g. ``WalletStoreError`` on a full disk) or an issuer
        refill; ``None`` again once that kind of work succeeds."""
        return self._reserve_error or self._issuer_error

    def __repr__(self) -> str:  # never shows the API key
        return f"TokenWallet({self.issuer_url!r}, store={str(self._store.path)!r})"

    async def __aenter__(self) -> TokenWallet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- public API

    def count(self) -> int:
        """Tokens in the store and held in memory now (including any a later directory
        check would drop)."""
        return self._store.count() + len(self._held)

    async def take(self) -> Token:
        """An unspent token, already removed from the store; refills first if empty.

        With tokens in the reserve this does no I/O and takes no lock (the directory
        is refreshed ahead of its expiry in the background); it waits only when the
        reserve is empty. Raises QuotaExceededError, IssuerAuthError,
        KeyConsistencyError, IssuerError or WalletStoreError when no token can be had.
        """
        self._check_open()
        await self._fresh_keys()
        for _ in range(8):
            entry = self._pop_held()
            if entry is not None:
                self._after_take()
                return entry.token
            self._starved = True
            self._waiters += 1
            try:
                refill = self._start_round()
                # wait() neither cancels the refill when this taker gives up (others
                # wait for it too) nor raises a CancelledError when aclose() stops it.
                await asyncio.wait([refill])
            finally:
                self._waiters -= 1
            self._check_open()
            if refill.cancelled():
                raise WalletError("the token reserve refill was stopped; try again")
            if (exc := refill.exception()) is not None:
                raise exc
        raise IssuerError("tokens ran out while being refilled; too many concurrent takers?")

    async def refill(self, n: int | None = None) -> int:
        """Obtain ``n`` (default ``batch_size``) more tokens now; returns how many were added."""
        self._check_open()
        async with self._lock:
            return await self._refill_locked(n or self.batch_size)

    async def settle(self) -> None:
        """Wait for in-flight background work (refills, directory refresh): for shutdown
        and tests. Its errors are in ``last_refill_error``, not raised."""
        for _ in range(8):
            tasks = [t for t in (self._round, self._bg, self._dir_task) if t and not t.done()]
            if not tasks:
                return
            for task in tasks:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(task)

    async def aclose(self) -> None:
        """Stop background work and close the HTTP session we opened; file the reserve
        back so the next wallet on this file can spend it."""
        self._closed = True
        # An issuer refill already sent has used quota: give it a moment to land.
        await _stop(self._round, grace=5.0 if self._round_sending else 0.0)
        await _stop(self._bg, grace=5.0 if self._bg_sending else 0.0)
        await _stop(self._dir_task, grace=0.0)
        self._round = self._bg = self._dir_task = None
        # A file transaction cannot be stopped: let it land, its tokens go back below.
        if self._io:
            await asyncio.wait(list(self._io))
        held = [e.token for e in self._held]
        self._held.clear()
        if held:  # never handed out: back to the file for the next wallet
            try:
                self._stored = await asyncio.to_thread(self._store.extend, held)
            except WalletStoreError as exc:
                log.warning("could not file %d held tokens back: %s", len(held), exc)
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise WalletError("the wallet is closed")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookie may link requests
            )
        return self._session

    def _usable(self, e: _Entry) -> bool:
        view = self._keys
        return (
            view is not None
            and e.key_id in view.key_ids
            and e.token.challenge_digest == self._digest
        )

    def _pop_held(self) -> _Entry | None:
        """The oldest usable reserve token: memory only, no await, so two takers on one
        event loop can never get the same one."""
        while self._held:
            entry = self._held.popleft()
            if self._usable(entry):  # the key may have left the directory meanwhile
                return entry
        return None

    def _after_take(self) -> None:
        if (
            not self._closed
            and self._target >= 2
            and 4 * len(self._held) < 3 * self._target  # below 3/4: runway for a slow disk
            and (self._round is None or self._round.done())
            and time.monotonic() >= self._round_retry_at
        ):
            # Submitted now, not when a task gets its turn: on a busy loop that turn
            # can come tens of milliseconds later, and the reserve would run dry.
            leased = self._submit_lease(self._target - len(self._held))
            task = asyncio.get_running_loop().create_task(self._refill_reserve(leased))
            task.add_done_callback(_retrieve)
            self._round = task
        self._maybe_background_refill()

    def _start_round(self) -> asyncio.Task[None]:
        """The reserve refill in flight, or a new one for the takers waiting; it is
        sized when it first runs, so that a burst of takers shares one transaction."""
        task = self._round
        if task is None or task.done():
            task = self._round = asyncio.get_running_loop().create_task(self._refill_reserve())
            task.add_done_callback(_retrieve)
        return task

    def _grow(self, waiting: int) -> None:
        """The reserve ran dry: it was too small for this load. Double it, and with
        ``waiting`` takers at once (that many requests in flight) make it cover each
        one's next take twice over while a refill runs; a lone first take gets 1."""
        self._starved = False
        burst = 2 * waiting if waiting > 1 else 1
        self._target = min(self.reserve, max(2 * self._target, burst))

    async def _refill_reserve(self, leased: asyncio.Future[int] | None = None) -> None:
        """One reserve refill. In the background (``leased``: already sized and
        submitted) it tops the reserve up to its target; for waiting takers it leases
        enough for them plus the target. Takers still waiting after that (they came
        late, or takers that did not wait took the tokens first) get a second lease;
        if the file is empty, a batch from the issuer comes first (that wait cannot
        be avoided)."""
        waiting = self._waiters
        target = self._target
        try:
            if leased is not None:
                await asyncio.shield(leased)
                if self._starved:  # takers waited for this one
                    self._grow(self._waiters)
                    target = self._target
            else:
                if self._starved:
                    self._grow(waiting)
                    if target or waiting > 1:  # not a lone first take (that leases just one)
                        target = self._target
                n = waiting + target - len(self._held)
                if n > 0:
                    await self._lease(n)
            if self._waiters > len(self._held):  # came late, or others took theirs
                got = await self._lease(max(1, self._waiters + target - len(self._held)))
                if not got and not self._held:  # the file is empty: the issuer it is
                    self._round_sending = True
                    try:
                        async with self._lock:
                            if await asyncio.to_thread(self._store.count) == 0:
                                await self._refill_locked(self.batch_size)
                    finally:
                        self._round_sending = False
                    await self._lease(max(1, self._waiters + target - len(self._held)))
        except OpenPCCError as exc:
            self._reserve_error = exc
            self._round_retry_at = time.monotonic() + _RESERVE_RETRY_S
            if not waiting and not self._waiters:  # nobody to raise to
                log.warning("background token reserve refill failed: %s", exc)
            raise
        self._reserve_error = None

    async def _lease(self, n: int) -> int:
        """How many tokens a lease of ``n`` moved (0: the file is empty). Shielded:
        cancelling the caller cannot stop the worker thread anyway."""
        return await asyncio.shield(self._submit_lease(n))

    def _submit_lease(self, n: int) -> asyncio.Future[int]:
        """Start moving up to ``n`` tokens from the file into the reserve, in a worker
        thread; aclose() waits for it before filing the reserve back."""
        fut = asyncio.get_running_loop().run_in_executor(None, self._lease_in_thread, n)
        self._io.add(fut)
        fut.add_done_callback(self._io_done)
        return fut

    def _lease_in_thread(self, n: int) -> int:
        """The file transaction returns only once the file without the tokens is fsynced
        and renamed in place (folder fsynced too); only then do they join the reserve.
        Appending here, not in a callback on the loop, keeps a busy loop from delaying
        them (deque appends are thread-safe; only the loop pops)."""
        taken, dropped, left = self._store.pop(self._usable, n)
        self._stored = left
        self._held.extend(taken)
        if dropped:
            log.info(
                "dropped %d stored tokens: key no longer published or other challenge",
                dropped,
            )
        return len(taken)

    def _io_done(self, fut: asyncio.Future[int]) -> None:
        self._io.discard(fut)
        if not fut.cancelled():
            fut.exception()  # seen: the awaiting refill (if any) raised it already

    def _maybe_background_refill(self) -> None:
        if self._closed or (self._bg is not None and not self._bg.done()):
            return
        if self._stored is None:  # unknown until our first file transaction
            return
        if self._clock() < self._quota_until or self._stored + len(self._held) >= self.low_water:
            return
        self._bg = asyncio.get_running_loop().create_task(self._background_refill())

    async def _background_refill(self) -> None:
        # The low-water crossing happens right after a take, i.e. right before a
        # redemption: a random delay keeps the refill time from pointing at it.
        if self.refill_jitter > 0:
            await asyncio.sleep(random.SystemRandom().uniform(0, self.refill_jitter))
        self._bg_sending = True
        try:
            async with self._lock:
                if await asyncio.to_thread(self._store.count) < self.low_water:
                    await self._refill_locked(self.batch_size)
            self._issuer_error = None
        except OpenPCCError as exc:
            # Nobody awaits this task: keep the error for the next take() to meet again.
            self._issuer_error = exc
            log.warning("background token refill failed: %s", exc)
        finally:
            self._bg_sending = False

    def _scrub(self, text: str) -> str:
        """Defence in depth: a hostile issuer could echo the API key back at us."""
        return text.replace(self._api_key, "<api key>")[:300]

    # ----------------------------------------------------------------- directory

    async def check_directory(self) -> None:
        """Refetch the directory and run the key-consistency checks (for `openpcc status`)."""
        self._check_open()
        await self._current_keys(force=True)

    async def _fresh_keys(self) -> None:
        """Wait for the directory only when there is none or it has expired; past
        ``_REFRESH_AHEAD`` of its lifetime, refresh it in the background instead."""
        view = self._keys
        if view is not None:
            age = time.monotonic() - view.fetched_at
            if age < self.directory_ttl:
                if age >= self.directory_ttl * _REFRESH_AHEAD:
                    self._refresh_ahead()
                return
        await self._current_keys()

    def _refresh_ahead(self) -> None:
        if (
            self._closed
            or (self._dir_task is not None and not self._dir_task.done())
            or time.monotonic() < self._dir_retry_at
        ):
            return
        self._dir_task = asyncio.get_running_loop().create_task(self._refresh_in_background())

    async def _refresh_in_background(self) -> None:
        try:
            async with self._dir_lock:
                view = self._keys
                if view is not None and (
                    time.monotonic() - view.fetched_at < self.directory_ttl * _REFRESH_AHEAD
                ):
                    return  # refreshed meanwhile
                # force: on failure keep the current (still valid) copy as it is; a
                # KeyConsistencyError is raised again by the take that finds it expired.
                await self._current_keys_locked(force=True)
        except (OpenPCCError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._dir_retry_at = time.monotonic() + min(30.0, self.directory_ttl / 4)
            log.warning("background issuer directory refresh failed: %s", exc)

    async def _current_keys(self, *, force: bool = False) -> _KeyView:
        view = self._keys
        if (
            not force
            and view is not None
            and time.monotonic() - view.fetched_at < self.directory_ttl
        ):
            return view
        async with self._dir_lock:
            return await self._current_keys_locked(force=force)

    async def _current_keys_locked(self, *, force: bool = False) -> _KeyView:
        view = self._keys
        if (
            not force
            and view is not None
            and time.monotonic() - view.fetched_at < self.directory_ttl
        ):
            return view
        try:
            raw = await self._fetcher()
        except KeyConsistencyError:
            raise
        except (OpenPCCError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            if view is not None and not force:
                log.warning("issuer directory refresh failed, keeping the last one: %s", exc)
                # Try again in at most 30 s, not on every take().
                retry_at = time.monotonic() - self.directory_ttl + min(30.0, self.directory_ttl)
                self._keys = view = dataclasses.replace(view, fetched_at=retry_at)
                return view
            if isinstance(exc, IssuerError):
                raise
            raise IssuerError(
                self._scrub(f"cannot fetch the issuer directory: {exc}; check the network")
            ) from None
        self._keys = view = self._accept_directory(raw)
        dropped, self._stored = await asyncio.to_thread(self._store.retain, self._usable)
        if dropped:
            log.info("dropped %d stored tokens whose key the issuer no longer publishes", dropped)
        return view

    def _accept_directory(self, raw: bytes) -> _KeyView:
        try:
            directory = IssuerDirectory.parse(raw)
        except OpenPCCError as exc:
            raise IssuerError(f"the issuer directory is malformed: {exc}") from None
        now = self._clock()
        in_force = [
            e
            for e in directory.token_keys
            if e.token_type == TOKEN_TYPE_BLIND_RSA
            and (e.not_before is None or e.not_before <= now)
        ]
        if len(in_force) > self.max_keys:
            raise KeyConsistencyError(
                f"the issuer directory has {len(in_force)} token keys in force, more than the "
                f"{self.max_keys} allowed: so many keys could sort users into groups; no tokens "
                "requested. Report this to the service operator."
            )
        try:
            entry = directory.select_key(TOKEN_TYPE_BLIND_RSA, now=now)
        except OpenPCCError:
            raise IssuerError(
                "the issuer directory lists no token key in force; try again later"
            ) from None
        request_url = urljoin(self.issuer_url + "/", directory.issuer_request_uri)
        if _origin(request_url) != _origin(self.issuer_url):
            # The directory may come via the gateway: never let it steer the API key elsewhere.
            raise IssuerError(
                f"the issuer directory names request URL {request_url!r}, outside the issuer "
                f"{self.issuer_url!r}; refusing to send the API key there"
            )
        key_ids = frozenset(
            issuance.token_key_id(e.token_key)
            for e in directory.token_keys
            if e.token_type == TOKEN_TYPE_BLIND_RSA
        )
        return _KeyView(entry, key_ids, request_url, time.monotonic())

    async def _fetch_directory_direct(self) -> bytes:
        """Plain GET of the issuer's well-known URL (not anonymous: see class docstring)."""
        url = self.issuer_url + WELL_KNOWN_PATH
        try:
            async with self._http().get(url) as r:
                body = await read_at_most(r.content, MAX_DIRECTORY_BYTES)
                if r.status != 200:
                    raise IssuerError(
                        f"the issuer answered {r.status} for its directory at {url}",
                        status=r.status,
                    )
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IssuerError(f"cannot reach the issuer at {self.issuer_url}: {exc!r}") from None

    # ----------------------------------------------------------------- issuance

    async def _refill_locked(self, n: int) -> int:
        now = self._clock()
        if now < self._quota_until:
            wait = self._quota_until - now
            raise QuotaExceededError(wait, self._quota_message(wait))
        view = await self._current_keys()
        try:
            return await self._issue(view, n)
        except IssuerError as exc:
            if exc.status != 400:
                raise
            # A 400 usually means the issuer rotated keys since our directory: refetch once.
            fresh = await self._current_keys(force=True)
            if fresh.entry.token_key == view.entry.token_key:
                raise
        return await self._issue(fresh, n)

    async def _issue(self, view: _KeyView, n: int) -> int:
        key = view.entry.token_key

        def blind() -> list[tuple[issuance.TokenRequest, issuance.ClientState]]:
            return [issuance.begin_token_request(key, self._challenge_bytes) for _ in range(n)]

        pending = await asyncio.to_thread(blind)
        responses = await self._post_all(view, [r for r, _ in pending])
        got = [(st, resp) for (_, st), resp in zip(pending, responses, strict=False) if resp]

        def finalize() -> list[Token]:
            out = []
            for st, resp in got:
                tok = issuance.finalize_token(st, resp)  # verifies the signature
                issuance.verify_token(key, tok, expected_challenge=self._challenge_bytes)
                out.append(tok)
            return out

        try:
            tokens = await asyncio.to_thread(finalize)
        except VerificationError:
            raise KeyConsistencyError(
                "the issuer's signatures do not verify under the key in the directory: it may "
                "be using a key meant to single this user out. No tokens were stored; report "
                "this to the service operator."
            ) from None
        if not tokens:
            raise IssuerError("the issuer answered the batch but signed none of it; try later")
        # In a thread (fsyncs); cancelling this task cannot stop it, so signed tokens land.
        self._stored = await asyncio.to_thread(self._store.extend, tokens)
        return len(tokens)

    async def _post_all(
        self, view: _KeyView, requests: list[issuance.TokenRequest]
    ) -> list[issuance.TokenResponse | None]:
        """Batch if the issuer can; on 429 halve the batch (quota is all-or-nothing)."""
        out: list[issuance.TokenResponse | None] = []
        todo = requests
        size = len(todo)
        while todo:
            chunk = todo[:size]
            batching = self._batch_ok and len(chunk) > 1
            try:
                if batching:
                    got = await self._post_batch(view, chunk)
                    if got is None:  # 415: this issuer cannot batch; go one by one
                        self._batch_ok = False
                        continue
                else:
                    chunk = chunk[:1]
                    got = [await self._post_single(view, chunk[0])]
            except QuotaExceededError as exc:
                if batching:
                    size = max(1, size // 2)
                    continue
                self._quota_until = self._clock() + exc.retry_after
                if out:  # keep what we already got; the next refill meets the quota
                    break
                raise
            except IssuerError:
                if out:
                    break
                raise
            out.extend(got)
            todo = todo[len(chunk) :]
        return out

    async def _post(self, url: str, ctype: str, accept: str, body: bytes) -> tuple[int, Any, bytes]:
        headers = {
            "Content-Type": ctype,
            "Accept": accept,
            "Authorization": f"Bearer {self._api_key}",
        }
        try:
            async with self._http().post(url, data=body, headers=headers) as r:
                data = await read_at_most(r.content, _MAX_RESPONSE)
                return r.status, r.headers, data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise IssuerError(
                self._scrub(f"cannot reach the issuer at {self.issuer_url}: {exc!r}")
            ) from None

    async def _post_batch(
        self, view: _KeyView, chunk: list[issuance.TokenRequest]
    ) -> list[issuance.TokenResponse | None] | None:
        status, headers, data = await self._post(
            view.request_url,
            batched.REQUEST_MEDIA_TYPE,
            batched.RESPONSE_MEDIA_TYPE,
            batched.encode_batch_request(chunk),
        )
        if status == 415:
            return None
        self._check_status(status, headers, data, batched.RESPONSE_MEDIA_TYPE)
        try:
            items = batched.decode_batch_response(data)
        except OpenPCCError as exc:
            raise IssuerError(f"the issuer sent a malformed batch response: {exc}") from None
        if len(items) != len(chunk):
            raise IssuerError(
                f"the issuer answered {len(items)} items to a batch of {len(chunk)}; try later"
            )
        return [i if isinstance(i, issuance.TokenResponse) else None for i in items]

    async def _post_single(
        self, view: _KeyView, req: issuance.TokenRequest
    ) -> issuance.TokenResponse:
        status, headers, data = await self._post(
            view.request_url, TOKEN_REQUEST_MEDIA_TYPE, TOKEN_RESPONSE_MEDIA_TYPE, req.encode()
        )
        self._check_status(status, headers, data, TOKEN_RESPONSE_MEDIA_TYPE)
        try:
            return issuance.TokenResponse.decode(data)
        except OpenPCCError as exc:
            raise IssuerError(f"the issuer sent a malformed token response: {exc}") from None

    def _check_status(self, status: int, headers: Any, data: bytes, want_type: str) -> None:
        if status == 200:
            ctype = headers.get("Content-Type", "").split(";")[0].strip().lower()
            if ctype != want_type:
                raise IssuerError(f"the issuer answered with {ctype or 'no content type'}")
            return
        detail = self._problem_detail(data)
        if status == 401:
            raise IssuerAuthError(
                f"the issuer at {self.issuer_url} rejected the API key ({detail or 'HTTP 401'}): "
                "check it, or ask the operator for a new one",
                status=401,
            )
        if status == 429:
            wait = _retry_after(headers.get("Retry-After"), self._clock())
            raise QuotaExceededError(wait, self._quota_message(wait))
        raise IssuerError(
            f"the issuer at {self.issuer_url} answered {status}"
            + (f": {detail}" if detail else "")
            + ("; try again later" if status >= 500 else ""),
            status=status,
        )

    def _quota_message(self, wait: float) -> str:
        return (
            f"token quota reached at issuer {self.issuer_url}; more tokens in {wait:.0f} s "
            "(or ask the operator for a larger quota)"
        )

    def _problem_detail(self, data: bytes) -> str:
        try:
            obj = json.loads(data[:4096])
        except ValueError:
            return ""
        if not isinstance(obj, dict):
            return ""
        parts = [str(obj[k]) for k in ("title", "detail") if isinstance(obj.get(k), str)]
        return self._scrub(": ".join(parts))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a reserve refill's error as seen: takers that waited got it already, and
    ``last_refill_error`` keeps it for everyone else."""
    if not task.cancelled():
        task.exception()


async def _stop(task: asyncio.Task[None] | None, *, grace: float) -> None:
    """Cancel ``task`` after up to ``grace`` seconds; its errors are not ours to raise."""
    if task is None or task.done():
        return
    if grace > 0:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=grace)
    task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task


def _retry_after(value: str | None, now: float) -> float:
    """Retry-After as seconds (RFC 9110 §10.2.3: delay-seconds or an HTTP-date)."""
    if not value:
        return DEFAULT_RETRY_AFTER
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
    return max(0.0, when.timestamp() - now)

"""The OpenPCC client: private, attested chat completions through a relay.

Flow per request (DESIGN.md §3): take an unlinkable token from the wallet; pick k
random candidates among the nodes whose attestation bundles verified under the trust
policy; seal the OpenAI request to them (openpcc/wire/sealed.py); wrap it with the
token in chunked OHTTP to the gateway; POST it to the relay; stream the answer back,
opening each layer incrementally, and fail loudly if the node's authenticated end of
stream never arrives.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ParamSpec, Protocol, TypeVar

import aiohttp

from openpcc.client.cachescope import (
    CONVERSATION,
    NODE_ID_HEADER,
    SALT_HEADER,
    Affinity,
    CacheScope,
    CacheSecret,
    derive_salt,
)
from openpcc.client.errors import (
    GatewayError,
    MalformedResponseError,
    NoCapacityError,
    NodeError,
    NoVerifiedNodeError,
    RelayError,
    TokenRejectedError,
    TruncatedResponseError,
    client_errors,
)
from openpcc.client.prepared import FirstBytePending, PreparedSenders
from openpcc.client.sse import DONE, SSEParser
from openpcc.client.unwrap import (
    Event,
    GatewayBody,
    NodeData,
    NodeHead,
    NodeTruncatedError,
    ResponseUnwrapper,
)
from openpcc.errors import OpenPCCError, VerificationError
from openpcc.forwarding import SENT_AT_HEADER
from openpcc.privacypass import auth
from openpcc.service.stagetrace import StageTrace
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.chunked import MEDIA_TYPE_CHUNKED_REQUEST, ChunkedRequestSender

log = logging.getLogger("openpcc.client")
_NODE_ID_HEX = re.compile(rb"[0-9a-f]{%d}" % (2 * sealed.NODE_ID_LEN))
GATEWAY_AUTHORITY = b"gateway"  # the inner requests' authority; the gateway ignores it


@dataclass(frozen=True)
class VerifiedNode:
    """A node whose bundle verified; its key comes from the verified claims only."""

    node_id: bytes
    public_key: bytes
    models: tuple[str, ...]
    expires_at: float
    release_id: str = ""  # the manifest release its attestation matched ("" if unknown)
    pq_public_key: bytes | None = None  # attested X-Wing key: sealed requests v2

    @property
    def sealing_key(self) -> bytes:
        """The key a request to this node is sealed to: X-Wing when attested."""
        return self.pq_public_key or self.public_key


P = ParamSpec("P")
T = TypeVar("T")


def _typed(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Whatever fails inside reaches the caller as a ClientError (cause chained)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with client_errors():
            return await fn(*args, **kwargs)

    return wrapper


def _typed_stream(fn: Callable[P, AsyncIterator[T]]) -> Callable[P, AsyncIterator[T]]:
    """The same for a streamed answer."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        with client_errors():
            async for item in fn(*args, **kwargs):
                yield item

    return wrapper


class NodeVerifier(Protocol):
    """Checks one directory entry; raises VerificationError (with reasons) if it fails."""

    def __call__(self, entry: dict[str, Any], now: datetime) -> VerifiedNode: ...


class KeyPins(Protocol):
    """Key consistency: the keys everybody is meant to see (the signed release manifest)."""

    def accepts_ohttp_key(self, config: bytes) -> bool: ...

    def accepts_token_key(self, key_id: bytes) -> bool: ...

    @property
    def post_quantum_required(self) -> bool:
        """Only a pinned X-Wing OHTTP key config will do (manifest ``post_quantum``)."""
        ...

    def pins_post_quantum_key(self) -> bool | None:
        """Whether an X-Wing key config is pinned (None: only digests, cannot tell)."""
        ...


def choose_key_config(configs: Sequence[ohttp.KeyConfig], trust: KeyPins | None) -> ohttp.KeyConfig:
    """The gateway key config to send with, from its ``application/ohttp-keys`` list.

    Only configs the manifest pins (key consistency: another could be this user's alone),
    and offering HKDF-SHA256 / AES-128-GCM. Among those, X-Wing (KEM 0x647A) if one is
    pinned, else X25519. Under ``post_quantum.require`` a gateway (or a manifest) with no
    pinned X-Wing config is refused with VerificationError: never a silent downgrade.
    Without a manifest (tests, tools) the gateway's X-Wing config is preferred likewise.
    """
    if trust is not None:
        configs = [c for c in configs if trust.accepts_ohttp_key(c.encode())]
        if not configs:
            raise VerificationError(
                "the gateway's OHTTP keys are not the ones the release manifest pins"
            )
    usable = [c for c in configs if c.supports(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM)]
    pq = [c for c in usable if c.kem_id == hpke.KEM_XWING]
    if pq:
        return pq[0]
    if trust is not None and trust.post_quantum_required:
        why = (
            "the release manifest pins none"
            if trust.pins_post_quantum_key() is False
            else "the gateway offers no X-Wing key config the release manifest pins"
        )
        raise VerificationError(
            "the release manifest requires a post-quantum (X-Wing) OHTTP key and " + why
        )
    if not usable:
        raise RelayError("the gateway offers no key config this client supports")
    if trust is not None and trust.pins_post_quantum_key():
        # Allowed (the manifest does not require X-Wing), but not what it expects: a relay
        # or gateway may have dropped the X-Wing config. `post_quantum.require` refuses.
        log.warning(
            "the release manifest pins an X-Wing OHTTP key the gateway does not offer: "
            "using X25519 (not post-quantum)"
        )
    return usable[0]


class TokenSource(Protocol):
    async def take(self) -> auth.Token: ...


class PolicyRefresher(Protocol):
    """Keeps the release manifest current (openpcc/client/manifest.py ManifestRefresher)."""

    async def refresh_if_due(self, client: Client) -> tuple[KeyPins, NodeVerifier] | None: ...


@dataclass
class _Verdicts:
    """Cached verification results, keyed by the exact bundle, until the claims expire."""

    ok: dict[str, VerifiedNode] = field(default_factory=dict)
    failed: dict[str, tuple[float, list[str]]] = field(default_factory=dict)


class Client:
    """Async client. Use as ``async with Client(...) as c:``."""

    def __init__(
        self,
        relay_url: str,
        *,
        tokens: TokenSource,
        verifier: NodeVerifier,
        k: int = 3,
        trust: KeyPins | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        refresher: PolicyRefresher | None = None,
        cache_secret: CacheSecret | None = None,
        affinity: bool = True,
        prepare: bool = True,
    ) -> None:
        """``refresher`` (openpcc/client/manifest.py) keeps the release manifest behind
        ``verifier`` and ``trust`` current: when it brings a newer one, both are swapped
        (``use_policy``). ``cache_secret`` keys this client's conversation cache scopes
        (openpcc/client/cachescope.py; in memory if None); ``affinity`` asks the node that
        answered a conversation's last turn first; ``prepare`` keeps HPKE sender setups
        ready off the request path (openpcc/client/prepared.py)."""
        if not 1 <= k <= sealed.MAX_CANDIDATES:
            raise ValueError(f"k must be 1..{sealed.MAX_CANDIDATES}")
        self._relay = relay_url.rstrip("/")
        self._tokens = tokens
        self._verifier = verifier
        self._trust = trust
        self._k = k
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._refresher = refresher
        self._cache_secret = cache_secret or CacheSecret(None, clock=clock)
        self._affinity = Affinity() if affinity else None
        self._prepared = PreparedSenders() if prepare else None
        # The node that answered the last request whose answer head arrived (with requests
        # in flight at once, whichever came last; affinity itself is kept per conversation).
        self.last_node_id: bytes | None = None
        # ... and its verified entry, when it is one of the candidates the request was
        # sealed to (always, unless the node misnamed itself): what `openpcc chat` shows.
        self.last_node: VerifiedNode | None = None
        self._trace = StageTrace("client")
        self._key_config: ohttp.KeyConfig | None = None
        self._verdicts = _Verdicts()
        self._nodes: list[VerifiedNode] = []
        self._nodes_at = 0.0
        self.directory_ttl = 30.0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._prepared is not None:
            await self._prepared.aclose()
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
            )
        return self._session

    # ----------------------------------------------------------------- discovery

    @_typed
    async def key_config(self) -> ohttp.KeyConfig:
        """The gateway's OHTTP key, fetched through the relay (RFC 9540), chosen by
        :func:`choose_key_config`: its ``kem_id`` says which KEM the outer layer uses."""
        if self._key_config is None:
            try:
                async with self._http().get(self._relay + "/.well-known/ohttp-gateway") as r:
                    if r.status != 200:
                        raise RelayError(f"relay answered {r.status} for the gateway keys")
                    configs = ohttp.parse_key_configs(await r.read())
            except aiohttp.ClientError as exc:
                raise RelayError(f"cannot reach the relay: {exc}") from exc
            # Pinned only (a key the manifest does not list could be this user's alone),
            # X-Wing when pinned, and no X25519 under a post-quantum manifest.
            self._key_config = choose_key_config(configs, self._trust)
        return self._key_config

    @_typed
    async def _inner_get(
        self, path: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """A small GET to the gateway inside plain OHTTP (no token: discovery only)."""
        cfg = await self.key_config()
        req = bhttp.encode_request(
            bhttp.Request(b"GET", b"https", GATEWAY_AUTHORITY, path.encode(), list(headers))
        )
        enc, ctx = ohttp.encapsulate_request(cfg, req)
        try:
            async with self._http().post(
                self._relay + "/",
                data=enc,
                headers={"Content-Type": ohttp.MEDIA_TYPE_REQUEST},
            ) as r:
                body = await r.read()
                if r.status != 200:
                    raise RelayError(f"relay/gateway answered {r.status} to an OHTTP request")
        except aiohttp.ClientError as exc:
            raise RelayError(f"cannot reach the relay: {exc}") from exc
        resp = bhttp.decode_response(ctx.decapsulate_response(body))
        return resp.status, {k.lower(): v for k, v in resp.headers}, resp.content

    async def issuer_directory(self) -> bytes:
        """The issuer directory as the gateway sees it, fetched anonymously.

        The wallet compares its token key against this copy (key consistency).
        """
        status, _, body = await self._inner_get("/v1/issuer-directory")
        if status != 200:
            raise GatewayError(status, _problem(body))
        return body

    def use_policy(self, trust: KeyPins, verifier: NodeVerifier) -> None:
        """Trust a newer release manifest from now on. Every verdict reached under the old
        one is dropped (it may have retired a measurement or a key), and so is the gateway
        key, which is checked again against the new pins when next needed."""
        self._trust = trust
        self._verifier = verifier
        self._verdicts = _Verdicts()
        self._nodes = []
        self._nodes_at = 0.0
        self._key_config = None

    async def _keep_policy_current(self) -> None:
        """Before judging nodes: refresh the manifest if due (a cheap check otherwise).

        A failed refresh is logged and never fails the request by itself; only an expired
        manifest does, through the verifier's usual refusal."""
        if self._refresher is None:
            return
        update = await self._refresher.refresh_if_due(self)
        if update is not None:
            self.use_policy(*update)

    async def verified_nodes(self, *, refresh: bool = False) -> list[VerifiedNode]:
        """Every node in the gateway's directory whose bundle verifies, cached."""
        await self._keep_policy_current()
        now = self._clock()
        if refresh or not self._nodes or now - self._nodes_at > self.directory_ttl:
            status, _, body = await self._inner_get("/v1/nodes")
            if status != 200:
                raise GatewayError(status, _problem(body))
            try:
                entries = json.loads(body)["nodes"]
                assert isinstance(entries, list)
            except (ValueError, KeyError, AssertionError) as exc:
                raise GatewayError(502, {"title": "malformed node directory"}) from exc
            self._nodes = [n for n in (self._verify(e, now) for e in entries) if n]
            self._nodes_at = now
        return [n for n in self._nodes if n.expires_at > now]

    def _verify(self, entry: Any, now: float) -> VerifiedNode | None:
        key = json.dumps(entry, sort_keys=True)
        hit = self._verdicts.ok.get(key)
        if hit is not None and hit.expires_at > now:
            return hit
        failed = self._verdicts.failed.get(key)
        if failed is not None and failed[0] > now:
            return None
        try:
            if not isinstance(entry, dict):
                raise VerificationError("directory entry is not an object")
            node = self._verifier(entry, datetime.fromtimestamp(now, UTC))
        except OpenPCCError as exc:
            node_id = str(entry.get("node_id", "?")) if isinstance(entry, dict) else "?"
            # Failed verdicts are cached briefly so a bad node is not re-verified per call.
            self._verdicts.failed[key] = (now + 60, [node_id, str(exc)])
            return None
        self._verdicts.ok[key] = node
        return node

    def _answered_by(self, headers: Sequence[tuple[bytes, bytes]], salt: bytes | None) -> None:
        """Remember which node answered (inside the sealed response), per conversation."""
        node_id = _node_id_of(headers)
        self.last_node_id = node_id
        if node_id is not None and salt and self._affinity is not None:
            self._affinity.put(salt, node_id)

    def rejected_nodes(self) -> dict[str, list[str]]:
        return {v[1][0]: v[1][1:] for v in self._verdicts.failed.values()}

    @property
    def trust(self) -> KeyPins | None:
        """The release manifest's policy the client judges by now (read-only; a refresh
        swaps it), so a UI can say which manifest admitted the node that answered."""
        return self._trust

    def cache_salt(
        self,
        model: str,
        messages: Sequence[dict[str, Any]] | None,
        cache_scope: CacheScope = CONVERSATION,
    ) -> bytes | None:
        """The salt a request with these arguments carries (None: no scope), so a UI can
        show which cache scope a conversation is in without sending anything. Secret to
        this client and the node: show a digest of it, never the salt itself."""
        return self._salt(cache_scope, model, messages)

    # -------------------------------------------------------------------- chat

    def _salt(
        self, scope: CacheScope, model: str, messages: Sequence[dict[str, Any]] | None
    ) -> bytes | None:
        if scope is not None and not isinstance(scope, str):
            raise TypeError("cache_scope must be 'conversation', a name, or None")
        return derive_salt(self._cache_secret.current(), scope, model=model, messages=messages)

    async def chat_completions_stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        cache_scope: CacheScope = CONVERSATION,
        **params: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream OpenAI ``chat.completion.chunk`` objects as the node produces them.

        ``cache_scope``: ``"conversation"`` (every turn of one conversation shares the
        node's prefix cache, no other conversation does), a name (share it on purpose),
        or None (a fresh cache namespace per request). docs/PROTOCOL.md."""
        salt = self._salt(cache_scope, model, messages)
        body = {"model": model, "messages": list(messages), **params, "stream": True}
        async for item in self._request(model, "/v1/chat/completions", body, salt):
            yield item

    async def chat_completions(
        self,
        model: str,
        messages: Sequence[dict[str, Any]],
        *,
        cache_scope: CacheScope = CONVERSATION,
        **params: Any,
    ) -> dict[str, Any]:
        """One non-streamed OpenAI ``chat.completion`` object (``cache_scope`` as above)."""
        salt = self._salt(cache_scope, model, messages)
        body = {"model": model, "messages": list(messages), **params, "stream": False}
        async for item in self._request(model, "/v1/chat/completions", body, salt):
            return item
        raise TruncatedResponseError("the node sent no completion")

    async def completions_stream(
        self, model: str, prompt: str, *, cache_scope: CacheScope = None, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream legacy OpenAI ``text_completion`` chunks (``/v1/completions``); no
        conversation here, so no cache scope unless a name is given."""
        salt = self._salt(cache_scope, model, None)
        body = {"model": model, "prompt": prompt, **params, "stream": True}
        async for item in self._request(model, "/v1/completions", body, salt):
            yield item

    async def completions(
        self, model: str, prompt: str, *, cache_scope: CacheScope = None, **params: Any
    ) -> dict[str, Any]:
        """One non-streamed legacy OpenAI ``text_completion`` object."""
        salt = self._salt(cache_scope, model, None)
        body = {"model": model, "prompt": prompt, **params, "stream": False}
        async for item in self._request(model, "/v1/completions", body, salt):
            return item
        raise TruncatedResponseError("the node sent no completion")

    def _candidates(self, nodes: list[VerifiedNode], salt: bytes | None) -> list[VerifiedNode]:
        """k random nodes; the one that answered this conversation's last turn first.

        Only nodes that attest an X-Wing key when there are any: one KEM per envelope,
        and a recording of the request then needs ML-KEM-768 broken too (sealed v2).
        """
        nodes = _sealing_pool(nodes)
        k = min(self._k, len(nodes))
        last = self._affinity.get(salt) if self._affinity is not None and salt else None
        first = next((n for n in nodes if n.node_id == last), None)
        if first is None:
            return self._rng.sample(nodes, k)
        others = [n for n in nodes if n is not first]
        return [first, *self._rng.sample(others, k - 1)]

    def _sealing_keys(self, nodes: list[VerifiedNode]) -> list[sealed.NodeKey]:
        """The keys requests to these nodes are sealed to: X-Wing where attested."""
        return [sealed.NodeKey(n.node_id, n.sealing_key) for n in nodes]

    async def models(self) -> list[str]:
        """Models served by at least one verified node.

        Answered from the attested directory rather than a node's ``/v1/models``: it
        spends no token and lists only what this client would actually send to.
        """
        nodes = await self.verified_nodes()
        return sorted({m for n in nodes for m in n.models})

    @_typed_stream
    async def _request(
        self, model: str, path: str, body: dict[str, Any], salt: bytes | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        prepared = self._prepared
        # From here to the first byte no prepared setup is made (prepared.py says why).
        with FirstBytePending(prepared) as pending:
            nodes = [n for n in await self.verified_nodes() if model in n.models]
            if not nodes:
                nodes = [n for n in await self.verified_nodes(refresh=True) if model in n.models]
            if not nodes:
                raise NoVerifiedNodeError(model, self.rejected_nodes())
            chosen = self._candidates(nodes, salt)
            trace = self._trace
            t0 = time.perf_counter()
            inner = bhttp.encode_request(
                bhttp.Request(
                    b"POST",
                    b"https",
                    b"node",
                    path.encode(),
                    [
                        (b"content-type", b"application/json"),
                        # Inside the encryption: the node refuses an old envelope, whoever
                        # replays it (openpcc/forwarding.py).
                        (SENT_AT_HEADER, str(int(time.time())).encode()),
                        # Inside the encryption too: only the node sees the cache scope.
                        *([(SALT_HEADER, salt.hex().encode())] if salt else []),
                    ],
                    json.dumps(body).encode(),
                )
            )
            keys = [sealed.NodeKey(n.node_id, n.sealing_key) for n in chosen]
            sreq = sealed.seal_request(
                keys, model, inner, senders=prepared.wraps(keys) if prepared else None
            )
            t1 = time.perf_counter()
            token = await self._tokens.take()
            t2 = time.perf_counter()
            trace.record("token", t2 - t1)
            if self._trust is not None and not self._trust.accepts_token_key(token.token_key_id):
                raise VerificationError(
                    "the token key is not the one the release manifest pins (possible per-user key)"
                )
            outer = bhttp.encode_request(
                bhttp.Request(
                    b"POST",
                    b"https",
                    GATEWAY_AUTHORITY,
                    b"/v1/infer",
                    [
                        (b"authorization", auth.format_authorization(token).encode()),
                        (b"content-type", sealed.REQUEST_MEDIA_TYPE.encode()),
                    ],
                    sreq.envelope,
                )
            )
            config = await self.key_config()
            sender = prepared.outer(config) if prepared else ChunkedRequestSender(config)
            wire = sender.seal_chunk(outer, final=True)
            trace.record("seal", (t1 - t0) + (time.perf_counter() - t2))
            unwrap = ResponseUnwrapper(sender.response_receiver(), sreq.response_opener())
            sse = SSEParser()
            streaming = bool(body.get("stream"))
            error_body = bytearray()
            node_status: int | None = None
            node_body = bytearray()

            def take(events: list[Event]) -> list[bytes]:
                """Sort one batch of events; return the node's streamed bytes to parse."""
                nonlocal node_status
                out: list[bytes] = []
                for ev in events:
                    if isinstance(ev, NodeData):
                        if node_status != 200 or not streaming:
                            node_body.extend(ev.data)
                        else:
                            out.append(ev.data)
                    elif isinstance(ev, NodeHead):
                        node_status = ev.status
                        self._answered_by(ev.headers, salt)
                        self.last_node = next(
                            (n for n in chosen if n.node_id == self.last_node_id), None
                        )
                    elif isinstance(ev, GatewayBody):
                        error_body.extend(ev.data)
                return out

            t_send = time.perf_counter()
            try:
                async with self._http().post(
                    self._relay + "/",
                    data=wire,
                    headers={"Content-Type": MEDIA_TYPE_CHUNKED_REQUEST, "Incremental": "?1"},
                ) as resp:
                    if resp.status != 200:
                        raise RelayError(f"relay answered {resp.status}")
                    first = True
                    async for piece in resp.content.iter_any():
                        if first:
                            trace.record("upstream_wait", time.perf_counter() - t_send)
                            pending.release()
                        t, c = time.perf_counter(), trace.cpu()
                        events = take(unwrap.receive_data(piece))  # opened, parsed after timing
                        # OpenPCC's own work per piece (both layers opened); SSE and JSON
                        # parsing, which any OpenAI client does, and the consumer's time
                        # between yields are not counted.
                        wall, cpu = time.perf_counter() - t, trace.cpu() - c
                        trace.record("chunk", wall)  # both read before either line is written
                        trace.record("chunk_cpu", cpu)
                        first = False
                        for item in events:
                            for obj in sse.receive_data(item):
                                if obj is not DONE:
                                    yield obj
                    # The end may still carry content (a final chunk with data): same path.
                    for item in take(unwrap.end_of_input()):
                        for obj in sse.receive_data(item):
                            if obj is not DONE:
                                yield obj
                    sse.end_of_input()
            except aiohttp.ClientError as exc:
                if unwrap.gateway_status == 200 and node_status is not None:
                    raise TruncatedResponseError(f"connection lost mid-answer: {exc}") from exc
                raise RelayError(f"transport failed: {exc}") from exc
            except NodeTruncatedError as exc:
                raise TruncatedResponseError(str(exc)) from exc
            # Any other cut is mapped by @_typed_stream (client_errors), like every core error.
            if unwrap.gateway_status != 200:
                problem = _problem(bytes(error_body))
                status = unwrap.gateway_status or 502
                if status == 401:
                    raise TokenRejectedError(status, problem)
                if status == 503:
                    raise NoCapacityError(status, problem)
                raise GatewayError(status, problem)
            if prepared is not None:
                # The answer has ended: the likeliest idle moment to set up the next request's
                # encapsulations, for this gateway key and the verified nodes (every model's:
                # a refill for one model must not drop what another's requests will use).
                prepared.refill(config, self._sealing_keys(self._nodes))
            if node_status != 200:
                raise NodeError(node_status or 0, bytes(node_body))
            if not streaming:
                try:
                    answer = json.loads(node_body)
                except ValueError as exc:
                    raise MalformedResponseError("the node's answer is not JSON") from exc
                yield answer


def _sealing_pool(nodes: list[VerifiedNode]) -> list[VerifiedNode]:
    """The nodes attesting an X-Wing key if there are any, else all (one KEM per envelope)."""
    return [n for n in nodes if n.pq_public_key is not None] or nodes


def _node_id_of(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    values = [v for k, v in headers if k.lower() == NODE_ID_HEADER]
    if len(values) != 1 or not _NODE_ID_HEX.fullmatch(values[0]):
        return None
    return bytes.fromhex(values[0].decode("ascii"))


def _problem(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class SyncClient:
    """Blocking wrapper: runs an async :class:`Client` on a private event-loop thread."""

    def __init__(self, factory: Callable[[], Client]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> Client:
            return factory()

        self._client = self._call(make())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def chat_completions(
        self, model: str, messages: Sequence[dict[str, Any]], **params: Any
    ) -> dict[str, Any]:
        return self._call(self._client.chat_completions(model, messages, **params))

    def chat_completions_stream(
        self, model: str, messages: Sequence[dict[str, Any]], **params: Any
    ) -> Iterator[dict[str, Any]]:
        agen = self._client.chat_completions_stream(model, messages, **params)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def close(self) -> None:
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

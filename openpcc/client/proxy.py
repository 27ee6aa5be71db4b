"""OpenAI-compatible front end over the private client, and the local proxy serving it.

Tools that already speak the OpenAI API get private inference by changing a base URL.
:class:`OpenAIFrontend` maps one OpenAI HTTP request (method, path, JSON body) onto
:class:`~openpcc.client.client.Client` and back into OpenAI's response shapes: JSON,
Server-Sent Events framed as OpenAI frames them (``data: {...}\\n\\n`` ... ``data:
[DONE]\\n\\n``), and OpenAI-style error objects with meaningful statuses. It is shared by
the aiohttp proxy below (``openpcc proxy``) and the httpx transport
(:mod:`openpcc.client.openai_transport`), so both behave identically.

Only the JSON body crosses into the sealed request: the caller's headers (its API key,
``User-Agent``, SDK telemetry headers) are dropped here, so nothing that could
identify the caller reaches any party.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from openpcc.client.client import Client
from openpcc.client.errors import (
    GatewayError,
    NoCapacityError,
    NodeError,
    NoVerifiedNodeError,
    RelayError,
    TokenRejectedError,
    TruncatedResponseError,
)
from openpcc.client.wallet import (
    IssuerAuthError,
    IssuerError,
    KeyConsistencyError,
    QuotaExceededError,
    WalletStoreError,
)
from openpcc.errors import OpenPCCError, VerificationError

log = logging.getLogger("openpcc.proxy")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Reverse proxies (nginx) must not buffer: the first token should arrive first.
    "X-Accel-Buffering": "no",
}
JSON_TYPE = "application/json"
DONE_EVENT = b"data: [DONE]\n\n"
MAX_BODY = 4 << 20


@dataclass
class Reply:
    """One OpenAI HTTP answer: either ``body`` (JSON bytes) or ``stream`` (SSE bytes)."""

    status: int
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON_TYPE})


class APIError(Exception):
    """An OpenAI-shaped error answer: status, message, ``type`` and ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def reply(self) -> Reply:
        return Reply(
            self.status, _dumps(self.body()), headers={"Content-Type": JSON_TYPE, **self.headers}
        )


def map_error(exc: BaseException) -> APIError:
    """The OpenAI-style error (status, type, code) for a client failure.

    Statuses follow what an OpenAI client already handles: 429 means back off and retry
    later (the token quota), 503 means the service cannot serve this model now, 400 is
    the caller's request, 502 is a failure somewhere on the private path.
    """
    if isinstance(exc, APIError):
        return exc
    msg = str(exc)
    if isinstance(exc, QuotaExceededError):
        retry = max(1, int(exc.retry_after + 0.999))
        return APIError(
            429, msg, "rate_limit_error", "token_quota_exhausted", {"Retry-After": str(retry)}
        )
    if isinstance(exc, IssuerAuthError):
        # The account key in the client profile, not the caller's api_key, was refused.
        return APIError(502, msg, "api_error", "issuer_rejected_account_key")
    if isinstance(exc, KeyConsistencyError | VerificationError):
        return APIError(502, msg, "api_error", "key_consistency_failed")
    if isinstance(exc, WalletStoreError):
        return APIError(500, msg, "api_error", "token_store_unreadable")
    if isinstance(exc, IssuerError):
        return APIError(502, msg, "api_error", "issuer_error")
    if isinstance(exc, NoVerifiedNodeError):
        return APIError(503, msg, "service_unavailable", "no_verified_node")
    if isinstance(exc, NoCapacityError):
        return APIError(503, msg, "service_unavailable", "no_capacity")
    if isinstance(exc, TokenRejectedError):
        return APIError(502, msg, "api_error", "token_rejected")
    if isinstance(exc, GatewayError):
        status = exc.status if exc.status in (429, 503) else 502
        return APIError(status, msg, "api_error", "gateway_error")
    if isinstance(exc, NodeError):
        return _node_error(exc)
    if isinstance(exc, TruncatedResponseError):
        return APIError(502, msg, "api_error", "truncated_response")
    if isinstance(exc, RelayError):
        return APIError(502, msg, "api_error", "relay_error")
    if isinstance(exc, OpenPCCError | ValueError):
        return APIError(502, msg, "api_error", "bad_response")
    log.error("unexpected proxy failure: %s", type(exc).__name__)
    return APIError(500, "internal error in the OpenPCC client", "api_error", "internal_error")


def _node_error(exc: NodeError) -> APIError:
    """The attested node's own 4xx (allow-list, context length) is the caller's to fix."""
    problem: Any = None
    with contextlib.suppress(ValueError):
        problem = json.loads(exc.body)
    if isinstance(problem, dict) and isinstance(problem.get("error"), dict):
        # The engine's own OpenAI-style error, passed through by the node.
        detail = str(problem["error"].get("message", ""))
    elif isinstance(problem, dict):
        detail = ": ".join(str(problem[k]) for k in ("title", "detail") if problem.get(k))
    else:
        detail = exc.body[:300].decode(errors="replace")
    message = f"the attested node refused the request: {detail or exc.status}"
    if 400 <= exc.status < 500:
        code = {404: "not_found", 413: "request_too_large"}.get(exc.status, "node_rejected")
        return APIError(exc.status, message, "invalid_request_error", code)
    return APIError(502, message, "api_error", "node_error")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse_event(obj: Any) -> bytes:
    """One Server-Sent Event exactly as OpenAI (and vLLM) frame a chunk."""
    return b"data: " + _dumps(obj) + b"\n\n"


class OpenAIFrontend:
    """Serves OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

    ``default_model`` fills in a request without ``model``. ``on_close`` callbacks run
    in :meth:`aclose` (the wallet and session built next to the client).
    """

    def __init__(
        self,
        client: Client,
        *,
        default_model: str | None = None,
        on_close: Sequence[Callable[[], Awaitable[Any]]] = (),
    ) -> None:
        self.client = client
        self.default_model = default_model
        self._on_close = list(on_close)

    async def aclose(self) -> None:
        await self.client.aclose()
        for close in self._on_close:
            await close()

    async def handle(self, method: str, path: str, body: bytes) -> Reply:
        """Answer one request; never raises for request or private-path failures."""
        try:
            return await self._route(method.upper(), path.rstrip("/"), body)
        except Exception as exc:  # every failure becomes an OpenAI-style error
            return map_error(exc).reply()

    async def _route(self, method: str, path: str, body: bytes) -> Reply:
        if path == "/v1/models":
            _allow(method, "GET")
            models = await self.client.models()
            return _json({"object": "list", "data": [_model(m) for m in models]})
        if path.startswith("/v1/models/"):
            _allow(method, "GET")
            name = path.removeprefix("/v1/models/")
            if name not in await self.client.models():
                raise APIError(
                    404, f"no verified node serves {name!r}", "invalid_request_error",
                    "model_not_found",
                )  # fmt: skip
            return _json(_model(name))
        if path == "/v1/chat/completions":
            _allow(method, "POST")
            req = self._parse(body)
            messages = req.pop("messages", None)
            if not isinstance(messages, list):
                raise _bad("'messages' must be a list of messages", "messages")
            model, stream = req.pop("model"), bool(req.pop("stream", False))
            # Not an OpenAI field: an agent may set it (extra_body) to name a shared scope,
            # or null for none; it never reaches the node as a field.
            scope = req.pop("cache_scope", "conversation")
            if scope is not None and not isinstance(scope, str):
                raise _bad("'cache_scope' must be a string or null", "cache_scope")
            if stream:
                return await _stream(
                    self.client.chat_completions_stream(model, messages, cache_scope=scope, **req)
                )
            answer = await self.client.chat_completions(model, messages, cache_scope=scope, **req)
            return _json(answer)
        if path == "/v1/completions":
            _allow(method, "POST")
            req = self._parse(body)
            prompt = req.pop("prompt", None)
            if not isinstance(prompt, str):
                raise _bad("'prompt' must be one string", "prompt")
            model, stream = req.pop("model"), bool(req.pop("stream", False))
            if stream:
                return await _stream(self.client.completions_stream(model, prompt, **req))
            return _json(await self.client.completions(model, prompt, **req))
        raise APIError(404, f"unknown endpoint {method} {path}", "invalid_request_error",
                       "unknown_url")  # fmt: skip

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            req = json.loads(body)
        except ValueError:
            raise _bad("the request body is not valid JSON", None) from None
        if not isinstance(req, dict):
            raise _bad("the request body must be a JSON object", None)
        if "self" in req:  # would collide with the method's own parameter; never valid
            raise _bad("unsupported field 'self'", "self")
        model = req.get("model") or self.default_model
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required", "model")
        req["model"] = model
        return req


def _allow(method: str, expected: str) -> None:
    if method != expected:
        raise APIError(405, f"use {expected}", "invalid_request_error", "method_not_allowed")


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, "invalid_request_error", "invalid_request", param=param)


def _json(obj: Any) -> Reply:
    return Reply(200, _dumps(obj))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "openpcc"}


async def _stream(chunks: AsyncIterator[dict[str, Any]]) -> Reply:
    """Wait for the first chunk before committing to 200, then relay the rest as SSE.

    Failures before the first chunk (quota, no node, a node's 400) become a proper HTTP
    error status; a failure after it (truncation) can only be an in-stream error event,
    which the OpenAI SDK raises as ``APIError``; ``[DONE]`` is then withheld so no
    client mistakes a cut answer for a complete one.
    """
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is None:
                yield DONE_EVENT
                return
            yield sse_event(first)
            try:
                async for chunk in chunks:
                    yield sse_event(chunk)
            except Exception as exc:
                yield sse_event(map_error(exc).body())
                return
            yield DONE_EVENT
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return Reply(200, stream=events(), headers=dict(SSE_HEADERS))


# ------------------------------------------------------------------------ proxy


LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 possibly in brackets) is loopback."""
    host = host.strip().lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_only(host_header: str) -> str:
    return urlsplit("//" + host_header).hostname or ""


def build_proxy_app(
    frontend: OpenAIFrontend, *, api_key: str | None = None, loopback_only: bool = True
) -> web.Application:
    """The aiohttp app of ``openpcc proxy``; every request spends the user's tokens.

    With ``loopback_only``, requests must name a loopback Host and, if they carry an
    Origin, a loopback origin: a web page the user visits could otherwise make the
    browser POST here (directly or through DNS rebinding) and spend their tokens.
    With ``api_key``, requests must carry ``Authorization: Bearer <api_key>``.
    """

    def refuse(status: int, message: str, code: str) -> web.Response:
        return _to_web(APIError(status, message, "invalid_request_error", code).reply())

    def gate(request: web.Request) -> web.Response | None:
        if loopback_only:
            if not is_loopback(_host_only(request.host)):
                return refuse(403, "this proxy only answers requests for a loopback host",
                              "forbidden_host")  # fmt: skip
            origin = request.headers.get("Origin")
            if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
                return refuse(403, "cross-origin requests are refused", "forbidden_origin")
        if api_key is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return refuse(401, "missing or wrong proxy API key", "invalid_api_key")
        return None

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle(request: web.Request) -> web.StreamResponse:
        refused = gate(request)
        if refused is not None:
            return refused
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, "request body too large", "request_too_large")
        reply = await frontend.handle(request.method, request.path, body)
        if reply.stream is None:
            return _to_web(reply)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        try:
            await resp.prepare(request)
            async for piece in reply.stream:
                await resp.write(piece)  # one write per event: nothing is held back
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the caller went away; closing the stream cancels the private request
        finally:
            await reply.stream.aclose()  # type: ignore[attr-defined]
        return resp

    async def cleanup(_app: web.Application) -> None:
        await frontend.aclose()

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(cleanup)
    return app


def _to_web(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

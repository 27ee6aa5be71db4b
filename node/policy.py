"""The node's allow-list for the requests it unseals (docs/node.md, "What the node accepts").

Only the attested node sees the decrypted request, so it is the last place a request
can be narrowed to what the release promises: three OpenAI paths, the one served
model, a closed set of fields with bounds. Everything else is refused *inside* the
sealed response. The engine never sees a field the client chose that could select
another model, another adapter, a tool, a cache namespace (``cache_salt`` is the
node's to set) or an identity (``user``). Sans-IO: bytes in, a decision out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from openpcc.errors import OpenPCCError
from openpcc.wire import bhttp

SALT_HEADER = b"openpcc-cache-salt"
_LOWER_HEX = re.compile(rb"[0-9a-f]+")
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"

# Fields both generation endpoints accept, with the check for each.
_COMMON_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "ignore_eos",  # vLLM: generate exactly max_tokens (benchmarks, fixed-length output)
    }
)
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
MAX_TOP_LOGPROBS = 5
MAX_STOP = 4
MAX_STOP_CHARS = 256
_SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one inner request; the defaults suit the tiny model and small GPUs."""

    max_body: int = 256 * 1024  # JSON body bytes
    max_tokens: int = 4096
    max_messages: int = 256
    max_text_chars: int = 128 * 1024  # total characters of prompt / message content


class Rejected(OpenPCCError):
    """The inner request is not allowed; ``status``/``title`` go into the sealed answer.

    ``title`` is generic and fixed per reason class (never the offending value), so
    even the client's own error carries no copy of its prompt.
    """

    def __init__(self, status: int, title: str) -> None:
        super().__init__(title)
        self.status = self.status_hint = status
        self.title = title


@dataclass(frozen=True)
class Forward:
    """An allowed request, ready for the engine: method, path, and the JSON body."""

    method: str
    path: str
    body: dict[str, Any] | None
    # The client's cache scope (``openpcc-cache-salt``, 32 bytes), or None: a fresh
    # namespace per request (docs/PROTOCOL.md, "Prefix cache scope and affinity").
    salt: bytes | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


def check_request(
    req: bhttp.Request, *, served_model: str, envelope_model: str, limits: RequestLimits
) -> Forward:
    """Allow ``req`` or raise :class:`Rejected`.

    The body is parsed strictly (no duplicate keys, no NaN/Infinity) and rebuilt by
    the node, so the engine never parses client bytes that two JSON parsers could
    read differently.
    """
    method = req.method.decode("ascii", "replace")
    try:
        path = req.path.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Rejected(404, "unknown path") from exc
    routes = {
        ("POST", CHAT_PATH): CHAT_FIELDS,
        ("POST", COMPLETIONS_PATH): COMPLETION_FIELDS,
        ("GET", MODELS_PATH): None,
    }
    salt = _salt(req)
    if (method, path) not in routes:
        if path in (CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH):
            raise Rejected(405, "method not allowed")
        raise Rejected(404, "unknown path")
    if envelope_model != served_model:
        raise Rejected(400, "model not served by this node")
    fields = routes[(method, path)]
    if fields is None:
        if req.content:
            raise Rejected(400, "unexpected request body")
        return Forward(method, path, None)

    ctype = _header(req, b"content-type")
    if ctype is not None and ctype.split(b";")[0].strip().lower() != b"application/json":
        raise Rejected(415, "content type must be application/json")
    if len(req.content) > limits.max_body:
        raise Rejected(413, "request body too large")
    body = _parse_json(req.content)
    unknown = set(body) - fields
    if unknown:
        raise Rejected(400, "field not allowed")
    if body.get("model") != served_model:
        raise Rejected(400, "model not served by this node")
    _check_common(body, limits)
    if path == CHAT_PATH:
        _check_chat(body, limits)
    else:
        _check_completion(body, limits)
    return Forward(method, path, body, salt)


def _salt(req: bhttp.Request) -> bytes | None:
    value = _header(req, SALT_HEADER)
    if value is None:
        return None
    if len(value) != 64 or not _LOWER_HEX.fullmatch(value):
        raise Rejected(400, "malformed cache salt")
    return bytes.fromhex(value.decode("ascii"))


def _header(req: bhttp.Request, name: bytes) -> bytes | None:
    values = [v for k, v in req.headers if k.lower() == name]
    if len(values) > 1:
        raise Rejected(400, "repeated header")
    return values[0] if values else None


def _parse_json(content: bytes) -> dict[str, Any]:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError("duplicate key")
            out[k] = v
        return out

    def no_constant(_s: str) -> Any:
        raise ValueError("non-finite number")

    try:
        body = json.loads(
            content.decode("utf-8"), object_pairs_hook=pairs, parse_constant=no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected(400, "body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise Rejected(400, "body must be a JSON object")
    return body


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)  # type: ignore[arg-type]


def _range(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    if name in body and body[name] is not None:
        v = body[name]
        if not _is_num(v) or not lo <= v <= hi:
            raise Rejected(400, f"{name} out of range")


def _check_common(body: dict[str, Any], limits: RequestLimits) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body and body[name] is not None:
            v = body[name]
            if not _is_int(v) or not 1 <= v <= limits.max_tokens:
                raise Rejected(400, f"{name} out of range")
    _range(body, "temperature", 0.0, 2.0)
    _range(body, "top_p", 0.0, 1.0)
    if "top_p" in body and body["top_p"] == 0:
        raise Rejected(400, "top_p out of range")
    _range(body, "presence_penalty", -2.0, 2.0)
    _range(body, "frequency_penalty", -2.0, 2.0)
    if "n" in body and body["n"] is not None and (not _is_int(body["n"]) or body["n"] != 1):
        raise Rejected(400, "n must be 1")
    if "seed" in body and body["seed"] is not None:
        v = body["seed"]
        if not _is_int(v) or not _SEED_RANGE[0] <= v <= _SEED_RANGE[1]:
            raise Rejected(400, "seed out of range")
    for flag in ("stream", "ignore_eos"):
        if flag in body and not isinstance(body[flag], bool | None):
            raise Rejected(400, f"{flag} must be a boolean")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise Rejected(400, "stream_options not allowed")
        if not isinstance(opts.get("include_usage", False), bool):
            raise Rejected(400, "stream_options not allowed")
        if not body.get("stream"):
            raise Rejected(400, "stream_options needs stream")
    stop = body.get("stop")
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(items, list)
            or len(items) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)
        ):
            raise Rejected(400, "stop not allowed")


def _check_chat(body: dict[str, Any], limits: RequestLimits) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Rejected(400, "messages must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise Rejected(400, "too many messages")
    total = 0
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise Rejected(400, "message not allowed")
        if m["role"] not in CHAT_ROLES:
            raise Rejected(400, "message role not allowed")
        content = m["content"]
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list) and content:
            for part in content:
                if (
                    not isinstance(part, dict)
                    or set(part) != {"type", "text"}
                    or part["type"] != "text"
                    or not isinstance(part["text"], str)
                ):
                    raise Rejected(400, "message content not allowed")
                total += len(part["text"])
        else:
            raise Rejected(400, "message content not allowed")
    if total > limits.max_text_chars:
        raise Rejected(413, "messages too long")
    if "logprobs" in body and not isinstance(body["logprobs"], bool | None):
        raise Rejected(400, "logprobs must be a boolean")
    tl = body.get("top_logprobs")
    if tl is not None and (not _is_int(tl) or not 0 <= tl <= MAX_TOP_LOGPROBS):
        raise Rejected(400, "top_logprobs out of range")


def _check_completion(body: dict[str, Any], limits: RequestLimits) -> None:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise Rejected(400, "prompt must be a non-empty string")
    if len(prompt) > limits.max_text_chars:
        raise Rejected(413, "prompt too long")
    lp = body.get("logprobs")
    if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS):
        raise Rejected(400, "logprobs out of range")

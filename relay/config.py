"""Relay configuration: plain data, parsed from flags and ``OPENPCC_RELAY_*`` variables.

Kept free of aiohttp so ``--help`` and config errors never pay for the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from openpcc.service.config import option

KEYS_WELL_KNOWN = "/.well-known/ohttp-gateway"  # RFC 9540 section 3
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", ".well-known"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Gateway:
    """One gateway resource: ``POST /<name>`` goes to ``url``; ``name`` "" is ``POST /``."""

    name: str
    url: str
    keys_url: str

    @property
    def post_path(self) -> str:
        return f"/{self.name}" if self.name else "/"

    @property
    def keys_path(self) -> str:
        return f"/{self.name}{KEYS_WELL_KNOWN}" if self.name else KEYS_WELL_KNOWN


@dataclass(frozen=True)
class RelayConfig:
    """Everything the relay needs; defaults suit a public relay behind nothing else.

    Every field with ``option`` metadata is a flag and an ``OPENPCC_RELAY_*`` variable
    (openpcc/service/config.py); ``gateways`` comes from ``--gateway``/``--keys-url``.
    """

    gateways: tuple[Gateway, ...]
    host: str = field(default="127.0.0.1", metadata=option("address to listen on"))
    port: int = field(default=8081, metadata=option("port to listen on", kind="int"))
    max_body: int = field(
        default=8 * 1024 * 1024,
        metadata=option("largest request body, e.g. 8m (413 above)", kind="size"),
    )
    rate_limit: float = field(
        default=10.0,
        metadata=option("requests per second per client address (0 disables); 429 above",
                        kind="float"),
    )  # fmt: skip
    rate_burst: int = field(
        default=40, metadata=option("requests a client may send back to back", kind="int")
    )
    rate_limit_clients: int = field(
        default=65536,
        metadata=option("client buckets kept in memory (least recently seen evicted)",
                        kind="int"),
    )  # fmt: skip
    max_concurrency: int = field(
        default=1024, metadata=option("requests relayed at once (503 above)", kind="int")
    )
    connect_timeout: float = field(
        default=5.0,
        metadata=option("seconds to connect to the gateway (502/504 after)", kind="float"),
    )
    read_timeout: float = field(
        default=120.0,
        metadata=option("seconds the gateway may stay silent (504, or a cut stream, after)",
                        kind="float"),
    )  # fmt: skip
    client_timeout: float = field(
        default=60.0,
        metadata=option("seconds a client may stay silent while sending its body (408 after)",
                        kind="float"),
    )  # fmt: skip
    keys_max_age: float = field(
        default=3600.0,
        metadata=option("cap, in seconds, on caching a key configuration", kind="float"),
    )
    keys_max_bytes: int = 64 * 1024  # largest key configuration answer accepted
    access_log: bool = field(
        default=False,
        metadata=option("log one line per request (method, route, status, bytes, seconds; "
                        "never addresses)", kind="bool"),
    )  # fmt: skip
    audit_log: str | None = field(
        default=None,
        metadata=option("TESTS AND DEMO ONLY: record every request received, client address "
                        "included", metavar="FILE", env=False),
    )  # fmt: skip
    allow_origins: tuple[str, ...] = field(
        default=(),
        metadata=option("CORS: let web pages from ORIGIN (scheme://host[:port], or * for any) "
                        "call the gateway routes (repeatable)", kind="origins",
                        flag="--allow-origin", metavar="ORIGIN"),
    )  # fmt: skip
    shutdown_timeout: float = field(
        default=30.0,
        metadata=option("on SIGTERM, stop accepting and let in-flight streams finish this "
                        "many seconds", kind="float"),
    )  # fmt: skip
    uvloop: bool = field(
        default=True,
        metadata=option("run on uvloop's event loop where it is installed (optional extra: "
                        "pip install 'openpcc[uvloop]'; less CPU per request); --no-uvloop "
                        "or OPENPCC_EVENT_LOOP=asyncio: asyncio's", kind="bool"),
    )  # fmt: skip
    http_server: str = field(
        default="lean",
        metadata=option("the HTTP/1.1 server: lean (relay/server.py, about half the CPU per "
                        "request) or aiohttp (relay/app.py, the previous one)",
                        metavar="lean|aiohttp"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("at least one --gateway is required")
        names = [g.name for g in self.gateways]
        if len(set(names)) != len(names):
            raise ValueError("gateway names must be unique (at most one unnamed gateway)")
        for name in ("max_body", "rate_burst", "rate_limit_clients", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0")
        for name in ("connect_timeout", "read_timeout", "client_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.http_server not in ("lean", "aiohttp"):
            raise ValueError("http-server must be lean or aiohttp")


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"gateway URL must be http(s)://host[:port]/path, got {url!r}")
    if parts.username or parts.password or parts.fragment:
        raise ValueError(f"gateway URL must not carry credentials or a fragment: {url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))


def _split_named(spec: str) -> tuple[str, str]:
    """``NAME=URL`` -> (NAME, URL); a bare URL -> ("", URL)."""
    head, sep, tail = spec.partition("=")
    if sep and "://" not in head:
        if not _NAME.match(head) or head in RESERVED_NAMES:
            raise ValueError(f"bad gateway name {head!r} (letters, digits, _ and -)")
        return head, tail.strip()
    return "", spec.strip()


def default_keys_url(gateway_url: str) -> str:
    """RFC 9540: the key configuration lives at the gateway origin's well-known path."""
    parts = urlsplit(gateway_url)
    return urlunsplit((parts.scheme, parts.netloc, KEYS_WELL_KNOWN, "", ""))


def parse_gateways(specs: list[str], keys_specs: list[str] | None = None) -> tuple[Gateway, ...]:
    """Parse ``[NAME=]URL`` gateway specs and optional ``[NAME=]URL`` key-config overrides."""
    keys: dict[str, str] = {}
    for spec in keys_specs or []:
        name, url = _split_named(spec)
        keys[name] = _check_url(url)
    out = []
    for spec in specs:
        name, url = _split_named(spec)
        url = _check_url(url)
        out.append(Gateway(name=name, url=url, keys_url=keys.pop(name, default_keys_url(url))))
    if keys:
        raise ValueError(f"--keys-url names no gateway: {sorted(keys)}")
    return tuple(out)

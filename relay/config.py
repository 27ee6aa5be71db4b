"""Relay configuration: plain data, parsed from flags and ``OPENPCC_RELAY_*`` variables.

Kept free of aiohttp so ``--help`` and config errors never pay for the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

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
    """Everything the relay needs; defaults suit a public relay behind nothing else."""

    gateways: tuple[Gateway, ...]
    host: str = "127.0.0.1"
    port: int = 8081
    max_body: int = 8 * 1024 * 1024
    rate_limit: float = 10.0  # requests per second per client address; 0 disables
    rate_burst: int = 40
    rate_limit_clients: int = 65536  # buckets kept (LRU); bounds memory
    max_concurrency: int = 1024
    connect_timeout: float = 5.0
    read_timeout: float = 120.0  # idle time between bytes from the gateway
    client_timeout: float = 60.0  # idle time between bytes of a request body
    keys_max_age: float = 3600.0  # cap on how long a key configuration is cached
    keys_max_bytes: int = 64 * 1024
    access_log: bool = False
    audit_log: str | None = None  # tests/demo only: records what the relay received
    allow_origins: tuple[str, ...] = ()  # CORS: web origins allowed to call the relay; "*" any

    def __post_init__(self) -> None:
        if not self.gateways:
            raise ValueError("at least one --gateway is required")
        names = [g.name for g in self.gateways]
        if len(set(names)) != len(names):
            raise ValueError("gateway names must be unique (at most one unnamed gateway)")
        for field in ("max_body", "rate_burst", "rate_limit_clients", "max_concurrency"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1")
        if self.rate_limit < 0:
            raise ValueError("rate_limit must be >= 0")
        for field in ("connect_timeout", "read_timeout", "client_timeout"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")


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

"""The issuer's configuration: one frozen dataclass; its flags and ``OPENPCC_ISSUER_*``
variables are derived from it (openpcc/service/config.py). Free of aiohttp."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openpcc.service.config import option, workers_field

ENV_PREFIX = "OPENPCC_ISSUER_"
MAX_BATCH = 1000
MAX_WORKERS = 64
# A key's lifetime plus its rotation lead may not exceed this (31 days: the default 30-day
# lifetime and 1-hour lead fit, with room below the gateway's default 32-day --spent-ttl).
MAX_KEY_LIFETIME = 31 * 24 * 3600


@dataclass(frozen=True)
class IssuerConfig:
    state_dir: Path = field(
        default=Path(".state/issuer"),
        metadata=option("state folder: SQLite database and token keys", kind="path",
                        flag="--state", metavar="DIR"),
    )  # fmt: skip
    redis: str | None = field(
        default=None,
        metadata=option("share accounts and quotas through Redis (several replicas)",
                        metavar="URL"),
    )  # fmt: skip
    host: str = field(default="127.0.0.1", metadata=option("address to listen on"))
    port: int = field(default=8401, metadata=option("port to listen on", kind="int"))
    public_url: str | None = field(
        default=None,
        metadata=option("absolute base URL clients reach the issuer at (issuer-request-uri)"),
    )
    allow_origins: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "CORS: let web pages from ORIGIN (scheme://host[:port], or * for any) fetch the "
            "directory and request tokens (repeatable; default: no CORS headers)",
            kind="origins",
            flag="--allow-origin",
            metavar="ORIGIN",
        ),
    )
    directory_max_age: int = field(
        default=300,
        metadata=option("Cache-Control max-age of the issuer directory", kind="int",
                        metavar="SECONDS"),
    )  # fmt: skip
    max_batch: int = field(
        default=MAX_BATCH, metadata=option("tokens per batch request", kind="int")
    )
    workers: int = workers_field()
    shutdown_timeout: float = field(
        default=10.0,
        metadata=option("on SIGTERM, stop accepting and let in-flight requests finish this long",
                        kind="float", metavar="SECONDS"),
    )  # fmt: skip
    audit_log: Path | None = field(
        default=None,
        metadata=option("TESTS AND DEMO ONLY: record every request received (addresses, "
                        "bodies)", kind="path", metavar="FILE", env=False),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:  # 0: the kernel picks (--port-file)
            raise ValueError("--port must be 0..65535")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ValueError(f"--max-batch must be 1..{MAX_BATCH}")
        if self.directory_max_age < 0:
            raise ValueError("--directory-max-age must be >= 0")
        if self.shutdown_timeout < 0:
            raise ValueError("--shutdown-timeout must be >= 0")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be 1..{MAX_WORKERS}")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("--public-url must be an absolute http(s) URL")


@dataclass(frozen=True)
class KeyRotation:
    """`issuer keys rotate`: the new key's schedule, and the longest one allowed.

    Why a limit: gateways refuse tokens under a key they have redeemed for longer than
    their --spent-ttl (past it they no longer remember which were spent), so a key that
    lives longer would stop working before it expires."""

    not_before_in: int = field(
        default=3600,
        metadata=option("seconds until the new key is in force (it is listed from now on; "
                        "negative: in force at once)", kind="int", metavar="SECONDS"),
    )  # fmt: skip
    lifetime: int = field(
        default=30 * 24 * 3600,
        metadata=option("seconds the new key is in force", kind="int", metavar="SECONDS"),
    )
    max_key_lifetime: int = field(
        default=MAX_KEY_LIFETIME,
        metadata=option("longest lifetime plus lead accepted; keep it below every gateway's "
                        "--spent-ttl (32 days by default)", kind="int", metavar="SECONDS"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.lifetime < 1:
            raise ValueError("--lifetime must be positive")
        if self.lifetime + max(0, self.not_before_in) > self.max_key_lifetime:
            raise ValueError(
                f"--lifetime {self.lifetime} s plus --not-before-in {self.not_before_in} s "
                f"exceeds --max-key-lifetime {self.max_key_lifetime} s; gateways would refuse "
                "the key's tokens before it expires (their --spent-ttl)"
            )

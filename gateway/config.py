"""The gateway's configuration: one frozen dataclass; its flags and ``OPENPCC_GATEWAY_*``
variables are derived from it (openpcc/service/config.py). Free of aiohttp.

Fields without ``option`` metadata are internal settings tests and benchmarks may set.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from gateway.spent import DEFAULT_TTL
from openpcc.service.config import option, workers_field

ENV_PREFIX = "OPENPCC_GATEWAY_"
MAX_WORKERS = 64
DEFAULT_SPENT_TTL = 32 * 86400  # longer than the issuer's default key lifetime plus skew
# OHTTP key config KEMs by name (gateway/keys.py maps them to KEM ids; named here so the
# parser is built without the crypto libraries).
OHTTP_KEMS = ("x25519", "x-wing")


@dataclass(frozen=True)
class GatewayConfig:
    state_dir: Path = field(
        default=Path(".state/gateway"),
        metadata=option(
            "state folder: OHTTP keys (ohttp-keys/) and the SQLite spent-token store",
            kind="path",
            flag="--state",
            metavar="DIR",
        ),
    )
    host: str = field(default="127.0.0.1", metadata=option("public listener address"))
    port: int = field(default=8403, metadata=option("public listener port", kind="int"))
    internal_host: str = field(
        default="127.0.0.1",
        metadata=option("node registration listener; bind it where only nodes reach it"),
    )
    internal_port: int = field(
        default=8404, metadata=option("node registration listener port", kind="int")
    )
    issuer: str | None = field(
        default=None,
        metadata=option(
            "issuer base URL; its directory lists the token keys we redeem (required)",
            metavar="URL",
        ),
    )
    issuer_name: str | None = field(
        default=None,
        metadata=option(
            "issuer_name of the TokenChallenge tokens must be for (default: host of --issuer)"
        ),
    )
    redis: str | None = field(
        default=None,
        metadata=option(
            "spent tokens and the node registry in Redis, shared by replicas", metavar="URL"
        ),
    )
    redis_prefix: str = field(
        default="openpcc:gateway:",
        metadata=option(
            "prefix of this deployment's Redis keys (two deployments sharing a Redis need "
            "different ones)",
            metavar="PREFIX",
        ),
    )
    registry_sync_interval: float = field(
        default=1.0,
        metadata=option(
            "with --redis: how often to copy the shared node registry from Redis",
            kind="float",
            flag="--registry-sync",
            metavar="SECONDS",
        ),
    )
    node_credentials: Path | None = field(
        default=None,
        metadata=option(
            "node admission credentials (gateway credentials add); default: "
            "STATE/node-credentials.json",
            kind="path",
            metavar="FILE",
        ),
    )
    trust_policy: Path | None = field(
        default=None,
        metadata=option(
            "signed release manifest nodes' bundles must verify under before they are "
            "listed (the one clients use; reloaded when it changes; required)",
            kind="path",
            metavar="FILE",
        ),
    )
    release_pubkey: Path | None = field(
        default=None,
        metadata=option(
            "the release public key (PEM) --trust-policy must be signed by (required)",
            kind="path",
            metavar="PEM",
        ),
    )
    node_network: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "network node URLs must be inside, as CIDR (repeatable; default: loopback only)",
            kind="list",
            metavar="CIDR",
        ),
    )
    node_ttl: float = field(
        default=30.0,
        metadata=option(
            "drop a node after this long without a heartbeat (3 x its interval)",
            kind="float",
            metavar="SECONDS",
        ),
    )
    affinity_slack: int = field(
        default=4,
        metadata=option(
            "route to the client's first candidate (its conversation's cache) unless its load "
            "exceeds the least-loaded candidate's by more than this many requests",
            kind="int",
            metavar="N",
        ),
    )
    health_interval: float = field(
        default=5.0,
        metadata=option("how often to GET each node's /readyz", kind="float", metavar="SECONDS"),
    )
    spent_ttl: int = field(
        default=DEFAULT_TTL,
        metadata=option(
            "how long a spent token is remembered; at least the issuer key lifetime",
            kind="int",
            metavar="SECONDS",
        ),
    )
    ohttp_kems: tuple[str, ...] = field(
        default=OHTTP_KEMS,
        metadata=option(
            "KEMs to keep and publish an OHTTP key config for (repeatable: x25519, x-wing); "
            "a missing one is created at start",
            kind="list",
            flag="--ohttp-kem",
            metavar="KEM",
        ),
    )
    keys_max_age: int = field(
        default=3600,
        metadata=option(
            "Cache-Control max-age of the key configs (keep below the rotation grace)",
            kind="int",
            metavar="SECONDS",
        ),
    )
    node_first_byte_timeout: float = field(
        default=60.0,
        metadata=option(
            "time a node has to start answering before the next candidate is tried",
            kind="float",
            flag="--node-timeout",
            metavar="SECONDS",
        ),
    )
    max_body: int | None = field(
        default=None,
        metadata=option(
            "largest encapsulated request, e.g. 9m (default: what the largest sealed envelope "
            "needs, gateway/limits.py)",
            kind="size",
        ),
    )
    workers: int = workers_field()
    shutdown_timeout: float = field(
        default=30.0,
        metadata=option(
            "on SIGTERM, stop accepting and let in-flight streams finish this long",
            kind="float",
            metavar="SECONDS",
        ),
    )
    audit_log: Path | None = field(
        default=None,
        metadata=option(
            "record what the gateway received (tests and demo only; never in production)",
            kind="path",
            metavar="FILE",
            env=False,
        ),
    )
    # Internal settings (no flag).
    node_connect_timeout: float = 2.0
    node_read_timeout: float = 300.0
    client_timeout: float = 30.0
    max_plain_response: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError(f"--issuer URL is required (or {ENV_PREFIX}ISSUER)")
        if self.trust_policy is None or self.release_pubkey is None:
            raise ValueError(
                f"--trust-policy FILE and --release-pubkey PEM ({ENV_PREFIX}TRUST_POLICY, "
                f"{ENV_PREFIX}RELEASE_PUBKEY) are required: nodes are listed only once "
                "their attestation verifies under them"
            )
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be 1..{MAX_WORKERS}")
        if self.workers > 1 and not self.redis:
            # Nodes register with whichever worker their connection reaches: the registry
            # (and the spent tokens, atomically) must be shared, which is what Redis is for.
            raise ValueError("--workers above 1 needs --redis (the workers share the registry)")
        if not self.ohttp_kems:
            raise ValueError("--ohttp-kem: at least one KEM (x25519, x-wing)")
        for kem in self.ohttp_kems:
            if kem.strip().lower() not in OHTTP_KEMS:
                raise ValueError(f"--ohttp-kem {kem!r} is not one of {', '.join(OHTTP_KEMS)}")
        for net in self.node_network:
            try:
                ipaddress.ip_network(net.strip(), strict=False)
            except ValueError:
                raise ValueError(f"--node-network {net!r} is not a CIDR network") from None
        if not self.issuer_name and not urlsplit(self.issuer).hostname:
            raise ValueError("cannot derive --issuer-name from --issuer")
        for name in ("port", "internal_port"):
            if not 0 <= getattr(self, name) <= 65535:  # 0: the kernel picks (--port-file)
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535")
        if self.affinity_slack < 0:
            raise ValueError("--affinity-slack must be 0 or more")
        if (self.max_body is not None and self.max_body < 1) or self.spent_ttl < 1:
            raise ValueError("--max-body and --spent-ttl must be positive")

    @property
    def credentials_path(self) -> Path:
        return self.node_credentials or self.state_dir / "node-credentials.json"

    @property
    def token_issuer_name(self) -> str:
        """The TokenChallenge issuer_name: the flag, else the host of --issuer."""
        return self.issuer_name or str(urlsplit(str(self.issuer)).hostname)

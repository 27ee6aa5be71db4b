"""A client profile (`client.json`): relay, issuer, account key file, trust policy,
wallet and model, as `openpcc up` writes it or an operator hands it out.

``client_from_config`` builds the client the SDK, `chat`, `status` and `proxy` use from
it; ``wait_for_config`` lets those commands start beside a stack that is still coming up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpcc.client.serials import MANIFEST_FILE, SERIALS_FILE, remember_serial
from openpcc.errors import DecodeError

if TYPE_CHECKING:
    from openpcc.attestation.policy import TrustPolicy

log = logging.getLogger("openpcc.client")

# Where `openpcc up` writes the profile (its --state, then client.json); env
# OPENPCC_CLIENT_CONFIG points the client commands elsewhere.
DEFAULT_PROFILE = Path(".state/local/client.json")


def default_profile() -> Path:
    import os

    return Path(os.environ.get("OPENPCC_CLIENT_CONFIG") or DEFAULT_PROFILE)


def policy_from_client_config(cfg: Mapping[str, Any], now: datetime) -> TrustPolicy:
    """The trust policy a client profile (``client.json``) names, in either form:
    ``{"policy": SIGNED.json, "release_pubkey": PUB.pem}`` (Ed25519), or
    ``{"policy": manifest.json, "sigstore": {"bundle": B, "identity": ID,
    "oidc_issuer": URL, "trust_root": trusted_root.json}}`` (Sigstore, offline)."""
    from openpcc.attestation.policy import TrustPolicy
    from openpcc.attestation.sigstore_manifest import policy_from_sigstore

    sigstore = cfg.get("sigstore")
    if sigstore is None:
        return TrustPolicy.from_signed(
            Path(cfg["policy"]).read_bytes(), [Path(cfg["release_pubkey"]).read_bytes()], now
        )
    if "release_pubkey" in cfg:
        raise DecodeError("client config: give release_pubkey or sigstore, not both")
    keys = {"bundle", "identity", "oidc_issuer", "trust_root"}
    if not isinstance(sigstore, dict) or set(sigstore) != keys:
        raise DecodeError(f"client config sigstore: an object with exactly {sorted(keys)}")
    s = sigstore
    if not all(isinstance(v, str) and v for v in s.values()):
        raise DecodeError("client config sigstore: every value must be a non-empty string")
    return policy_from_sigstore(
        Path(cfg["policy"]).read_bytes(),
        Path(s["bundle"]).read_bytes(),
        identity=s["identity"],
        oidc_issuer=s["oidc_issuer"],
        trust_root=s["trust_root"],
        now=now,
    )


def newest_policy(cfg: Mapping[str, Any], folder: Path, now: datetime) -> TrustPolicy:
    """The policy a client starts with: the newer valid one of the configured manifest and
    the one a refresh persisted in ``folder`` (``MANIFEST_FILE``; Ed25519 form only), so a
    restart neither goes back to the older file nor fails once the configured one expires.
    With neither valid, the configured one's error."""
    from openpcc.attestation.policy import TrustPolicy
    from openpcc.errors import OpenPCCError

    try:
        configured: TrustPolicy | None = policy_from_client_config(cfg, now)
        problem: Exception | None = None
    except (OSError, OpenPCCError) as exc:
        configured, problem = None, exc
    stored = folder / MANIFEST_FILE
    persisted = None
    if cfg.get("sigstore") is None and stored.exists():
        try:
            keys = [Path(cfg["release_pubkey"]).read_bytes()]
            persisted = TrustPolicy.from_signed(stored.read_bytes(), keys, now)
        except (OSError, OpenPCCError) as exc:
            log.warning("ignoring the refreshed release manifest %s: %s", stored, exc)
    if configured is None and persisted is None:
        assert problem is not None
        raise problem
    if configured is None:
        log.warning("configured release manifest not usable (%s); using %s", problem, stored)
    candidates = [p for p in (configured, persisted) if p is not None]
    return max(candidates, key=lambda p: p.manifest.serial)


def client_from_config(
    config_path: Path,
    *,
    local_addr: str | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[Any, Any, str, Any]:
    """(Client, wallet, model, shared session or None) from `STATE/client.json`.

    Call inside a running event loop; the caller closes all three. ``clock`` (Unix
    seconds) is what the client judges manifests, claims and its caches by, and when it
    refreshes the manifest (``manifest_url``, openpcc/client/manifest.py).
    """
    from openpcc.client.attest import BundleVerifier
    from openpcc.client.cachescope import CACHE_SECRET_FILE, CacheSecret
    from openpcc.client.client import Client
    from openpcc.client.manifest import refresher_from_config
    from openpcc.client.wallet import TokenWallet

    cfg = json.loads(config_path.read_text())
    policy = newest_policy(cfg, config_path.parent, datetime.fromtimestamp(clock(), UTC))
    remember_serial(policy, config_path.parent / SERIALS_FILE)
    refresher = refresher_from_config(cfg, policy, config_path.parent, clock=clock)
    api_key = Path(cfg["api_key_file"]).read_text().strip()
    client: Client | None = None
    session = None
    if local_addr is not None:
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=(local_addr, 0)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
        )

    async def fetch_directory() -> bytes:
        assert client is not None
        return await client.issuer_directory()

    wallet = TokenWallet(
        cfg["issuer_url"],
        api_key,
        cfg["wallet"],
        batch_size=20,
        low_water=5,
        directory_fetcher=fetch_directory,
        session=session,
    )
    affinity = cfg.get("affinity", True)
    if not isinstance(affinity, bool):
        raise DecodeError("client config: affinity must be true or false")
    client = Client(
        cfg["relay_url"],
        tokens=wallet,
        verifier=BundleVerifier(policy),
        trust=policy,
        session=session,
        # Beside the wallet: a second profile is a second client, with its own scopes.
        cache_secret=CacheSecret(config_path.parent / CACHE_SECRET_FILE, clock=clock),
        affinity=affinity,
        clock=clock,
        refresher=refresher,
    )
    return client, wallet, cfg["model"], session


def wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait this long for the client profile while `openpcc up` is still coming up "
        "(0: do not wait)",
    )


def wait_for_config(path: Path, wait: float, command: str) -> bool:
    """True once ``path`` exists; False (after saying so) when ``wait`` seconds pass.

    `openpcc up` writes the profile last, atomically, once every party is ready, so a
    command started beside it can simply wait for the file.
    """
    from openpcc.progress import Every

    if path.exists():
        return True
    t0 = time.monotonic()
    if wait > 0:
        print(f"waiting for the client profile {path} (written by `openpcc up` once the "
              f"stack is ready; --wait {wait:g})…", file=sys.stderr, flush=True)  # fmt: skip
    every = Every(now=False)
    while not path.exists():
        now = time.monotonic()
        if now - t0 >= wait:
            print(f"openpcc {command}: no client profile at {path} after {wait:g} s: start "
                  "`openpcc up` first", file=sys.stderr)  # fmt: skip
            return False
        if every.due():
            print(f"still waiting for {path} ({now - t0:.0f} s)", file=sys.stderr, flush=True)
        time.sleep(0.2)
    return True

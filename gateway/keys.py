"""The gateway's OHTTP key configs on disk: generation, rotation, reload.

Layout: ``STATE/ohttp-keys/<key_id>.json`` (mode 0600), one X25519 key pair per file:
``{"key_id", "private_key" (hex), "created_at", "expires_at" (null while current)}``.
Key ids are 0-255 (RFC 9458 §3.1). Rotation adds a key under a fresh id and gives the
keys it replaces an expiry ``grace`` seconds out, so clients and relays that cached the
old config (``Cache-Control: max-age``) keep working until it is really gone. Several
gateway replicas can share the folder (e.g. a Kubernetes secret); a running gateway
reloads it when the folder's mtime changes, exactly as the issuer does for token keys.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from openpcc.errors import KeyStoreError, OpenPCCError
from openpcc.files import mtime_ns, write_private
from openpcc.wire import hpke
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

KEYS_DIRNAME = "ohttp-keys"
DEFAULT_GRACE = 24 * 3600
# Both AEADs PROTOCOL.md says the gateway publishes: (HKDF-SHA256, AES-128-GCM), (…, ChaCha20).
SUITES = (
    SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
)


@dataclass(frozen=True)
class OhttpKey:
    key_id: int
    private_key: bytes
    public_key: bytes
    created_at: int
    expires_at: int | None

    def __repr__(self) -> str:  # never print the private key
        return f"OhttpKey(key_id={self.key_id}, expires_at={self.expires_at})"

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def config(self) -> KeyConfig:
        return KeyConfig(self.key_id, hpke.KEM_DHKEM_X25519_HKDF_SHA256, self.public_key, SUITES)


def _save(keys_dir: Path, key: OhttpKey) -> None:
    doc = {
        "key_id": key.key_id,
        "private_key": key.private_key.hex(),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
    }
    write_private(keys_dir / f"{key.key_id}.json", json.dumps(doc).encode())


class OhttpKeyRing:
    """All OHTTP keys in a state folder; newest first (clients take the first config)."""

    def __init__(self, keys_dir: Path, keys: list[OhttpKey]) -> None:
        self.dir = keys_dir
        # The current key (no expiry yet) first, then the others by how long they remain.
        self.keys = sorted(
            keys,
            key=lambda k: (k.expires_at is None, k.expires_at or 0, k.created_at),
            reverse=True,
        )
        self.mtime_ns = mtime_ns(keys_dir)
        self._invalidate()

    def _invalidate(self) -> None:
        # Parsed key objects, built once: parsing a raw X25519 key costs a scalar
        # multiplication (the library derives the public key), ~35 us per request.
        self._parsed = {k.key_id: hpke.load_private_key(k.private_key) for k in self.keys}
        self._decap: Mapping[int, X25519PrivateKey] = MappingProxyType({})
        self._decap_from, self._decap_until = math.inf, -math.inf

    @classmethod
    def load(cls, state_dir: Path) -> OhttpKeyRing:
        keys_dir = state_dir / KEYS_DIRNAME
        keys: list[OhttpKey] = []
        if keys_dir.is_dir():
            for path in sorted(keys_dir.glob("*.json")):
                try:
                    doc = json.loads(path.read_text())
                    sk = bytes.fromhex(doc["private_key"])
                    key_id = int(doc["key_id"])
                    expires = doc.get("expires_at")
                    key = OhttpKey(
                        key_id,
                        sk,
                        hpke.public_key_from_private(sk),
                        int(doc["created_at"]),
                        None if expires is None else int(expires),
                    )
                except (OSError, ValueError, KeyError, TypeError, OpenPCCError) as exc:
                    raise KeyStoreError(f"unreadable OHTTP key {path.name}: {exc}") from exc
                if path.stem != str(key_id) or not 0 <= key_id <= 255:
                    raise KeyStoreError(f"OHTTP key file {path.name} does not match its key id")
                keys.append(key)
        return cls(keys_dir, keys)

    def changed_on_disk(self) -> bool:
        """Cheap check so a running gateway picks up ``keys rotate`` without a restart."""
        return mtime_ns(self.dir) != self.mtime_ns

    def live(self, now: float) -> list[OhttpKey]:
        return [k for k in self.keys if k.live(now)]

    def private_keys(self, now: float) -> Mapping[int, X25519PrivateKey]:
        """key_id -> parsed private key, for decapsulation: only keys still published.

        The same read-only mapping is handed out until the next expiry passes.
        """
        if not self._decap_from <= now < self._decap_until:
            live = self.live(now)
            self._decap = MappingProxyType({k.key_id: self._parsed[k.key_id] for k in live})
            # Valid from now until the first live key expires (a key never comes back).
            self._decap_from = now
            self._decap_until = min(
                (k.expires_at for k in live if k.expires_at is not None), default=math.inf
            )
        return self._decap

    def configs(self, now: float) -> list[KeyConfig]:
        return [k.config for k in self.live(now)]

    def rotate(self, *, now: float, grace: int = DEFAULT_GRACE) -> tuple[OhttpKey, list[int]]:
        """Add a key under a fresh id; current keys expire ``grace`` s later; prune dead ones.

        Returns (new key, pruned key ids).
        """
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pruned = []
        for k in self.keys:
            if not k.live(now):
                (self.dir / f"{k.key_id}.json").unlink(missing_ok=True)
                pruned.append(k.key_id)
        live = self.live(now)
        taken = {k.key_id for k in live}
        if len(taken) >= 256:
            raise KeyStoreError("all 256 OHTTP key ids are in use; wait for old keys to expire")
        # Next id after the newest one, so ids cycle instead of reusing a just-retired one.
        start = (live[0].key_id + 1) % 256 if live else 0
        key_id = next(i % 256 for i in range(start, start + 256) if i % 256 not in taken)
        pair = hpke.generate_key_pair()
        new = OhttpKey(key_id, pair.private_key, pair.public_key, int(now), None)
        _save(self.dir, new)
        for k in live:
            if k.expires_at is None or k.expires_at > now + grace:
                _save(
                    self.dir,
                    OhttpKey(k.key_id, k.private_key, k.public_key, k.created_at, int(now + grace)),
                )
        fresh = OhttpKeyRing.load(self.dir.parent)
        self.keys, self.mtime_ns = fresh.keys, fresh.mtime_ns
        self._invalidate()
        return new, pruned


def ensure_key(state_dir: Path, now: float | None = None) -> OhttpKeyRing:
    """Load the ring, creating a first key if none is live (fresh install)."""
    ring = OhttpKeyRing.load(state_dir)
    t = time.time() if now is None else now
    if not ring.live(t):
        ring.rotate(now=t)
    return ring

"""The issuer's token keys on disk: generation, rotation, and what is in force.

Layout under ``STATE/keys/``: ``<token_key_id hex>.pem`` (PKCS#8, mode 0600) and
``<id>.json`` (``not_before``, ``expires_at``, ``created_at``; Unix seconds).
Several issuer replicas share one key folder (e.g. a Kubernetes secret).

A key is *published* in the directory from creation until it expires (so the
gateway and clients learn a rotated-in key before it is used), *issuable* from
``not_before`` until it expires, and accepted for redemption while published.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from openpcc.errors import KeyStoreError, OpenPCCError
from openpcc.files import mtime_ns, write_private
from openpcc.privacypass.blindrsa import PrivateKey
from openpcc.privacypass.issuance import IssuerKey

DEFAULT_LIFETIME = 30 * 24 * 3600
DEFAULT_ROTATION_LEAD = 3600


@dataclass(frozen=True)
class StoredKey:
    key: IssuerKey
    not_before: int
    expires_at: int
    created_at: int

    @property
    def key_id_hex(self) -> str:
        return self.key.token_key_id.hex()

    def published(self, now: float) -> bool:
        return now < self.expires_at

    def issuable(self, now: float) -> bool:
        return self.not_before <= now < self.expires_at


class KeyRing:
    """All token keys found in a state folder, newest ``not_before`` first."""

    def __init__(self, keys_dir: Path, keys: list[StoredKey]) -> None:
        self.dir = keys_dir
        self.keys = sorted(keys, key=lambda k: (k.not_before, k.created_at), reverse=True)
        self.mtime_ns = mtime_ns(keys_dir)

    @classmethod
    def load(cls, state_dir: Path) -> KeyRing:
        keys_dir = state_dir / "keys"
        keys: list[StoredKey] = []
        if keys_dir.is_dir():
            for meta_path in sorted(keys_dir.glob("*.json")):
                try:
                    meta = json.loads(meta_path.read_text())
                    pem = meta_path.with_suffix(".pem").read_bytes()
                    ik = IssuerKey(PrivateKey.from_pem(pem))
                except (OSError, ValueError, OpenPCCError) as exc:
                    raise KeyStoreError(f"unreadable token key {meta_path.stem}: {exc}") from exc
                if ik.token_key_id.hex() != meta_path.stem:
                    raise KeyStoreError(f"token key file {meta_path.name} does not match its key")
                keys.append(
                    StoredKey(
                        ik,
                        int(meta["not_before"]),
                        int(meta["expires_at"]),
                        int(meta["created_at"]),
                    )
                )
        return cls(keys_dir, keys)

    def changed_on_disk(self) -> bool:
        """Cheap check so a running service picks up ``keys rotate`` without a restart."""
        return mtime_ns(self.dir) != self.mtime_ns

    def published(self, now: float) -> list[StoredKey]:
        return [k for k in self.keys if k.published(now)]

    def issuable_by_truncated_id(self, truncated: int, now: float) -> StoredKey | None:
        for k in self.keys:
            if k.key.truncated_key_id == truncated and k.issuable(now):
                return k
        return None

    def generate(
        self, *, now: float, not_before: float, lifetime: int = DEFAULT_LIFETIME
    ) -> StoredKey:
        """Create a key whose truncated id differs from every published key's."""
        taken = {k.key.truncated_key_id for k in self.published(now)}
        while True:
            ik = IssuerKey.generate()
            if ik.truncated_key_id not in taken:
                break
        stored = StoredKey(ik, int(not_before), int(not_before) + lifetime, int(now))
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = self.dir / stored.key_id_hex
        write_private(stem.with_suffix(".pem"), ik.private_key.to_pkcs8_pem())
        meta = {
            "not_before": stored.not_before,
            "expires_at": stored.expires_at,
            "created_at": stored.created_at,
        }
        # Metadata last: a key without metadata is invisible, never half-loaded.
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, stem.with_suffix(".json"))
        self.keys = sorted(
            [*self.keys, stored], key=lambda k: (k.not_before, k.created_at), reverse=True
        )
        return stored

    def prune(self, now: float) -> list[str]:
        """Delete expired keys' files; they can no longer issue or redeem."""
        removed = []
        for k in [k for k in self.keys if not k.published(now)]:
            for suffix in (".json", ".pem"):
                (self.dir / k.key_id_hex).with_suffix(suffix).unlink(missing_ok=True)
            removed.append(k.key_id_hex)
        self.keys = [k for k in self.keys if k.published(now)]
        return removed


def ensure_key(state_dir: Path, now: float | None = None) -> KeyRing:
    """Load the ring, creating a first key (in force at once) when none is issuable."""
    t = time.time() if now is None else now
    ring = KeyRing.load(state_dir)
    if not any(k.issuable(t) for k in ring.keys):
        ring.generate(now=t, not_before=t)
    return ring

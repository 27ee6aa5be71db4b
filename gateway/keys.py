"""The gateway's OHTTP key configs on disk: generation, rotation, reload; one key ring per KEM.

Layout: ``STATE/ohttp-keys/<key_id>.json`` (mode 0600), one key pair per file:
``{"key_id", "kem_id", "private_key" (hex), "created_at", "expires_at" (null while
current)}``. ``kem_id`` is 0x0020 (X25519: the private key is the 32-byte scalar) or
0x647A (X-Wing: the private key is its 32-byte seed, from which the ML-KEM-768 and X25519
keys are expanded); a file without it is X25519 (files written before X-Wing existed).
Key ids are 0-255 (RFC 9458 §3.1) and shared by all KEMs: each config has its own id,
so a request's key id names one key of one KEM.

By default the gateway keeps one current key per KEM (X25519 and X-Wing) and publishes
both configs. Rotation adds a key under a fresh id for each KEM rotated and gives that
KEM's keys it replaces an expiry ``grace`` seconds out, so clients and relays that cached
the old config (``Cache-Control: max-age``) keep working until it is really gone. Several
gateway replicas can share the folder (e.g. a Kubernetes secret); a running gateway
reloads it when the folder's mtime changes, exactly as the issuer does for token keys.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from gateway.config import OHTTP_KEMS
from openpcc.errors import KeyStoreError, OpenPCCError
from openpcc.files import mtime_ns, write_private
from openpcc.wire import hpke
from openpcc.wire.ohttp import KeyConfig, SymmetricSuite

log = logging.getLogger("openpcc.gateway")

KEYS_DIRNAME = "ohttp-keys"
DEFAULT_GRACE = 24 * 3600
# Both AEADs PROTOCOL.md says the gateway publishes: (HKDF-SHA256, AES-128-GCM), (…, ChaCha20).
SUITES = (
    SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),
    SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_CHACHA20_POLY1305),
)
X25519: Final = hpke.KEM_DHKEM_X25519_HKDF_SHA256
XWING: Final = hpke.KEM_XWING
# The names `--kem` and `--ohttp-kem` take (gateway/config.py OHTTP_KEMS), and the KEMs a
# gateway keeps by default.
KEM_BY_NAME: Final = dict(zip(OHTTP_KEMS, (X25519, XWING), strict=True))
DEFAULT_KEMS: Final = (X25519, XWING)


def kem_ids(names: Iterable[str]) -> tuple[int, ...]:
    """KEM ids for ``--kem``/``--ohttp-kem`` names (case-insensitive); ValueError if unknown."""
    out: list[int] = []
    for name in names:
        try:
            kem = KEM_BY_NAME[name.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown OHTTP KEM {name!r} (use {', '.join(KEM_BY_NAME)})") from None
        if kem not in out:
            out.append(kem)
    return tuple(out)


def _rank(kem_id: int) -> int:
    # Among keys of one generation, X-Wing first: the gateway's preference, for clients
    # that take the first config they support.
    return 1 if kem_id == XWING else 0


@dataclass(frozen=True)
class OhttpKey:
    key_id: int
    private_key: bytes  # X25519: the scalar; X-Wing: the 32-byte seed
    public_key: bytes
    created_at: int
    expires_at: int | None
    kem_id: int = X25519

    def __repr__(self) -> str:  # never print the private key
        return (
            f"OhttpKey(key_id={self.key_id}, kem={hpke.kem_name(self.kem_id)}, "
            f"expires_at={self.expires_at})"
        )

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def config(self) -> KeyConfig:
        return KeyConfig(self.key_id, self.kem_id, self.public_key, SUITES)


def _save(keys_dir: Path, key: OhttpKey) -> None:
    doc = {
        "key_id": key.key_id,
        "kem_id": key.kem_id,
        "private_key": key.private_key.hex(),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
    }
    write_private(keys_dir / f"{key.key_id}.json", json.dumps(doc).encode())


class OhttpKeyRing:
    """All OHTTP keys in a state folder; newest first (clients take the first config).

    ``kems``: the KEMs this gateway serves; keys of others in the folder are neither
    published nor opened with (and are left alone by rotation).
    """

    def __init__(
        self,
        keys_dir: Path,
        keys: list[OhttpKey],
        *,
        kems: Iterable[int] = DEFAULT_KEMS,
        parsed: Mapping[int, hpke.PrivateKey] | None = None,
    ) -> None:
        self.dir = keys_dir
        self.kems = tuple(kems)
        # The current keys (no expiry yet) first, then the others by how long they remain;
        # within one generation X-Wing before X25519.
        self.keys = sorted(
            keys,
            key=lambda k: (
                k.expires_at is None,
                k.expires_at or 0,
                k.created_at,
                _rank(k.kem_id),
            ),
            reverse=True,
        )
        self.mtime_ns = mtime_ns(keys_dir)
        self._invalidate(parsed)

    def _invalidate(self, parsed: Mapping[int, hpke.PrivateKey] | None = None) -> None:
        # Parsed key objects, built once: parsing a raw X25519 key costs a scalar
        # multiplication (the library derives the public key), ~35 us per request; an
        # X-Wing seed an ML-KEM key expansion, ~0.5 ms.
        parsed = parsed or {}
        self._parsed = {
            k.key_id: parsed.get(k.key_id) or hpke.load_private_key(k.private_key, kem_id=k.kem_id)
            for k in self.keys
            if k.kem_id in self.kems
        }
        self._decap: Mapping[int, hpke.PrivateKey] = MappingProxyType({})
        self._decap_from, self._decap_until = math.inf, -math.inf

    @classmethod
    def load(cls, state_dir: Path, *, kems: Iterable[int] = DEFAULT_KEMS) -> OhttpKeyRing:
        keys_dir = state_dir / KEYS_DIRNAME
        keys: list[OhttpKey] = []
        parsed: dict[int, hpke.PrivateKey] = {}
        if keys_dir.is_dir():
            for path in sorted(keys_dir.glob("*.json")):
                try:
                    doc = json.loads(path.read_text())
                    sk = bytes.fromhex(doc["private_key"])
                    key_id = int(doc["key_id"])
                    kem_id = int(doc.get("kem_id", X25519))
                    if kem_id not in KEM_BY_NAME.values():
                        raise KeyStoreError(f"unsupported KEM 0x{kem_id:04x}")
                    key_obj = hpke.load_private_key(sk, kem_id=kem_id)
                    expires = doc.get("expires_at")
                    key = OhttpKey(
                        key_id,
                        sk,
                        hpke.public_key_from_private(key_obj, kem_id=kem_id),
                        int(doc["created_at"]),
                        None if expires is None else int(expires),
                        kem_id,
                    )
                except (OSError, ValueError, KeyError, TypeError, OpenPCCError) as exc:
                    raise KeyStoreError(f"unreadable OHTTP key {path.name}: {exc}") from exc
                if path.stem != str(key_id) or not 0 <= key_id <= 255:
                    raise KeyStoreError(f"OHTTP key file {path.name} does not match its key id")
                keys.append(key)
                parsed[key_id] = key_obj
        return cls(keys_dir, keys, kems=kems, parsed=parsed)

    def changed_on_disk(self) -> bool:
        """Cheap check so a running gateway picks up ``keys rotate`` without a restart."""
        return mtime_ns(self.dir) != self.mtime_ns

    def live(self, now: float) -> list[OhttpKey]:
        """Every key in the folder not yet expired, whatever its KEM."""
        return [k for k in self.keys if k.live(now)]

    def published(self, now: float) -> list[OhttpKey]:
        """The live keys of the KEMs this gateway serves, in publishing order."""
        return [k for k in self.keys if k.live(now) and k.kem_id in self.kems]

    def private_keys(self, now: float) -> Mapping[int, hpke.PrivateKey]:
        """key_id -> parsed private key, for decapsulation: only keys still published.

        The same read-only mapping is handed out until the next expiry passes.
        """
        if not self._decap_from <= now < self._decap_until:
            live = self.published(now)
            self._decap = MappingProxyType({k.key_id: self._parsed[k.key_id] for k in live})
            # Valid from now until the first live key expires (a key never comes back).
            self._decap_from = now
            self._decap_until = min(
                (k.expires_at for k in live if k.expires_at is not None), default=math.inf
            )
        return self._decap

    def configs(self, now: float) -> list[KeyConfig]:
        return [k.config for k in self.published(now)]

    def rotate(
        self, *, now: float, grace: int = DEFAULT_GRACE, kems: Iterable[int] | None = None
    ) -> tuple[list[OhttpKey], list[int]]:
        """For each KEM in ``kems`` (default: the ones this ring serves), add a key under a
        fresh id and give that KEM's current keys an expiry ``grace`` s later; prune dead
        keys (of any KEM).

        Returns (new keys, pruned key ids).
        """
        kems = self.kems if kems is None else tuple(kems)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pruned = []
        for k in self.keys:
            if not k.live(now):
                (self.dir / f"{k.key_id}.json").unlink(missing_ok=True)
                pruned.append(k.key_id)
        live = self.live(now)
        taken = {k.key_id for k in live}
        if len(taken) + len(kems) > 256:
            raise KeyStoreError("all 256 OHTTP key ids are in use; wait for old keys to expire")
        # Next id after the newest one, so ids cycle instead of reusing a just-retired one.
        # X-Wing is allocated last, and sorts first among keys made together.
        key_id = (live[0].key_id + 1) % 256 if live else 0
        new: list[OhttpKey] = []
        for kem in sorted(kems, key=_rank):
            key_id = next(i % 256 for i in range(key_id, key_id + 256) if i % 256 not in taken)
            taken.add(key_id)
            pair = hpke.generate_key_pair(kem_id=kem)
            new.append(OhttpKey(key_id, pair.private_key, pair.public_key, int(now), None, kem))
        for key in new:
            _save(self.dir, key)
        for k in live:
            if k.kem_id in kems and (k.expires_at is None or k.expires_at > now + grace):
                _save(
                    self.dir,
                    OhttpKey(
                        k.key_id,
                        k.private_key,
                        k.public_key,
                        k.created_at,
                        int(now + grace),
                        k.kem_id,
                    ),
                )
        fresh = OhttpKeyRing.load(self.dir.parent, kems=self.kems)
        self.keys, self.mtime_ns = fresh.keys, fresh.mtime_ns
        self._invalidate(fresh._parsed)
        return new, pruned


def ensure_keys(
    state_dir: Path, kems: Iterable[int] = DEFAULT_KEMS, now: float | None = None
) -> OhttpKeyRing:
    """Load the ring, creating a key for each of ``kems`` that has none live (a fresh
    install, or a folder from before X-Wing). A folder that cannot be written (a read-only
    Secret) keeps what it has, as long as some key is live: a warning says what is missing.
    """
    kems = tuple(kems)
    ring = OhttpKeyRing.load(state_dir, kems=kems)
    t = time.time() if now is None else now
    missing = [kem for kem in kems if not any(k.kem_id == kem for k in ring.live(t))]
    if missing:
        try:
            ring.rotate(now=t, kems=missing)
        except OSError as exc:
            if not ring.published(t):
                raise KeyStoreError(f"cannot create an OHTTP key in {ring.dir}: {exc}") from exc
            names = ", ".join(hpke.kem_name(k) for k in missing)
            log.warning(
                "no %s OHTTP key in %s and it cannot be written (%s): serving the others; "
                "run `openpcc gateway keys rotate` where the folder is made",
                names,
                ring.dir,
                type(exc).__name__,
            )
    return ring

"""The client's trust policy: a release manifest signed with a pinned Ed25519 release key.

Why a signed manifest: a client cannot judge a launch measurement by itself; it needs
the operator's published statement of which builds (SNP MEASUREMENT, TDX MRTD/RTMRs,
GPU driver/VBIOS versions, model weights) form a release, and that statement must not
be forgeable by whoever serves it (relay, gateway). The same manifest pins the gateway's
OHTTP key configs and the issuer's token keys in force, so every client sees the same
keys and a per-user key (a tagging attack) is detected (key consistency).

Manifest (JSON object, strict: unknown or duplicate keys, floats and wrong types are
rejected with :class:`~openpcc.errors.DecodeError`)::

    {
      "format": "openpcc-release-manifest/1",
      "serial": 7,                                   # monotonic; clients may refuse lower
      "issued_at": 1780000000, "expires_at": 1782592000,   # Unix seconds, UTC
      "releases": {
        "openpcc-2026.11.0": {
          "model_digests": ["<64 hex>", ...],          # SHA-256 of the served weights
          "snp": {"measurements": ["<96 hex>", ...]},  # or null = any (written out)
          "tdx": {"mrtd": [...], "rtmr0": [...], "rtmr1": [...], "rtmr2": [...],
                  "rtmr3": [...]},                    # each a list, or null = unchecked
          "gpu": {"driver_versions": ["550.90.07"], "vbios_versions": ["96.00.9F.00.01"]}
        }
      },
      "snp": {"min_tcb": {"Genoa": {"bl": 10, "snp": 23, "ucode": 84}}, "allow_debug": false,
              "allow_smt": true, "allow_migration_agent": false, "vmpl": 0,
              "min_guest_svn": 0},
      "tdx": {"accepted_tcb_statuses": ["UpToDate"], "min_tcb_eval_data_number": null,
              "allow_debug": false, "require_sept_ve_disable": false,
              "rejected_advisories": []},
      "gpu": {"require": true, "require_ocsp": false},
      "development_roots": [],                       # SHA-256 fingerprints (hex); dev only
      "ohttp_key_configs": ["<hex of one KeyConfig>" | "sha256:<64 hex>", ...],
      "post_quantum": {"require": false},            # optional; see below
      "token_key_ids": ["<64 hex: SHA-256 of the issuer's token public key>", ...]
    }

Only ``format``, ``serial``, ``issued_at``, ``expires_at``, ``releases``,
``ohttp_key_configs`` and ``token_key_ids`` are required; the platform sections default
to the strict values shown. ``post_quantum.require`` (default false): a client then uses
only an X-Wing (KEM 0x647A) gateway key config the manifest pins and refuses the
gateway otherwise (no silent downgrade to X25519), and a node bundle whose claims attest
no X-Wing key (``pq_public_key``) fails verification, for clients and for gateway
admission alike; without it a client still prefers a pinned X-Wing config and nodes
with X-Wing keys. A release without an ``snp``/``tdx``/``gpu`` section
accepts no evidence of that kind. Signed form (``SignedManifest``)::

    {"format": "openpcc-signed-manifest/1", "key_id": "<sha256(raw pubkey) hex>",
     "manifest": "<base64 of the exact manifest bytes>", "signature": "<base64 Ed25519>"}

The signature covers ``SIGNING_LABEL || manifest bytes``. The alternative is a Sigstore
bundle over the exact manifest bytes (``sigstore_manifest.py``, ``policy_from_sigstore``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.attestation.nvidia import GpuPolicy
from openpcc.attestation.snp import SnpPolicy
from openpcc.attestation.tdx import ACCEPTABLE_WITH_POLICY, TdxPolicy
from openpcc.errors import DecodeError, LimitExceededError, VerificationError

MANIFEST_FORMAT = "openpcc-release-manifest/1"
SIGNED_FORMAT = "openpcc-signed-manifest/1"
SIGNING_LABEL = b"OpenPCC release manifest v1\x00"
MAX_MANIFEST_SIZE = 1 << 20
DEFAULT_CLOCK_SKEW = timedelta(minutes=5)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,127}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
_SNP_TCB_NAMES = frozenset({"bl", "tee", "snp", "ucode", "fmc"})
_PRODUCTS = frozenset({"Milan", "Genoa", "Turin"})
_KEM_XWING = b"\x64\x7a"  # a KeyConfig's kem_id (bytes 1-2) for X-Wing, MLKEM768-X25519


# --- strict JSON helpers ---------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_float(s: str) -> Any:
    raise ValueError(f"non-integer number {s!r}")


def strict_json(data: bytes | str, what: str, limit: int = MAX_MANIFEST_SIZE) -> Any:
    """Parse JSON refusing duplicate keys, floats, NaN and oversize input."""
    if len(data) > limit:
        raise LimitExceededError(f"{what} larger than {limit} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_reject_float,
            parse_constant=_reject_float,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DecodeError(f"{what} is not valid JSON: {e}") from e


def _obj(value: Any, what: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
    if not isinstance(value, dict):
        raise DecodeError(f"{what} must be a JSON object")
    req, opt = set(required), set(optional)
    missing, unknown = req - set(value), set(value) - req - opt
    if missing or unknown:
        raise DecodeError(f"{what}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return value


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**53 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise DecodeError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise DecodeError(f"{what} must be true or false")
    return value


def _hex(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        raise DecodeError(f"{what} must be a hex string")
    raw = bytes.fromhex(value)
    if size is not None and len(raw) != size:
        raise DecodeError(f"{what} must be {size} bytes")
    return raw


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{what} must be a list")
    return value


def _hex_set(value: Any, what: str, size: int) -> frozenset[bytes]:
    return frozenset(_hex(v, f"{what}[{i}]", size) for i, v in enumerate(_list(value, what)))


def _str_set(value: Any, what: str) -> frozenset[str]:
    items = _list(value, what)
    if not all(isinstance(v, str) and v for v in items):
        raise DecodeError(f"{what} must be a list of non-empty strings")
    return frozenset(items)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: Any, what: str) -> bytes:
    """Strict standard base64 (padding required, no whitespace, canonical trailing bits)."""
    if not isinstance(value, str):
        raise DecodeError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"{what} is not base64: {e}") from e
    if b64(raw) != value:
        raise DecodeError(f"{what} is not canonical base64")
    return raw


# --- the manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class TdxMeasurements:
    """Allow-lists per register; ``None`` = explicitly not checked."""

    mrtd: frozenset[bytes] | None
    rtmr0: frozenset[bytes] | None
    rtmr1: frozenset[bytes] | None
    rtmr2: frozenset[bytes] | None
    rtmr3: frozenset[bytes] | None


@dataclass(frozen=True)
class Release:
    """What one published release consists of."""

    release_id: str
    model_digests: frozenset[bytes]
    snp_measurements: frozenset[bytes] | None = frozenset()  # None = any
    has_snp: bool = False
    tdx: TdxMeasurements | None = None
    has_gpu: bool = False
    gpu_driver_versions: frozenset[str] | None = frozenset()
    gpu_vbios_versions: frozenset[str] | None = frozenset()


@dataclass(frozen=True)
class Manifest:
    """A parsed (not yet trusted) release manifest; see the module docstring."""

    serial: int
    issued_at: int
    expires_at: int
    releases: Mapping[str, Release]
    snp_min_tcb: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    snp_allow_debug: bool = False
    snp_allow_smt: bool = True
    snp_allow_migration_agent: bool = False
    snp_vmpl: int | None = 0
    snp_min_guest_svn: int = 0
    tdx_accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    tdx_min_tcb_eval_data_number: int | None = None
    tdx_allow_debug: bool = False
    tdx_require_sept_ve_disable: bool = False
    tdx_rejected_advisories: frozenset[str] = frozenset()
    require_gpu: bool = True
    gpu_require_ocsp: bool = False
    development_roots: frozenset[str] = frozenset()
    ohttp_key_configs: frozenset[bytes] = frozenset()
    ohttp_key_config_digests: frozenset[bytes] = frozenset()
    token_key_ids: frozenset[bytes] = frozenset()
    require_post_quantum: bool = False

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Strictly parse manifest bytes; anything unexpected raises DecodeError."""
        doc = _obj(
            strict_json(data, "release manifest"),
            "manifest",
            (
                "format",
                "serial",
                "issued_at",
                "expires_at",
                "releases",
                "ohttp_key_configs",
                "token_key_ids",
            ),
            ("snp", "tdx", "gpu", "development_roots", "post_quantum", "comment"),
        )
        if doc["format"] != MANIFEST_FORMAT:
            raise DecodeError(f"manifest format must be {MANIFEST_FORMAT!r}")
        if "comment" in doc and not isinstance(doc["comment"], str):
            raise DecodeError("comment must be a string")
        kw: dict[str, Any] = {
            "serial": _int(doc["serial"], "serial"),
            "issued_at": _int(doc["issued_at"], "issued_at"),
            "expires_at": _int(doc["expires_at"], "expires_at"),
        }
        if kw["expires_at"] <= kw["issued_at"]:
            raise DecodeError("expires_at must be after issued_at")
        releases = doc["releases"]
        if not isinstance(releases, dict):
            raise DecodeError("releases must be an object")
        kw["releases"] = {rid: _parse_release(rid, r) for rid, r in releases.items()}

        snp = _obj(
            doc.get("snp", {}),
            "snp",
            (),
            (
                "min_tcb",
                "allow_debug",
                "allow_smt",
                "allow_migration_agent",
                "vmpl",
                "min_guest_svn",
            ),
        )
        min_tcb: dict[str, dict[str, int]] = {}
        for product, comps in _obj(snp.get("min_tcb", {}), "snp.min_tcb", (), _PRODUCTS).items():
            comps = _obj(comps, f"snp.min_tcb.{product}", (), _SNP_TCB_NAMES)
            min_tcb[product] = {
                k: _int(v, f"snp.min_tcb.{product}.{k}", 0, 255) for k, v in comps.items()
            }
        kw["snp_min_tcb"] = min_tcb
        for key in ("allow_debug", "allow_smt", "allow_migration_agent"):
            if key in snp:
                kw[f"snp_{key}"] = _bool(snp[key], f"snp.{key}")
        if "vmpl" in snp:
            kw["snp_vmpl"] = None if snp["vmpl"] is None else _int(snp["vmpl"], "snp.vmpl", 0, 3)
        if "min_guest_svn" in snp:
            kw["snp_min_guest_svn"] = _int(snp["min_guest_svn"], "snp.min_guest_svn", 0, 2**32 - 1)

        tdx = _obj(
            doc.get("tdx", {}),
            "tdx",
            (),
            (
                "accepted_tcb_statuses",
                "min_tcb_eval_data_number",
                "allow_debug",
                "require_sept_ve_disable",
                "rejected_advisories",
            ),
        )
        if "accepted_tcb_statuses" in tdx:
            statuses = _str_set(tdx["accepted_tcb_statuses"], "tdx.accepted_tcb_statuses")
            bad = statuses - ACCEPTABLE_WITH_POLICY - {"UpToDate"}
            if bad:
                raise DecodeError(f"TDX TCB statuses that can never be accepted: {sorted(bad)}")
            kw["tdx_accepted_tcb_statuses"] = statuses
        if tdx.get("min_tcb_eval_data_number") is not None:
            kw["tdx_min_tcb_eval_data_number"] = _int(
                tdx["min_tcb_eval_data_number"], "tdx.min_tcb_eval_data_number"
            )
        for key in ("allow_debug", "require_sept_ve_disable"):
            if key in tdx:
                kw[f"tdx_{key}"] = _bool(tdx[key], f"tdx.{key}")
        if "rejected_advisories" in tdx:
            kw["tdx_rejected_advisories"] = _str_set(
                tdx["rejected_advisories"], "tdx.rejected_advisories"
            )

        gpu = _obj(doc.get("gpu", {}), "gpu", (), ("require", "require_ocsp"))
        if "require" in gpu:
            kw["require_gpu"] = _bool(gpu["require"], "gpu.require")
        if "require_ocsp" in gpu:
            kw["gpu_require_ocsp"] = _bool(gpu["require_ocsp"], "gpu.require_ocsp")

        kw["development_roots"] = frozenset(
            _hex(fp, f"development_roots[{i}]", 32).hex()
            for i, fp in enumerate(_list(doc.get("development_roots", []), "development_roots"))
        )
        configs, digests = set(), set()
        for i, entry in enumerate(_list(doc["ohttp_key_configs"], "ohttp_key_configs")):
            what = f"ohttp_key_configs[{i}]"
            if isinstance(entry, str) and entry.startswith("sha256:"):
                digests.add(_hex(entry[7:], what, 32))
            else:
                configs.add(_hex(entry, what))
        kw["ohttp_key_configs"] = frozenset(configs)
        kw["ohttp_key_config_digests"] = frozenset(digests)
        pq = _obj(doc.get("post_quantum", {}), "post_quantum", (), ("require",))
        if "require" in pq:
            kw["require_post_quantum"] = _bool(pq["require"], "post_quantum.require")
        kw["token_key_ids"] = _hex_set(doc["token_key_ids"], "token_key_ids", 32)
        return cls(**kw)


def _parse_release(rid: str, value: Any) -> Release:
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise DecodeError(f"release id {rid!r} must match {_ID_RE.pattern}")
    what = f"releases[{rid}]"
    r = _obj(value, what, ("model_digests",), ("snp", "tdx", "gpu", "comment"))
    kw: dict[str, Any] = {
        "release_id": rid,
        "model_digests": _hex_set(r["model_digests"], f"{what}.model_digests", 32),
    }
    if "snp" in r:
        snp = _obj(r["snp"], f"{what}.snp", ("measurements",))
        kw["has_snp"] = True
        m = snp["measurements"]
        kw["snp_measurements"] = None if m is None else _hex_set(m, f"{what}.snp.measurements", 48)
    if "tdx" in r:
        names = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
        tdx = _obj(r["tdx"], f"{what}.tdx", names)
        kw["tdx"] = TdxMeasurements(
            **{
                n: None if tdx[n] is None else _hex_set(tdx[n], f"{what}.tdx.{n}", 48)
                for n in names
            }
        )
    if "gpu" in r:
        gpu = _obj(r["gpu"], f"{what}.gpu", ("driver_versions", "vbios_versions"))
        kw["has_gpu"] = True
        for key in ("driver_versions", "vbios_versions"):
            v = gpu[key]
            kw[f"gpu_{key}"] = None if v is None else _str_set(v, f"{what}.gpu.{key}")
    return Release(**kw)


# --- signing -----------------------------------------------------------------------------


def release_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex: how a signed manifest names its key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_release_public_key(data: bytes | ed25519.Ed25519PublicKey) -> ed25519.Ed25519PublicKey:
    """A release public key from PEM, DER (SubjectPublicKeyInfo) or 32 raw bytes."""
    if isinstance(data, ed25519.Ed25519PublicKey):
        return data
    try:
        if len(data) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        key = (
            serialization.load_pem_public_key(data)
            if data.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(data)
        )
    except ValueError as e:
        raise DecodeError(f"unreadable release public key: {e}") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise DecodeError("release key is not an Ed25519 key")
    return key


def load_release_private_key(data: bytes) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as e:
        raise DecodeError(f"unreadable release private key: {e}") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DecodeError("release key is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class SignedManifest:
    """Manifest bytes + Ed25519 signature + the signing key's id."""

    manifest: bytes
    signature: bytes
    key_id: str

    @classmethod
    def sign(cls, manifest: bytes, key: ed25519.Ed25519PrivateKey) -> SignedManifest:
        """Sign after checking the manifest parses, so no malformed manifest is ever signed."""
        Manifest.parse(manifest)
        sig = key.sign(SIGNING_LABEL + manifest)
        return cls(manifest, sig, release_key_id(key.public_key()))

    def encode(self) -> bytes:
        obj = {
            "format": SIGNED_FORMAT,
            "key_id": self.key_id,
            "manifest": b64(self.manifest),
            "signature": b64(self.signature),
        }
        return json.dumps(obj, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> SignedManifest:
        doc = _obj(
            strict_json(data, "signed manifest", 2 * MAX_MANIFEST_SIZE),
            "signed manifest",
            ("format", "key_id", "manifest", "signature"),
        )
        if doc["format"] != SIGNED_FORMAT:
            raise DecodeError(f"signed manifest format must be {SIGNED_FORMAT!r}")
        key_id = _hex(doc["key_id"], "key_id", 32).hex()
        sig = unb64(doc["signature"], "signature")
        if len(sig) != 64:
            raise DecodeError("an Ed25519 signature is 64 bytes")
        return cls(unb64(doc["manifest"], "manifest"), sig, key_id)

    def verify(
        self, pinned_release_keys: Iterable[bytes | ed25519.Ed25519PublicKey]
    ) -> ed25519.Ed25519PublicKey:
        """Check the signature under the pinned key the ``key_id`` names."""
        keys = {release_key_id(k): k for k in map(load_release_public_key, pinned_release_keys)}
        key = keys.get(self.key_id)
        if key is None:
            raise VerificationError(f"manifest signed by key {self.key_id[:16]}…, not pinned")
        try:
            key.verify(self.signature, SIGNING_LABEL + self.manifest)
        except InvalidSignature as e:
            raise VerificationError("release manifest signature does not verify") from e
        return key


# --- the policy a client applies ------------------------------------------------------------


def check_manifest_validity(
    manifest: Manifest,
    now: datetime,
    *,
    min_serial: int = 0,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> None:
    """The checks every signature scheme shares: ``issued_at - skew <= now < expires_at``
    and no serial below ``min_serial`` (rollback); VerificationError otherwise."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    issued = datetime.fromtimestamp(manifest.issued_at, UTC)
    expires = datetime.fromtimestamp(manifest.expires_at, UTC)
    if now + clock_skew < issued:
        raise VerificationError(f"release manifest issued in the future ({issued.isoformat()})")
    if now >= expires:
        raise VerificationError(f"release manifest expired at {expires.isoformat()}")
    if manifest.serial < min_serial:
        raise VerificationError(f"manifest serial {manifest.serial} < {min_serial} (rollback)")


@dataclass(frozen=True)
class TrustPolicy:
    """A verified, currently valid manifest, turned into per-platform policies."""

    manifest: Manifest
    key_id: str

    @classmethod
    def from_signed(
        cls,
        data: bytes | SignedManifest,
        pinned_release_keys: Iterable[bytes | ed25519.Ed25519PublicKey],
        now: datetime,
        *,
        min_serial: int = 0,
        clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
    ) -> TrustPolicy:
        """Verify signature, validity window at ``now`` and serial; DecodeError for
        malformed input, VerificationError for a bad signature, unpinned key, a manifest
        outside its window or older than ``min_serial`` (rollback)."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        signed = data if isinstance(data, SignedManifest) else SignedManifest.decode(data)
        signed.verify(pinned_release_keys)
        manifest = Manifest.parse(signed.manifest)
        check_manifest_validity(manifest, now, min_serial=min_serial, clock_skew=clock_skew)
        return cls(manifest, signed.key_id)

    @classmethod
    def unsigned_for_tests(cls, manifest: bytes | Manifest) -> TrustPolicy:
        """A policy without signature or time checks: for tests and local tooling only."""
        m = manifest if isinstance(manifest, Manifest) else Manifest.parse(manifest)
        return cls(m, "unsigned")

    def check_current(self, now: datetime, clock_skew: timedelta = DEFAULT_CLOCK_SKEW) -> None:
        """VerificationError unless the manifest is inside its validity window at ``now``.

        Why again after loading: a long-running client (a proxy, an app backend) must stop
        trusting a manifest the moment it expires, not at its next restart. A policy made
        by ``unsigned_for_tests`` has no time checks."""
        if self.key_id != "unsigned":
            check_manifest_validity(self.manifest, now, clock_skew=clock_skew)

    @property
    def valid_until(self) -> float:
        """Unix time the manifest stops being trusted (never, for ``unsigned_for_tests``):
        nothing verified under it may be trusted longer."""
        return math.inf if self.key_id == "unsigned" else float(self.manifest.expires_at)

    @property
    def development(self) -> bool:
        """True when the manifest trusts development roots (simulated TEEs)."""
        return bool(self.manifest.development_roots)

    def release(self, release_id: str) -> Release | None:
        return self.manifest.releases.get(release_id)

    def accepts_model(self, release_id: str, digest: bytes) -> bool:
        rel = self.release(release_id)
        return rel is not None and any(hmac.compare_digest(digest, d) for d in rel.model_digests)

    def snp_min_tcb(self, product: str | None) -> tuple[Mapping[str, int] | None, str | None]:
        """(minimum, problem): a manifest naming minimums but not this product rejects it."""
        table = self.manifest.snp_min_tcb
        if not table:
            return None, None
        if product not in table:
            return None, f"no minimum TCB for product {product} in the manifest"
        return table[product], None

    def snp_policy(self, release_id: str, product: str | None = None) -> SnpPolicy:
        """SNP policy for a release; a release without ``snp`` accepts no measurement."""
        m = self.manifest
        rel = self.release(release_id)
        measurements = rel.snp_measurements if rel is not None and rel.has_snp else frozenset()
        return SnpPolicy(
            measurements=measurements,
            allow_debug=m.snp_allow_debug,
            allow_smt=m.snp_allow_smt,
            allow_migration_agent=m.snp_allow_migration_agent,
            vmpl=m.snp_vmpl,
            min_tcb=self.snp_min_tcb(product)[0],
            min_guest_svn=m.snp_min_guest_svn,
            trusted_roots=m.development_roots,
        )

    def tdx_policy(self, release_id: str) -> TdxPolicy:
        """TDX policy for a release; a release without ``tdx`` accepts no MRTD."""
        m = self.manifest
        rel = self.release(release_id)
        meas = rel.tdx if rel is not None else None
        if meas is None:
            meas = TdxMeasurements(frozenset(), None, None, None, None)
        return TdxPolicy(
            mrtd=meas.mrtd,
            rtmr0=meas.rtmr0,
            rtmr1=meas.rtmr1,
            rtmr2=meas.rtmr2,
            rtmr3=meas.rtmr3,
            accepted_tcb_statuses=m.tdx_accepted_tcb_statuses,
            rejected_advisories=m.tdx_rejected_advisories,
            min_tcb_eval_data_number=m.tdx_min_tcb_eval_data_number,
            allow_debug=m.tdx_allow_debug,
            require_sept_ve_disable=m.tdx_require_sept_ve_disable,
        )

    def gpu_policy(self, release_id: str) -> GpuPolicy:
        """GPU policy for a release; a release without ``gpu`` accepts no driver/VBIOS."""
        rel = self.release(release_id)
        if rel is None or not rel.has_gpu:
            drivers: frozenset[str] | None = frozenset()
            vbios: frozenset[str] | None = frozenset()
        else:
            drivers, vbios = rel.gpu_driver_versions, rel.gpu_vbios_versions
        return GpuPolicy(
            allowed_driver_versions=drivers,
            allowed_vbios_versions=vbios,
            require_ocsp=self.manifest.gpu_require_ocsp,
        )

    def accepts_ohttp_key(self, config: bytes) -> bool:
        """Whether one gateway key config (bare, as in ``application/ohttp-keys`` without
        its length prefix) is pinned, by value or by SHA-256."""
        config = bytes(config)
        if config in self.manifest.ohttp_key_configs:
            return True
        return hashlib.sha256(config).digest() in self.manifest.ohttp_key_config_digests

    def accepts_ohttp_keys_body(self, body: bytes) -> bool:
        """Every entry of an ``application/ohttp-keys`` body must be pinned: one unpinned
        config may be the per-user key a gateway hands out to tag a client."""
        body, pos, seen = bytes(body), 0, 0
        while pos < len(body):
            if len(body) - pos < 2:
                return False
            n = int.from_bytes(body[pos : pos + 2], "big")
            chunk = body[pos + 2 : pos + 2 + n]
            if len(chunk) != n or not self.accepts_ohttp_key(chunk):
                return False
            pos, seen = pos + 2 + n, seen + 1
        return seen > 0

    @property
    def post_quantum_required(self) -> bool:
        """``post_quantum.require``: only a pinned X-Wing gateway key config and nodes that
        attest an X-Wing key will do."""
        return self.manifest.require_post_quantum

    def pins_post_quantum_key(self) -> bool | None:
        """Whether the manifest pins an X-Wing (KEM 0x647A) key config: True or False from
        the configs pinned by value, None when only a ``sha256:`` pin could be one."""
        if any(c[1:3] == _KEM_XWING for c in self.manifest.ohttp_key_configs):
            return True
        return None if self.manifest.ohttp_key_config_digests else False

    def accepts_token_key(self, key_id: bytes) -> bool:
        """Whether an issuer token key id (SHA-256 of the public key) is in force."""
        return bytes(key_id) in self.manifest.token_key_ids

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "key_id": self.key_id,
            "serial": m.serial,
            "issued_at": datetime.fromtimestamp(m.issued_at, UTC).isoformat(),
            "expires_at": datetime.fromtimestamp(m.expires_at, UTC).isoformat(),
            "releases": sorted(m.releases),
            "development": self.development,
            "development_roots": sorted(m.development_roots),
            "require_gpu": m.require_gpu,
            "ohttp_key_pins": len(m.ohttp_key_configs) + len(m.ohttp_key_config_digests),
            "post_quantum_required": m.require_post_quantum,
            "token_key_ids": sorted(k.hex() for k in m.token_key_ids),
        }

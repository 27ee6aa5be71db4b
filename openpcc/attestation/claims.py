"""The node's claims document and its binding into TEE evidence (DESIGN.md section 4).

A node commits to its HPKE public key, TEE type, GPU evidence, model weights and
release by hashing the canonical claims into the 64-byte REPORT_DATA (SNP) /
REPORTDATA (TDX) of its hardware report. The GPU evidence is itself inside the
claims, so the GPU's SPDM nonce cannot depend on it: :func:`gpu_nonce_for` hashes
every claim *except* ``gpu_evidence_digest``. Encoding (exact, see
docs/ATTESTATION.md):

* canonical JSON: one object with exactly the 9 keys below, plus ``pq_public_key``
  when the node has an X-Wing key, sorted by key, no whitespace (separators ``,`` and
  ``:``), ASCII only, UTF-8 bytes;
* byte strings as lower-case hex; times as integer Unix seconds (UTC);
  ``gpu_evidence_digest`` is ``null`` when the node has no GPU; ``pq_public_key`` is
  absent (never ``null``) for an X25519-only node, so such claims keep their bytes;
* ``node_id`` and ``release_id`` match ``[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,127}``, so no
  JSON escaping ever occurs.

Parsing is strict: the input bytes must be exactly the canonical encoding of the
value they decode to (so duplicate keys, whitespace, floats, upper-case hex, unknown or
missing keys all raise :class:`~openpcc.errors.DecodeError`).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from openpcc.attestation.verdict import Check
from openpcc.errors import DecodeError, EncodeError, LimitExceededError

CLAIMS_LABEL = b"OpenPCC attestation v1 claims\x00"
GPU_NONCE_LABEL = b"OpenPCC attestation v1 gpu nonce\x00"
GPU_EVIDENCE_LABEL = b"OpenPCC attestation v1 gpu evidence\x00"
TEE_TYPES = frozenset({"sev-snp", "tdx", "simulated-snp"})
MAX_CLAIMS_SIZE = 4096
DEFAULT_MAX_LIFETIME = timedelta(hours=24)
DEFAULT_CLOCK_SKEW = timedelta(minutes=5)
_MAX_TIME = 2**53 - 1  # exact in every JSON implementation

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@/-]{0,127}")
_FIELDS = (
    "expires_at",
    "gpu_evidence_digest",
    "hpke_public_key",
    "issued_at",
    "model_digest",
    "node_id",
    "release_id",
    "signing_key",
    "tee",
)
_OPTIONAL = "pq_public_key"  # absent when None (X25519-only nodes, claims before X-Wing)
_HEX_LEN = {
    "hpke_public_key": 32,
    "model_digest": 32,
    "gpu_evidence_digest": 32,
    "signing_key": 32,
    _OPTIONAL: 1216,  # X-Wing (KEM 0x647A) public key
}


@dataclass(frozen=True)
class Claims:
    """What a node commits to in its TEE report.

    ``hpke_public_key``: the node's DHKEM-X25519 public key (32 bytes).
    ``gpu_evidence_digest``: :func:`gpu_evidence_digest_for` over the GPU reports, or None.
    ``model_digest``: SHA-256 of the served weights (the release manifest's digest).
    ``issued_at`` / ``expires_at``: Unix seconds, UTC.
    ``signing_key``: the node's per-boot Ed25519 public key (32 bytes). It signs the node's
    registrations with a gateway, so only the attested node can list itself under its id.
    ``pq_public_key``: the node's X-Wing public key (1216 bytes) for sealed requests v2,
    or None for a node with only its X25519 key.
    """

    node_id: str
    hpke_public_key: bytes
    tee: str
    gpu_evidence_digest: bytes | None
    model_digest: bytes
    release_id: str
    issued_at: int
    expires_at: int
    signing_key: bytes
    pq_public_key: bytes | None = None

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise EncodeError(problem)

    def to_json_obj(self, *, include_gpu_digest: bool = True) -> dict[str, Any]:
        obj: dict[str, Any] = {
            k: (v.hex() if isinstance(v, bytes) else v) for k, v in asdict(self).items()
        }
        if not include_gpu_digest:
            del obj["gpu_evidence_digest"]
        if obj[_OPTIONAL] is None:
            del obj[_OPTIONAL]
        return obj

    def encode(self) -> bytes:
        """The canonical bytes that :func:`report_data_for` hashes."""
        return _canonical(self.to_json_obj())

    @classmethod
    def decode(cls, data: bytes) -> Claims:
        """Strict inverse of :meth:`encode`; anything else raises DecodeError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError("claims must be bytes")
        data = bytes(data)
        if len(data) > MAX_CLAIMS_SIZE:
            raise LimitExceededError(f"claims larger than {MAX_CLAIMS_SIZE} bytes")
        try:
            obj = json.loads(
                data.decode("ascii"),
                object_pairs_hook=_no_duplicates,
                parse_float=_reject_float,
                parse_constant=_reject_float,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DecodeError(f"claims are not canonical JSON: {e}") from e
        if not isinstance(obj, dict):
            raise DecodeError("claims must be a JSON object")
        keys = set(obj)
        if keys - {_OPTIONAL} != set(_FIELDS):
            missing, extra = set(_FIELDS) - keys, keys - set(_FIELDS) - {_OPTIONAL}
            raise DecodeError(
                f"claims keys wrong: missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        values: dict[str, Any] = {}
        for name in (*_FIELDS, _OPTIONAL):
            if name not in obj:
                continue
            value = obj[name]
            if name in _HEX_LEN:
                if value is None and name == "gpu_evidence_digest":
                    values[name] = None
                    continue
                if not isinstance(value, str) or not re.fullmatch(r"(?:[0-9a-f]{2})*", value):
                    raise DecodeError(f"{name} must be lower-case hex")
                values[name] = bytes.fromhex(value)
            elif name in ("issued_at", "expires_at"):
                if type(value) is not int:
                    raise DecodeError(f"{name} must be an integer")
                values[name] = value
            else:
                if not isinstance(value, str):
                    raise DecodeError(f"{name} must be a string")
                values[name] = value
        try:
            claims = cls(**values)
        except EncodeError as e:
            raise DecodeError(str(e)) from e
        if claims.encode() != data:
            raise DecodeError("claims are not in canonical form")
        return claims

    @property
    def issued_at_dt(self) -> datetime:
        return datetime.fromtimestamp(self.issued_at, UTC)

    @property
    def expires_at_dt(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)

    def with_gpu_evidence_digest(self, digest: bytes | None) -> Claims:
        return replace(self, gpu_evidence_digest=digest)


def _problem(c: Claims) -> str | None:
    for name in ("node_id", "release_id"):
        v = getattr(c, name)
        if not isinstance(v, str) or not _ID_RE.fullmatch(v):
            return f"{name} must match {_ID_RE.pattern}"
    if c.tee not in TEE_TYPES:
        return f"tee must be one of {sorted(TEE_TYPES)}"
    for name, n in _HEX_LEN.items():
        v = getattr(c, name)
        if v is None and name in ("gpu_evidence_digest", _OPTIONAL):
            continue
        if not isinstance(v, bytes) or len(v) != n:
            return f"{name} must be {n} bytes"
    for name in ("issued_at", "expires_at"):
        v = getattr(c, name)
        if type(v) is not int or not 0 <= v <= _MAX_TIME:
            return f"{name} must be an integer in [0, 2^53)"
    return None


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_float(s: str) -> Any:
    raise ValueError(f"non-integer number {s!r}")


def report_data_for(claims: Claims) -> bytes:
    """REPORT_DATA / REPORTDATA = SHA-512(CLAIMS_LABEL || canonical claims), 64 bytes."""
    return hashlib.sha512(CLAIMS_LABEL + claims.encode()).digest()


def gpu_nonce_for(claims: Claims) -> bytes:
    """The 32-byte SPDM nonce for the node's GPU evidence.

    SHA-256(GPU_NONCE_LABEL || canonical JSON of the claims with the
    ``gpu_evidence_digest`` key removed); i.e. it covers node_id, hpke_public_key, tee,
    model_digest, release_id, issued_at, expires_at, signing_key and pq_public_key. The value of
    ``gpu_evidence_digest`` (if any) is ignored, which breaks the circularity: the node
    derives the nonce, collects GPU evidence, then fills in the digest.
    """
    return hashlib.sha256(
        GPU_NONCE_LABEL + _canonical(claims.to_json_obj(include_gpu_digest=False))
    ).digest()


def gpu_evidence_digest_for(reports: Sequence[bytes]) -> bytes:
    """SHA-256(GPU_EVIDENCE_LABEL || for each GPU in order: u32be(len) || evidence)."""
    h = hashlib.sha256(GPU_EVIDENCE_LABEL)
    for r in reports:
        h.update(struct.pack(">I", len(r)))
        h.update(r)
    return h.digest()


def check_claims(
    claims: Claims,
    now: datetime,
    *,
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> list[Check]:
    """Validity window at ``now`` (with ``clock_skew`` for issued-at only) and lifetime.

    Long-lived claims would let a captured bundle outlive a key compromise, so the
    lifetime is capped (default 24 h) independently of what the node asked for.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    issued, expires = claims.issued_at_dt, claims.expires_at_dt
    if now + clock_skew < issued:
        window = Check("claims_window", False, f"issued in the future ({issued.isoformat()})")
    elif now >= expires:
        window = Check("claims_window", False, f"expired at {expires.isoformat()}")
    else:
        window = Check("claims_window", True, f"valid until {expires.isoformat()}")
    lifetime = expires - issued
    if lifetime <= timedelta(0):
        life = Check("claims_lifetime", False, "expires_at is not after issued_at")
    elif lifetime > max_lifetime:
        life = Check("claims_lifetime", False, f"lifetime {lifetime} exceeds {max_lifetime}")
    else:
        life = Check("claims_lifetime", True, f"lifetime {lifetime}")
    return [window, life]

"""Release manifests signed with Sigstore: the keyless alternative to the Ed25519 release key.

Why: an operator whose release CI already signs artifacts with Sigstore (a short-lived
Fulcio certificate bound to an OIDC identity, logged in Rekor) should not also have to
guard a long-lived release key. The client then pins *who* signs (certificate SAN + OIDC
issuer) and *which Sigstore instance* it believes (a ``trusted_root.json`` shipped with
the client), instead of a public key.

Everything is offline: the trust root is a file the operator ships and refreshes (we
never contact TUF, Fulcio, Rekor or a TSA), and a bundle must carry its own inclusion
proof, signed checkpoint and signed time (Rekor inclusion promise and/or RFC 3161
timestamp). The ``sigstore`` package is an optional extra (``openpcc[sigstore]``),
imported only when a Sigstore bundle is actually verified.

Time: Sigstore judges the short-lived signing certificate at the *signing* time that the
log (integrated time) or a TSA vouches for, never at our "now". Our injectable ``now``
governs what Sigstore leaves open: the manifest's own validity window and serial (as
for the Ed25519 path), that the verified signing time is not after ``now`` (+ skew), and
that the trust root's certificate authority was in force at the signing time. One check
inside sigstore-python reads the wall clock and cannot be injected: trust-root keys
whose ``validFor.start`` lies after the real current time are ignored.

A few private sigstore-python attributes are read (the verified times, the trust root's
CA list, the log index); the extra pins ``sigstore>=4.5,<5`` for that reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpcc.attestation.certs import load_certificate, readable
from openpcc.attestation.policy import (
    DEFAULT_CLOCK_SKEW,
    Manifest,
    TrustPolicy,
    check_manifest_validity,
)
from openpcc.errors import DecodeError, LimitExceededError, OpenPCCError, VerificationError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

BUNDLE_MEDIA_TYPE_PREFIX = "application/vnd.dev.sigstore.bundle"
MAX_BUNDLE_SIZE = 1 << 20
MAX_TRUST_ROOT_SIZE = 4 << 20
INSTALL_HINT = "pip install 'openpcc[sigstore]'"
# Fulcio certificate extensions (https://github.com/sigstore/fulcio/blob/main/docs/oid-info.md)
OIDC_ISSUER_V1_OID = "1.3.6.1.4.1.57264.1.1"  # raw string value (deprecated, still issued)
OIDC_ISSUER_V2_OID = "1.3.6.1.4.1.57264.1.8"  # DER UTF8String


class SigstoreUnavailableError(OpenPCCError):
    """The optional ``sigstore`` extra is not installed, so a bundle cannot be checked."""


class SigstoreVerificationError(VerificationError):
    """A Sigstore bundle did not verify: signature, chain, SCT, log proof, identity or time."""


def _sigstore() -> Any:
    """Import sigstore lazily: the core (relay, gateway, Ed25519 clients) must not need it."""
    try:
        import sigstore.errors
        import sigstore.models
        import sigstore.verify
    except ImportError as e:
        raise SigstoreUnavailableError(
            f"verifying a Sigstore bundle needs the sigstore package ({INSTALL_HINT}): {e}"
        ) from e
    return sigstore


@dataclass(frozen=True)
class SignerIdentity:
    """Who must have signed: the certificate SAN (email or URI) and its OIDC issuer.

    Both are mandatory: a bundle proves only that *somebody* with an OIDC account signed;
    without pinning both, anyone could sign a manifest the client accepts.
    """

    identity: str
    oidc_issuer: str

    def __post_init__(self) -> None:
        if not self.identity or not self.oidc_issuer:
            raise ValueError("a Sigstore signer needs both an identity and an OIDC issuer")


class OfflineTrustRoot:
    """A Sigstore ``trusted_root.json`` read from a file; never refreshed over the network."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        if len(data) > MAX_TRUST_ROOT_SIZE:
            raise LimitExceededError(f"trust root larger than {MAX_TRUST_ROOT_SIZE} bytes")
        sg = _sigstore()
        try:
            from sigstore_models.trustroot import v1 as trustroot_v1

            self._root = sg.models.TrustedRoot(trustroot_v1.TrustedRoot.from_json(data))
        except (sg.errors.Error, ValueError, TypeError) as e:
            raise DecodeError(f"{source} is not a Sigstore trusted_root.json: {e}") from e
        self.source = source
        self.sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> OfflineTrustRoot:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DecodeError(f"cannot read trust root {path}: {e.strerror or e}") from e
        return cls(data, str(path))

    @classmethod
    def coerce(cls, value: OfflineTrustRoot | str | PathLike[str]) -> OfflineTrustRoot:
        return value if isinstance(value, OfflineTrustRoot) else cls.from_file(value)


@dataclass(frozen=True)
class SigstoreSignature:
    """What a verified bundle established (for logs and ``release verify`` output)."""

    identity: str
    oidc_issuer: str
    signed_at: datetime  # earliest verified signing time (log or TSA), not our "now"
    time_sources: tuple[str, ...]
    log_index: int
    certificate_sha256: str
    artifact_sha256: str
    trust_root_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "oidc_issuer": self.oidc_issuer,
            "signed_at": self.signed_at.isoformat(),
            "time_sources": list(self.time_sources),
            "log_index": self.log_index,
            "certificate_sha256": self.certificate_sha256,
            "artifact_sha256": self.artifact_sha256,
            "trust_root_sha256": self.trust_root_sha256,
        }


@dataclass(frozen=True)
class SigstoreManifest:
    """A manifest verified through Sigstore: the same TrustPolicy the Ed25519 path yields."""

    policy: TrustPolicy
    signature: SigstoreSignature


def _ext_text(cert: Certificate, oid: str, der: bool) -> str | None:
    from cryptography import x509

    try:
        raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    value: bytes = raw.value  # type: ignore[attr-defined]
    if not der:
        return value.decode("utf-8", "replace")
    # DER UTF8String (tag 0x0C) with a short or long length.
    if len(value) < 2 or value[0] != 0x0C:
        return ""
    n, pos = value[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, pos = int.from_bytes(value[2 : 2 + size], "big"), 2 + size
    return value[pos : pos + n].decode("utf-8", "replace")


class _IdentityPolicy:
    """SAN must equal the pinned identity; the OIDC issuer, in whichever of the v1 (.1.1)
    and v2 (.1.8) Fulcio extensions the certificate carries (at least one), must equal
    the pinned issuer. sigstore's own ``Identity`` reads only the deprecated v1 one."""

    def __init__(self, signer: SignerIdentity, error: type[Exception]) -> None:
        self.signer, self.error = signer, error

    def verify(self, cert: Certificate) -> None:
        sg = _sigstore()
        issuers = [
            v
            for v in (
                _ext_text(cert, OIDC_ISSUER_V1_OID, der=False),
                _ext_text(cert, OIDC_ISSUER_V2_OID, der=True),
            )
            if v is not None
        ]
        if not issuers:
            raise self.error("signing certificate names no OIDC issuer")
        if any(v != self.signer.oidc_issuer for v in issuers):
            raise self.error(
                f"signed through OIDC issuer {issuers[0]!r}, not {self.signer.oidc_issuer!r}"
            )
        sg.verify.policy.Identity(identity=self.signer.identity).verify(cert)


def _load_bundle(sg: Any, data: bytes) -> Any:
    if len(data) > MAX_BUNDLE_SIZE:
        raise LimitExceededError(f"Sigstore bundle larger than {MAX_BUNDLE_SIZE} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DecodeError(f"not a Sigstore bundle: {e}") from e
    media = doc.get("mediaType") if isinstance(doc, dict) else None
    if not isinstance(media, str) or not media.startswith(BUNDLE_MEDIA_TYPE_PREFIX):
        raise DecodeError(f"not a Sigstore bundle: media type {media!r}")
    try:
        parsed = sg.models.Bundle.from_json(data)
    except (sg.errors.Error, ValueError, TypeError) as e:
        raise DecodeError(f"not a Sigstore bundle: {e}") from e
    # sigstore-python loaded the leaf; its lazily parsed fields are read here, inside the
    # typed-error boundary, before verification touches them (openpcc.attestation.certs).
    readable(parsed.signing_certificate, "Sigstore bundle's signing certificate")
    return parsed


def _ca_in_force(root: OfflineTrustRoot, leaf: Certificate, times: list[datetime]) -> None:
    """The CA that issued the leaf must be one whose ``validFor`` covers the signing
    time: a retired CA (``end`` set) must not sign new manifests even if its X.509
    certificate is still valid. sigstore-python accepts any listed CA here."""
    from cryptography.exceptions import InvalidSignature

    issuing = []
    for ca in root._root._inner.certificate_authorities:
        certs = [
            load_certificate(c.raw_bytes, "trust root CA certificate")
            for c in ca.cert_chain.certificates
        ]
        if not certs or certs[0].subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(certs[0])
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuing.append(ca.valid_for)
    for valid in issuing:
        if valid is None or all(
            valid.start <= t and (valid.end is None or t <= valid.end) for t in times
        ):
            return
    raise SigstoreVerificationError(
        "no certificate authority of the trust root was in force at the signing time "
        f"{min(times).isoformat()}"
    )


def verify_blob(
    data: bytes,
    bundle: bytes,
    signer: SignerIdentity,
    trust_root: OfflineTrustRoot | str | PathLike[str],
    *,
    now: datetime | None = None,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> SigstoreSignature:
    """Verify ``data`` against a Sigstore bundle (hashedrekord message signature), offline.

    DecodeError for an unreadable bundle/trust root; SigstoreVerificationError for
    everything that does not verify; SigstoreUnavailableError without the extra.
    ``now`` (default: the clock) only bounds the verified signing time from above.
    """
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    sg = _sigstore()
    root = OfflineTrustRoot.coerce(trust_root)
    parsed = _load_bundle(sg, bundle)
    try:
        verifier = sg.verify.Verifier(trusted_root=root._root)
        verifier.verify_artifact(
            bytes(data), parsed, _IdentityPolicy(signer, sg.errors.VerificationError)
        )
        # Re-derive the verified times (TSA tokens that verify, the log's integrated
        # time when an inclusion promise binds it): the same list sigstore judged by.
        times = verifier._establish_time(parsed)
    except sg.errors.Error as e:
        raise SigstoreVerificationError(f"Sigstore bundle does not verify: {e}") from e
    except (ValueError, TypeError) as e:
        raise SigstoreVerificationError(f"Sigstore bundle does not verify: {e}") from e
    if not times:
        raise SigstoreVerificationError("Sigstore bundle carries no verified signing time")
    instants = [t.time for t in times]
    signed_at = min(instants)
    if max(instants) > now + clock_skew:
        raise SigstoreVerificationError(
            f"signed at {max(instants).isoformat()}, after now ({now.isoformat()})"
        )
    leaf = parsed.signing_certificate
    _ca_in_force(root, leaf, instants)
    from cryptography.hazmat.primitives.serialization import Encoding

    return SigstoreSignature(
        identity=signer.identity,
        oidc_issuer=signer.oidc_issuer,
        signed_at=signed_at,
        time_sources=tuple(sorted({t.source.name.lower() for t in times})),
        log_index=int(parsed.log_entry._inner.log_index),
        certificate_sha256=hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest(),
        artifact_sha256=hashlib.sha256(bytes(data)).hexdigest(),
        trust_root_sha256=root.sha256,
    )


def verify_manifest(
    manifest: bytes,
    bundle: bytes,
    signer: SignerIdentity,
    trust_root: OfflineTrustRoot | str | PathLike[str],
    now: datetime,
    *,
    min_serial: int = 0,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> SigstoreManifest:
    """Signature first, then the same parse / window / serial checks as the Ed25519 path."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    sig = verify_blob(manifest, bundle, signer, trust_root, now=now, clock_skew=clock_skew)
    try:
        parsed = Manifest.parse(manifest)
    except DecodeError as e:
        raise DecodeError(
            f"the Sigstore signature verified, but the signed file is not a release manifest: {e}"
        ) from e
    check_manifest_validity(parsed, now, min_serial=min_serial, clock_skew=clock_skew)
    return SigstoreManifest(TrustPolicy(parsed, f"sigstore:{signer.identity}"), sig)


def policy_from_sigstore(
    manifest: bytes,
    bundle: bytes,
    *,
    identity: str,
    oidc_issuer: str,
    trust_root: Any,
    now: datetime,
    min_serial: int = 0,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> TrustPolicy:
    """The Sigstore alternative to ``TrustPolicy.from_signed``: manifest bytes + a
    Sigstore bundle, the pinned signer (SAN + OIDC issuer) and an offline
    ``trusted_root.json`` (path or ``OfflineTrustRoot``). Same errors, plus
    ``SigstoreUnavailableError`` without the ``sigstore`` extra. Here, not on
    ``TrustPolicy``, so that policy.py never imports this module (no import cycle)."""
    signer = SignerIdentity(identity, oidc_issuer)
    return verify_manifest(
        manifest, bundle, signer, trust_root, now, min_serial=min_serial, clock_skew=clock_skew
    ).policy

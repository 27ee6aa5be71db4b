"""Who may list a node: credential, network, attested bundle, the node's own signature.

``Admission.admit`` runs the checks that need no registry state, cheapest first, and
returns the registration with what the registry then enforces (the signing key an id is
bound to, the signed time, the credential and its cap). See openpcc/admission.py for why.

Bundles are verified with the operator's trust policy (the signed release manifest the
clients use, ``--trust-policy`` + ``--release-pubkey``), reloaded when the file changes.
A verdict is cached per (policy, bundle) until the claims or the manifest expire, so a
heartbeat costs a signature check, not an attestation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from gateway.registry import Registration, parse_registration
from openpcc.admission import (
    SIGNATURE_HEADER,
    AdmissionError,
    Credential,
    CredentialStore,
    verify_registration,
)
from openpcc.attestation.bundle import AttestationBundle, verify_bundle
from openpcc.attestation.policy import TrustPolicy
from openpcc.errors import OpenPCCError
from openpcc.files import file_stamp

log = logging.getLogger("openpcc.gateway")

LOOPBACK = ("127.0.0.0/8", "::1/128")
_VERDICTS = 4096
# What a verdict hands the registry: signing key, trusted until, X-Wing key (or None).
_Judged = tuple[bytes, float, bytes | None]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyUnavailableError(AdmissionError):
    """No trust policy the gateway can judge bundles with (missing, bad or expired)."""

    status_hint = 503


class NotAttestedError(AdmissionError):
    """The bundle does not verify under the operator's trust policy."""

    status_hint = 403


class OutsideNetworksError(AdmissionError):
    """The node's URL is not an address inside ``--node-network``."""

    status_hint = 403


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """``--node-network`` values (CIDR); ValueError names the bad one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--node-network {v!r} is not a CIDR network") from None
    return tuple(out)


def url_in_networks(url: str, networks: Sequence[Network]) -> bool:
    """True if ``url``'s host is an IP literal inside one of ``networks``. Host names are
    refused: what they resolve to can change after the check (DNS rebinding)."""
    host = urlsplit(url).hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(addr in n for n in networks)


class PolicyFile:
    """The signed manifest at ``path`` under ``release_keys``; re-verified when it changes."""

    def __init__(self, path: Path, release_keys: Sequence[Path]) -> None:
        self.path = path
        self.release_keys = tuple(release_keys)
        self._stamp: tuple[int, int] | None = None
        self._policy: TrustPolicy | None = None
        self.raw = b""  # the signed bytes of the policy in use (what clients refresh to)
        self._problem = "not loaded"

    def current(self, now: float) -> TrustPolicy:
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            self._load(now)
        if self._policy is None:
            raise PolicyUnavailableError(f"no trust policy: {self._problem}")
        try:
            self._policy.check_current(datetime.fromtimestamp(now, UTC))
        except OpenPCCError as exc:
            raise PolicyUnavailableError(f"trust policy no longer valid: {exc}") from None
        return self._policy

    def _load(self, now: float) -> None:
        try:
            keys = [p.read_bytes() for p in self.release_keys]
            raw = self.path.read_bytes()
            policy = TrustPolicy.from_signed(
                raw,
                keys,
                datetime.fromtimestamp(now, UTC),
                # Never step back to an older manifest than one already in use.
                min_serial=self._policy.manifest.serial if self._policy else 0,
            )
        except (OSError, OpenPCCError) as exc:
            self._problem = f"{self.path}: {exc}"
            if self._policy is not None:
                log.error("keeping the trust policy in use: %s", self._problem)
            else:
                log.warning("%s", self._problem)
            return
        if self._policy is None or policy.manifest.serial != self._policy.manifest.serial:
            log.info("trust policy: manifest serial %d", policy.manifest.serial)
        self._policy, self.raw = policy, raw


@dataclass(frozen=True)
class Admitted:
    reg: Registration  # with signing_key, trusted_until and credential filled in
    credential: Credential
    signed_ms: int


class Admission:
    def __init__(
        self,
        credentials: CredentialStore,
        policy: PolicyFile,
        networks: Sequence[Network],
    ) -> None:
        self.credentials = credentials
        self.policy = policy
        self.networks = tuple(networks)
        self._verdicts: OrderedDict[bytes, _Judged] = OrderedDict()

    def credential(self, authorization: str | None) -> Credential:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            raise AdmissionError("missing admission credential (Authorization: Bearer …)")
        return self.credentials.check(token)

    def admit(
        self, credential: Credential, body: bytes, signature: str | None, now: float | None = None
    ) -> Admitted:
        """The checks in the order of their cost; AdmissionError (or RegistrationError).

        A heartbeat whose body did not change (the usual case) finds its verdict cached
        (per policy and body digest): no bundle parse, no attestation, one signature."""
        t = time.time() if now is None else now
        reg = parse_registration(body)
        if not url_in_networks(reg.url, self.networks):
            nets = ", ".join(str(n) for n in self.networks)
            raise OutsideNetworksError(f"node url must be an IP address inside {nets}")
        policy = self.policy.current(t)
        judged = self._cached(reg, policy, t)
        if judged is not None:
            signed_ms = verify_registration(judged[0], body, signature, t)
        else:
            bundle = self._bundle(reg)
            # The signature before the attestation: refusing a forgery costs no verdict.
            signed_ms = verify_registration(bundle.claims.signing_key, body, signature, t)
            judged = self._verify(bundle, reg, policy, t)
        reg = dataclasses.replace(
            reg,
            signing_key=judged[0],
            trusted_until=judged[1],
            pq_public_key=judged[2],
            credential=credential.name,
        )
        return Admitted(reg, credential, signed_ms)

    def recheck(self, reg: Registration, now: float | None = None) -> Registration | None:
        """A registration another replica admitted (read from Redis), judged by our policy;
        None if it does not verify here."""
        t = time.time() if now is None else now
        try:
            policy = self.policy.current(t)
            judged = self._cached(reg, policy, t) or self._verify(self._bundle(reg), reg, policy, t)
        except OpenPCCError:
            return None
        return dataclasses.replace(
            reg, signing_key=judged[0], trusted_until=judged[1], pq_public_key=judged[2]
        )

    @staticmethod
    def _key(reg: Registration, policy: TrustPolicy) -> bytes:
        label = f"{policy.key_id}\0{policy.manifest.serial}\0".encode()
        return hashlib.sha256(label + reg.digest).digest()

    def _cached(self, reg: Registration, policy: TrustPolicy, now: float) -> _Judged | None:
        """(signing key, trusted until, X-Wing key) of an earlier verdict on this very body,
        if live."""
        key = self._key(reg, policy)
        hit = self._verdicts.get(key)
        if hit is None or now >= hit[1]:
            return None
        self._verdicts.move_to_end(key)
        return hit

    @staticmethod
    def _bundle(reg: Registration) -> AttestationBundle:
        """The parsed bundle, naming this registration's node id (else NotAttestedError)."""
        try:
            bundle = AttestationBundle.from_json_obj(reg.bundle)
        except (OpenPCCError, ValueError, TypeError) as exc:
            raise NotAttestedError(f"bundle does not parse: {exc}") from None
        if bundle.claims.node_id != reg.node_id.hex():
            raise NotAttestedError("node_id differs from the attested one")
        return bundle

    def _verify(
        self, bundle: AttestationBundle, reg: Registration, policy: TrustPolicy, now: float
    ) -> _Judged:
        verdict = verify_bundle(
            bundle,
            policy=policy,
            now=datetime.fromtimestamp(now, UTC),
            expected_node_key=reg.public_key,
        )
        if not verdict.ok:
            reasons = "; ".join(f"{c.name}: {c.detail}" for c in verdict.failures())
            raise NotAttestedError(f"bundle does not verify: {reasons}"[:500])
        claims = bundle.claims
        judged = (
            claims.signing_key,
            min(float(claims.expires_at), policy.valid_until),
            claims.pq_public_key,
        )
        self._verdicts[self._key(reg, policy)] = judged
        while len(self._verdicts) > _VERDICTS:
            self._verdicts.popitem(last=False)
        return judged


__all__ = [
    "LOOPBACK",
    "SIGNATURE_HEADER",
    "Admission",
    "Admitted",
    "NotAttestedError",
    "OutsideNetworksError",
    "PolicyFile",
    "PolicyUnavailableError",
    "parse_networks",
    "url_in_networks",
]

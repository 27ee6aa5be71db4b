"""The attestation bundle a node publishes, and the one function a client trusts it with.

A bundle is everything needed to verify a node offline: its claims (DESIGN.md section 4),
the TEE evidence whose REPORT_DATA commits to them, the endorsements that chain that
evidence to a vendor root, and the GPU evidence whose SPDM nonce is derived from the same
claims. :func:`verify_bundle` runs every per-platform verifier and merges their checks,
prefixed (``tee.signature``, ``gpu[0].measurements``), into one ``bundle`` verdict.

JSON encoding (what ``GET /v1/nodes`` carries as ``bundle``; bytes are standard base64)::

    {"version": 1, "claims": "<b64 canonical claims>", "tee": "sev-snp",
     "evidence": "<b64 SNP report or TDX quote>",
     "endorsements": {...},
     "gpu": [{"evidence": "<b64 SPDM>", "cert_chain_pem": "<PEM text>",
              "rims": ["<b64 RIM XML>"], "ocsp": ["<b64 DER>"]}]}

``endorsements``: SNP / simulated SNP: ``{"vcek": PEM}`` or ``{"vlek": PEM}``, plus an
optional ``"ask_ark": PEM`` chain (the simulated TEE puts its development root there;
AMD's is pinned and used by default). TDX: ``{"collateral": <dcap-qvl
QuoteCollateralV3 object>}`` (optional: without it the ``dcap`` check fails). Decoding is
strict: unknown keys, wrong types, non-canonical base64 and oversize fields raise
:class:`~openpcc.errors.DecodeError` (:class:`~openpcc.errors.LimitExceededError`).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from openpcc.attestation import amd
from openpcc.attestation.claims import (
    Claims,
    check_claims,
    gpu_evidence_digest_for,
    gpu_nonce_for,
    report_data_for,
)
from openpcc.attestation.nvidia import verify_gpu
from openpcc.attestation.policy import TrustPolicy, _obj, b64, strict_json, unb64
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.attestation.snp import AttestationReport, SnpPolicy, verify_snp
from openpcc.attestation.tdx import verify_tdx
from openpcc.attestation.verdict import Verdict
from openpcc.errors import DecodeError, EncodeError, LimitExceededError

BUNDLE_VERSION = 1
MAX_BUNDLE_SIZE = 4 << 20  # 8 GPUs with RIMs and OCSP fit with room to spare
MAX_EVIDENCE_SIZE = 64 << 10
MAX_ENDORSEMENT_SIZE = 256 << 10
MAX_GPUS = 16
MAX_GPU_ITEMS = 16  # RIMs or OCSP responses per GPU
MAX_GPU_ITEM_SIZE = 256 << 10
TEE_KINDS = ("sev-snp", "tdx", "simulated-snp")
_SNP_KEYS = ("vcek", "vlek", "ask_ark")


@dataclass(frozen=True)
class GpuEvidence:
    """One GPU's SPDM evidence, its device chain, and optional RIMs / OCSP responses."""

    evidence: bytes
    cert_chain_pem: str
    rims: tuple[bytes, ...] = ()
    ocsp: tuple[bytes, ...] = ()

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "evidence": b64(self.evidence),
            "cert_chain_pem": self.cert_chain_pem,
        }
        if self.rims:
            obj["rims"] = [b64(r) for r in self.rims]
        if self.ocsp:
            obj["ocsp"] = [b64(o) for o in self.ocsp]
        return obj

    @classmethod
    def from_json_obj(cls, value: Any, what: str) -> GpuEvidence:
        g = _obj(value, what, ("evidence", "cert_chain_pem"), ("rims", "ocsp"))
        evidence = _bytes(g["evidence"], f"{what}.evidence", MAX_EVIDENCE_SIZE)
        chain = _text(g["cert_chain_pem"], f"{what}.cert_chain_pem", MAX_ENDORSEMENT_SIZE)
        items: dict[str, tuple[bytes, ...]] = {}
        for key in ("rims", "ocsp"):
            raw = g.get(key, [])
            if not isinstance(raw, list):
                raise DecodeError(f"{what}.{key} must be a list")
            if len(raw) > MAX_GPU_ITEMS:
                raise LimitExceededError(f"{what}.{key}: more than {MAX_GPU_ITEMS} entries")
            items[key] = tuple(
                _bytes(x, f"{what}.{key}[{i}]", MAX_GPU_ITEM_SIZE) for i, x in enumerate(raw)
            )
        return cls(evidence, chain, items["rims"], items["ocsp"])


@dataclass(frozen=True)
class AttestationBundle:
    """What a node publishes; see the module docstring for the JSON form."""

    claims: Claims
    tee: str
    evidence: bytes
    endorsements: dict[str, Any]
    gpu: tuple[GpuEvidence, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.tee not in TEE_KINDS:
            raise EncodeError(f"tee must be one of {TEE_KINDS}")
        _check_endorsements(self.tee, self.endorsements)
        object.__setattr__(self, "gpu", tuple(self.gpu))

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "version": BUNDLE_VERSION,
            "claims": b64(self.claims.encode()),
            "tee": self.tee,
            "evidence": b64(self.evidence),
            "endorsements": self.endorsements,
            "gpu": [g.to_json_obj() for g in self.gpu],
        }

    def encode(self) -> bytes:
        """Canonical JSON: sorted keys, no whitespace, ASCII."""
        return json.dumps(
            self.to_json_obj(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> AttestationBundle:
        """Strictly parse JSON bytes (any whitespace; structure and types are exact)."""
        return cls.from_json_obj(strict_json(bytes(data), "attestation bundle", MAX_BUNDLE_SIZE))

    @classmethod
    def from_json_obj(cls, value: Any) -> AttestationBundle:
        """Parse an already-decoded JSON object (as embedded in the node directory)."""
        b = _obj(value, "bundle", ("version", "claims", "tee", "evidence", "endorsements", "gpu"))
        if b["version"] != BUNDLE_VERSION or type(b["version"]) is not int:
            raise DecodeError(f"unsupported bundle version {b['version']!r}")
        if b["tee"] not in TEE_KINDS:
            raise DecodeError(f"tee must be one of {TEE_KINDS}")
        claims = Claims.decode(unb64(b["claims"], "claims"))
        evidence = _bytes(b["evidence"], "evidence", MAX_EVIDENCE_SIZE)
        endorsements = b["endorsements"]
        try:
            _check_endorsements(b["tee"], endorsements)
        except EncodeError as e:
            raise DecodeError(str(e)) from e
        gpus = b["gpu"]
        if not isinstance(gpus, list):
            raise DecodeError("gpu must be a list")
        if len(gpus) > MAX_GPUS:
            raise LimitExceededError(f"more than {MAX_GPUS} GPUs")
        gpu = tuple(GpuEvidence.from_json_obj(g, f"gpu[{i}]") for i, g in enumerate(gpus))
        return cls(claims, b["tee"], evidence, dict(endorsements), gpu)


def _bytes(value: Any, what: str, limit: int) -> bytes:
    if isinstance(value, str) and len(value) > (limit + 2) // 3 * 4:
        raise LimitExceededError(f"{what} larger than {limit} bytes")
    return unb64(value, what)


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"{what} must be a string")
    if len(value) > limit:
        raise LimitExceededError(f"{what} larger than {limit} characters")
    return value


def _check_endorsements(tee: str, e: Any) -> None:
    """Shape only (raises EncodeError); the certificates are judged by the verifiers."""
    if not isinstance(e, dict):
        raise EncodeError("endorsements must be an object")
    if tee == "tdx":
        unknown = set(e) - {"collateral"}
        if unknown:
            raise EncodeError(f"TDX endorsements: unknown keys {sorted(unknown)}")
        if "collateral" in e:
            if not isinstance(e["collateral"], dict):
                raise EncodeError("TDX collateral must be a JSON object")
            if len(json.dumps(e["collateral"])) > MAX_ENDORSEMENT_SIZE:
                raise EncodeError("TDX collateral too large")
        return
    unknown = set(e) - set(_SNP_KEYS)
    if unknown:
        raise EncodeError(f"SNP endorsements: unknown keys {sorted(unknown)}")
    if ("vcek" in e) == ("vlek" in e):
        raise EncodeError("SNP endorsements need exactly one of vcek, vlek")
    for k, v in e.items():
        if not isinstance(v, str) or len(v) > MAX_ENDORSEMENT_SIZE:
            raise EncodeError(f"endorsement {k} must be PEM text under {MAX_ENDORSEMENT_SIZE} B")


# --- verification --------------------------------------------------------------------------


def _merge(verdict: Verdict, prefix: str, sub: Verdict) -> None:
    for c in sub.checks:
        verdict.add(f"{prefix}.{c.name}", c.ok, c.detail)
    verdict.fields[prefix] = {"platform": sub.platform, "judged": sub.judged, **sub.fields}


def verify_bundle(
    bundle: AttestationBundle,
    *,
    policy: TrustPolicy | None,
    now: datetime,
    expected_node_key: bytes | None = None,
) -> Verdict:
    """Verify a node's bundle at ``now``; without a policy only policy-free checks run.

    Never raises on evidence that is readable but wrong (a failed check instead), so the
    client sees every reason. ``expected_node_key`` is the HPKE key the directory lists
    for the node; it must be the one the TEE committed to.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    claims = bundle.claims
    v = Verdict(platform="bundle", judged=policy is not None)
    v.fields["claims"] = claims.to_json_obj()
    v.fields["tee"] = bundle.tee
    for c in check_claims(claims, now):
        v.add(c.name, c.ok, c.detail)
    v.add(
        "tee_type",
        claims.tee == bundle.tee,
        f"claims say {claims.tee}, evidence is {bundle.tee}",
    )
    if expected_node_key is not None:
        same = hmac.compare_digest(claims.hpke_public_key, bytes(expected_node_key))
        v.add("node_key", same, "matches" if same else "claims commit to another HPKE key")

    release = None
    if policy is not None:
        release = policy.release(claims.release_id)
        v.add(
            "release",
            release is not None,
            f"release {claims.release_id}" + ("" if release else " is not in the manifest"),
        )
        ok = policy.accepts_model(claims.release_id, claims.model_digest)
        v.add("model_digest", ok, "in the release" if ok else "not a digest of this release")
        if policy.post_quantum_required:
            # No silent downgrade: a node without an attested X-Wing key would take only
            # X25519-sealed requests (manifest ``post_quantum.require``).
            pq = claims.pq_public_key is not None
            v.add(
                "post_quantum",
                pq,
                "X-Wing key attested"
                if pq
                else "the manifest requires post-quantum keys; the node attests none",
            )
        if bundle.tee == "simulated-snp" or claims.tee == "simulated-snp":
            v.add(
                "development",
                policy.development,
                "simulated TEE: manifest trusts development roots"
                if policy.development
                else "simulated TEE, but the manifest trusts no development root",
            )
    judge = policy is not None and release is not None

    expected_rd = report_data_for(claims)
    if bundle.tee in ("sev-snp", "simulated-snp"):
        _verify_snp_part(v, bundle, policy if judge else None, now, expected_rd)
    else:
        _verify_tdx_part(v, bundle, policy if judge else None, now, expected_rd)

    _verify_gpu_part(v, bundle, policy, judge, now)
    return v


def _verify_snp_part(
    v: Verdict,
    bundle: AttestationBundle,
    policy: TrustPolicy | None,
    now: datetime,
    expected_rd: bytes,
) -> None:
    e = bundle.endorsements
    try:
        report = AttestationReport.parse(bundle.evidence)
    except DecodeError as err:
        v.add("tee.report_parse", False, str(err))
        return
    try:
        cert = amd.load_certificate((e.get("vcek") or e["vlek"]).encode())
    except DecodeError as err:
        v.add("tee.endorsement", False, str(err))
        return
    snp_policy: SnpPolicy | None = None
    if policy is not None:
        # v2 reports carry no CPUID: the certificate names the product then.
        product = report.product or amd.endorsement_info(cert).product
        snp_policy = policy.snp_policy(bundle.claims.release_id, product)
        _, problem = policy.snp_min_tcb(product)
        if problem:
            v.add("tee.min_tcb", False, problem)
        # Real hardware must chain to AMD: development roots count only for simulated TEEs.
        if bundle.tee == "sev-snp":
            snp_policy = _without_dev_roots(snp_policy)
    try:
        sub = verify_snp(
            report,
            cert,
            now=now,
            ark_ask_chain=e["ask_ark"].encode() if "ask_ark" in e else None,
            expected_report_data=expected_rd,
            policy=snp_policy,
        )
    except DecodeError as err:
        v.add("tee.endorsement", False, str(err))
        return
    _merge(v, "tee", sub)
    ok = sub.platform == bundle.tee
    v.add(
        "tee.root_kind", ok, f"evidence chains to a {sub.platform} root, bundle says {bundle.tee}"
    )


def _without_dev_roots(p: SnpPolicy) -> SnpPolicy:
    return replace(p, trusted_roots=frozenset())


def _verify_tdx_part(
    v: Verdict,
    bundle: AttestationBundle,
    policy: TrustPolicy | None,
    now: datetime,
    expected_rd: bytes,
) -> None:
    tdx_policy = policy.tdx_policy(bundle.claims.release_id) if policy is not None else None
    collateral = bundle.endorsements.get("collateral")
    try:
        sub = verify_tdx(
            bundle.evidence,
            collateral,
            now=now,
            expected_report_data=expected_rd,
            policy=tdx_policy,
        )
    except (DecodeError, ValueError) as err:
        v.add("tee.quote_parse", False, str(err))
        return
    _merge(v, "tee", sub)


def _verify_gpu_part(
    v: Verdict,
    bundle: AttestationBundle,
    policy: TrustPolicy | None,
    judge: bool,
    now: datetime,
) -> None:
    claims = bundle.claims
    if policy is not None and policy.manifest.require_gpu:
        v.add("gpu_required", bool(bundle.gpu), f"{len(bundle.gpu)} GPU(s) attested")
    if not bundle.gpu:
        ok = claims.gpu_evidence_digest is None
        v.add("gpu_digest", ok, "no GPU" if ok else "claims commit to GPU evidence, none given")
        return
    digest = gpu_evidence_digest_for([g.evidence for g in bundle.gpu])
    ok = claims.gpu_evidence_digest is not None and hmac.compare_digest(
        digest, claims.gpu_evidence_digest
    )
    v.add("gpu_digest", ok, "matches the claims" if ok else "GPU evidence differs from the claims")
    nonce = gpu_nonce_for(claims)
    gpu_policy = policy.gpu_policy(claims.release_id) if judge and policy is not None else None
    for i, g in enumerate(bundle.gpu):
        try:
            sub = verify_gpu(
                g.evidence,
                g.cert_chain_pem,
                now=now,
                expected_nonce=nonce,
                rims=g.rims,
                ocsp=g.ocsp,
                policy=gpu_policy,
            )
        except (DecodeError, ValueError) as err:
            v.add(f"gpu[{i}].evidence_parse", False, str(err))
            continue
        _merge(v, f"gpu[{i}]", sub)


def make_simulated_bundle(
    tee: SimulatedTEE, claims: Claims, measurement: bytes
) -> AttestationBundle:
    """A development node's bundle: a simulated SNP report bound to ``claims``.

    No GPU evidence, so ``claims.gpu_evidence_digest`` must be None. Verifies only under a
    policy whose manifest names ``tee.root_fingerprint`` in ``development_roots``.
    """
    if claims.tee != "simulated-snp":
        raise EncodeError("a simulated bundle's claims must say tee=simulated-snp")
    if claims.gpu_evidence_digest is not None:
        raise EncodeError("a simulated bundle carries no GPU evidence")
    report = tee.issue_report(report_data_for(claims), measurement=measurement)
    endorsements = {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()}
    return AttestationBundle(claims, "simulated-snp", report, endorsements, ())

"""`openpcc verify ...` and `openpcc release ...`: attestation on the command line.

Every ``verify`` command prints exactly one JSON object (``Verdict.to_json`` plus, when
no ``--policy`` is given, ``"note"`` saying measurements were reported but not judged)
and exits 0 when every check passed, 1 when verification failed (including a policy
manifest that does not verify), 2 when an input cannot be read or parsed. The clock is
read only when ``--at`` is absent; ``--at`` takes ISO 8601 or Unix seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.errors import DecodeError, VerificationError

EXIT_OK, EXIT_FAILED, EXIT_UNREADABLE = 0, 1, 2
NOTE_UNJUDGED = (
    "no --policy given: signatures, chains, TCB, debug and bindings were checked; "
    "measurements are reported, not judged"
)
PRIVATE_KEY_FILE = "release-key.pem"
PUBLIC_KEY_FILE = "release-key.pub.pem"
_HEX_TEXT = re.compile(rb"\s*(?:0[xX])?[0-9a-fA-F\s]+")


class InputError(Exception):
    """An input the user named cannot be read or parsed (exit 2)."""


def register(sub: Any) -> None:
    """Add the ``verify`` and ``release`` command groups."""
    verify = sub.add_parser("verify", help="verify attestation evidence offline; JSON verdict")
    vsub = verify.add_subparsers(dest="verify_kind", metavar="KIND", required=True)

    p = vsub.add_parser("snp", help="AMD SEV-SNP attestation report")
    p.add_argument("report", help="1184-byte report, binary or hex")
    p.add_argument("--vcek", required=True, help="VCEK or VLEK certificate (PEM or DER)")
    p.add_argument("--chain", help="ASK/ASVK + ARK PEM bundle (default: pinned AMD chain)")
    p.add_argument(
        "--trust-root",
        action="append",
        default=[],
        metavar="SHA256",
        help="also trust this root fingerprint (simulated TEE development root)",
    )
    p.add_argument("--report-data", metavar="HEX", help="expected 64-byte REPORT_DATA")
    _common(p)
    p.set_defaults(func=_verify_snp)

    p = vsub.add_parser("tdx", help="Intel TDX DCAP quote (v4/v5)")
    p.add_argument("quote", help="quote, binary or hex")
    p.add_argument("--collateral", help="dcap-qvl QuoteCollateralV3 JSON (without: dcap fails)")
    p.add_argument("--report-data", metavar="HEX", help="expected 64-byte REPORTDATA")
    _common(p)
    p.set_defaults(func=_verify_tdx)

    p = vsub.add_parser("gpu", help="NVIDIA GPU SPDM evidence")
    p.add_argument("report", help="SPDM GET_MEASUREMENTS request+response, binary or hex")
    p.add_argument("--cert-chain", required=True, help="device certificate chain (PEM)")
    p.add_argument("--nonce", metavar="HEX", help="expected 32-byte request nonce")
    p.add_argument("--rim", action="append", default=[], help="signed RIM XML (repeat)")
    p.add_argument("--ocsp", action="append", default=[], help="DER OCSP response (repeat)")
    p.add_argument("--rim-at", metavar="T", help="instant for RIM checks (default: --at)")
    _common(p)
    p.set_defaults(func=_verify_gpu)

    p = vsub.add_parser("bundle", help="a node's attestation bundle (JSON)")
    p.add_argument("file", help="bundle JSON")
    p.add_argument("--node-key", metavar="HEX", help="HPKE key the directory lists for the node")
    _common(p, release=False)
    p.set_defaults(func=_verify_bundle)

    release = sub.add_parser("release", help="create, sign and check release manifests")
    rsub = release.add_subparsers(dest="release_cmd", metavar="COMMAND", required=True)
    p = rsub.add_parser("keygen", help="new Ed25519 release key pair")
    p.add_argument("--out", required=True, help="directory for the key files")
    p.set_defaults(func=_release_keygen)
    p = rsub.add_parser("sign", help="sign a release manifest")
    p.add_argument("manifest", help="manifest JSON")
    p.add_argument("--key", required=True, help="release private key (PEM)")
    p.add_argument("--out", required=True, help="signed manifest to write")
    p.set_defaults(func=_release_sign)
    p = rsub.add_parser("verify", help="check a signed manifest's signature and validity")
    p.add_argument("signed", help="signed manifest JSON (bare manifest with --sigstore-bundle)")
    p.add_argument("--pubkey", action="append", default=[], help="pinned release key (PEM)")
    p.add_argument("--at", metavar="T", help="instant (ISO 8601 or Unix seconds)")
    p.add_argument("--min-serial", type=int, default=0, help="refuse older manifests")
    g = p.add_argument_group("Sigstore (instead of --pubkey; needs openpcc[sigstore])")
    g.add_argument("--sigstore-bundle", metavar="B", help="Sigstore bundle over the manifest")
    g.add_argument("--identity", metavar="ID", help="pinned signer: certificate SAN (email/URI)")
    g.add_argument("--oidc-issuer", metavar="URL", help="pinned OIDC issuer of the signer")
    g.add_argument("--trust-root", metavar="FILE", help="Sigstore trusted_root.json (offline)")
    p.set_defaults(func=_release_verify)
    from openpcc.release_measure import add_parser as add_measure  # sev-snp-measure: lazily

    add_measure(rsub)


def _common(p: argparse.ArgumentParser, *, release: bool = True) -> None:
    p.add_argument("--at", metavar="T", help="verify as of T (ISO 8601 or Unix seconds)")
    p.add_argument("--policy", metavar="SIGNED", help="signed release manifest to judge against")
    p.add_argument(
        "--release-pubkey",
        action="append",
        default=[],
        metavar="PUB",
        help="pinned release public key (PEM); required with --policy",
    )
    if release:
        p.add_argument("--release", metavar="ID", help="release to judge against (--policy)")


# --- input helpers ---------------------------------------------------------------------


def parse_time(value: str | None) -> datetime:
    """ISO 8601 (naive = UTC, trailing Z allowed) or integer Unix seconds; None = now."""
    if value is None:
        return datetime.now(UTC)
    text = value.strip()
    try:
        if re.fullmatch(r"-?\d+", text):
            return datetime.fromtimestamp(int(text), UTC)
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError) as e:
        raise InputError(f"bad time {value!r}: use ISO 8601 or Unix seconds") from e
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e


def read_evidence(path: str) -> bytes:
    """Binary evidence, or its hex text (whitespace and a 0x prefix allowed)."""
    raw = read_file(path)
    if raw and _HEX_TEXT.fullmatch(raw):
        text = b"".join(raw.split())
        if text[:2] in (b"0x", b"0X"):
            text = text[2:]
        try:
            return bytes.fromhex(text.decode("ascii"))
        except ValueError as e:
            raise InputError(f"{path}: looks like hex but is not: {e}") from e
    return raw


def parse_hex(value: str | None, what: str, size: int | None = None) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise InputError(f"{what} is not hex") from e
    if size is not None and len(raw) != size:
        raise InputError(f"{what} must be {size} bytes")
    return raw


def _load_policy(args: argparse.Namespace, now: datetime) -> Any:
    """The verified TrustPolicy for --policy, or None. VerificationError propagates."""
    from openpcc.attestation.policy import TrustPolicy

    if not args.policy:
        return None
    if not args.release_pubkey:
        raise InputError("--policy needs at least one --release-pubkey")
    keys = [read_file(k) for k in args.release_pubkey]
    return TrustPolicy.from_signed(read_file(args.policy), keys, now)


def _release_id(args: argparse.Namespace, policy: Any) -> str:
    if args.release:
        return str(args.release)
    releases = sorted(policy.manifest.releases)
    if len(releases) != 1:
        raise InputError(f"--release needed: the manifest lists {releases}")
    return releases[0]


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _run(body: Any, platform: str) -> int:
    """Run ``body() -> dict`` mapping errors to exit codes; always print one JSON object."""
    try:
        out = body()
    except (InputError, DecodeError) as e:
        _emit({"ok": False, "platform": platform, "error": f"unreadable input: {e}"})
        print(f"openpcc: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    except VerificationError as e:
        _emit({"ok": False, "platform": platform, "error": f"policy: {e}"})
        print(f"openpcc: {e}", file=sys.stderr)
        return EXIT_FAILED
    _emit(out)
    return EXIT_OK if out.get("ok") else EXIT_FAILED


def _result(verdict: Any, **extra: Any) -> dict[str, Any]:
    out = verdict.to_json()
    if not verdict.judged:
        out["note"] = NOTE_UNJUDGED
    out.update(extra)
    return out


# --- verify ----------------------------------------------------------------------------------


def _verify_snp(args: argparse.Namespace) -> int:
    from openpcc.attestation.snp import AttestationReport, verify_snp

    def body() -> dict[str, Any]:
        from openpcc.attestation import amd

        now = parse_time(args.at)
        report = AttestationReport.parse(read_evidence(args.report))
        cert = amd.load_certificate(read_file(args.vcek))
        chain = read_file(args.chain) if args.chain else None
        policy = _load_policy(args, now)
        snp_policy, extra = None, {}
        if policy is not None:
            rid = _release_id(args, policy)
            product = report.product or amd.endorsement_info(cert).product
            snp_policy = policy.snp_policy(rid, product)
            extra = {"release": rid}
        v = verify_snp(
            report,
            cert,
            now=now,
            ark_ask_chain=chain,
            expected_report_data=parse_hex(args.report_data, "--report-data", 64),
            policy=snp_policy,
            trusted_roots=args.trust_root,
        )
        if policy is not None:
            _, problem = policy.snp_min_tcb(v.fields.get("product"))
            if problem:
                v.add("min_tcb", False, problem)
        return _result(v, at=now.isoformat(), **extra)

    return _run(body, "sev-snp")


def _verify_tdx(args: argparse.Namespace) -> int:
    from openpcc.attestation.tdx import verify_tdx

    def body() -> dict[str, Any]:
        now = parse_time(args.at)
        quote = read_evidence(args.quote)
        collateral = None
        if args.collateral:
            text = read_file(args.collateral)
            try:
                collateral = json.loads(text)
            except ValueError as e:
                raise InputError(f"{args.collateral} is not JSON: {e}") from e
        policy = _load_policy(args, now)
        tdx_policy, extra = None, {}
        if policy is not None:
            rid = _release_id(args, policy)
            tdx_policy, extra = policy.tdx_policy(rid), {"release": rid}
        v = verify_tdx(
            quote,
            collateral,
            now=now,
            expected_report_data=parse_hex(args.report_data, "--report-data", 64),
            policy=tdx_policy,
        )
        if v.checks and v.checks[0].name == "quote_parse" and not v.checks[0].ok:
            raise InputError(v.checks[0].detail)
        return _result(v, at=now.isoformat(), **extra)

    return _run(body, "tdx")


def _verify_gpu(args: argparse.Namespace) -> int:
    from openpcc.attestation.nvidia import SpdmEvidence, verify_gpu

    def body() -> dict[str, Any]:
        now = parse_time(args.at)
        rim_now = parse_time(args.rim_at) if args.rim_at else now
        evidence = read_evidence(args.report)
        SpdmEvidence.parse(evidence)  # unreadable evidence is exit 2, not a verdict
        chain = read_file(args.cert_chain)
        policy = _load_policy(args, now)
        gpu_policy, extra = None, {}
        if policy is not None:
            rid = _release_id(args, policy)
            gpu_policy, extra = policy.gpu_policy(rid), {"release": rid}
        v = verify_gpu(
            evidence,
            chain,
            now=now,
            expected_nonce=parse_hex(args.nonce, "--nonce", 32),
            rims=[read_file(r) for r in args.rim],
            ocsp=[read_file(o) for o in args.ocsp],
            policy=gpu_policy,
            rim_now=rim_now,
        )
        return _result(v, at=now.isoformat(), rim_at=rim_now.isoformat(), **extra)

    return _run(body, "nvidia-gpu")


def _verify_bundle(args: argparse.Namespace) -> int:
    from openpcc.attestation.bundle import AttestationBundle, verify_bundle

    def body() -> dict[str, Any]:
        now = parse_time(args.at)
        bundle = AttestationBundle.decode(read_file(args.file))
        policy = _load_policy(args, now)
        v = verify_bundle(
            bundle,
            policy=policy,
            now=now,
            expected_node_key=parse_hex(args.node_key, "--node-key", 32),
        )
        extra: dict[str, Any] = {"at": now.isoformat()}
        if policy is not None:
            extra["policy"] = policy.summary()
        return _result(v, **extra)

    return _run(body, "bundle")


# --- release ---------------------------------------------------------------------------------


def _release_keygen(args: argparse.Namespace) -> int:
    from openpcc.attestation.policy import release_key_id

    out = Path(args.out)
    private = out / PRIVATE_KEY_FILE
    if private.exists():
        print(f"openpcc: {private} exists; refusing to overwrite a release key", file=sys.stderr)
        return EXIT_UNREADABLE
    out.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (out / PUBLIC_KEY_FILE).write_bytes(pub)
    _emit(
        {
            "key_id": release_key_id(key.public_key()),
            "private_key": str(private),
            "public_key": str(out / PUBLIC_KEY_FILE),
        }
    )
    return EXIT_OK


def _release_sign(args: argparse.Namespace) -> int:
    from openpcc.attestation.policy import SignedManifest, load_release_private_key

    def body() -> dict[str, Any]:
        key = load_release_private_key(read_file(args.key))
        signed = SignedManifest.sign(read_file(args.manifest), key)
        Path(args.out).write_bytes(signed.encode())
        return {"ok": True, "key_id": signed.key_id, "out": args.out}

    return _run(body, "release-manifest")


def _release_verify(args: argparse.Namespace) -> int:
    from openpcc.attestation.policy import TrustPolicy
    from openpcc.attestation.sigstore_manifest import SigstoreUnavailableError

    sigstore_args = (args.sigstore_bundle, args.identity, args.oidc_issuer, args.trust_root)

    def body() -> dict[str, Any]:
        now = parse_time(args.at)
        extra: dict[str, Any] = {}
        if any(a is not None for a in sigstore_args):
            policy, extra["sigstore"] = _sigstore_policy(args, now)
        elif args.pubkey:
            keys = [read_file(k) for k in args.pubkey]
            policy = TrustPolicy.from_signed(
                read_file(args.signed), keys, now, min_serial=args.min_serial
            )
        else:
            raise InputError("give --pubkey, or --sigstore-bundle with its pins")
        out: dict[str, Any] = {"ok": True, "at": now.isoformat(), **policy.summary(), **extra}
        if policy.development:
            out["warning"] = "trusts development roots: never use for production clients"
        return out

    try:
        return _run(body, "release-manifest")
    except SigstoreUnavailableError as e:
        _emit({"ok": False, "platform": "release-manifest", "error": str(e)})
        print(f"openpcc: {e}", file=sys.stderr)
        return EXIT_UNREADABLE


def _sigstore_policy(args: argparse.Namespace, now: datetime) -> tuple[Any, dict[str, Any]]:
    """``release verify MANIFEST --sigstore-bundle B --identity ID --oidc-issuer URL
    --trust-root FILE``: every pin is mandatory, and it excludes ``--pubkey``."""
    from openpcc.attestation.sigstore_manifest import (
        OfflineTrustRoot,
        SignerIdentity,
        verify_manifest,
    )

    if args.pubkey:
        raise InputError("--pubkey and --sigstore-bundle exclude each other")
    missing = [
        flag
        for flag, value in (
            ("--sigstore-bundle", args.sigstore_bundle),
            ("--identity", args.identity),
            ("--oidc-issuer", args.oidc_issuer),
            ("--trust-root", args.trust_root),
        )
        if not value
    ]
    if missing:
        raise InputError(f"Sigstore verification needs {', '.join(missing)}")
    root = OfflineTrustRoot(read_file(args.trust_root), args.trust_root)
    verified = verify_manifest(
        read_file(args.signed),
        read_file(args.sigstore_bundle),
        SignerIdentity(args.identity, args.oidc_issuer),
        root,
        now,
        min_serial=args.min_serial,
    )
    return verified.policy, verified.signature.to_json()

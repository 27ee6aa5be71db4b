"""Sigstore-signed release manifests, verified offline.

Part 1 uses real bundles made by the public Sigstore instances (production and staging),
checked against the real trust roots, copied byte for byte into tests/vectors/sigstore/
(see its README): they prove the verifier accepts what Sigstore really issues and refuses
each kind of tampering. Their artifacts are not release manifests, so the manifest layer
is shown to verify the signature and then refuse to parse.

Part 2 builds a private Sigstore instance in the test (a Fulcio-style CA issuing a
10-minute certificate with the OIDC issuer extensions and an embedded SCT from a test CT
log, a Rekor-style log producing a hashedrekord entry with inclusion proof, signed
checkpoint and signed entry timestamp, and the trusted_root.json naming those keys) and
verifies a real OpenPCC manifest end to end through sigstore-python, the API, the client
configuration and the command line.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from openpcc.attestation.policy import (
    MANIFEST_FORMAT,
    Manifest,
    SignedManifest,
    TrustPolicy,
)
from openpcc.attestation.sigstore_manifest import (
    OfflineTrustRoot,
    SignerIdentity,
    SigstoreUnavailableError,
    SigstoreVerificationError,
    policy_from_sigstore,
    verify_blob,
    verify_manifest,
)
from openpcc.client.profile import policy_from_client_config
from openpcc.errors import DecodeError, VerificationError
from tests.conftest import ROOT, require_module
from tests.test_attestation_cli import openpcc  # the CLI as a subprocess, JSON out

V = ROOT / "tests" / "vectors" / "sigstore"
PROD_ROOT, STAGING_ROOT = V / "trusted_root.production.json", V / "trusted_root.staging.json"
GITHUB = "https://github.com/login/oauth"
PROD = SignerIdentity("aryadeeptade@gmail.com", GITHUB)
STAGING = SignerIdentity("william@yossarian.net", GITHUB)
PROD_SIGNED_AT = datetime(2026, 8, 23, 17, 2, 0, tzinfo=UTC)  # the TSA's genTime
NOW = datetime(2026, 11, 1, tzinfo=UTC)


WITHOUT_SIGSTORE = {"test_core_never_imports_sigstore", "test_missing_extra_is_a_typed_error"}


@pytest.fixture(autouse=True)
def _sigstore_installed(request: pytest.FixtureRequest) -> None:
    if request.function.__name__ not in WITHOUT_SIGSTORE:
        require_module("sigstore")


def prod() -> tuple[bytes, bytes]:
    return (V / "new_bundle.txt").read_bytes(), (V / "new_bundle.txt.sigstore.json").read_bytes()


def edit(bundle: bytes, change: Any) -> bytes:
    obj = json.loads(bundle)
    change(obj)
    return json.dumps(obj).encode()


def flip_b64(value: str, at: int = 10) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[at % len(raw)] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# --- part 1: real bundles from the public Sigstore instances ---------------------------------


def test_real_production_bundle_verifies_offline() -> None:
    artifact, bundle = prod()
    sig = verify_blob(artifact, bundle, PROD, PROD_ROOT, now=NOW)
    assert sig.identity == PROD.identity and sig.oidc_issuer == GITHUB
    assert sig.signed_at == PROD_SIGNED_AT
    assert sig.time_sources == ("timestamp_authority", "transparency_service")
    assert sig.log_index == 2574120827
    assert sig.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    assert sig.trust_root_sha256 == hashlib.sha256(PROD_ROOT.read_bytes()).hexdigest()


def test_real_staging_bundle_verifies_offline() -> None:
    artifact = (V / "bundle_v3_alt.txt").read_bytes()
    bundle = (V / "bundle_v3_alt.txt.sigstore").read_bytes()
    sig = verify_blob(artifact, bundle, STAGING, OfflineTrustRoot.from_file(STAGING_ROOT), now=NOW)
    assert sig.time_sources == ("transparency_service",)  # inclusion promise only, no TSA
    assert sig.signed_at == datetime.fromtimestamp(1712085616, UTC)


def test_real_staging_rekor_v2_bundle_verifies_offline() -> None:
    """Rekor v2: hashedrekord 0.0.2, no inclusion promise, the TSA is the only signed time."""
    artifact = (V / "staging-rekor-v2.txt").read_bytes()
    bundle = (V / "staging-rekor-v2.txt.sigstore.json").read_bytes()
    signer = SignerIdentity("jku@goto.fi", GITHUB)
    sig = verify_blob(artifact, bundle, signer, STAGING_ROOT, now=NOW)
    assert sig.time_sources == ("timestamp_authority",) and sig.log_index == 645
    assert sig.signed_at == datetime(2025, 6, 9, 11, 57, 38, tzinfo=UTC)
    with pytest.raises(SigstoreVerificationError):
        verify_blob(artifact[:-1] + b"?", bundle, signer, STAGING_ROOT, now=NOW)

    def bad_tsa(o: dict) -> None:
        ts = o["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"][0]
        ts["signedTimestamp"] = flip_b64(ts["signedTimestamp"], -40)

    with pytest.raises(SigstoreVerificationError, match="verified time"):
        verify_blob(artifact, edit(bundle, bad_tsa), signer, STAGING_ROOT, now=NOW)
    no_tsa = _root(lambda o: o.update(timestampAuthorities=[]), STAGING_ROOT)
    with pytest.raises(SigstoreVerificationError, match="Timestamp Authorities"):
        verify_blob(artifact, bundle, signer, no_tsa, now=NOW)


@pytest.mark.parametrize("at", [0, 17, -1])
def test_real_bundle_flipped_artifact_byte(at: int) -> None:
    artifact, bundle = prod()
    bad = bytearray(artifact)
    bad[at] ^= 0x20
    with pytest.raises(SigstoreVerificationError, match="digest mismatch"):
        verify_blob(bytes(bad), bundle, PROD, PROD_ROOT, now=NOW)
    # Without the bundle's informational digest, the ECDSA signature itself refuses it.
    stripped = edit(bundle, lambda o: o["messageSignature"].pop("messageDigest"))
    verify_blob(artifact, stripped, PROD, PROD_ROOT, now=NOW)
    with pytest.raises(SigstoreVerificationError, match="Signature is invalid"):
        verify_blob(bytes(bad), stripped, PROD, PROD_ROOT, now=NOW)


@pytest.mark.parametrize(
    "signer, match",
    [
        (SignerIdentity("someone@example.com", GITHUB), "SANs do not match"),
        (SignerIdentity("aryadeeptade@gmail.co", GITHUB), "SANs do not match"),  # exact only
        (SignerIdentity("ARYADEEPTADE@gmail.com", GITHUB), "SANs do not match"),
        (SignerIdentity(PROD.identity, "https://accounts.google.com"), "OIDC issuer"),
        (SignerIdentity(PROD.identity, GITHUB + "/"), "OIDC issuer"),
    ],
)
def test_real_bundle_wrong_identity_or_issuer(signer: SignerIdentity, match: str) -> None:
    artifact, bundle = prod()
    with pytest.raises(SigstoreVerificationError, match=match):
        verify_blob(artifact, bundle, signer, PROD_ROOT, now=NOW)


def test_identity_pinning_is_mandatory() -> None:
    with pytest.raises(ValueError):
        SignerIdentity("", GITHUB)
    with pytest.raises(ValueError):
        SignerIdentity(PROD.identity, "")


def _tamper_sig(o: dict) -> None:
    o["messageSignature"]["signature"] = flip_b64(o["messageSignature"]["signature"], 20)


def _tamper_set(o: dict) -> None:
    promise = o["verificationMaterial"]["tlogEntries"][0]["inclusionPromise"]
    promise["signedEntryTimestamp"] = flip_b64(promise["signedEntryTimestamp"], 12)


def _tamper_proof(o: dict) -> None:
    proof = o["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    proof["hashes"][3] = flip_b64(proof["hashes"][3], 0)


def _tamper_checkpoint(o: dict) -> None:
    proof = o["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    env = proof["checkpoint"]["envelope"]
    proof["checkpoint"]["envelope"] = env.replace("2452216574\n", "2452216575\n")


def _tamper_cert(o: dict) -> None:
    cert = o["verificationMaterial"]["certificate"]
    cert["rawBytes"] = flip_b64(cert["rawBytes"], 600)  # the CA's signature no longer matches


def _tamper_time(o: dict) -> None:
    o["verificationMaterial"]["tlogEntries"][0]["integratedTime"] = "1787504521"
    o["verificationMaterial"].pop("timestampVerificationData")


@pytest.mark.parametrize(
    "tamper, match",
    [
        (_tamper_sig, "Signature is invalid"),
        (_tamper_set, "SET: invalid inclusion promise"),
        (_tamper_proof, "inclusion proof contains invalid root hash"),
        (_tamper_checkpoint, "checkpoint: invalid signature"),
        (_tamper_cert, "certificate chain"),
        (_tamper_time, "SET: invalid inclusion promise"),  # the log signed the old time
    ],
)
def test_real_bundle_tampered(tamper: Callable[[dict], None], match: str) -> None:
    artifact, bundle = prod()
    with pytest.raises(SigstoreVerificationError, match=match):
        verify_blob(artifact, edit(bundle, tamper), PROD, PROD_ROOT, now=NOW)


def _root(change: Any, base: Path = PROD_ROOT) -> OfflineTrustRoot:
    obj = json.loads(base.read_bytes())
    change(obj)
    return OfflineTrustRoot(json.dumps(obj).encode(), "edited trusted_root.json")


def test_real_bundle_trust_root_without_the_right_ca() -> None:
    artifact, bundle = prod()
    # The staging instance's root: a different Fulcio CA, Rekor and CT keys.
    with pytest.raises(SigstoreVerificationError, match="certificate chain"):
        verify_blob(artifact, bundle, PROD, STAGING_ROOT, now=NOW)
    # Production's root with only the 2021 CA left (the current one removed).
    only_old = _root(lambda o: o["certificateAuthorities"].pop(1))
    with pytest.raises(SigstoreVerificationError, match="certificate chain"):
        verify_blob(artifact, bundle, PROD, only_old, now=NOW)
    no_ca = _root(lambda o: o.update(certificateAuthorities=[]))
    with pytest.raises(SigstoreVerificationError, match="Fulcio certificates not found"):
        verify_blob(artifact, bundle, PROD, no_ca, now=NOW)


def test_real_bundle_trust_root_without_log_or_ct_key() -> None:
    artifact, bundle = prod()
    no_rekor_v1 = _root(lambda o: o["tlogs"].pop(0))
    with pytest.raises(SigstoreVerificationError, match="checkpoint"):
        verify_blob(artifact, bundle, PROD, no_rekor_v1, now=NOW)
    no_ct = _root(lambda o: o["ctlogs"].pop(1))
    with pytest.raises(SigstoreVerificationError, match="SCT"):
        verify_blob(artifact, bundle, PROD, no_ct, now=NOW)


def test_real_bundle_retired_ca_refused_by_our_check() -> None:
    """sigstore-python accepts any CA listed in the root; we also require the issuing
    CA's validFor to cover the signing time (a retired CA must not sign new manifests)."""
    from sigstore.models import Bundle
    from sigstore.verify import Verifier, policy

    artifact, bundle = prod()
    retired = _root(
        lambda o: o["certificateAuthorities"][1]["validFor"].update(end="2025-01-01T00:00:00Z")
    )
    Verifier(trusted_root=retired._root).verify_artifact(
        artifact, Bundle.from_json(bundle), policy.UnsafeNoOp()
    )
    with pytest.raises(SigstoreVerificationError, match="in force"):
        verify_blob(artifact, bundle, PROD, retired, now=NOW)


def test_real_bundle_signed_after_now() -> None:
    artifact, bundle = prod()
    before = PROD_SIGNED_AT - timedelta(minutes=6)
    with pytest.raises(SigstoreVerificationError, match="after now"):
        verify_blob(artifact, bundle, PROD, PROD_ROOT, now=before)
    verify_blob(artifact, bundle, PROD, PROD_ROOT, now=PROD_SIGNED_AT - timedelta(minutes=4))


def test_real_bundle_manifest_layer_verifies_then_refuses_to_parse() -> None:
    artifact, bundle = prod()
    with pytest.raises(DecodeError, match="signature verified, but the signed file is not"):
        verify_manifest(artifact, bundle, PROD, PROD_ROOT, NOW)
    # ...and a bad signature is reported as such, before any parsing.
    with pytest.raises(SigstoreVerificationError):
        verify_manifest(artifact, edit(bundle, _tamper_sig), PROD, PROD_ROOT, NOW)


def test_unreadable_bundle_and_trust_root() -> None:
    artifact, bundle = prod()
    with pytest.raises(DecodeError, match="not a Sigstore bundle"):
        verify_blob(artifact, b"{not json", PROD, PROD_ROOT, now=NOW)
    wrong_type = edit(bundle, lambda o: o.update(mediaType="application/json"))
    with pytest.raises(DecodeError, match="media type 'application/json'"):
        verify_blob(artifact, wrong_type, PROD, PROD_ROOT, now=NOW)
    with pytest.raises(DecodeError, match="trusted_root"):
        OfflineTrustRoot(b'{"mediaType": 3}')
    with pytest.raises(DecodeError, match="cannot read"):
        OfflineTrustRoot.from_file(V / "missing.json")


def test_core_never_imports_sigstore() -> None:
    code = (
        "import sys; import openpcc.attestation.policy, openpcc.attestation.sigstore_manifest,"
        " openpcc.attestation.cli, openpcc.cli; openpcc.cli.build_parser();"
        " assert not [m for m in sys.modules if m.split('.')[0] == 'sigstore'], 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_extra_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("sigstore", "sigstore.errors", "sigstore.models", "sigstore.verify"):
        monkeypatch.setitem(sys.modules, name, None)
    artifact, bundle = prod()
    with pytest.raises(SigstoreUnavailableError, match=r"openpcc\[sigstore\]"):
        verify_blob(artifact, bundle, PROD, PROD_ROOT, now=NOW)
    with pytest.raises(SigstoreUnavailableError):
        policy_from_sigstore(
            artifact,
            bundle,
            identity=PROD.identity,
            oidc_issuer=GITHUB,
            trust_root=PROD_ROOT,
            now=NOW,
        )


def test_cli_real_bundle(tmp_path: Path) -> None:
    art, bun = V / "new_bundle.txt", V / "new_bundle.txt.sigstore.json"
    pins = ("--identity", PROD.identity, "--oidc-issuer", GITHUB, "--trust-root", PROD_ROOT)
    args = ("release", "verify", art, "--sigstore-bundle", bun, *pins, "--at", "2026-11-01")
    rc, out = openpcc(*args)
    assert rc == 2 and "signature verified, but the signed file is not" in out["error"]
    rc, out = openpcc(*args[:-6], "--identity", "x@example.com", *pins[2:], "--at", "2026-11-01")
    assert rc == 1 and out["ok"] is False and "SANs do not match" in out["error"]
    rc, out = openpcc("release", "verify", art, "--sigstore-bundle", bun, "--identity", "x@y")
    assert rc == 2 and "--oidc-issuer, --trust-root" in out["error"]
    rc, out = openpcc("release", "verify", art)
    assert rc == 2 and "--pubkey" in out["error"]


# --- part 2: a private Sigstore instance, built here -------------------------------------------


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash over leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return _node(_mth(leaves[:k]), _mth(leaves[k:]))


def _path(index: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 audit path, lowest level first."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if index < k:
        return [*_path(index, leaves[:k]), _mth(leaves[k:])]
    return [*_path(index - k, leaves[k:]), _mth(leaves[:k])]


def _der_utf8(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 128
    return bytes([0x0C, len(raw)]) + raw


@dataclass
class PrivateSigstore:
    """A Fulcio CA + CT log + Rekor log of our own, and the trusted_root.json naming them.

    Knobs let a test break exactly one property and watch the verifier refuse it."""

    t0: datetime = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    ca_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    ct_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    rekor_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "openpcc.test"),
                x509.NameAttribute(NameOID.COMMON_NAME, "openpcc-test-fulcio"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
            .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self.ca_key, hashes.SHA384())
        )
        self.log_id = hashlib.sha256(_spki(self.rekor_key.public_key())).digest()
        self.ct_log_id = hashlib.sha256(_spki(self.ct_key.public_key())).digest()

    # --- Fulcio: a 10-minute certificate with an embedded SCT ---------------------------

    def certificate(
        self,
        key: Any,
        *,
        email: str = "release@openpcc.test",
        issuer_v1: str | None = GITHUB,
        issuer_v2: str | None = GITHUB,
        sct_key: Any = None,
        issued: datetime | None = None,
    ) -> x509.Certificate:
        issued = issued or self.t0
        serial = x509.random_serial_number()

        def build(sct_ext: x509.ExtensionType) -> x509.Certificate:
            b = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self.ca.subject)
                .public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(issued)
                .not_valid_after(issued + timedelta(minutes=10))
                .add_extension(
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                    critical=True,
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
                )
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                    critical=False,
                )
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), True)
            )
            if issuer_v1 is not None:
                oid = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1")
                b = b.add_extension(x509.UnrecognizedExtension(oid, issuer_v1.encode()), False)
            if issuer_v2 is not None:
                oid = x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.8")
                b = b.add_extension(x509.UnrecognizedExtension(oid, _der_utf8(issuer_v2)), False)
            b = b.add_extension(sct_ext, critical=False)
            return b.sign(self.ca_key, hashes.SHA384())

        sct_oid = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
        # The SCT signs the precertificate TBS (the final TBS minus the SCT extension),
        # which does not depend on the SCT itself: build once with a placeholder.
        precert = build(x509.UnrecognizedExtension(sct_oid, b"\x04\x02\x00\x00"))
        tbs = precert.tbs_precertificate_bytes
        ts = int(issued.timestamp() * 1000) + 500
        issuer_key_hash = hashlib.sha256(_spki(self.ca_key.public_key())).digest()
        signed = (
            bytes([0, 0])  # v1, certificate_timestamp
            + ts.to_bytes(8, "big")
            + (1).to_bytes(2, "big")  # precert_entry
            + issuer_key_hash
            + len(tbs).to_bytes(3, "big")
            + tbs
            + (0).to_bytes(2, "big")  # no extensions
        )
        sig = (sct_key or self.ct_key).sign(signed, ec.ECDSA(hashes.SHA256()))
        sct = (
            bytes([0])
            + self.ct_log_id
            + ts.to_bytes(8, "big")
            + (0).to_bytes(2, "big")
            + bytes([4, 3])  # sha256, ecdsa
            + len(sig).to_bytes(2, "big")
            + sig
        )
        sct_list = len(sct).to_bytes(2, "big") + sct
        sct_list = len(sct_list).to_bytes(2, "big") + sct_list
        assert len(sct_list) < 128
        ext = x509.UnrecognizedExtension(sct_oid, bytes([0x04, len(sct_list)]) + sct_list)
        return build(ext)

    # --- Rekor: a hashedrekord entry in a small tree, checkpoint and SET ---------------

    def bundle(
        self,
        artifact: bytes,
        *,
        signing_key: Any = None,
        cert: x509.Certificate | None = None,
        integrated: datetime | None = None,
        checkpoint_key: Any = None,
        set_key: Any = None,
        index: int = 5,
        size: int = 7,
    ) -> bytes:
        signing_key = signing_key or ec.generate_private_key(ec.SECP256R1())
        cert = cert or self.certificate(signing_key)
        integrated = integrated or self.t0 + timedelta(seconds=30)
        sig = signing_key.sign(artifact, ec.ECDSA(hashes.SHA256()))
        digest = hashlib.sha256(artifact).digest()
        pem = cert.public_bytes(serialization.Encoding.PEM)
        body = json.dumps(
            {
                "apiVersion": "0.0.1",
                "kind": "hashedrekord",
                "spec": {
                    "data": {"hash": {"algorithm": "sha256", "value": digest.hex()}},
                    "signature": {"content": _b64(sig), "publicKey": {"content": _b64(pem)}},
                },
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        leaves = [_leaf_hash(b"other entry %d" % i) for i in range(size)]
        leaves[index] = _leaf_hash(body)
        root = _mth(leaves)
        note = f"rekor.openpcc.test - 42\n{size}\n{_b64(root)}\n"
        cp_sig = (checkpoint_key or self.rekor_key).sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        envelope = f"{note}\n\u2014 rekor.openpcc.test {_b64(self.log_id[:4] + cp_sig)}\n"
        import rfc8785

        set_payload = rfc8785.dumps(
            {
                "body": _b64(body),
                "integratedTime": int(integrated.timestamp()),
                "logID": self.log_id.hex(),
                "logIndex": index,
            }
        )
        set_sig = (set_key or self.rekor_key).sign(set_payload, ec.ECDSA(hashes.SHA256()))
        entry = {
            "logIndex": str(index),
            "logId": {"keyId": _b64(self.log_id)},
            "kindVersion": {"kind": "hashedrekord", "version": "0.0.1"},
            "integratedTime": str(int(integrated.timestamp())),
            "inclusionPromise": {"signedEntryTimestamp": _b64(set_sig)},
            "inclusionProof": {
                "logIndex": str(index),
                "rootHash": _b64(root),
                "treeSize": str(size),
                "hashes": [_b64(h) for h in _path(index, leaves)],
                "checkpoint": {"envelope": envelope},
            },
            "canonicalizedBody": _b64(body),
        }
        return json.dumps(
            {
                "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                "verificationMaterial": {
                    "certificate": {
                        "rawBytes": _b64(cert.public_bytes(serialization.Encoding.DER))
                    },
                    "tlogEntries": [entry],
                },
                "messageSignature": {
                    "messageDigest": {"algorithm": "SHA2_256", "digest": _b64(digest)},
                    "signature": _b64(sig),
                },
            },
            indent=1,
        ).encode()

    def trusted_root(self, *, ca_valid_for: dict | None = None) -> bytes:
        since = {"start": "2020-01-01T00:00:00Z"}

        def key(k: Any) -> dict:
            return {
                "rawBytes": _b64(_spki(k.public_key())),
                "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                "validFor": since,
            }

        return json.dumps(
            {
                "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
                "tlogs": [
                    {
                        "baseUrl": "https://rekor.openpcc.test",
                        "hashAlgorithm": "SHA2_256",
                        "publicKey": key(self.rekor_key),
                        "logId": {"keyId": _b64(self.log_id)},
                    }
                ],
                "certificateAuthorities": [
                    {
                        "subject": {"organization": "openpcc.test", "commonName": "openpcc-test"},
                        "uri": "https://fulcio.openpcc.test",
                        "certChain": {
                            "certificates": [
                                {"rawBytes": _b64(self.ca.public_bytes(serialization.Encoding.DER))}
                            ]
                        },
                        "validFor": ca_valid_for or since,
                    }
                ],
                "ctlogs": [
                    {
                        "baseUrl": "https://ctfe.openpcc.test",
                        "hashAlgorithm": "SHA2_256",
                        "publicKey": key(self.ct_key),
                        "logId": {"keyId": _b64(self.ct_log_id)},
                    }
                ],
                "timestampAuthorities": [],
            },
            indent=1,
        ).encode()


SIGNER = SignerIdentity("release@openpcc.test", GITHUB)
T0 = PrivateSigstore.t0
AT = T0 + timedelta(hours=1)


def release_manifest(serial: int = 3) -> bytes:
    obj = {
        "format": MANIFEST_FORMAT,
        "serial": serial,
        "issued_at": int(T0.timestamp()) - 60,
        "expires_at": int(T0.timestamp()) + 30 * 86400,
        "releases": {
            "openpcc-2026.6.0": {
                "model_digests": ["11" * 32],
                "snp": {"measurements": ["22" * 48]},
            }
        },
        "gpu": {"require": False, "require_ocsp": False},
        "ohttp_key_configs": ["sha256:" + "33" * 32],
        "token_key_ids": ["44" * 32],
    }
    return json.dumps(obj, indent=2).encode() + b"\n"


@pytest.fixture(scope="module")
def instance() -> PrivateSigstore:
    require_module("sigstore")
    return PrivateSigstore()


@pytest.fixture(scope="module")
def published(
    instance: PrivateSigstore, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """What an operator publishes: manifest.json, its .sigstore.json, the trust root."""
    d = tmp_path_factory.mktemp("sigstore-release")
    manifest = release_manifest()
    files = {
        "manifest": d / "manifest.json",
        "bundle": d / "manifest.json.sigstore.json",
        "root": d / "trusted_root.json",
    }
    files["manifest"].write_bytes(manifest)
    files["bundle"].write_bytes(instance.bundle(manifest))
    files["root"].write_bytes(instance.trusted_root())
    return files


def test_private_instance_manifest_end_to_end(
    instance: PrivateSigstore, published: dict[str, Path]
) -> None:
    manifest, bundle = published["manifest"].read_bytes(), published["bundle"].read_bytes()
    got = verify_manifest(manifest, bundle, SIGNER, published["root"], AT)
    assert got.signature.time_sources == ("transparency_service",)
    assert got.signature.signed_at == T0 + timedelta(seconds=30)
    assert got.signature.log_index == 5
    # The same TrustPolicy as the Ed25519 path, so client/policy code is unchanged.
    key = ed25519.Ed25519PrivateKey.generate()
    ed = TrustPolicy.from_signed(
        SignedManifest.sign(manifest, key).encode(), [key.public_key()], AT
    )
    assert got.policy.manifest == ed.manifest == Manifest.parse(manifest)
    assert got.policy.key_id == "sigstore:release@openpcc.test"
    assert got.policy.accepts_model("openpcc-2026.6.0", bytes.fromhex("11" * 32))
    assert got.policy.snp_policy("openpcc-2026.6.0").measurements == {bytes.fromhex("22" * 48)}
    again = policy_from_sigstore(
        manifest,
        bundle,
        identity=SIGNER.identity,
        oidc_issuer=GITHUB,
        trust_root=published["root"],
        now=AT,
    )
    assert again.manifest == got.policy.manifest


def test_private_instance_manifest_window_and_serial(published: dict[str, Path]) -> None:
    manifest, bundle = published["manifest"].read_bytes(), published["bundle"].read_bytes()
    root = published["root"]
    with pytest.raises(VerificationError, match="expired"):
        verify_manifest(manifest, bundle, SIGNER, root, T0 + timedelta(days=31))
    with pytest.raises(VerificationError, match="rollback"):
        verify_manifest(manifest, bundle, SIGNER, root, AT, min_serial=4)
    verify_manifest(manifest, bundle, SIGNER, root, AT, min_serial=3)
    # The log says it was signed at T0+30s: a clock before that is refused.
    with pytest.raises(SigstoreVerificationError, match="after now"):
        verify_manifest(manifest, bundle, SIGNER, root, T0 - timedelta(minutes=10))


def test_private_instance_tampered_manifest(published: dict[str, Path]) -> None:
    manifest, bundle = published["manifest"].read_bytes(), published["bundle"].read_bytes()
    for bad in (
        manifest.replace(b'"serial": 3', b'"serial": 9'),
        manifest + b" ",
        manifest.replace(b"11", b"12", 1),
    ):
        with pytest.raises(SigstoreVerificationError):
            verify_manifest(bad, bundle, SIGNER, published["root"], AT)


def test_private_instance_wrong_pins(published: dict[str, Path]) -> None:
    manifest, bundle = published["manifest"].read_bytes(), published["bundle"].read_bytes()
    for signer in (
        SignerIdentity("attacker@openpcc.test", GITHUB),
        SignerIdentity(SIGNER.identity, "https://token.actions.githubusercontent.com"),
    ):
        with pytest.raises(SigstoreVerificationError):
            verify_manifest(manifest, bundle, signer, published["root"], AT)
    other = PrivateSigstore()  # same shape, other keys: not our trust root
    with pytest.raises(SigstoreVerificationError):
        verify_manifest(manifest, bundle, SIGNER, OfflineTrustRoot(other.trusted_root()), AT)


def _refused(instance: PrivateSigstore, bundle: bytes, match: str, **root: Any) -> None:
    manifest = release_manifest()
    trust = OfflineTrustRoot(instance.trusted_root(**root))
    with pytest.raises(SigstoreVerificationError, match=match):
        verify_manifest(manifest, bundle, SIGNER, trust, AT)


def test_private_instance_each_component_matters(instance: PrivateSigstore) -> None:
    manifest = release_manifest()
    stranger = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    # The baseline the broken variants below differ from by one thing each.
    ok = OfflineTrustRoot(instance.trusted_root())
    verify_manifest(manifest, instance.bundle(manifest, signing_key=key), SIGNER, ok, AT)
    # SCT from a CT log the root does not name.
    cert = instance.certificate(key, sct_key=stranger)
    _refused(instance, instance.bundle(manifest, signing_key=key, cert=cert), "SCT")
    # Checkpoint or SET signed by a key other than the log's.
    _refused(instance, instance.bundle(manifest, checkpoint_key=stranger), "checkpoint")
    _refused(instance, instance.bundle(manifest, set_key=stranger), "inclusion promise")
    # Integrated after the 10-minute certificate expired.
    late = instance.bundle(manifest, integrated=T0 + timedelta(minutes=11))
    _refused(instance, late, "certificate chain|expired")
    # Signature by a key other than the certificate's.
    cert = instance.certificate(key)
    _refused(
        instance, instance.bundle(manifest, signing_key=stranger, cert=cert), "Signature is invalid"
    )
    # The CA retired (validFor.end) before the signing time.
    retired = {"start": "2020-01-01T00:00:00Z", "end": "2026-05-01T00:00:00Z"}
    _refused(instance, instance.bundle(manifest), "in force", ca_valid_for=retired)


def test_private_instance_oidc_issuer_extensions(instance: PrivateSigstore) -> None:
    """Fulcio writes the issuer twice (.1.1 raw, .1.8 DER UTF8String): either alone is
    accepted, disagreeing values or none are refused."""
    manifest, ok = release_manifest(), OfflineTrustRoot(instance.trusted_root())
    for v1, v2, accepted in (
        (None, GITHUB, True),
        (GITHUB, None, True),
        (GITHUB, "https://evil.example", False),
        ("https://evil.example", GITHUB, False),
        (None, None, False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = instance.certificate(key, issuer_v1=v1, issuer_v2=v2)
        bundle = instance.bundle(manifest, signing_key=key, cert=cert)
        if accepted:
            verify_manifest(manifest, bundle, SIGNER, ok, AT)
        else:
            with pytest.raises(SigstoreVerificationError, match="OIDC issuer"):
                verify_manifest(manifest, bundle, SIGNER, ok, AT)


def test_private_instance_client_config(published: dict[str, Path]) -> None:
    cfg = {
        "policy": str(published["manifest"]),
        "sigstore": {
            "bundle": str(published["bundle"]),
            "identity": SIGNER.identity,
            "oidc_issuer": GITHUB,
            "trust_root": str(published["root"]),
        },
    }
    policy = policy_from_client_config(cfg, AT)
    assert policy.manifest == Manifest.parse(published["manifest"].read_bytes())
    wrong = copy.deepcopy(cfg)
    wrong["sigstore"]["identity"] = "attacker@openpcc.test"
    with pytest.raises(VerificationError):
        policy_from_client_config(wrong, AT)
    with pytest.raises(DecodeError, match="not both"):
        policy_from_client_config({**cfg, "release_pubkey": "x.pem"}, AT)
    with pytest.raises(DecodeError):
        policy_from_client_config({**cfg, "sigstore": {"bundle": "b"}}, AT)


def test_private_instance_cli(published: dict[str, Path], tmp_path: Path) -> None:
    pins = ("--identity", SIGNER.identity, "--oidc-issuer", GITHUB, "--trust-root")
    args = ("release", "verify", published["manifest"], "--sigstore-bundle", published["bundle"])
    at = ("--at", AT.isoformat())
    rc, out = openpcc(*args, *pins, published["root"], *at)
    assert rc == 0 and out["ok"] is True, out
    assert out["releases"] == ["openpcc-2026.6.0"] and out["serial"] == 3
    assert out["key_id"] == "sigstore:release@openpcc.test"
    assert out["sigstore"]["identity"] == SIGNER.identity
    assert out["sigstore"]["signed_at"] == (T0 + timedelta(seconds=30)).isoformat()
    rc, out = openpcc(*args, *pins, published["root"], *at, "--min-serial", "4")
    assert rc == 1 and "rollback" in out["error"]
    rc, out = openpcc(*args, *pins, published["root"], "--at", "2026-08-01")
    assert rc == 1 and "expired" in out["error"]
    other = tmp_path / "other_root.json"
    other.write_bytes(PrivateSigstore().trusted_root())
    rc, out = openpcc(*args, *pins, other, *at)
    assert rc == 1 and out["ok"] is False
    rc, out = openpcc(*args, *pins, published["root"], *at, "--pubkey", "k.pem")
    assert rc == 2 and "exclude" in out["error"]

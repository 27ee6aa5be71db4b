"""What a gateway under test needs to admit nodes, and what a test node needs to be admitted.

A gateway lists a node only with a credential, at a loopback URL, with a bundle that
verifies under a signed release manifest, signed by the bundle's own key
(openpcc/admission.py). The test nodes are real in all of that: a simulated TEE (the one
the dev stack uses) issues their reports, and they sign every registration.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.admission import CredentialStore, sign_registration
from openpcc.attestation.bundle import make_simulated_bundle
from openpcc.attestation.claims import Claims
from openpcc.attestation.policy import SignedManifest, load_release_private_key
from openpcc.attestation.simulated import SimulatedTEE, simulated_measurement

RELEASE = "dev"
MODEL_DIGEST = hashlib.sha256(b"openpcc test model").digest()


def simulated_tee(folder: Path) -> SimulatedTEE:
    """One simulated TEE per folder (made once, loaded after)."""
    if (folder / "dev-root.pem").exists():
        return SimulatedTEE.load(folder)
    return SimulatedTEE.create(folder)


def publish_policy(
    folder: Path,
    tee: SimulatedTEE,
    *,
    serial: int | None = None,
    expires_in: int = 86400,
    model_digests: tuple[bytes, ...] = (MODEL_DIGEST,),
) -> tuple[Path, Path]:
    """A signed manifest trusting ``tee``'s development root for release ``dev``; returns
    (policy file, release public key PEM). The same release key is reused per folder."""
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    key_pem = folder / "release-key.pem"
    if not key_pem.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (folder / "release-key.pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    key = load_release_private_key(key_pem.read_bytes())
    now = int(time.time())
    manifest = {
        "format": "openpcc-release-manifest/1",
        "serial": serial if serial is not None else time.time_ns() // 1000,
        "issued_at": now - 60,
        "expires_at": now + expires_in,
        "releases": {
            RELEASE: {
                "model_digests": [d.hex() for d in model_digests],
                "snp": {"measurements": [simulated_measurement(RELEASE).hex()]},
            }
        },
        "gpu": {"require": False, "require_ocsp": False},
        "development_roots": [tee.root_fingerprint],
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    signed = SignedManifest.sign(json.dumps(manifest).encode(), key)
    path = folder / "trust-policy.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(signed.encode())
    tmp.replace(path)
    return path, folder / "release-key.pub.pem"


def gateway_admission_args(policy: Path, pubkey: Path) -> list[str]:
    return ["--trust-policy", str(policy), "--release-pubkey", str(pubkey),
            "--node-network", "127.0.0.0/8"]  # fmt: skip


def issue_credential(state: Path, name: str = "test", max_nodes: int = 64) -> str:
    """A credential in the gateway state folder ``state`` (as `gateway credentials add`)."""
    store = CredentialStore(state / "node-credentials.json")
    if name in store.current():
        store.revoke(name)
    return store.add(name, max_nodes).token


class AttestedIdentity:
    """A test node's attested self: per-boot signing key, claims and simulated bundle."""

    def __init__(
        self,
        tee: SimulatedTEE,
        node_id: bytes,
        public_key: bytes,
        pq_public_key: bytes | None = None,
    ) -> None:
        self.node_id = node_id
        self.public_key = public_key
        self.key = ed25519.Ed25519PrivateKey.generate()
        now = int(time.time())
        self.claims = Claims(
            node_id=node_id.hex(),
            hpke_public_key=public_key,
            tee="simulated-snp",
            gpu_evidence_digest=None,
            model_digest=MODEL_DIGEST,
            release_id=RELEASE,
            issued_at=now - 5,
            expires_at=now + 3600,
            signing_key=self.key.public_key().public_bytes_raw(),
            pq_public_key=pq_public_key,
        )
        self.bundle = make_simulated_bundle(
            tee, self.claims, simulated_measurement(RELEASE)
        ).to_json_obj()

    def document(self, url: str, models: list[str]) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex(),
            "url": url,
            "public_key": self.public_key.hex(),
            "models": models,
            "bundle": self.bundle,
        }

    def signed(self, doc: dict[str, Any], now: float | None = None) -> tuple[bytes, str]:
        """(body, OpenPCC-Node-Signature value)."""
        body = json.dumps(doc, separators=(",", ":")).encode()
        return body, sign_registration(self.key, body, now)

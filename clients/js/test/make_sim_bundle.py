"""Fixture for attestation.test.js: a simulated-TEE node entry and signed manifests (JSON)."""

import json
import sys
import tempfile
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.attestation.bundle import make_simulated_bundle
from openpcc.attestation.claims import Claims
from openpcc.attestation.policy import SignedManifest
from openpcc.attestation.simulated import SimulatedTEE, simulated_measurement

now = int(time.time())
tee = SimulatedTEE.create(tempfile.mkdtemp())
node_key = bytes(range(32))
claims = Claims(
    "00112233445566778899aabbccddeeff",
    node_key,
    "simulated-snp",
    None,
    bytes(32),
    "dev",
    now - 10,
    now + 3600,
    bytes(range(32, 64)),
)
DEV_MEASUREMENT = simulated_measurement("dev").hex()
bundle = make_simulated_bundle(tee, claims, simulated_measurement("dev"))
entry = {
    "node_id": claims.node_id,
    "public_key": node_key.hex(),
    "key_id": "00" * 8,
    "models": ["m"],
    "bundle": bundle.to_json_obj(),
}
key = ed25519.Ed25519PrivateKey.generate()


def manifest(
    dev_roots: list[str],
    measurement: str = DEV_MEASUREMENT,
    serial: int = now,
    expires_at: int = now + 86400,
) -> str:
    m = {
        "format": "openpcc-release-manifest/1",
        "serial": serial,
        "issued_at": now - 60,
        "expires_at": expires_at,
        "releases": {"dev": {"model_digests": ["00" * 32], "snp": {"measurements": [measurement]}}},
        "gpu": {"require": False, "require_ocsp": False},
        "development_roots": dev_roots,
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    return SignedManifest.sign(json.dumps(m).encode(), key).encode().decode()


json.dump(
    {
        "entry": entry,
        "now": now,
        "signed": manifest([tee.root_fingerprint]),
        "signed_no_dev_root": manifest([]),
        "signed_other_measurement": manifest([tee.root_fingerprint], "11" * 48),
        # Expires long before the node's claims (an hour): trust must end with it.
        "signed_expiring": manifest([tee.root_fingerprint], expires_at=now + 60),
        "signed_older": manifest([tee.root_fingerprint], serial=now - 5),
        "release_pubkey_pem": key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    },
    sys.stdout,
)

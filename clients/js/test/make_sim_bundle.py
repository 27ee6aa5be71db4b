"""Fixture for the JS tests: simulated-TEE node entries (one with an X-Wing key, one
X25519-only) and signed manifests (JSON)."""

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
from openpcc.wire import hpke

now = int(time.time())
tee = SimulatedTEE.create(tempfile.mkdtemp())
node_key = bytes(range(32))
# The node's X-Wing key (sealed requests v2), from a fixed seed; the legacy entry has none.
pq_key = hpke.public_key_from_private(bytes([0xB0]) * 32, kem_id=hpke.KEM_XWING)
DEV_MEASUREMENT = simulated_measurement("dev").hex()


def node_entry(node_id: str, pq_public_key: bytes | None) -> dict[str, object]:
    claims = Claims(
        node_id,
        node_key,
        "simulated-snp",
        None,
        bytes(32),
        "dev",
        now - 10,
        now + 3600,
        bytes(range(32, 64)),
        pq_public_key,
    )
    bundle = make_simulated_bundle(tee, claims, simulated_measurement("dev"))
    return {
        "node_id": claims.node_id,
        "public_key": node_key.hex(),
        "key_id": "00" * 8,
        "models": ["m"],
        "bundle": bundle.to_json_obj(),
    }


entry = node_entry("00112233445566778899aabbccddeeff", pq_key)
entry_x25519 = node_entry("ffeeddccbbaa99887766554433221100", None)
key = ed25519.Ed25519PrivateKey.generate()


def manifest(
    dev_roots: list[str],
    measurement: str = DEV_MEASUREMENT,
    serial: int = now,
    expires_at: int = now + 86400,
    post_quantum: dict[str, bool] | None = None,
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
        **({} if post_quantum is None else {"post_quantum": post_quantum}),
    }
    return SignedManifest.sign(json.dumps(m).encode(), key).encode().decode()


json.dump(
    {
        "entry": entry,
        "entry_x25519": entry_x25519,
        "pq_public_key": pq_key.hex(),
        "now": now,
        "signed": manifest([tee.root_fingerprint]),
        "signed_no_dev_root": manifest([]),
        "signed_other_measurement": manifest([tee.root_fingerprint], "11" * 48),
        # Expires long before the node's claims (an hour): trust must end with it.
        "signed_expiring": manifest([tee.root_fingerprint], expires_at=now + 60),
        "signed_older": manifest([tee.root_fingerprint], serial=now - 5),
        "signed_pq_required": manifest([tee.root_fingerprint], post_quantum={"require": True}),
        "release_pubkey_pem": key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    },
    sys.stdout,
)

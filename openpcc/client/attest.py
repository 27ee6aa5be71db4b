"""The client's node verifier: a directory entry is usable only if its bundle verifies.

The node's HPKE keys (X25519, and X-Wing when attested) and id are taken from the claims
the TEE signed, never from the gateway's directory fields (which only have to agree with
them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from openpcc.attestation.bundle import AttestationBundle, verify_bundle
from openpcc.attestation.policy import TrustPolicy
from openpcc.client.client import VerifiedNode
from openpcc.errors import DecodeError, VerificationError
from openpcc.wire.sealed import NODE_ID_LEN


class BundleVerifier:
    """Verify ``GET /v1/nodes`` entries against a trust policy (required: no policy, no trust)."""

    def __init__(self, policy: TrustPolicy) -> None:
        self.policy = policy

    def __call__(self, entry: dict[str, Any], now: datetime) -> VerifiedNode:
        self.policy.check_current(now)  # an expired manifest trusts nothing any more
        try:
            bundle = AttestationBundle.from_json_obj(entry["bundle"])
            listed_key = bytes.fromhex(entry["public_key"])
            listed_id = bytes.fromhex(entry["node_id"])
            models = tuple(str(m) for m in entry.get("models", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise DecodeError(f"malformed directory entry: {exc}") from exc
        verdict = verify_bundle(bundle, policy=self.policy, now=now, expected_node_key=listed_key)
        claims = bundle.claims
        try:
            claimed_id = bytes.fromhex(claims.node_id)
        except ValueError:
            claimed_id = b""
        if claimed_id != listed_id or len(claimed_id) != NODE_ID_LEN:
            verdict.add("node_id", False, "directory node id differs from the attested one")
        if not verdict.ok:
            raise VerificationError("; ".join(f"{c.name}: {c.detail}" for c in verdict.failures()))
        # Trusted until the claims or the manifest that admitted them expire, whichever is
        # first: the client's cache of verdicts must not outlive the manifest.
        until = min(float(claims.expires_at), self.policy.valid_until)
        return VerifiedNode(
            claimed_id,
            claims.hpke_public_key,
            models,
            until,
            release_id=claims.release_id,
            pq_public_key=claims.pq_public_key,
        )

"""The node's one evidence interface: claims in, attestation bundle out.

The node commits to its HPKE public key, model and release in a claims document and
asks its TEE for a report binding ``report_data_for(claims)``. Where the report comes
from (the simulated TEE on a development machine, configfs-tsm on real SNP/TDX
hardware) is the attestation module's business; the node only calls
:meth:`EvidenceSource.bundle`. Adding a real provider means adding a branch to
:func:`open_source`, nothing else in the node changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from openpcc.attestation.claims import Claims
from openpcc.attestation.simulated import simulated_measurement

TEE_CHOICES = ("simulated",)
DEFAULT_LIFETIME = 3600


class EvidenceSource(Protocol):
    """Something that turns claims into a bundle a client can verify offline."""

    tee: str  # the claims' ``tee`` value

    def bundle(self, claims: Claims) -> dict[str, Any]: ...


@dataclass
class ProviderSource:
    """Any attestation-module :class:`~openpcc.attestation.providers.TeeProvider`, run
    through :func:`~openpcc.attestation.providers.collect_bundle` (claims -> REPORT_DATA
    -> report -> bundle). The simulated TEE is one such provider; real ones are others."""

    provider: Any  # openpcc.attestation.providers.TeeProvider
    tee: str
    root_fingerprint: str | None = None  # development root, for the simulated TEE only

    def bundle(self, claims: Claims) -> dict[str, Any]:
        from openpcc.attestation.providers import collect_bundle

        return collect_bundle(self.provider, claims).to_json_obj()


def _simulated(tee_dir: Path, measurement: bytes) -> ProviderSource:
    from openpcc.attestation.providers import SimulatedProvider
    from openpcc.attestation.simulated import ROOT_FILE, SimulatedTEE

    if (tee_dir / ROOT_FILE).exists():
        tee = SimulatedTEE.load(tee_dir)
    else:
        tee = SimulatedTEE.create(tee_dir)
    provider = SimulatedProvider(tee, measurement)
    return ProviderSource(provider, "simulated-snp", tee.root_fingerprint)


def open_source(
    tee: str, tee_dir: Path, *, release_id: str, measurement: bytes | None = None
) -> EvidenceSource:
    """The evidence source named by ``--tee`` (only ``simulated`` so far).

    ``measurement`` (48 bytes) overrides the simulated launch measurement, which is
    otherwise :func:`simulated_measurement` of the release id.
    """
    if tee == "simulated":
        m = simulated_measurement(release_id) if measurement is None else measurement
        if len(m) != 48:
            raise ValueError("the simulated measurement must be 48 bytes (96 hex characters)")
        return _simulated(tee_dir, m)
    raise ValueError(f"unknown TEE {tee!r}; choose from {', '.join(TEE_CHOICES)}")


def make_claims(
    *,
    node_id: str,
    public_key: bytes,
    tee: str,
    model_digest: bytes,
    release_id: str,
    lifetime: int = DEFAULT_LIFETIME,
    now: float | None = None,
) -> Claims:
    """Fresh claims for the current key; no GPU evidence yet (``gpu_evidence_digest`` None)."""
    issued = int(time.time() if now is None else now)
    return Claims(
        node_id=node_id,
        hpke_public_key=public_key,
        tee=tee,
        gpu_evidence_digest=None,
        model_digest=model_digest,
        release_id=release_id,
        issued_at=issued,
        expires_at=issued + lifetime,
    )

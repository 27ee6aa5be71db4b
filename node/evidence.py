"""The node's one evidence interface: claims in, attestation bundle out.

The node commits to its HPKE public key, model and release in a claims document and
asks its TEE for a report binding ``report_data_for(claims)``. Where the report comes
from (the simulated TEE on a development machine, configfs-tsm or /dev/sev-guest on real
SNP/TDX hardware, see :mod:`openpcc.attestation.providers`) is chosen once, by
:func:`open_source`; the node only calls :meth:`EvidenceSource.bundle`.

Hardware sources never fall back to the simulator: no TEE means a typed
:class:`EvidenceError` whose message says what to fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from openpcc.attestation.bundle import MAX_GPU_ITEM_SIZE, MAX_GPU_ITEMS, MAX_GPUS
from openpcc.attestation.claims import Claims
from openpcc.attestation.providers import (
    SEV_GUEST_DEVICE,
    TSM_PROVIDERS,
    TSM_REPORT_ROOT,
    ConfigfsTsmProvider,
    OsFs,
    ProviderError,
    SevGuestDeviceProvider,
)
from openpcc.attestation.simulated import simulated_measurement

TEE_CHOICES = ("simulated", "auto", "configfs-tsm", "sev-guest")
GPU_CHOICES = ("none", "nvml")
DEFAULT_LIFETIME = 3600
_SNP_ENDORSEMENT_KEYS = ("vcek", "vlek", "ask_ark")
_TDX_ENDORSEMENT_KEYS = ("collateral",)


class EvidenceError(ProviderError):
    """This machine cannot produce the evidence the node was asked for; the message is
    one line saying what to change (device, kernel, driver, flags, endorsement files)."""


class EvidenceSource(Protocol):
    """Something that turns claims into a bundle a client can verify offline."""

    tee: str  # the claims' ``tee`` value

    def bundle(self, claims: Claims) -> dict[str, Any]: ...


class _NodeGpu:
    """NVML behind collect_bundle, with errors turned into actionable EvidenceErrors."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def collect(self, nonce: bytes) -> list[Any]:
        try:
            gpus = self.provider.collect(nonce)
        except ProviderError as e:
            raise EvidenceError(
                f"GPU evidence (--gpu nvml): {e}; the node needs the NVIDIA driver, a GPU in "
                "confidential-computing mode, or --gpu none on a machine without GPUs"
            ) from e
        if not gpus:
            raise EvidenceError("--gpu nvml, but NVML sees no GPU (use --gpu none without GPUs)")
        return list(gpus)


def _read_small(path: Path, what: str, limit: int) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvidenceError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > limit:
        raise EvidenceError(f"{what} {path} is larger than {limit} bytes")
    return data


def load_endorsements(path: Path, tee: str) -> dict[str, Any]:
    """The operator's endorsements file: a JSON object with the keys the verifier reads
    for ``tee`` (SNP: vcek|vlek PEM, optional ask_ark PEM; TDX: collateral object)."""
    raw = _read_small(path, "--endorsements", 1 << 20)
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise EvidenceError(f"--endorsements {path} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise EvidenceError(f"--endorsements {path} must hold a JSON object")
    allowed = _TDX_ENDORSEMENT_KEYS if tee == "tdx" else _SNP_ENDORSEMENT_KEYS
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise EvidenceError(
            f"--endorsements {path}: keys {unknown} do not apply to {tee} "
            f"(allowed: {', '.join(allowed)})"
        )
    for k, v in value.items():
        ok = isinstance(v, dict) if k == "collateral" else isinstance(v, str)
        if not ok:
            kind = "a JSON object" if k == "collateral" else "PEM text"
            raise EvidenceError(f"--endorsements {path}: {k} must be {kind}")
    return value


@dataclass
class ProviderSource:
    """Any attestation-module :class:`~openpcc.attestation.providers.TeeProvider`, run
    through :func:`~openpcc.attestation.providers.collect_bundle` (claims -> GPU evidence
    -> REPORT_DATA -> report -> bundle).

    Endorsement, RIM and OCSP files are read again for every bundle, so a timer that
    refreshes them (OCSP responses and TDX collateral expire) needs no node restart.
    """

    provider: Any  # openpcc.attestation.providers.TeeProvider
    tee: str
    root_fingerprint: str | None = None  # development root, for the simulated TEE only
    gpu: Any = None  # openpcc.attestation.providers.NvmlGpuProvider
    gpu_rims: tuple[Path, ...] = ()
    gpu_ocsp: tuple[Path, ...] = ()
    endorsements: Path | None = None

    def bundle(self, claims: Claims) -> dict[str, Any]:
        from openpcc.attestation.providers import collect_bundle

        extra = None
        if self.endorsements is not None:
            extra = load_endorsements(self.endorsements, self.tee)
        gpu = None if self.gpu is None else _NodeGpu(self.gpu)
        rims = [_read_small(p, "--gpu-rim", MAX_GPU_ITEM_SIZE) for p in self.gpu_rims]
        ocsp = [_read_small(p, "--gpu-ocsp", MAX_GPU_ITEM_SIZE) for p in self.gpu_ocsp]
        # collect_bundle pairs gpu_extras[i] with GPU i: the same files go to every GPU.
        extras = [(rims, ocsp)] * MAX_GPUS if (rims or ocsp) else []
        try:
            b = collect_bundle(
                self.provider, claims, gpu=gpu, gpu_extras=extras, endorsements=extra
            )
        except EvidenceError:
            raise
        except ProviderError as e:
            raise EvidenceError(f"TEE evidence ({self.provider.name}): {e}") from e
        except ValueError as e:  # EncodeError: the bundle's shape (e.g. no VCEK/VLEK)
            hint = ""
            if self.tee == "sev-snp":
                hint = (
                    "; this platform handed out no VCEK/VLEK: give --endorsements FILE with "
                    '{"vcek": PEM} or {"vlek": PEM} (and "ask_ark")'
                )
            raise EvidenceError(f"cannot build the bundle: {e}{hint}") from e
        return b.to_json_obj()


def _simulated(tee_dir: Path, measurement: bytes) -> ProviderSource:
    from openpcc.attestation.providers import SimulatedProvider
    from openpcc.attestation.simulated import ROOT_FILE, SimulatedTEE

    if (tee_dir / ROOT_FILE).exists():
        tee = SimulatedTEE.load(tee_dir)
    else:
        tee = SimulatedTEE.create(tee_dir)
    provider = SimulatedProvider(tee, measurement)
    return ProviderSource(provider, "simulated-snp", tee.root_fingerprint)


def tsm_tee(provider: ConfigfsTsmProvider) -> str:
    """The claims' ``tee`` for a configfs-tsm provider, read before any claims exist.

    An entry's ``provider`` attribute names the TEE without generating a report, so a
    probe entry (created and removed again) tells us what get_evidence will return.
    """
    entry = provider.root / f"openpcc-probe-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        provider.fs.mkdir(entry)
    except OSError as e:
        raise EvidenceError(
            f"cannot create a configfs-tsm report entry in {provider.root}: "
            f"{e.strerror or e} (the node needs write access there)"
        ) from e
    try:
        name = provider.fs.read(entry / "provider").decode("ascii", "replace").strip()
    except OSError as e:
        raise EvidenceError(f"cannot read the configfs-tsm provider: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(OSError):
            provider.fs.rmdir(entry)
    tee = TSM_PROVIDERS.get(name)
    if tee is None:
        raise EvidenceError(
            f"configfs-tsm provider {name!r} is not supported "
            f"(supported: {', '.join(sorted(TSM_PROVIDERS))})"
        )
    return tee


def _hardware(
    tee: str,
    *,
    tsm_root: str | os.PathLike[str],
    sev_guest: str | os.PathLike[str],
    fs: OsFs | None,
    ioctl: Callable[..., Any] | None,
) -> tuple[Any, str]:
    """(provider, claims tee) for ``auto``, ``configfs-tsm`` or ``sev-guest``."""
    tsm = ConfigfsTsmProvider(tsm_root, fs=fs)
    if tee == "configfs-tsm" or (tee == "auto" and tsm.available()):
        if not tsm.available():
            raise EvidenceError(
                f"--tee configfs-tsm: {tsm_root} does not exist (needs Linux 6.7+ in an "
                "SEV-SNP or TDX guest with configfs mounted at /sys/kernel/config)"
            )
        return tsm, tsm_tee(tsm)
    if tee in ("sev-guest", "auto"):
        if not Path(sev_guest).exists():
            if tee == "auto":
                raise EvidenceError(
                    f"--tee auto: no TEE found (neither {tsm_root} nor {sev_guest}); "
                    "this is not an SEV-SNP/TDX guest (development machines use --tee simulated)"
                )
            raise EvidenceError(f"--tee sev-guest: {sev_guest} does not exist (no SEV-SNP guest)")
        return SevGuestDeviceProvider(sev_guest, ioctl=ioctl), "sev-snp"
    raise ValueError(f"unknown TEE {tee!r}; choose from {', '.join(TEE_CHOICES)}")


def _open_gpu(gpu: str, nvml: Any) -> Any:
    if gpu == "none":
        return None
    if gpu != "nvml":
        raise ValueError(f"unknown GPU evidence {gpu!r}; choose from {', '.join(GPU_CHOICES)}")
    from openpcc.attestation.providers import NvmlGpuProvider

    try:
        return NvmlGpuProvider(nvml)
    except ProviderError as e:
        raise EvidenceError(
            f"--gpu nvml: {e} (pip install nvidia-ml-py, or --gpu none without GPUs)"
        ) from e


def _check_files(paths: Sequence[Path], what: str) -> tuple[Path, ...]:
    if len(paths) > MAX_GPU_ITEMS:
        raise EvidenceError(f"at most {MAX_GPU_ITEMS} {what} files")
    for p in paths:
        _read_small(p, what, MAX_GPU_ITEM_SIZE)
    return tuple(paths)


def open_source(
    tee: str,
    tee_dir: Path | None = None,
    *,
    release_id: str,
    measurement: bytes | None = None,
    gpu: str = "none",
    gpu_rims: Sequence[Path] = (),
    gpu_ocsp: Sequence[Path] = (),
    endorsements: Path | None = None,
    tsm_root: str | os.PathLike[str] = TSM_REPORT_ROOT,
    sev_guest: str | os.PathLike[str] = SEV_GUEST_DEVICE,
    fs: OsFs | None = None,
    ioctl: Callable[..., Any] | None = None,
    nvml: Any = None,
) -> ProviderSource:
    """The evidence source named by ``--tee`` and ``--gpu``.

    ``simulated`` needs ``tee_dir``; ``measurement`` (48 bytes) overrides its launch
    measurement (default :func:`simulated_measurement` of the release id). ``tsm_root``,
    ``sev_guest``, ``fs``, ``ioctl`` and ``nvml`` exist so tests can stand in for the
    kernel and the driver. Raises :class:`EvidenceError` when the hardware is missing.
    """
    if tee == "simulated":
        if tee_dir is None:
            raise ValueError("--tee simulated needs a directory for its keys (--tee-dir)")
        m = simulated_measurement(release_id) if measurement is None else measurement
        if len(m) != 48:
            raise ValueError("the simulated measurement must be 48 bytes (96 hex characters)")
        source = _simulated(tee_dir, m)
    else:
        if tee not in TEE_CHOICES:
            raise ValueError(f"unknown TEE {tee!r}; choose from {', '.join(TEE_CHOICES)}")
        if tee_dir is not None or measurement is not None:
            raise ValueError("a TEE directory or measurement applies only to --tee simulated")
        provider, claims_tee = _hardware(
            tee, tsm_root=tsm_root, sev_guest=sev_guest, fs=fs, ioctl=ioctl
        )
        source = ProviderSource(provider, claims_tee)
    given = {} if endorsements is None else load_endorsements(endorsements, source.tee)
    if source.tee == "tdx" and "collateral" not in given:
        # configfs-tsm hands out no collateral and clients fail a quote without it.
        raise EvidenceError(
            "TDX quotes need collateral: give --endorsements FILE with "
            '{"collateral": <QuoteCollateralV3 JSON from Intel PCS or your PCCS>}'
        )
    source.gpu = _open_gpu(gpu, nvml)
    if source.gpu is None and (gpu_rims or gpu_ocsp):
        raise ValueError("--gpu-rim and --gpu-ocsp need --gpu nvml")
    source.gpu_rims = _check_files(gpu_rims, "--gpu-rim")
    source.gpu_ocsp = _check_files(gpu_ocsp, "--gpu-ocsp")
    source.endorsements = endorsements
    return source


def check_source(
    source: EvidenceSource, *, node_id: str, model_digest: bytes, release_id: str
) -> None:
    """Collect one throwaway bundle (for a random key) so that a missing device, GPU
    CC mode off or missing endorsements stop the start before the engine is launched."""
    claims = make_claims(
        node_id=node_id,
        public_key=secrets.token_bytes(32),
        tee=source.tee,
        model_digest=model_digest,
        release_id=release_id,
        signing_key=secrets.token_bytes(32),
    )
    source.bundle(claims)


def make_claims(
    *,
    node_id: str,
    public_key: bytes,
    tee: str,
    model_digest: bytes,
    release_id: str,
    signing_key: bytes,
    pq_public_key: bytes | None = None,
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
        signing_key=signing_key,
        pq_public_key=pq_public_key,
    )

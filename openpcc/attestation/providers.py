"""Evidence collection on a node: where the bytes inside an attestation bundle come from.

Sources, in :func:`detect_provider` order (never a silent fallback to simulation):

1. :class:`ConfigfsTsmProvider`: Linux configfs-tsm (``/sys/kernel/config/tsm/report``,
   kernel 6.7+), one interface for SEV-SNP (``provider`` = ``sev_guest``) and TDX
   (``tdx_guest``). ``auxblob`` carries the SNP certificate table when the host
   provisioned one.
2. :class:`SevGuestDeviceProvider`: the ``/dev/sev-guest`` ``SNP_GET_REPORT`` ioctl, for
   SNP guests on older kernels.

GPU evidence: :class:`NvmlGpuProvider` (``nvidia-ml-py``). Development:
:class:`SimulatedProvider` over a :class:`~openpcc.attestation.simulated.SimulatedTEE`,
only ever chosen explicitly. :func:`collect_bundle` runs the whole binding dance.

None of this was run on real hardware here (no SEV-SNP/TDX guest or H100 was
available): the configfs-tsm code is tested against a fake tree that emulates the
kernel's semantics, the ioctl against the uapi struct sizes and a fake ioctl, NVML
against a fake module.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization

from openpcc.attestation.bundle import AttestationBundle, GpuEvidence
from openpcc.attestation.certs import load_certificate
from openpcc.attestation.claims import gpu_evidence_digest_for, gpu_nonce_for, report_data_for
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.errors import DecodeError, OpenPCCError

TSM_REPORT_ROOT = "/sys/kernel/config/tsm/report"
SEV_GUEST_DEVICE = "/dev/sev-guest"
TSM_PROVIDERS = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}

# GHCB spec certificate-table GUIDs (stored in RFC 4122 byte order, as virtee/sev and
# go-sev-guest read them).
SNP_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
    uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea"): "crl",
}


class ProviderError(OpenPCCError):
    """Evidence could not be collected (no device, kernel error, a racing writer)."""


@dataclass(frozen=True)
class TeeEvidence:
    """One hardware report plus whatever endorsements the platform handed out with it."""

    tee: str  # "sev-snp" | "tdx" | "simulated-snp"
    evidence: bytes
    endorsements: dict[str, Any] = field(default_factory=dict)
    provider: str = ""


class TeeProvider(Protocol):
    name: str

    def get_evidence(self, report_data: bytes) -> TeeEvidence: ...


def _check_report_data(report_data: bytes) -> bytes:
    if len(report_data) != 64:
        raise ValueError("report data is 64 bytes")
    return bytes(report_data)


# --- SNP certificate table (configfs auxblob, SNP_GET_EXT_REPORT) ---------------------------


def parse_snp_cert_table(table: bytes) -> dict[str, bytes]:
    """GUID table -> {"vcek"|"vlek"|"ask"|"ark"|"crl"|<guid>: DER}; ProviderError if bad.

    Entries are (GUID[16], offset u32 LE, length u32 LE), ended by an all-zero entry;
    offsets are from the start of the table.
    """
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + 24 > len(table):
            raise ProviderError("SNP certificate table has no terminating entry")
        guid, off, length = table[pos : pos + 16], *struct.unpack_from("<II", table, pos + 16)
        if guid == bytes(16):
            return out
        if off + length > len(table):
            raise ProviderError("SNP certificate table entry points past its end")
        u = uuid.UUID(bytes=guid)
        out[SNP_CERT_GUIDS.get(u, str(u))] = table[off : off + length]
        pos += 24


def snp_endorsements_from_table(table: bytes) -> dict[str, str]:
    """Bundle endorsements (PEM) from a certificate table; empty when it has no VCEK/VLEK."""
    certs = parse_snp_cert_table(table)

    def pem(der: bytes) -> str:
        try:
            cert = load_certificate(der, "certificate in the table")
        except DecodeError as e:
            raise ProviderError(f"certificate table holds an unreadable certificate: {e}") from e
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    out: dict[str, str] = {}
    for kind in ("vcek", "vlek"):
        if kind in certs:
            out[kind] = pem(certs[kind])
            break
    if out and "ask" in certs and "ark" in certs:
        out["ask_ark"] = pem(certs["ask"]) + pem(certs["ark"])
    return out


# --- configfs-tsm ---------------------------------------------------------------------------


class OsFs:
    """The four file operations configfs-tsm needs; tests swap in a kernel emulation."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)  # configfs removes the entry's attributes with it

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(data)

    def read(self, path: Path) -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read()


class ConfigfsTsmProvider:
    """Linux configfs-tsm reports (Documentation/ABI/testing/configfs-tsm).

    Per request: mkdir an entry, write options then ``inblob``, read ``generation``,
    ``outblob``, ``provider``, ``auxblob``, read ``generation`` again, rmdir. The kernel
    bumps ``generation`` on every write to the entry; if it is not what our own writes
    explain, or changes while we read, another process wrote the entry and the report may
    carry its REPORT_DATA, so we fail rather than publish it.
    """

    name = "configfs-tsm"

    def __init__(
        self,
        root: str | os.PathLike[str] = TSM_REPORT_ROOT,
        *,
        privlevel: int | None = None,
        fs: OsFs | None = None,
    ) -> None:
        self.root = Path(root)
        self.privlevel = privlevel
        self.fs = fs or OsFs()

    def available(self) -> bool:
        return self.root.is_dir()

    def _op(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            raise ProviderError(f"{what}: {e.strerror or e}") from e

    def _generation(self, entry: Path) -> int:
        text = self._op("reading generation", self.fs.read, entry / "generation").strip()
        try:
            return int(text)
        except ValueError as e:
            raise ProviderError(f"generation is not a number: {text!r}") from e

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        report_data = _check_report_data(report_data)
        entry = self.root / f"openpcc-{os.getpid()}-{secrets.token_hex(6)}"
        self._op(f"creating {entry}", self.fs.mkdir, entry)
        try:
            writes = 0
            if self.privlevel is not None:
                data = str(self.privlevel).encode()
                self._op("writing privlevel", self.fs.write, entry / "privlevel", data)
                writes += 1
            self._op("writing inblob", self.fs.write, entry / "inblob", report_data)
            writes += 1
            before = self._generation(entry)
            if before != writes:
                raise ProviderError(
                    f"generation {before} after our {writes} write(s): another writer raced us"
                )
            outblob = self._op("reading outblob", self.fs.read, entry / "outblob")
            provider = self._op("reading provider", self.fs.read, entry / "provider")
            provider = provider.decode("ascii", "replace").strip()
            try:
                auxblob = self.fs.read(entry / "auxblob")
            except OSError:
                auxblob = b""  # no auxblob attribute, or nothing provisioned by the host
            after = self._generation(entry)
            if after != before:
                raise ProviderError(
                    f"generation changed from {before} to {after} while reading: "
                    "another writer raced us"
                )
        finally:
            with contextlib.suppress(OSError):
                self.fs.rmdir(entry)
        tee = TSM_PROVIDERS.get(provider)
        if tee is None:
            raise ProviderError(f"unknown configfs-tsm provider {provider!r}")
        if not outblob:
            raise ProviderError("configfs-tsm returned an empty report")
        endorsements: dict[str, Any] = {}
        if tee == "sev-snp" and auxblob:
            endorsements = snp_endorsements_from_table(auxblob)
        return TeeEvidence(tee, outblob, endorsements, f"configfs-tsm:{provider}")


# --- /dev/sev-guest -----------------------------------------------------------------------------


class SnpReportReq(ctypes.Structure):
    """``struct snp_report_req`` (linux/sev-guest.h): 96 bytes."""

    _fields_ = (
        ("user_data", ctypes.c_uint8 * 64),
        ("vmpl", ctypes.c_uint32),
        ("rsvd", ctypes.c_uint8 * 28),
    )


class SnpReportResp(ctypes.Structure):
    """``struct snp_report_resp``: 4000 bytes holding the firmware's MSG_REPORT_RSP."""

    _fields_ = (("data", ctypes.c_uint8 * 4000),)


class SnpGuestRequestIoctl(ctypes.Structure):
    """``struct snp_guest_request_ioctl``: u8 msg_version, 7 bytes padding, u64 req_data,
    u64 resp_data, u64 exitinfo2 (fw_error low 32 bits, vmm_error high 32): 32 bytes."""

    _fields_ = (
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    )


class SnpExtReportReq(ctypes.Structure):
    """``struct snp_ext_report_req``: report request + certs buffer address/length (112)."""

    _fields_ = (
        ("data", SnpReportReq),
        ("certs_address", ctypes.c_uint64),
        ("certs_len", ctypes.c_uint32),
    )


def _iowr(typ: str, nr: int, size: int) -> int:
    """Linux _IOWR on x86/arm64: dir 3 (read|write) << 30 | size << 16 | type << 8 | nr."""
    return (3 << 30) | (size << 16) | (ord(typ) << 8) | nr


SNP_GET_REPORT = _iowr("S", 0x0, ctypes.sizeof(SnpGuestRequestIoctl))  # 0xC0205300
SNP_GET_EXT_REPORT = _iowr("S", 0x2, ctypes.sizeof(SnpGuestRequestIoctl))  # 0xC0205302
MSG_REPORT_RSP_HEADER = 0x20  # status u32, report_size u32, 24 reserved bytes
SNP_REPORT_SIZE = 1184


class SevGuestDeviceProvider:
    """SNP reports via ``ioctl(/dev/sev-guest, SNP_GET_REPORT)``.

    Returns no endorsements: the plain report request carries no certificates, so the
    node must supply the VCEK (AMD KDS, cached) itself; configfs-tsm's auxblob is the
    better source where available. ``ioctl`` is injectable for tests.
    """

    name = "sev-guest"

    def __init__(
        self,
        path: str | os.PathLike[str] = SEV_GUEST_DEVICE,
        *,
        vmpl: int = 0,
        ioctl: Callable[..., Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.vmpl = vmpl
        if ioctl is None:
            import fcntl

            ioctl = fcntl.ioctl
        self._ioctl = ioctl

    def available(self) -> bool:
        return self.path.exists()

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        report_data = _check_report_data(report_data)
        req = SnpReportReq()
        ctypes.memmove(req.user_data, report_data, 64)
        req.vmpl = self.vmpl
        resp = SnpReportResp()
        io = SnpGuestRequestIoctl(1, ctypes.addressof(req), ctypes.addressof(resp), 0)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise ProviderError(f"cannot open {self.path}: {e.strerror or e}") from e
        try:
            self._ioctl(fd, SNP_GET_REPORT, io, True)
        except OSError as e:
            fw, vmm = io.exitinfo2 & 0xFFFFFFFF, io.exitinfo2 >> 32
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise ProviderError(
                f"SNP_GET_REPORT failed: {name}, fw_error={fw:#x}, vmm_error={vmm:#x}"
            ) from e
        finally:
            os.close(fd)
        return TeeEvidence("sev-snp", parse_report_response(bytes(resp.data)), {}, "sev-guest")


def parse_report_response(data: bytes) -> bytes:
    """The report out of a MSG_REPORT_RSP (SNP firmware ABI): status 0, size 1184."""
    status, size = struct.unpack_from("<II", data, 0)
    if status != 0:
        raise ProviderError(f"SNP firmware returned status {status:#x}")
    if size != SNP_REPORT_SIZE or MSG_REPORT_RSP_HEADER + size > len(data):
        raise ProviderError(f"SNP firmware returned a report of {size} bytes")
    return data[MSG_REPORT_RSP_HEADER : MSG_REPORT_RSP_HEADER + size]


# --- simulated ------------------------------------------------------------------------------------


class SimulatedProvider:
    """Reports from a development :class:`SimulatedTEE`; only chosen explicitly."""

    name = "simulated"

    def __init__(self, tee: SimulatedTEE, measurement: bytes = bytes(48)) -> None:
        self.tee = tee
        self.measurement = measurement

    def get_evidence(self, report_data: bytes) -> TeeEvidence:
        report = self.tee.issue_report(
            _check_report_data(report_data), measurement=self.measurement
        )
        endorsements = {"vcek": self.tee.leaf_pem.decode(), "ask_ark": self.tee.root_pem.decode()}
        return TeeEvidence("simulated-snp", report, endorsements, "simulated")


# --- NVML ------------------------------------------------------------------------------------


class NvmlGpuProvider:
    """GPU evidence through NVML (``nvidia-ml-py``, imported only when used).

    Collects, per GPU in NVML index order: the SPDM GET_MEASUREMENTS request+response
    for our nonce (``nvmlDeviceGetConfComputeGpuAttestationReport``) and the device
    certificate chain (``nvmlDeviceGetConfComputeGpuCertificate``, PEM). NVML's CC
    state (``nvmlSystemGetConfComputeState``) is checked as a precondition only: the host
    controls NVML, so it proves nothing to a client. RIMs and OCSP responses are not
    fetched here (that needs NVIDIA's services); a node adds cached copies if it has them.
    """

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml  # nvidia-ml-py
            except ImportError as e:
                raise ProviderError("nvidia-ml-py is not installed") from e
        self.nvml = nvml

    def collect(self, nonce: bytes) -> list[GpuEvidence]:
        from openpcc.attestation.nvidia import SpdmEvidence

        if len(nonce) != 32:
            raise ValueError("the SPDM nonce is 32 bytes")
        nv = self.nvml
        try:
            nv.nvmlInit()
        except Exception as e:  # NVMLError has no stable base we can name without the module
            raise ProviderError(f"NVML init failed: {e}") from e
        try:
            state = nv.nvmlSystemGetConfComputeState()
            if getattr(state, "ccFeature", 0) != 1:
                raise ProviderError("GPU confidential-computing mode is off (NVML ccFeature)")
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                rep = nv.nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
                evidence = bytes(rep.attestationReport[: rep.attestationReportSize])
                cert = nv.nvmlDeviceGetConfComputeGpuCertificate(handle)
                chain = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
                try:
                    got = SpdmEvidence.parse(evidence).nonce
                except ValueError as e:
                    raise ProviderError(f"GPU {i} returned unreadable evidence: {e}") from e
                if got != nonce:
                    raise ProviderError(f"GPU {i} answered for another nonce")
                out.append(GpuEvidence(evidence, chain.decode("ascii")))
            return out
        except ProviderError:
            raise
        except Exception as e:
            raise ProviderError(f"NVML: {e}") from e
        finally:
            nv.nvmlShutdown()


# --- detection and the whole dance ------------------------------------------------------------


def detect_provider(
    *,
    tsm_root: str | os.PathLike[str] = TSM_REPORT_ROOT,
    sev_guest: str | os.PathLike[str] = SEV_GUEST_DEVICE,
) -> ConfigfsTsmProvider | SevGuestDeviceProvider | None:
    """configfs-tsm, else /dev/sev-guest, else None. Never the simulator: a node without
    TEE hardware must be told so, not quietly publish development evidence."""
    tsm = ConfigfsTsmProvider(tsm_root)
    if tsm.available():
        return tsm
    dev = SevGuestDeviceProvider(sev_guest, ioctl=lambda *a: None)
    if dev.available():
        return SevGuestDeviceProvider(sev_guest)
    return None


def collect_bundle(
    provider: TeeProvider,
    claims: Any,
    *,
    gpu: NvmlGpuProvider | None = None,
    gpu_extras: Sequence[tuple[Sequence[bytes], Sequence[bytes]]] = (),
    endorsements: dict[str, Any] | None = None,
) -> AttestationBundle:
    """Claims (with any gpu digest) -> GPU evidence for the claims' nonce -> the digest
    filled in -> a TEE report over the final claims -> the bundle.

    ``gpu_extras[i]`` = (RIMs, OCSP responses) to attach to GPU i. ``endorsements``
    override/extend what the provider returned (e.g. a cached VCEK for /dev/sev-guest).
    """
    gpus: list[GpuEvidence] = []
    if gpu is not None:
        gpus = gpu.collect(gpu_nonce_for(claims))
        for i, (rims, ocsp) in enumerate(gpu_extras[: len(gpus)]):
            gpus[i] = replace(gpus[i], rims=tuple(rims), ocsp=tuple(ocsp))
    digest = gpu_evidence_digest_for([g.evidence for g in gpus]) if gpus else None
    claims = claims.with_gpu_evidence_digest(digest)
    ev = provider.get_evidence(report_data_for(claims))
    if ev.tee != claims.tee:
        raise ProviderError(f"claims say {claims.tee}, the provider produced {ev.tee}")
    merged = {**ev.endorsements, **(endorsements or {})}
    return AttestationBundle(claims, ev.tee, ev.evidence, merged, tuple(gpus))

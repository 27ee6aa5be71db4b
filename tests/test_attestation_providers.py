"""Evidence providers, without hardware: an emulated configfs-tsm tree, the sev-guest ioctl
ABI against the kernel uapi sizes, a fake NVML, and the simulated TEE end to end."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

from openpcc.attestation import providers as pv
from openpcc.attestation.bundle import verify_bundle
from openpcc.attestation.claims import Claims, report_data_for
from openpcc.attestation.policy import MANIFEST_FORMAT, TrustPolicy
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.attestation.snp import AttestationReport, verify_snp
from tests.conftest import SAMPLES

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
T0 = int(NOW.timestamp())
RD = bytes(range(64))
H100 = SAMPLES / "nvidia-gpu" / "h100-nvtrust-sample"
H100_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")


@pytest.fixture(scope="module")
def tee(tmp_path_factory) -> SimulatedTEE:
    return SimulatedTEE.create(tmp_path_factory.mktemp("devtee"), now=NOW)


def cert_table(entries: list[tuple[str, bytes]]) -> bytes:
    header = 24 * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, blob in entries:
        table += uuid.UUID(guid).bytes + struct.pack("<II", header + len(blobs), len(blob))
        blobs += blob
    return table + bytes(24) + blobs


VCEK_GUID = "63da758d-e664-4564-adc5-f4b93be8accd"


# --- configfs-tsm, emulated ------------------------------------------------------------------


class FakeTsmKernel(pv.OsFs):
    """A real directory tree behaving as configfs-tsm does: mkdir creates the attributes,
    each write bumps ``generation``, reading ``outblob`` makes the report, rmdir removes
    the entry with its attributes."""

    def __init__(self, tee: SimulatedTEE, provider: str = "sev_guest", auxblob: bytes = b""):
        self.tee, self.provider, self.auxblob = tee, provider, auxblob
        self.on_outblob = None  # a racing writer, for tests
        self.created: list[Path] = []

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)
        self.created.append(path)
        for name, value in (
            ("provider", self.provider.encode() + b"\n"),
            ("generation", b"0\n"),
            ("inblob", b""),
            ("privlevel", b"0\n"),
        ):
            (path / name).write_bytes(value)
        if self.auxblob:
            (path / "auxblob").write_bytes(self.auxblob)

    def write(self, path: Path, data: bytes) -> None:
        if path.name not in ("inblob", "privlevel"):
            raise OSError(errno.EACCES, "read-only attribute")
        if path.name == "inblob" and len(data) > 64:
            raise OSError(errno.EINVAL, "inblob too large")
        path.write_bytes(data)
        gen = path.parent / "generation"
        gen.write_bytes(b"%d\n" % (int(gen.read_bytes()) + 1))

    def read(self, path: Path) -> bytes:
        if path.name == "outblob":
            data = (path.parent / "inblob").read_bytes().ljust(64, b"\0")
            report = self.tee.issue_report(data)
            if self.on_outblob:
                self.on_outblob(path.parent)
            return report
        return path.read_bytes()

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)


def test_configfs_tsm_report(tee, tmp_path):
    table = cert_table([(VCEK_GUID, tee.leaf_cert.public_bytes(serialization.Encoding.DER))])
    kernel = FakeTsmKernel(tee, auxblob=table)
    ev = pv.ConfigfsTsmProvider(tmp_path, fs=kernel).get_evidence(RD)
    assert ev.tee == "sev-snp" and ev.provider == "configfs-tsm:sev_guest"
    assert AttestationReport.parse(ev.evidence).report_data == RD
    assert ev.endorsements == {"vcek": tee.leaf_pem.decode()}
    assert list(tmp_path.iterdir()) == []  # the entry was removed
    v = verify_snp(
        ev.evidence,
        ev.endorsements["vcek"].encode(),
        now=NOW,
        ark_ask_chain=tee.root_pem,
        trusted_roots=[tee.root_fingerprint],
        expected_report_data=RD,
    )
    assert v.ok, v.to_json()["failed"]
    # privlevel is one more write the generation must account for.
    ev = pv.ConfigfsTsmProvider(tmp_path, privlevel=2, fs=kernel).get_evidence(RD)
    assert AttestationReport.parse(ev.evidence).report_data == RD
    # TDX provider name maps to tdx.
    tdx = pv.ConfigfsTsmProvider(tmp_path, fs=FakeTsmKernel(tee, provider="tdx_guest"))
    assert tdx.get_evidence(RD).tee == "tdx"


def test_configfs_tsm_racing_writer_is_detected(tee, tmp_path):
    kernel = FakeTsmKernel(tee)
    kernel.on_outblob = lambda entry: kernel.write(entry / "inblob", b"\xee" * 64)
    with pytest.raises(pv.ProviderError, match="generation changed from 1 to 2"):
        pv.ConfigfsTsmProvider(tmp_path, fs=kernel).get_evidence(RD)
    assert list(tmp_path.iterdir()) == []  # cleaned up on failure too

    class EarlyWriter(FakeTsmKernel):
        def write(self, path: Path, data: bytes) -> None:
            super().write(path, data)
            if path.name == "inblob" and data == RD:
                super().write(path, b"\xee" * 64)  # someone overwrites before we read

    with pytest.raises(pv.ProviderError, match="another writer"):
        pv.ConfigfsTsmProvider(tmp_path, fs=EarlyWriter(tee)).get_evidence(RD)


def test_configfs_tsm_errors(tee, tmp_path):
    with pytest.raises(pv.ProviderError, match="creating"):
        pv.ConfigfsTsmProvider(tmp_path / "missing", fs=FakeTsmKernel(tee)).get_evidence(RD)
    with pytest.raises(pv.ProviderError, match="unknown configfs-tsm provider"):
        pv.ConfigfsTsmProvider(tmp_path, fs=FakeTsmKernel(tee, "arm_cca")).get_evidence(RD)
    with pytest.raises(ValueError):
        pv.ConfigfsTsmProvider(tmp_path, fs=FakeTsmKernel(tee)).get_evidence(b"short")


def test_snp_cert_table():
    table = cert_table(
        [
            (VCEK_GUID, b"vcek-der"),
            ("4ab7b379-bbac-4fe4-a02f-05aef327c782", b"ask"),
            ("c0b406a4-a803-4952-9743-3fb6014cd0ae", b"ark"),
            ("11111111-2222-3333-4444-555555555555", b"x"),
        ]
    )
    assert pv.parse_snp_cert_table(table) == {
        "vcek": b"vcek-der",
        "ask": b"ask",
        "ark": b"ark",
        "11111111-2222-3333-4444-555555555555": b"x",
    }
    assert pv.parse_snp_cert_table(bytes(24)) == {}
    with pytest.raises(pv.ProviderError, match="terminating"):
        pv.parse_snp_cert_table(uuid.UUID(VCEK_GUID).bytes + struct.pack("<II", 0, 8))
    bad = uuid.UUID(VCEK_GUID).bytes + struct.pack("<II", 48, 100) + bytes(24)
    with pytest.raises(pv.ProviderError, match="past its end"):
        pv.parse_snp_cert_table(bad)
    with pytest.raises(pv.ProviderError, match="unreadable certificate"):
        pv.snp_endorsements_from_table(cert_table([(VCEK_GUID, b"not der")]))


# --- /dev/sev-guest ioctl ---------------------------------------------------------------------


def test_sev_guest_uapi_layout():
    """Sizes and offsets of linux/include/uapi/linux/sev-guest.h on x86-64."""
    assert ctypes.sizeof(pv.SnpReportReq) == 96
    assert pv.SnpReportReq.vmpl.offset == 64 and pv.SnpReportReq.rsvd.offset == 68
    assert ctypes.sizeof(pv.SnpReportResp) == 4000
    assert ctypes.sizeof(pv.SnpGuestRequestIoctl) == 32
    assert pv.SnpGuestRequestIoctl.req_data.offset == 8
    assert pv.SnpGuestRequestIoctl.resp_data.offset == 16
    assert pv.SnpGuestRequestIoctl.exitinfo2.offset == 24
    assert ctypes.sizeof(pv.SnpExtReportReq) == 112
    assert pv.SnpExtReportReq.certs_address.offset == 96
    assert pv.SnpExtReportReq.certs_len.offset == 104
    assert pv.SNP_GET_REPORT == 0xC0205300 and pv.SNP_GET_EXT_REPORT == 0xC0205302


def fake_ioctl(tee: SimulatedTEE, calls: list, fail: int | None = None):
    def ioctl(fd: int, request: int, arg: pv.SnpGuestRequestIoctl, mutate: bool) -> int:
        calls.append((request, arg.msg_version))
        raw = bytes(ctypes.string_at(arg.req_data, 96))
        user_data, vmpl = raw[:64], struct.unpack_from("<I", raw, 64)[0]
        assert raw[68:] == bytes(28) and mutate
        if fail is not None:
            arg.exitinfo2 = fail
            raise OSError(errno.EIO, "Input/output error")
        report = tee.issue_report(user_data, vmpl=vmpl)
        msg = struct.pack("<II", 0, len(report)) + bytes(24) + report
        ctypes.memmove(arg.resp_data, msg, len(msg))
        return 0

    return ioctl


def test_sev_guest_device(tee, tmp_path):
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    calls: list = []
    prov = pv.SevGuestDeviceProvider(device, vmpl=1, ioctl=fake_ioctl(tee, calls))
    ev = prov.get_evidence(RD)
    rep = AttestationReport.parse(ev.evidence)
    assert ev.tee == "sev-snp" and rep.report_data == RD and rep.vmpl == 1
    assert calls == [(pv.SNP_GET_REPORT, 1)]
    failing = pv.SevGuestDeviceProvider(device, ioctl=fake_ioctl(tee, [], fail=(1 << 32) | 0x16))
    with pytest.raises(pv.ProviderError, match="EIO, fw_error=0x16, vmm_error=0x1"):
        failing.get_evidence(RD)
    with pytest.raises(pv.ProviderError, match="cannot open"):
        pv.SevGuestDeviceProvider(tmp_path / "none", ioctl=fake_ioctl(tee, [])).get_evidence(RD)


def test_report_response_parsing():
    with pytest.raises(pv.ProviderError, match="status 0x16"):
        pv.parse_report_response(struct.pack("<II", 0x16, 1184) + bytes(3992))
    with pytest.raises(pv.ProviderError, match="report of 100 bytes"):
        pv.parse_report_response(struct.pack("<II", 0, 100) + bytes(3992))


def test_detect_provider(tmp_path):
    tsm, dev = tmp_path / "tsm", tmp_path / "sev-guest"
    assert pv.detect_provider(tsm_root=tsm, sev_guest=dev) is None  # never the simulator
    dev.write_bytes(b"")
    assert isinstance(pv.detect_provider(tsm_root=tsm, sev_guest=dev), pv.SevGuestDeviceProvider)
    tsm.mkdir()
    assert isinstance(pv.detect_provider(tsm_root=tsm, sev_guest=dev), pv.ConfigfsTsmProvider)


# --- NVML -------------------------------------------------------------------------------------


class FakeNvml:
    """The nvidia-ml-py calls NvmlGpuProvider makes, answering with the real H100 sample."""

    def __init__(self, cc: int = 1, count: int = 1):
        self.cc, self.count, self.nonces, self.shut = cc, count, [], False
        self.report = (H100 / "attestation_report.bin").read_bytes()
        self.chain = (H100 / "gpu_cert_chain.pem").read_bytes()

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlSystemGetConfComputeState(self):
        return SimpleNamespace(ccFeature=self.cc, devToolsMode=0, environment=1)

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle, nonce):
        self.nonces.append(bytes(nonce))
        buf = list(self.report) + [0] * 100
        return SimpleNamespace(attestationReport=buf, attestationReportSize=len(self.report))

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle):
        buf = list(self.chain) + [0] * 100
        return SimpleNamespace(attestationCertChain=buf, attestationCertChainSize=len(self.chain))


def test_nvml_provider():
    nvml = FakeNvml(count=2)
    gpus = pv.NvmlGpuProvider(nvml).collect(H100_NONCE)
    assert len(gpus) == 2 and nvml.shut and nvml.nonces == [H100_NONCE] * 2
    assert gpus[0].evidence == nvml.report and gpus[0].cert_chain_pem == nvml.chain.decode()
    # A GPU answering for a nonce other than ours (replayed evidence) is refused.
    with pytest.raises(pv.ProviderError, match="another nonce"):
        pv.NvmlGpuProvider(FakeNvml()).collect(bytes(32))
    nvml = FakeNvml(cc=0)
    with pytest.raises(pv.ProviderError, match="mode is off"):
        pv.NvmlGpuProvider(nvml).collect(H100_NONCE)
    assert nvml.shut


# --- simulated, end to end ---------------------------------------------------------------------


def test_simulated_provider_end_to_end(tee):
    claims = Claims(
        "node-7",
        b"\x07" * 32,
        "simulated-snp",
        None,
        b"\x08" * 32,
        "dev",
        T0,
        T0 + 600,
        b"\x09" * 32,
    )
    measurement = b"\x09" * 48
    bundle = pv.collect_bundle(pv.SimulatedProvider(tee, measurement), claims)
    manifest = {
        "format": MANIFEST_FORMAT,
        "serial": 1,
        "issued_at": T0 - 60,
        "expires_at": T0 + 86400,
        "releases": {"dev": {"model_digests": ["08" * 32], "snp": {"measurements": ["09" * 48]}}},
        "gpu": {"require": False},
        "development_roots": [tee.root_fingerprint],
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    policy = TrustPolicy.unsigned_for_tests(json.dumps(manifest).encode())
    v = verify_bundle(bundle, policy=policy, now=NOW, expected_node_key=b"\x07" * 32)
    assert v.ok, v.to_json()["failed"]
    assert AttestationReport.parse(bundle.evidence).report_data == report_data_for(claims)
    # The provider must produce the TEE type the claims name.
    with pytest.raises(pv.ProviderError, match="claims say sev-snp"):
        pv.collect_bundle(
            pv.SimulatedProvider(tee),
            Claims("n", b"\0" * 32, "sev-snp", None, b"\0" * 32, "dev", T0, T0 + 1, b"\0" * 32),
        )
    # GPU evidence is collected for the claims' nonce: the replayed sample is refused.
    with pytest.raises(pv.ProviderError, match="another nonce"):
        pv.collect_bundle(pv.SimulatedProvider(tee), claims, gpu=pv.NvmlGpuProvider(FakeNvml()))

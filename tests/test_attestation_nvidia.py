"""NVIDIA GPU SPDM evidence, device chain, OCSP and RIM checks on the real samples."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.attestation.nvidia import (
    GpuPolicy,
    OpaqueData,
    SpdmEvidence,
    nvidia_corim_root_ca,
    nvidia_device_root_ca,
    parse_nvtrust_dump,
    parse_rim,
    verify_gpu,
)
from openpcc.errors import DecodeError, OpenPCCError
from tests.conftest import SAMPLES

NV = SAMPLES / "nvidia-gpu"
H100 = NV / "h100-nvtrust-sample"
DEVICE_NOW = datetime(2025, 8, 21, 12, tzinfo=UTC)
RIM_NOW = datetime(2025, 10, 24, 12, tzinfo=UTC)
NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
DRIVER_RIM = H100 / "rims" / "NV_GPU_DRIVER_GH100_550.90.07.xml"
VBIOS_RIM = H100 / "rims" / "NV_GPU_VBIOS_1010_0200_882_96009F0001.xml"


def evidence() -> bytes:
    return (H100 / "attestation_report.bin").read_bytes()


def chain() -> bytes:
    return (H100 / "gpu_cert_chain.pem").read_bytes()


def rims() -> list[bytes]:
    return [DRIVER_RIM.read_bytes(), VBIOS_RIM.read_bytes()]


def ocsp_all() -> list[bytes]:
    return [p.read_bytes() for p in sorted((H100 / "ocsp").iterdir())]


def check(verdict, name):
    found = [c for c in verdict.checks if c.name == name]
    assert found, f"no check {name!r} in {verdict.checks}"
    return found[0]


def full(**kw):
    args = dict(
        now=DEVICE_NOW,
        rim_now=RIM_NOW,
        expected_nonce=NONCE,
        rims=rims(),
        ocsp=ocsp_all(),
    )
    args.update(kw)
    ev = args.pop("evidence", evidence())
    pem = args.pop("chain", chain())
    return verify_gpu(ev, pem, **args)


# --- the README's expected outcome ------------------------------------------------------


def test_h100_sample_verifies_end_to_end():
    v = full()
    assert v.ok, v.failures()
    for name in (
        "evidence_parse",
        "signature",
        "chain",
        "fwid",
        "ocsp",
        "nonce",
        "rim_signature",
        "rim_ocsp",
        "rim_versions",
        "measurements",
    ):
        assert check(v, name).ok
    f = v.fields
    assert f["driver_version"] == "550.90.07"
    assert f["vbios_version"] == "96.00.9F.00.01"
    assert f["measurement_count"] == 64
    assert f["nonce"] == NONCE.hex()
    assert f["measurements_matched"] == "33/33"
    assert (f["project"], f["project_sku"], f["chip_sku"]) == ("1010", "0200", "882")
    assert f["nvdec0_status"] == "disabled"


def test_hex_evidence_is_accepted():
    v = full(evidence=(H100 / "attestation_report.hex").read_text())
    assert v.ok, v.failures()


def test_parse_fields():
    ev = SpdmEvidence.parse(evidence())
    assert ev.nonce == NONCE
    assert ev.responder_nonce.hex().startswith("b4b8a06aaaa35542")
    assert len(ev.opaque_raw) == 422
    assert len(ev.blocks) == 64
    nonzero = sorted(b.index for b in ev.blocks if any(b.value))  # 1-based
    assert nonzero == [2, 3, 4, 5, 6, 7, 8, 10, 12, 22, 23, 26, 27, 28, *range(30, 42)]
    assert ev.opaque.fwid.hex().startswith("f5c384ae")
    assert ev.trailing == b""


def test_rim_parse_counts():
    driver, vbios = parse_rim(DRIVER_RIM.read_bytes()), parse_rim(VBIOS_RIM.read_bytes())
    assert driver.colloquial_version == "550.90.07"
    assert vbios.colloquial_version == "96.00.9F.00.01"
    assert sum(m.active for m in driver.measurements.values()) == 21
    assert sum(m.active for m in vbios.measurements.values()) == 12
    assert "HCC RIM L4 Signer" in driver.chain[0].subject.rfc4514_string()


def test_as_of_today_fails_expired_rim_signer_and_ocsp():
    today = datetime(2026, 11, 25, tzinfo=UTC)
    v = full(now=today, rim_now=today)
    assert not v.ok
    assert not check(v, "ocsp").ok
    assert not check(v, "rim_signature").ok
    assert check(v, "signature").ok and check(v, "chain").ok  # 9999 validity


def test_single_instant_cannot_satisfy_both_ocsp_sets():
    v = full(rim_now=None)
    assert check(v, "ocsp").ok
    assert not check(v, "rim_ocsp").ok


# --- negative chains ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["case2_root_only.pem", "case3_missing_provisioner_ica.pem", "case4_missing_leaf.pem"]
)
def test_negative_chains_fail(name):
    v = full(chain=(NV / "negative-chains" / name).read_bytes())
    assert not v.ok
    assert not check(v, "chain").ok
    if name != "case3_missing_provisioner_ica.pem":
        assert not check(v, "signature").ok  # no leaf: nothing can verify the report


# --- negative tests derived in code -------------------------------------------------------


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def test_wrong_nonce():
    v = full(expected_nonce=bytes(32))
    assert not v.ok
    assert [f.name for f in v.failures()] == ["nonce"]


def test_flipped_nonce_in_request_breaks_signature():
    v = full(evidence=flip(evidence(), 10))
    assert not check(v, "signature").ok
    assert not check(v, "nonce").ok


def test_flipped_opaque_byte_breaks_signature():
    ev = evidence()
    pos = len(ev) - 96 - 10  # inside the opaque data (FWID TLV area)
    v = full(evidence=flip(ev, pos))
    assert not check(v, "signature").ok


def test_tampered_measurement_breaks_signature_and_match():
    ev = evidence()
    # block 8 (RIM index 7, active in the driver RIM): 37 request + 8 header + 7 * 55 + 7
    pos = 37 + 8 + 7 * 55 + 7
    assert SpdmEvidence.parse(ev).blocks[7].index == 8
    v = full(evidence=flip(ev, pos))
    assert not check(v, "signature").ok
    m = check(v, "measurements")
    assert not m.ok and "[7]" in m.detail


def test_tampered_rim_fails_signature():
    xml = DRIVER_RIM.read_bytes().replace(b"80161aac5e75", b"80161aac5e76", 1)
    v = full(rims=[xml, VBIOS_RIM.read_bytes()])
    assert not check(v, "rim_signature").ok
    assert not check(v, "measurements").ok


def test_missing_or_wrong_rim():
    v = full(rims=[DRIVER_RIM.read_bytes()])
    assert not check(v, "rim_versions").ok and "VBIOS" in check(v, "rim_versions").detail
    assert not check(v, "measurements").ok
    v = full(rims=[])
    assert not check(v, "measurements").ok


def test_expired_device_ocsp():
    v = full(now=DEVICE_NOW + timedelta(days=2))
    assert not check(v, "ocsp").ok
    assert check(v, "chain").ok


def test_device_ocsp_missing_for_a_cert():
    only_rim = [p.read_bytes() for p in sorted((H100 / "ocsp").iterdir()) if "rim" in p.name]
    v = full(ocsp=only_rim)
    assert not check(v, "ocsp").ok
    assert check(v, "rim_ocsp").ok


def test_ocsp_optional_unless_policy_requires_it():
    v = full(ocsp=[])
    assert v.ok
    assert all(c.name not in ("ocsp", "rim_ocsp") for c in v.checks)
    v = full(ocsp=[], policy=GpuPolicy(require_ocsp=True))
    assert not check(v, "ocsp").ok and not check(v, "rim_ocsp").ok


def _fake_root(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2060, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


def test_wrong_device_root():
    v = full(device_root=_fake_root("NVIDIA Device Identity CA"))
    assert not check(v, "chain").ok
    assert check(v, "signature").ok


def test_wrong_rim_root():
    v = full(rim_root=_fake_root("NVIDIA CoRIM signing Root CA"))
    assert not check(v, "rim_signature").ok
    assert not check(v, "measurements").ok


def test_pinned_roots():
    dev, rim = nvidia_device_root_ca(), nvidia_corim_root_ca()
    assert dev == x509.load_pem_x509_certificate(
        (NV / "roots" / "nvidia_device_identity_ca.pem").read_bytes()
    )
    assert rim == x509.load_pem_x509_certificate(
        (NV / "roots" / "nvidia_corim_signing_root_ca.pem").read_bytes()
    )
    assert dev.fingerprint(hashes.SHA256()).hex().startswith("102bf659d5419614")
    assert rim.fingerprint(hashes.SHA256()).hex().startswith("12977b5115acb038")
    assert dev.public_bytes(serialization.Encoding.DER) != rim.public_bytes(
        serialization.Encoding.DER
    )


def test_policy_versions():
    ok = GpuPolicy(allowed_driver_versions={"550.90.07"}, allowed_vbios_versions={"96.00.9f.00.01"})
    v = full(policy=ok)
    assert v.ok and v.judged
    v = full(policy=GpuPolicy(allowed_driver_versions={"570.124.06"}))
    assert [f.name for f in v.failures()] == ["driver_version"]


# --- multi-GPU / Blackwell samples ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "nonce", "gpus", "switches", "driver", "vbios"),
    [
        (
            "ppcie_8xH100_4xNVSwitch.json",
            "1234567890123456789012345678901234567890123456789012345678901234",
            8,
            4,
            "570.124.06",
            "96.00.CF.00.02",
        ),
        (
            "mpt_8xB200.json",
            "cdb72201e569085d6de41863745f6f77db1f75962c29564ec6abe91f0221861f",
            8,
            0,
            "590.48.01",
            "97.00.D9.00.35",
        ),
    ],
)
def test_multi_gpu_reports_verify(path, nonce, gpus, switches, driver, vbios):
    devices = parse_nvtrust_dump((NV / "multi-gpu" / path).read_text())
    assert sum(d["kind"] == "gpu" for d in devices) == gpus
    assert sum(d["kind"] == "nvswitch" for d in devices) == switches
    for d in devices:
        v = verify_gpu(
            d["report"], d["chain_pem"], now=DEVICE_NOW, expected_nonce=bytes.fromhex(nonce)
        )
        for name in ("evidence_parse", "signature", "chain", "nonce"):
            assert check(v, name).ok, (d["id"], check(v, name))
        assert not v.ok  # no RIMs offline: measurements are not accepted unverified
        if d["kind"] == "gpu":
            assert check(v, "fwid").ok
            assert v.fields["driver_version"] == d["driver_version"] == driver
            assert v.fields["vbios_version"] == d["vbios_version"] == vbios
    if "B200" in path:
        assert v.fields["chip_info"] == "GB100"


# --- robustness ----------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_random_bytes(data):
    with contextlib.suppress(OpenPCCError):
        SpdmEvidence.parse(data)
    with contextlib.suppress(OpenPCCError):
        OpaqueData.parse(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_mutated_evidence(data):
    raw = bytearray(evidence())
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 8))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(OpenPCCError):
        SpdmEvidence.parse(bytes(raw))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 4116), st.integers(0, 255))
def test_verify_returns_verdict_on_mutation(pos, value):
    raw = bytearray(evidence())
    raw[pos] = value
    v = verify_gpu(bytes(raw), chain(), now=DEVICE_NOW, expected_nonce=NONCE)
    assert v.checks


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_rim_and_dump_parsers_raise_only_openpcc_errors(data):
    with contextlib.suppress(OpenPCCError):
        parse_rim(data)
    with contextlib.suppress(OpenPCCError):
        parse_nvtrust_dump(data)


def test_bad_chain_and_ocsp_inputs():
    v = verify_gpu(evidence(), b"not a pem", now=DEVICE_NOW, expected_nonce=None)
    assert not check(v, "chain").ok
    with pytest.raises(DecodeError):
        verify_gpu(evidence(), chain(), now=DEVICE_NOW, expected_nonce=None, ocsp=[b"junk"])

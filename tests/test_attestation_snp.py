"""SEV-SNP: real samples give the outcomes their README states; derived negatives fail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openpcc.attestation import amd
from openpcc.attestation.snp import (
    REPORT_SIZE,
    AttestationReport,
    AzureHclReport,
    SnpPolicy,
    TcbVersion,
    verify_azure_snp,
    verify_snp,
)
from openpcc.errors import DecodeError, OpenPCCError, UnsupportedError
from tests.conftest import SAMPLES

SNP = SAMPLES / "sev-snp"
ROOTS = SNP / "amd-roots"
AT = datetime(2025, 6, 1, tzinfo=UTC)  # README: inside every certificate's window
TODAY = datetime(2026, 11, 25, tzinfo=UTC)  # README's "today": the AWS VLEK has expired


def read(rel: str) -> bytes:
    path = SNP / rel
    if not path.exists():
        pytest.fail(f"sample missing: {path}")
    return path.read_bytes()


GOSEV = ("milan-vcek-gosevguest/attestation.bin", "milan-vcek-gosevguest/vcek.der")
VIRTEE = ("milan-vcek-virtee/report_milan.bin", "milan-vcek-virtee/vcek_milan.der")
TRUSTEE = ("milan-vcek-trustee/test-report.bin", "milan-vcek-trustee/test-vcek.der")
AWS = ("milan-vlek-aws-trustee/test-vlek-report.bin", "milan-vlek-aws-trustee/test-vlek.der")
AZURE = ("genoa-vcek-azure-hcl/snp-report.bin", "genoa-vcek-azure-hcl/vcek-genoa.pem")


def failed(v: object) -> set[str]:
    return {c.name for c in v.failures()}  # type: ignore[attr-defined]


# --- the samples, as their README states ---------------------------------------------


@pytest.mark.parametrize(
    ("sample", "product", "version", "measurement", "signing_key"),
    [
        (VIRTEE, "Milan", 2, "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb424", "VCEK"),
        (TRUSTEE, "Milan", 2, "a1f3930413247bb38cfc171579ea3c12d5fe4901f0c792f6", "VCEK"),
        (AWS, "Milan", 3, "8922ebbdd00ec2c541f36a6e7a82a8773a7accb451ed67bc", "VLEK"),
        (AZURE, "Genoa", 3, "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e98", "VCEK"),
    ],
)
def test_valid_samples_verify(sample, product, version, measurement, signing_key):
    v = verify_snp(read(sample[0]), read(sample[1]), now=AT)
    assert v.ok, v.to_json()["failed"]
    assert v.platform == "sev-snp"
    assert [c.name for c in v.checks] == [
        "report_parse",
        "signature",
        "chain",
        "tcb",
        "debug",
    ]
    assert v.fields["product"] == product
    assert v.fields["version"] == version
    assert v.fields["measurement"].startswith(measurement)
    assert v.fields["signing_key"] == signing_key
    json.dumps(v.to_json())  # the verdict is JSON-ready (for `openpcc verify`)


def test_gosevguest_debug_sample():
    report, vcek = (read(p) for p in GOSEV)
    v = verify_snp(report, vcek, now=AT)
    # Genuine, but its guest policy allows debugging: rejected unless policy allows it.
    assert failed(v) == {"debug"}
    assert v.fields["policy"]["debug"] is True
    assert v.fields["policy"]["raw"] == "0xb0000"
    assert v.fields["report_data"] == "0102030405" + "00" * 59
    assert v.fields["reported_tcb"] == {
        "raw": "0200000000000544",
        "bl": 2,
        "tee": 0,
        "snp": 5,
        "ucode": 68,
    }
    assert v.fields["firmware"] == "1.49 build 3"
    assert v.fields["chip_id"].startswith("3ac3fe21e13fb099")
    ok = verify_snp(report, vcek, now=AT, policy=SnpPolicy(measurements=None, allow_debug=True))
    assert ok.ok and ok.judged
    strict = verify_snp(report, vcek, now=AT, policy=SnpPolicy(measurements=None))
    assert failed(strict) == {"debug"}


def test_gosevguest_chain_window():
    report, vcek = (read(p) for p in GOSEV)
    assert verify_snp(report, vcek, now=datetime(2022, 9, 25, tzinfo=UTC)).checks[2].ok
    assert verify_snp(report, vcek, now=datetime(2029, 9, 23, tzinfo=UTC)).checks[2].ok
    late = verify_snp(report, vcek, now=datetime(2029, 9, 25, tzinfo=UTC))
    assert "chain" in failed(late) and "expired" in late.checks[2].detail
    early = verify_snp(report, vcek, now=datetime(2022, 9, 23, tzinfo=UTC))
    assert "chain" in failed(early) and "not valid before" in early.checks[2].detail


def test_trustee_reported_tcb_not_current_tcb():
    rep = AttestationReport.parse(read(TRUSTEE[0]))
    assert str(rep.current_tcb) == "03000000000008ce"
    assert str(rep.reported_tcb) == "0300000000000873"
    assert rep.family_id == b"\x01" + bytes(15) and rep.image_id == b"\x02" + bytes(15)
    assert rep.guest_svn == 4
    assert rep.id_key_digest.hex().startswith("0356215882a82527")
    v = verify_snp(read(TRUSTEE[0]), read(TRUSTEE[1]), now=AT)
    assert v.ok
    assert v.fields["current_tcb"]["ucode"] == 206 and v.fields["reported_tcb"]["ucode"] == 115


@pytest.mark.parametrize("bad", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_trustee_invalid_vceks_parse_but_fail(bad):
    cert = amd.load_certificate(read(f"milan-vcek-trustee/{bad}"))
    info = amd.endorsement_info(cert)
    assert info.hwid == bytes(range(64))  # raw and OCTET-STRING-wrapped both decode
    assert info.product == "Milan" and info.kind == "VCEK" and not info.errors
    v = verify_snp(read(TRUSTEE[0]), cert, now=AT)
    assert {"chain", "signature", "tcb"} <= failed(v)
    assert "hwID does not match CHIP_ID" in next(c for c in v.checks if c.name == "tcb").detail


def test_aws_vlek_valid_then_expired():
    report, vlek = (read(p) for p in AWS)
    v = verify_snp(report, vlek, now=AT)
    assert v.ok and v.fields["vmpl"] == 1 and v.fields["chip_id"] == "masked"
    assert v.fields["platform_info"]["raw"] == "0x27"
    assert v.fields["reported_tcb"] == {
        "raw": "04000000000018d9",
        "bl": 4,
        "tee": 0,
        "snp": 24,
        "ucode": 217,
    }
    info = amd.endorsement_info(amd.load_certificate(vlek))
    assert info.kind == "VLEK" and info.csp_id == "CN=cc-us-east-2.amazonaws.com"
    expired = verify_snp(report, vlek, now=TODAY)
    assert failed(expired) == {"chain"}
    assert "expired 2025-12-10 22:14:21" in expired.checks[2].detail
    assert not verify_snp(report, vlek, now=datetime(2025, 12, 10, 22, 14, 22, tzinfo=UTC)).ok
    # The explicit KDS bundle gives the same result as the embedded pinned one.
    explicit = verify_snp(
        report, vlek, now=AT, ark_ask_chain=(ROOTS / "ask_ark_milan_vlek.pem").read_bytes()
    )
    assert explicit.ok


def test_aws_vlek_against_vcek_chain_fails():
    report, vlek = (read(p) for p in AWS)
    v = verify_snp(report, vlek, now=AT, ark_ask_chain=(ROOTS / "ask_ark_milan.pem").read_bytes())
    assert failed(v) == {"chain"}


def test_aws_vmpl_policy():
    report, vlek = (read(p) for p in AWS)
    v = verify_snp(report, vlek, now=AT, policy=SnpPolicy(measurements=None))
    assert failed(v) == {"vmpl"}
    assert verify_snp(report, vlek, now=AT, policy=SnpPolicy(measurements=None, vmpl=1)).ok


def test_azure_genoa_hcl_binding_and_vtpm_quote():
    hcl_bytes = read("genoa-vcek-azure-hcl/hcl-report.bin")
    vcek = read(AZURE[1])
    hcl = AzureHclReport.parse(hcl_bytes)
    assert hcl.snp_report == read(AZURE[0])
    assert hashlib.sha256(hcl.snp_report).hexdigest() == (
        "227a641db25e82ae50344a548bdb8497ddcbb4783d67012b56d2c052ac57b4ad"
    )
    assert hcl.runtime_data == read("genoa-vcek-azure-hcl/runtime-data.json")
    assert hcl.expected_report_data() == bytes.fromhex(
        "b581f12e29a2d7d64e5e0b738d563879a78b51c644d0fa0cce02b48699f6bf5f"
    ) + bytes(32)
    evidence = json.loads(read("genoa-vcek-azure-hcl/evidence-genoa.json"))
    message = bytes(evidence["quote"]["message"])
    signature = bytes(evidence["quote"]["signature"])
    v = verify_azure_snp(hcl_bytes, vcek, now=AT, tpm_quote=(message, signature))
    assert v.ok, v.to_json()["failed"]
    assert {c.name for c in v.checks} >= {"report_data", "vtpm_quote", "chain", "tcb"}
    assert v.fields["guest_svn"] == 65547
    assert v.fields["reported_tcb"] == {
        "raw": "0a00000000001754",
        "bl": 10,
        "tee": 0,
        "snp": 23,
        "ucode": 84,
    }
    # Quote tampered: the AK signature no longer verifies.
    bad = verify_azure_snp(hcl_bytes, vcek, now=AT, tpm_quote=(message[:-1] + b"\0", signature))
    assert failed(bad) == {"vtpm_quote"}
    # Runtime data tampered: the REPORT_DATA binding breaks (SNP signature still fine).
    i = hcl_bytes.index(b"HCLAkPub")
    tampered = hcl_bytes[:i] + b"HCLAkPuc" + hcl_bytes[i + 8 :]
    assert failed(verify_azure_snp(tampered, vcek, now=AT)) == {"report_data"}


def test_turin_vcek_chains_only_to_turin():
    vcek = amd.load_certificate(read("turin-vcek-virtee/vcek_turin.der"))
    info = amd.endorsement_info(vcek)
    assert info.product == "Turin" and info.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
    assert info.tcb == {"fmc": 0, "bl": 0, "tee": 0, "snp": 0, "ucode": 9}
    turin = amd.load_certificates((ROOTS / "ask_ark_turin_vcek.pem").read_bytes())
    assert amd.verify_chain(vcek, turin, now=AT, product=None, vlek=False).ok
    for other in ("ask_ark_milan.pem", "ask_ark_genoa.pem"):
        chain = amd.load_certificates((ROOTS / other).read_bytes())
        assert not amd.verify_chain(vcek, chain, now=AT, product=None, vlek=False).ok


def test_embedded_roots_match_sample_files():
    for product, suffix in (("Milan", "milan"), ("Genoa", "genoa"), ("Turin", "turin_vcek")):
        ask, ark = amd.load_certificates((ROOTS / f"ask_ark_{suffix}.pem").read_bytes())
        assert (ask, ark) == amd.pinned_chain(product)
        assert amd.fingerprint(ark) == amd.PINNED_ARK_SHA256[product]
        assert amd.fingerprint(ask) == amd.PINNED_ASK_SHA256[product]
        assert amd.pinned_ark_product(ark) == product
    for product, suffix in (("Milan", "milan"), ("Genoa", "genoa"), ("Turin", "turin")):
        asvk, ark = amd.load_certificates((ROOTS / f"ask_ark_{suffix}_vlek.pem").read_bytes())
        assert (asvk, ark) == amd.pinned_chain(product, vlek=True)
        assert amd.fingerprint(asvk) == amd.PINNED_ASVK_SHA256[product]


def test_vcek_serial_zero_loads():
    """cryptography warns on serial 0 today; if it starts raising, this fails loudly."""
    for rel in (GOSEV[1], VIRTEE[1], TRUSTEE[1], AWS[1], AZURE[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cert = amd.load_certificate(read(rel))  # loading itself stays silent
            amd.endorsement_info(cert)
        with pytest.warns(Warning, match="serial number"):
            assert cert.serial_number == 0


# --- parsing ------------------------------------------------------------------------


def test_parse_fields_virtee():
    rep = AttestationReport.parse(read(VIRTEE[0]))
    assert rep.version == 2 and rep.vmpl == 0 and rep.signature_algo == 1
    assert rep.policy.raw == 0x30000 and rep.policy.smt_allowed and not rep.policy.debug
    assert rep.report_data.hex().startswith("d447b55d197491bf")
    assert rep.chip_id.hex().startswith("d49554ec717f4e5b")
    assert rep.cpuid_fam_id is None and rep.product is None
    assert rep.report_id_ma == b"\xff" * 32
    assert rep.problems() == []
    assert hashlib.sha256(rep.raw).hexdigest().startswith("120d77b213c8868d")


def test_parse_v3_cpuid():
    rep = AttestationReport.parse(read(AZURE[0]))
    assert (rep.cpuid_fam_id, rep.cpuid_mod_id, rep.cpuid_step) == (0x19, 0x11, 1)
    assert rep.product == "Genoa"
    aws = AttestationReport.parse(read(AWS[0]))
    assert aws.product == "Milan" and aws.signing_key == 1 and aws.vmpl == 1


def test_parse_rejects():
    good = read(VIRTEE[0])
    with pytest.raises(DecodeError):
        AttestationReport.parse(good[:-1])
    with pytest.raises(DecodeError):
        AttestationReport.parse(good + b"\0")
    for version in (0, 1, 6, 0xFFFFFFFF):
        with pytest.raises(UnsupportedError):
            AttestationReport.parse(version.to_bytes(4, "little") + good[4:])
    with pytest.raises(DecodeError):
        verify_snp(good[:100], read(VIRTEE[1]), now=AT)
    with pytest.raises(DecodeError):
        verify_snp(good, b"not a certificate", now=AT)


def test_version5_mitigation_vectors_parse():
    raw = bytearray(read(AZURE[0]))
    raw[0:4] = (5).to_bytes(4, "little")
    raw[0x1F8:0x208] = (7).to_bytes(8, "little") + (9).to_bytes(8, "little")
    rep = AttestationReport.parse(bytes(raw))
    assert (rep.launch_mit_vector, rep.current_mit_vector) == (7, 9)
    assert rep.problems() == []
    raw[0:4] = (3).to_bytes(4, "little")
    assert AttestationReport.parse(bytes(raw)).problems()  # MBZ in v3


def test_tcb_layouts():
    t = TcbVersion.from_components("Turin", fmc=1, bl=2, tee=3, snp=4, ucode=5)
    assert t.to_bytes() == bytes([1, 2, 3, 4, 0, 0, 0, 5])
    m = TcbVersion.from_components("Milan", bl=3, tee=0, snp=8, ucode=115)
    assert str(m) == "0300000000000873"
    assert m.components("Genoa") == {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}


# --- derived negatives ----------------------------------------------------------------


SIGNED_OFFSETS = [
    0x000,
    0x004,
    0x008,
    0x015,
    0x030,
    0x038,
    0x040,
    0x050,
    0x08F,
    0x090,
    0x0BF,
    0x0C0,
    0x0E0,
    0x110,
    0x140,
    0x160,
    0x180,
    0x187,
    0x1A0,
    0x1DF,
    0x1E0,
    0x1E8,
    0x1F0,
    0x1F7,
    0x200,
    0x29F,
]


@pytest.mark.parametrize("offset", SIGNED_OFFSETS)
def test_flip_signed_byte_breaks_signature(offset):
    report = bytearray(read(VIRTEE[0]))
    report[offset] ^= 0x80 if offset else 0x00  # a version flip is a parse error instead
    if offset == 0:
        report[offset] ^= 0x01  # 2 -> 3: still supported, still signed
    v = verify_snp(bytes(report), read(VIRTEE[1]), now=AT)
    assert "signature" in failed(v)


def test_virtee_negative_policy_byte():
    """virtee/sev's own negative test: bit 7 of byte 21 (a policy byte)."""
    report = bytearray(read(VIRTEE[0]))
    report[21] ^= 0x80
    assert "signature" in failed(verify_snp(bytes(report), read(VIRTEE[1]), now=AT))


@pytest.mark.parametrize("offset", [0x2A0, 0x2C0, 0x2E7, 0x2E8, 0x310, 0x32F])
def test_flip_signature_byte(offset):
    report = bytearray(read(AZURE[0]))
    report[offset] ^= 0x01
    assert failed(verify_snp(bytes(report), read(AZURE[1]), now=AT)) == {"signature"}


def test_nonzero_signature_padding_is_a_format_failure():
    report = bytearray(read(AZURE[0]))
    report[0x400] = 1
    assert failed(verify_snp(bytes(report), read(AZURE[1]), now=AT)) == {"report_parse"}


def test_swapped_vcek_fails():
    v = verify_snp(read(VIRTEE[0]), read(GOSEV[1]), now=AT)
    assert {"signature", "tcb"} <= failed(v)


def test_genoa_vcek_with_milan_chain_fails():
    milan = (ROOTS / "ask_ark_milan.pem").read_bytes()
    v = verify_snp(read(AZURE[0]), read(AZURE[1]), now=AT, ark_ask_chain=milan)
    assert failed(v) == {"chain"}


def test_milan_report_with_genoa_chain_fails():
    genoa = (ROOTS / "ask_ark_genoa.pem").read_bytes()
    v = verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=AT, ark_ask_chain=genoa)
    assert failed(v) == {"chain"}


def test_mixed_chain_milan_ask_genoa_ark_fails():
    ask, _ = amd.pinned_chain("Milan")
    _, ark = amd.pinned_chain("Genoa")
    v = verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=AT, ark_ask_chain=[ask, ark])
    assert failed(v) == {"chain"}


def test_lookalike_root_is_not_pinned():
    """A self-made 'ARK-Milan' with the same name is still not the pinned root."""
    ask, ark = amd.pinned_chain("Milan")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fake = (
        x509.CertificateBuilder()
        .subject_name(ark.subject)
        .issuer_name(ark.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(AT - timedelta(days=1))
        .not_valid_after(AT + timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    v = verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=AT, ark_ask_chain=[ask, fake])
    assert failed(v) == {"chain"}
    assert "not a pinned AMD ARK" in v.checks[2].detail
    trusted = verify_snp(
        read(VIRTEE[0]),
        read(VIRTEE[1]),
        now=AT,
        ark_ask_chain=[ask, fake],
        trusted_roots=[amd.fingerprint(fake)],
    )
    assert failed(trusted) == {"chain"}  # trusted, but the real ASK is not signed by it


def test_expired_chain():
    later = datetime(2030, 4, 4, tzinfo=UTC)  # after the virtee VCEK's notAfter
    assert failed(verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=later)) == {"chain"}
    far = datetime(2046, 1, 1, tzinfo=UTC)  # ASK/ARK-Milan expired too
    v = verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=far)
    assert "'ARK-Milan' expired" in v.checks[2].detail


def test_report_data_binding():
    report, vcek = (read(p) for p in VIRTEE)
    rd = AttestationReport.parse(report).report_data
    ok = verify_snp(report, vcek, now=AT, expected_report_data=rd)
    assert ok.ok and ok.checks[-1].name == "report_data"
    wrong = verify_snp(report, vcek, now=AT, expected_report_data=rd[:-1] + b"\0")
    assert failed(wrong) == {"report_data"}
    short = verify_snp(report, vcek, now=AT, expected_report_data=rd[:32])
    assert failed(short) == {"report_data"}


def test_measurement_policy():
    report, vcek = (read(p) for p in VIRTEE)
    m = AttestationReport.parse(report).measurement
    assert verify_snp(report, vcek, now=AT, policy=SnpPolicy(measurements={m.hex()})).ok
    other = SnpPolicy(measurements={bytes(48)})
    assert failed(verify_snp(report, vcek, now=AT, policy=other)) == {"measurement"}
    nothing = SnpPolicy(measurements=frozenset())
    assert failed(verify_snp(report, vcek, now=AT, policy=nothing)) == {"measurement"}


def test_smt_migration_min_tcb_policy():
    report, vcek = (read(p) for p in VIRTEE)
    no_smt = SnpPolicy(measurements=None, allow_smt=False)
    assert failed(verify_snp(report, vcek, now=AT, policy=no_smt)) == {"smt"}
    low = SnpPolicy(measurements=None, min_tcb={"bl": 3, "snp": 8, "ucode": 115})
    assert verify_snp(report, vcek, now=AT, policy=low).ok
    high = SnpPolicy(measurements=None, min_tcb={"ucode": 116})
    assert failed(verify_snp(report, vcek, now=AT, policy=high)) == {"min_tcb"}
    svn = SnpPolicy(measurements=None, min_guest_svn=1)
    assert failed(verify_snp(report, vcek, now=AT, policy=svn)) == {"guest_svn"}


def test_naive_now_is_refused():
    with pytest.raises(ValueError):
        verify_snp(read(VIRTEE[0]), read(VIRTEE[1]), now=datetime(2025, 6, 1))


# --- robustness -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2 * REPORT_SIZE))
def test_parse_random_bytes_raises_only_openpcc_errors(data):
    with contextlib.suppress(OpenPCCError):
        AttestationReport.parse(data)


_SAMPLE_REPORTS = [SNP / r for r in (GOSEV[0], VIRTEE[0], TRUSTEE[0], AWS[0], AZURE[0])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(_SAMPLE_REPORTS))),
    st.lists(st.tuples(st.integers(0, REPORT_SIZE - 1), st.integers(0, 255)), max_size=8),
)
def test_mutated_reports_verify_without_crashing(which, edits):
    raw = bytearray(_SAMPLE_REPORTS[which].read_bytes())
    for off, val in edits:
        raw[off] = val
    vcek = read(VIRTEE[1])
    try:
        v = verify_snp(bytes(raw), vcek, now=AT)
    except OpenPCCError:
        return
    assert isinstance(v.ok, bool)

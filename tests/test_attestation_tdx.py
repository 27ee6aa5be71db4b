"""TDX quote parsing and verification against the real samples in tests/attestation-samples."""

from __future__ import annotations

import contextlib
import hashlib
from datetime import UTC, datetime, timedelta

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openpcc.attestation.tdx import TdxPolicy, TdxQuote, intel_sgx_root_ca, verify_tdx
from openpcc.errors import DecodeError, OpenPCCError, UnsupportedError
from tests.conftest import SAMPLES

TDX = SAMPLES / "tdx"
T2025 = datetime(2025, 7, 1, tzinfo=UTC)
T2026 = datetime(2026, 3, 1, tzinfo=UTC)
T2023 = datetime(2023, 7, 1, tzinfo=UTC)
COLL_2025 = "emr-v4-uptodate-dcapqvl/tdx_quote_collateral.json"
COLL_2026 = "emr-v5-tcb-unmatched-dcapqvl/tdx_quote_outdated_collateral.json"
COLL_2023 = "spr-v4-gotdxguest-2023/collateral.json"

V4_UPTODATE = "emr-v4-uptodate-dcapqvl/tdx_quote"
V5_UPTODATE = "emr-v5-uptodate-gotdxguest/quote_v5_sample.dat"
V4_MRTD = bytes.fromhex(
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
V4_REPORT_DATA = bytes.fromhex(
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)


def read(rel: str) -> bytes:
    return (TDX / rel).read_bytes()


def coll(rel: str) -> str:
    return (TDX / rel).read_text()


def check(verdict, name):
    found = [c for c in verdict.checks if c.name == name]
    assert found, f"no check {name!r} in {verdict.checks}"
    return found[0]


# --- the README's expected outcomes ---------------------------------------------------

DCAP_CASES = [
    (V4_UPTODATE, COLL_2025, T2025, True, "UpToDate"),
    (V5_UPTODATE, COLL_2026, T2026, True, "UpToDate"),
    ("emr-v5-tcb-unmatched-dcapqvl/tdx_quote_outdated", COLL_2026, T2026, False, "No matching"),
    ("spr-v4-gotdxguest-2023/tdx_prod_quote_SPR_E4.dat", COLL_2023, T2023, False, "No matching"),
    ("spr-v4-debug-trustee/tdx_quote_4.dat", COLL_2023, T2023, False, "Debug mode is enabled"),
]


@pytest.mark.parametrize(("quote", "collateral", "now", "ok", "status"), DCAP_CASES)
def test_dcap_outcomes_match_readme(quote, collateral, now, ok, status):
    v = verify_tdx(read(quote), coll(collateral), now=now, expected_report_data=None, policy=None)
    assert v.ok is ok
    assert check(v, "dcap").ok is ok
    assert status in check(v, "dcap").detail
    assert status in v.fields["tcb_status"]
    # every TDX sample's signatures are fine; failures come from TCB/policy only
    for name in ("quote_parse", "quote_signature", "qe_binding", "qe_signature", "pck_chain"):
        assert check(v, name).ok, check(v, name)


def test_uptodate_fields():
    v = verify_tdx(read(V4_UPTODATE), coll(COLL_2025), now=T2025, expected_report_data=None)
    f = v.fields
    assert f["quote_version"] == 4
    assert f["fmspc"] == "B0C06F000000"
    assert f["mrtd"] == V4_MRTD.hex()
    assert f["report_data"] == V4_REPORT_DATA.hex()
    assert f["td_attributes"] == "0000001000000000"
    assert f["tcb_status"] == "UpToDate"
    assert f["advisory_ids"] == []
    assert f["rtmr3"] == "00" * 48
    assert f["tcb_eval_data_number"] == 17
    assert not v.judged


def test_debug_td_fails_debug_check_and_allow_debug_cannot_rescue_dcap():
    q = read("spr-v4-debug-trustee/tdx_quote_4.dat")
    v = verify_tdx(q, coll(COLL_2023), now=T2023, expected_report_data=None)
    assert not check(v, "debug").ok
    v = verify_tdx(
        q, coll(COLL_2023), now=T2023, expected_report_data=None, policy=TdxPolicy(allow_debug=True)
    )
    assert check(v, "debug").ok
    assert not check(v, "dcap").ok  # dcap-qvl has no switch for debug TDs
    assert not v.ok


def test_sgx_quote_is_refused_as_not_tdx():
    with pytest.raises(UnsupportedError):
        TdxQuote.parse(read("sgx-v3-dcapqvl/sgx_quote"))
    v = verify_tdx(
        read("sgx-v3-dcapqvl/sgx_quote"),
        coll("sgx-v3-dcapqvl/sgx_quote_collateral.json"),
        now=T2025,
        expected_report_data=None,
    )
    assert not v.ok
    assert not check(v, "quote_parse").ok


PARSE_ONLY = [
    ("parse-only/trustee_tdx_quote_5.dat", 5, 3, "90C06F000000"),
    ("parse-only/trustee_tdx_quote_6.dat", 4, 2, "00A06D080000"),
    ("parse-only/gcp_cos113_tdx_quote.dat", 4, 2, "00806F050000"),
    ("parse-only/phala_dstack_quote.hex", 4, 2, "B0C06F000000"),
    ("azure-tdx-vtpm-spr/td-quote.bin", 4, 2, "00806F050000"),
]


@pytest.mark.parametrize(("path", "version", "body_type", "fmspc"), PARSE_ONLY)
def test_parse_only_samples_parse_and_sign(path, version, body_type, fmspc):
    q = TdxQuote.parse(read(path))
    assert (q.version, q.body_type) == (version, body_type)
    assert q.tee_type == 0x81
    assert q.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    v = verify_tdx(read(path), None, now=T2025, expected_report_data=None)
    for name in ("quote_signature", "qe_binding", "qe_signature", "pck_chain"):
        assert check(v, name).ok, check(v, name)
    assert v.fields["fmspc"] == fmspc
    assert not check(v, "dcap").ok  # no collateral: TCB unknown, fail closed
    assert not v.ok


def test_quote_v5_tdx15_fields():
    q = TdxQuote.parse(read("parse-only/trustee_tdx_quote_5.dat"))
    assert q.report.mrservicetd is not None and q.report.mrservicetd.hex().startswith("383c87d3")
    q = TdxQuote.parse(read(V5_UPTODATE))
    assert q.report.tee_tcb_svn2.hex().startswith("0d010400")
    assert len(q.signed_region) == 702


@pytest.mark.parametrize("path", [V4_UPTODATE, V5_UPTODATE, "parse-only/gcp_cos113_tdx_quote.dat"])
def test_parser_agrees_with_dcap_qvl(path):
    raw = read(path)
    ours = TdxQuote.parse(raw).report
    theirs = dcap_qvl.parse_quote(raw).report
    assert ours.mrtd == bytes(theirs.mr_td)
    assert ours.rtmrs == tuple(bytes(getattr(theirs, f"rt_mr{i}")) for i in range(4))
    assert ours.report_data == bytes(theirs.report_data)
    assert ours.td_attributes == bytes(theirs.td_attributes)
    assert ours.mrseam == bytes(theirs.mr_seam)
    assert ours.xfam == bytes(theirs.xfam)


def test_trailing_text_is_ignored():
    raw = read("spr-v4-gotdxguest-2023/tdx_prod_quote_SPR_E4.dat")
    q = TdxQuote.parse(raw)
    assert raw.endswith(b"extra bytes(only for testing purpose)\n")
    assert len(q.raw) == len(raw) - 39


def test_azure_report_data_binds_runtime_data():
    runtime = read("azure-tdx-vtpm-spr/runtime-data.json")
    want = hashlib.sha256(runtime).digest() + bytes(32)
    v = verify_tdx(
        read("azure-tdx-vtpm-spr/td-quote.bin"), None, now=T2025, expected_report_data=want
    )
    assert check(v, "report_data").ok


# --- negative tests derived in code ---------------------------------------------------


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def test_report_data_match_and_mismatch():
    raw, c = read(V4_UPTODATE), coll(COLL_2025)
    assert verify_tdx(raw, c, now=T2025, expected_report_data=V4_REPORT_DATA).ok
    v = verify_tdx(raw, c, now=T2025, expected_report_data=flip(V4_REPORT_DATA, 0))
    assert not v.ok and not check(v, "report_data").ok


@pytest.mark.parametrize("pos", [1, 48 + 136, 48 + 520])  # header, MRTD, REPORTDATA
def test_flipped_byte_in_signed_region_fails(pos):
    v = verify_tdx(
        flip(read(V4_UPTODATE), pos), coll(COLL_2025), now=T2025, expected_report_data=None
    )
    assert not v.ok
    if pos != 1:  # a header flip may turn into a parse refusal instead
        assert not check(v, "quote_signature").ok
        assert not check(v, "dcap").ok


def test_flipped_byte_in_qe_report_fails():
    raw = read(V4_UPTODATE)
    qe_report_off = 632 + 4 + 64 + 64 + 6
    v = verify_tdx(
        flip(raw, qe_report_off + 10), coll(COLL_2025), now=T2025, expected_report_data=None
    )
    assert check(v, "quote_signature").ok
    assert not check(v, "qe_signature").ok
    assert not check(v, "dcap").ok


def test_flipped_qe_auth_data_breaks_binding():
    raw = read(V4_UPTODATE)
    auth_off = 632 + 4 + 64 + 64 + 6 + 384 + 64 + 2
    v = verify_tdx(flip(raw, auth_off), coll(COLL_2025), now=T2025, expected_report_data=None)
    assert not check(v, "qe_binding").ok
    assert not v.ok


@pytest.mark.parametrize("delta", [timedelta(days=-400), timedelta(days=500)])
def test_outside_collateral_window_fails(delta):
    v = verify_tdx(read(V4_UPTODATE), coll(COLL_2025), now=T2025 + delta, expected_report_data=None)
    assert not check(v, "dcap").ok
    assert not v.ok


def test_today_fails_everything_has_expired():
    v = verify_tdx(
        read(V4_UPTODATE),
        coll(COLL_2025),
        now=datetime(2026, 11, 25, tzinfo=UTC),
        expected_report_data=None,
    )
    assert not v.ok


def _self_signed_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2018, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2049, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_wrong_root_fails_chain_and_dcap():
    v = verify_tdx(
        read(V4_UPTODATE),
        coll(COLL_2025),
        now=T2025,
        expected_report_data=None,
        root_ca=_self_signed_root(),
    )
    assert not check(v, "pck_chain").ok
    assert not check(v, "dcap").ok


def test_pinned_root_is_intel():
    root = intel_sgx_root_ca()
    sample = x509.load_der_x509_certificate(
        (TDX / "intel-root" / "Intel_SGX_Root_CA.der").read_bytes()
    )
    assert root == sample
    assert root.fingerprint(hashes.SHA256()).hex() == (
        "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
    )


# --- policy --------------------------------------------------------------------------


def test_policy_allow_lists():
    raw, c = read(V4_UPTODATE), coll(COLL_2025)
    q = TdxQuote.parse(raw)
    good = TdxPolicy(
        mrtd={V4_MRTD.hex()},
        rtmr0={q.report.rtmrs[0]},
        rtmr3={bytes(48)},
        mrseam={q.report.mrseam},
        min_tcb_eval_data_number=17,
        min_tee_tcb_svn=q.report.tee_tcb_svn,
        require_sept_ve_disable=True,
    )
    v = verify_tdx(raw, c, now=T2025, expected_report_data=V4_REPORT_DATA, policy=good)
    assert v.ok and v.judged, v.failures()
    bad = TdxPolicy(mrtd={bytes(48)})
    v = verify_tdx(raw, c, now=T2025, expected_report_data=None, policy=bad)
    assert not v.ok and [f.name for f in v.failures()] == ["mrtd"]
    v = verify_tdx(
        raw,
        c,
        now=T2025,
        expected_report_data=None,
        policy=TdxPolicy(rtmr1={bytes(48)}, min_tcb_eval_data_number=18),
    )
    assert {f.name for f in v.failures()} == {"rtmr1", "min_tcb"}


def test_policy_refuses_never_acceptable_statuses():
    with pytest.raises(ValueError):
        TdxPolicy(accepted_tcb_statuses=frozenset({"UpToDate", "OutOfDate"}))
    with pytest.raises(ValueError):
        TdxPolicy(accepted_tcb_statuses=frozenset({"Revoked"}))
    TdxPolicy(accepted_tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}))


# --- robustness ----------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_parse_random_bytes_raises_only_openpcc_errors(data):
    with contextlib.suppress(OpenPCCError):
        TdxQuote.parse(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_parse_mutated_quote_raises_only_openpcc_errors(data):
    raw = bytearray(read(V5_UPTODATE))
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 8))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        q = TdxQuote.parse(bytes(raw))
        q.pck_chain()
    except OpenPCCError:
        pass


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 1500), st.integers(0, 255))
def test_verify_never_raises_on_mutated_quote(pos, value):
    raw = bytearray(read(V4_UPTODATE))
    raw[pos] = value
    v = verify_tdx(bytes(raw), coll(COLL_2025), now=T2025, expected_report_data=None)
    if bytes(raw) != read(V4_UPTODATE):
        assert v.checks  # a verdict, never an exception


def test_hex_input_and_bad_hex():
    text = read(V4_UPTODATE).hex()
    assert TdxQuote.parse(text).version == 4
    assert TdxQuote.parse("0x" + text).version == 4
    with pytest.raises(DecodeError):
        TdxQuote.parse("abc")

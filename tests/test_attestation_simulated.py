"""Simulated TEE: real SNP format, same verifier, rejected unless its root is trusted."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta

import pytest

from openpcc.attestation import amd
from openpcc.attestation.claims import Claims, check_claims, report_data_for
from openpcc.attestation.simulated import KEY_FILE, LEAF_FILE, ROOT_FILE, SimulatedTEE
from openpcc.attestation.snp import AttestationReport, SnpPolicy, verify_snp
from tests.conftest import SAMPLES

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
MEASUREMENT = bytes(range(48))


@pytest.fixture(scope="module")
def tee(tmp_path_factory: pytest.TempPathFactory) -> SimulatedTEE:
    return SimulatedTEE.create(tmp_path_factory.mktemp("devtee"), now=NOW)


def failed(v) -> set[str]:
    return {c.name for c in v.failures()}


def trusted(tee: SimulatedTEE, report: bytes, **kw):
    return verify_snp(
        report,
        tee.leaf_pem,
        now=NOW,
        ark_ask_chain=tee.root_pem,
        trusted_roots=[tee.root_fingerprint],
        **kw,
    )


def test_report_is_real_format(tee):
    report = tee.issue_report(b"\x07" * 64, measurement=MEASUREMENT)
    rep = AttestationReport.parse(report)
    assert len(report) == 1184 and rep.version == 3
    assert rep.product == "Genoa" and rep.signing_key == 0 and rep.signature_algo == 1
    assert rep.report_data == b"\x07" * 64 and rep.measurement == MEASUREMENT
    assert rep.reported_tcb == rep.current_tcb == rep.committed_tcb == rep.launch_tcb
    assert rep.problems() == []


def test_round_trip_with_explicit_trust(tee):
    rd = b"\x42" * 64
    report = tee.issue_report(rd, measurement=MEASUREMENT)
    v = trusted(tee, report, expected_report_data=rd)
    assert v.ok, v.to_json()["failed"]
    assert v.platform == "simulated-snp"  # never mistaken for real hardware
    assert v.fields["root"] == tee.root_fingerprint
    # Trust via the policy instead of the keyword: same result, judged.
    policy = SnpPolicy(measurements={MEASUREMENT}, trusted_roots={tee.root_fingerprint.upper()})
    v2 = verify_snp(report, tee.leaf_pem, now=NOW, ark_ask_chain=tee.root_pem, policy=policy)
    assert v2.ok and v2.judged and v2.platform == "simulated-snp"


def test_rejected_without_trust(tee, tmp_path):
    report = tee.issue_report(b"\0" * 64)
    v = verify_snp(report, tee.leaf_pem, now=NOW, ark_ask_chain=tee.root_pem)
    assert failed(v) == {"chain"} and v.platform == "sev-snp"
    assert "not a pinned AMD ARK" in v.checks[2].detail
    # Default (pinned AMD Genoa chain): the dev leaf is not issued by AMD.
    assert failed(verify_snp(report, tee.leaf_pem, now=NOW)) == {"chain"}
    # Another machine's dev root is trusted, this one is not.
    other = SimulatedTEE.create(tmp_path, now=NOW)
    v3 = verify_snp(
        report,
        tee.leaf_pem,
        now=NOW,
        ark_ask_chain=tee.root_pem,
        trusted_roots=[other.root_fingerprint],
    )
    assert failed(v3) == {"chain"}


def test_dev_root_cannot_pose_as_amd_product(tee):
    """Trusting a dev root does not let it sign under an AMD chain or an AMD ASK."""
    report = tee.issue_report(b"\0" * 64)
    ask, _ = amd.pinned_chain("Genoa")
    v = verify_snp(
        report,
        tee.leaf_pem,
        now=NOW,
        ark_ask_chain=[ask, tee.root_cert],
        trusted_roots=[tee.root_fingerprint],
    )
    assert failed(v) == {"chain"}


def test_real_report_under_dev_root_fails(tee):
    report = SAMPLES / "sev-snp/genoa-vcek-azure-hcl/snp-report.bin"
    v = trusted(tee, report.read_bytes())
    assert {"signature", "tcb"} <= failed(v)


def test_load_round_trip_and_files(tee, tmp_path):
    t = SimulatedTEE.create(tmp_path, now=NOW, product="Milan")
    for name in (ROOT_FILE, LEAF_FILE, KEY_FILE):
        assert (tmp_path / name).is_file()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    loaded = SimulatedTEE.load(tmp_path)
    assert loaded.root_fingerprint == t.root_fingerprint
    assert loaded.chip_id == t.chip_id and loaded.tcb == t.tcb and loaded.product == "Milan"
    report = loaded.issue_report(b"\x01" * 64)
    v = verify_snp(
        report,
        t.leaf_pem,
        now=NOW,
        ark_ask_chain=t.root_pem,
        trusted_roots=[t.root_fingerprint],
    )
    assert v.ok and v.fields["product"] == "Milan"


def test_turin_layout(tmp_path):
    t = SimulatedTEE.create(
        tmp_path, now=NOW, product="Turin", tcb={"fmc": 1, "bl": 2, "tee": 3, "snp": 4, "ucode": 5}
    )
    v = trusted(t, t.issue_report(bytes(64)))
    assert v.ok
    assert v.fields["reported_tcb"] == {
        "raw": "0102030400000005",
        "fmc": 1,
        "bl": 2,
        "tee": 3,
        "snp": 4,
        "ucode": 5,
    }
    stale = trusted(t, t.issue_report(bytes(64), reported_tcb={**t.tcb, "fmc": 2}))
    assert failed(stale) == {"tcb"}


def test_debug_bit_rejected(tee):
    report = tee.issue_report(bytes(64), policy=0x30000 | 1 << 19)
    v = trusted(tee, report)
    assert failed(v) == {"debug"}
    allow = SnpPolicy(measurements=None, allow_debug=True)
    assert trusted(tee, report, policy=allow).ok


def test_stale_tcb_rejected(tee):
    higher = {**tee.tcb, "snp": tee.tcb["snp"] + 1}
    v = trusted(tee, tee.issue_report(bytes(64), reported_tcb=higher))
    assert failed(v) == {"tcb"}
    assert "REPORTED_TCB snp=24 but certificate says 23" in v.checks[3].detail
    lower = {**tee.tcb, "ucode": tee.tcb["ucode"] - 1}
    assert failed(trusted(tee, tee.issue_report(bytes(64), reported_tcb=lower))) == {"tcb"}


def test_policy_knobs(tee):
    report = tee.issue_report(bytes(64), measurement=MEASUREMENT, vmpl=2, policy=0x30000 | 1 << 18)
    policy = SnpPolicy(measurements={bytes(48)}, allow_smt=False, min_tcb={"snp": 99})
    v = trusted(tee, report, policy=policy)
    assert failed(v) == {"measurement", "smt", "migration_agent", "vmpl", "min_tcb"}


def test_resigned_tamper_still_fails_without_resigning(tee):
    report = bytearray(tee.issue_report(bytes(64)))
    report[0x90] ^= 1
    assert failed(trusted(tee, bytes(report))) == {"signature"}
    assert trusted(tee, tee.sign_report(bytes(report))).ok


def test_expired_dev_chain(tee):
    v = verify_snp(
        tee.issue_report(bytes(64)),
        tee.leaf_pem,
        now=NOW + timedelta(days=3651),
        ark_ask_chain=tee.root_pem,
        trusted_roots=[tee.root_fingerprint],
    )
    assert failed(v) == {"chain"}


def test_claims_end_to_end(tee):
    """Node: claims -> REPORT_DATA -> report. Client: verify evidence, binding, expiry."""
    issued = int(NOW.timestamp())
    claims = Claims(
        node_id="dev-node-1",
        hpke_public_key=b"\x11" * 32,
        tee="simulated-snp",
        gpu_evidence_digest=None,
        model_digest=b"\x22" * 32,
        release_id="dev",
        issued_at=issued,
        expires_at=issued + 3600,
        signing_key=b"\x33" * 32,
    )
    report = tee.issue_report(report_data_for(claims), measurement=MEASUREMENT)
    received = Claims.decode(claims.encode())
    v = trusted(tee, report, expected_report_data=report_data_for(received))
    v.checks.extend(check_claims(received, NOW + timedelta(minutes=1)))
    assert v.ok
    # Claims altered in transit (another HPKE key): binding fails.
    swapped = Claims.decode(claims.encode().replace(b"11" * 32, b"33" * 32))
    assert failed(trusted(tee, report, expected_report_data=report_data_for(swapped))) == {
        "report_data"
    }
    # Past expiry: the claims check fails even though the evidence is fine.
    late = check_claims(received, NOW + timedelta(hours=2))
    assert [c.name for c in late if not c.ok] == ["claims_window"]

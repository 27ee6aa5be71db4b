"""Attestation bundle: strict JSON, and verify_bundle over simulated and real evidence."""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openpcc.attestation.bundle import (
    AttestationBundle,
    GpuEvidence,
    make_simulated_bundle,
    verify_bundle,
)
from openpcc.attestation.claims import Claims, gpu_evidence_digest_for, gpu_nonce_for
from openpcc.attestation.policy import MANIFEST_FORMAT, TrustPolicy
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.errors import DecodeError, EncodeError, LimitExceededError
from tests.conftest import SAMPLES

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
T0 = int(NOW.timestamp())
MEAS = bytes(range(48))
MODEL = b"\x4d" * 32
NODE_KEY = b"\x11" * 32
REL = "openpcc-dev"
SNP = SAMPLES / "sev-snp"
TDX = SAMPLES / "tdx"
GPU = SAMPLES / "nvidia-gpu" / "h100-nvtrust-sample"


def claims_at(t: int, tee: str = "simulated-snp", **kw) -> Claims:
    base = dict(
        node_id="node-1",
        hpke_public_key=NODE_KEY,
        tee=tee,
        gpu_evidence_digest=None,
        model_digest=MODEL,
        release_id=REL,
        issued_at=t - 60,
        expires_at=t + 3600,
        signing_key=b"\x44" * 32,
    )
    base.update(kw)
    return Claims(**base)


def dev_policy(tee: SimulatedTEE | None, **over) -> TrustPolicy:
    obj = {
        "format": MANIFEST_FORMAT,
        "serial": 1,
        "issued_at": T0 - 86400,
        "expires_at": T0 + 86400,
        "releases": {REL: {"model_digests": [MODEL.hex()], "snp": {"measurements": [MEAS.hex()]}}},
        "gpu": {"require": False},
        "development_roots": [tee.root_fingerprint] if tee else [],
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    obj.update(over)
    return TrustPolicy.unsigned_for_tests(json.dumps(obj).encode())


@pytest.fixture(scope="module")
def tee(tmp_path_factory: pytest.TempPathFactory) -> SimulatedTEE:
    return SimulatedTEE.create(tmp_path_factory.mktemp("devtee"), now=NOW)


@pytest.fixture(scope="module")
def bundle(tee) -> AttestationBundle:
    return make_simulated_bundle(tee, claims_at(T0), MEAS)


def failed(v) -> set[str]:
    return {c.name for c in v.failures()}


# --- encoding ----------------------------------------------------------------------------


def test_json_round_trip_is_canonical(bundle):
    data = bundle.encode()
    again = AttestationBundle.decode(data)
    assert again == bundle and again.encode() == data
    obj = json.loads(data)
    assert data == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert base64.b64decode(obj["claims"]) == bundle.claims.encode()
    # Pretty-printed (as a directory might re-serialize it) still parses to the same bundle.
    assert AttestationBundle.decode(json.dumps(obj, indent=2).encode()) == bundle
    assert AttestationBundle.from_json_obj(obj) == bundle


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(version=2),
        lambda o: o.update(version=True),
        lambda o: o.update(extra=1),
        lambda o: o.pop("gpu"),
        lambda o: o.update(tee="sgx"),
        lambda o: o.update(evidence=o["evidence"] + "\n"),
        lambda o: o.update(evidence=o["evidence"].rstrip("=")),
        lambda o: o.update(claims=base64.b64encode(b"{}").decode()),
        lambda o: o["endorsements"].pop("vcek"),
        lambda o: o["endorsements"].update(vlek="x"),
        lambda o: o["endorsements"].update(other="x"),
        lambda o: o.update(endorsements={"vcek": 5}),
        lambda o: o.update(gpu={}),
        lambda o: o.update(gpu=[{"evidence": ""}]),
        lambda o: o.update(gpu=[{"evidence": "", "cert_chain_pem": "", "x": []}]),
        lambda o: o.update(gpu=[{"evidence": "", "cert_chain_pem": "", "rims": "x"}]),
    ],
)
def test_strict_parse(bundle, mutate):
    obj = json.loads(bundle.encode())
    mutate(obj)
    with pytest.raises(DecodeError):
        AttestationBundle.decode(json.dumps(obj).encode())


def test_size_limits(bundle):
    obj = json.loads(bundle.encode())
    obj["evidence"] = base64.b64encode(bytes(70_000)).decode()
    with pytest.raises(LimitExceededError):
        AttestationBundle.decode(json.dumps(obj).encode())
    obj = json.loads(bundle.encode())
    obj["gpu"] = [{"evidence": "", "cert_chain_pem": ""}] * 17
    with pytest.raises(LimitExceededError):
        AttestationBundle.decode(json.dumps(obj).encode())
    with pytest.raises(LimitExceededError):
        AttestationBundle.decode(b" " * (5 << 20))
    dup = bundle.encode().replace(b'"tee":', b'"tee":"tdx","tee":', 1)
    with pytest.raises(DecodeError, match="duplicate"):
        AttestationBundle.decode(dup)


def test_simulated_bundle_preconditions(tee):
    with pytest.raises(EncodeError):
        make_simulated_bundle(tee, claims_at(T0, tee="sev-snp"), MEAS)
    with pytest.raises(EncodeError):
        make_simulated_bundle(tee, claims_at(T0, gpu_evidence_digest=bytes(32)), MEAS)


# --- verification with the simulated TEE ------------------------------------------------


def test_simulated_bundle_verifies_under_a_dev_policy(tee, bundle):
    v = verify_bundle(bundle, policy=dev_policy(tee), now=NOW, expected_node_key=NODE_KEY)
    assert v.ok, v.to_json()["failed"]
    assert v.platform == "bundle" and v.judged
    names = {c.name for c in v.checks}
    assert {
        "claims_window",
        "tee_type",
        "node_key",
        "release",
        "model_digest",
        "development",
        "tee.signature",
        "tee.chain",
        "tee.report_data",
        "tee.measurement",
        "tee.root_kind",
        "gpu_digest",
    } <= names
    assert v.fields["tee"]["platform"] == "simulated-snp"
    assert v.fields["claims"]["node_id"] == "node-1"


def test_simulated_bundle_rejected_without_trust(tee, bundle, tmp_path):
    v = verify_bundle(bundle, policy=None, now=NOW)
    assert not v.ok and not v.judged
    assert failed(v) == {"tee.chain", "tee.root_kind"}
    # A production manifest (no development roots): rejected.
    v = verify_bundle(bundle, policy=dev_policy(None), now=NOW)
    assert {"development", "tee.chain"} <= failed(v)
    # Another machine's development root: rejected.
    other = SimulatedTEE.create(tmp_path, now=NOW)
    assert "tee.chain" in failed(verify_bundle(bundle, policy=dev_policy(other), now=NOW))


def test_simulated_report_cannot_pose_as_real_hardware(tee, bundle):
    policy = dev_policy(tee)
    # Relabel bundle and claims as sev-snp: the claims change, and so does REPORT_DATA;
    # even re-issued for the new claims, the dev root is not accepted for sev-snp.
    fake_claims = replace(bundle.claims, tee="sev-snp")
    relabeled = replace(bundle, tee="sev-snp", claims=fake_claims)
    assert {"tee.report_data", "tee.chain"} <= failed(
        verify_bundle(relabeled, policy=policy, now=NOW)
    )
    from openpcc.attestation.claims import report_data_for

    report = tee.issue_report(report_data_for(fake_claims), measurement=MEAS)
    reissued = replace(relabeled, evidence=report)
    assert failed(verify_bundle(reissued, policy=policy, now=NOW)) == {"tee.chain"}
    # Only the bundle's label changed: claims and evidence disagree.
    assert "tee_type" in failed(
        verify_bundle(replace(bundle, tee="sev-snp"), policy=policy, now=NOW)
    )


def test_negative_cases(tee, bundle):
    policy = dev_policy(tee)
    # Someone else's node key.
    v = verify_bundle(bundle, policy=policy, now=NOW, expected_node_key=b"\x22" * 32)
    assert failed(v) == {"node_key"}
    # Claims past expiry / not yet valid.
    assert failed(verify_bundle(bundle, policy=policy, now=NOW + timedelta(hours=2))) == {
        "claims_window"
    }
    assert "claims_window" in failed(verify_bundle(bundle, policy=policy, now=NOW - timedelta(1)))
    # Claims swapped for another key: REPORT_DATA no longer binds them.
    swapped = replace(bundle, claims=replace(bundle.claims, hpke_public_key=b"\x33" * 32))
    assert failed(verify_bundle(swapped, policy=policy, now=NOW)) == {"tee.report_data"}
    # A measurement not in the release.
    other = make_simulated_bundle(tee, claims_at(T0), bytes(48))
    assert failed(verify_bundle(other, policy=policy, now=NOW)) == {"tee.measurement"}
    # Weights not in the release.
    wrong_model = make_simulated_bundle(tee, claims_at(T0, model_digest=bytes(32)), MEAS)
    assert failed(verify_bundle(wrong_model, policy=policy, now=NOW)) == {"model_digest"}
    # An unknown release.
    unknown = make_simulated_bundle(tee, claims_at(T0, release_id="rogue-1"), MEAS)
    assert {"release", "model_digest"} <= failed(verify_bundle(unknown, policy=policy, now=NOW))
    # Claims promise GPU evidence that the bundle lacks.
    lying = replace(bundle, claims=replace(bundle.claims, gpu_evidence_digest=bytes(32)))
    assert "gpu_digest" in failed(verify_bundle(lying, policy=policy, now=NOW))
    # The policy requires GPUs.
    gpu_policy = dev_policy(tee, gpu={"require": True})
    assert failed(verify_bundle(bundle, policy=gpu_policy, now=NOW)) == {"gpu_required"}
    # Debug on (re-signed by the dev key): rejected.
    debug = bytearray(bundle.evidence)
    debug[10] |= 0x08  # POLICY bit 19
    resigned = replace(bundle, evidence=tee.sign_report(bytes(debug)))
    assert failed(verify_bundle(resigned, policy=policy, now=NOW)) == {"tee.debug"}
    # Minimum TCB above the report's: rejected; a product without a minimum: rejected.
    stale = dev_policy(tee, snp={"min_tcb": {"Genoa": {"snp": 24}}})
    assert failed(verify_bundle(bundle, policy=stale, now=NOW)) == {"tee.min_tcb"}
    milan_only = dev_policy(tee, snp={"min_tcb": {"Milan": {"snp": 1}}})
    assert failed(verify_bundle(bundle, policy=milan_only, now=NOW)) == {"tee.min_tcb"}
    # Garbage evidence: a failed check, never an exception.
    garbage = replace(bundle, evidence=b"\0" * 10)
    assert failed(verify_bundle(garbage, policy=policy, now=NOW)) == {"tee.report_parse"}
    bad_cert = replace(bundle, endorsements={"vcek": "not a cert"})
    assert failed(verify_bundle(bad_cert, policy=policy, now=NOW)) == {"tee.endorsement"}


def test_flipped_byte_in_signed_report(tee, bundle):
    ev = bytearray(bundle.evidence)
    ev[0x90] ^= 1  # MEASUREMENT
    v = verify_bundle(replace(bundle, evidence=bytes(ev)), policy=dev_policy(tee), now=NOW)
    assert {"tee.signature", "tee.measurement"} <= failed(v)


# --- real evidence inside bundles ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_real_snp_report_in_a_bundle():
    """A real Milan report is genuine, but not bound to our claims."""
    at = datetime(2025, 6, 1, tzinfo=UTC)
    claims = claims_at(int(at.timestamp()), tee="sev-snp")
    vcek = (SNP / "milan-vcek-virtee" / "vcek_milan.der").read_bytes()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = x509.load_der_x509_certificate(vcek).public_bytes(serialization.Encoding.PEM).decode()
    report = (SNP / "milan-vcek-virtee" / "report_milan.bin").read_bytes()
    b = AttestationBundle(claims, "sev-snp", report, {"vcek": pem})
    v = verify_bundle(b, policy=None, now=at)
    assert failed(v) == {"tee.report_data"}
    assert v.fields["tee"]["platform"] == "sev-snp"
    # 2030: the VCEK has expired, so the chain fails too.
    later = verify_bundle(b, policy=None, now=datetime(2030, 6, 1, tzinfo=UTC))
    assert "tee.chain" in failed(later)


def test_real_tdx_quote_in_a_bundle():
    at = datetime(2025, 7, 1, tzinfo=UTC)
    folder = TDX / "emr-v4-uptodate-dcapqvl"
    collateral = json.loads((folder / "tdx_quote_collateral.json").read_text())
    claims = claims_at(int(at.timestamp()), tee="tdx")
    b = AttestationBundle(
        claims, "tdx", (folder / "tdx_quote").read_bytes(), {"collateral": collateral}
    )
    b = AttestationBundle.decode(b.encode())
    v = verify_bundle(b, policy=None, now=at)
    assert failed(v) == {"tee.report_data"}
    assert {"tee.quote_signature", "tee.dcap", "tee.pck_chain"} <= {c.name for c in v.checks}


def test_real_gpu_evidence_in_a_bundle(tmp_path):
    """Real H100 evidence, bound into the claims' digest, but with the sample's nonce."""
    evidence = (GPU / "attestation_report.bin").read_bytes()
    chain = (GPU / "gpu_cert_chain.pem").read_text()
    rims = tuple(p.read_bytes() for p in sorted((GPU / "rims").iterdir()))
    at = datetime(2025, 8, 21, 12, tzinfo=UTC)
    tee = SimulatedTEE.create(tmp_path, now=at)
    claims = claims_at(int(at.timestamp()), gpu_evidence_digest=gpu_evidence_digest_for([evidence]))
    from openpcc.attestation.claims import report_data_for

    report = tee.issue_report(report_data_for(claims), measurement=MEAS)
    b = AttestationBundle(
        claims,
        "simulated-snp",
        report,
        {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()},
        (GpuEvidence(evidence, chain, rims),),
    )
    b = AttestationBundle.decode(b.encode())
    v = verify_bundle(b, policy=dev_policy(tee, gpu={"require": True}), now=at)
    f = failed(v)
    assert "gpu[0].nonce" in f  # the sample's nonce is not derived from our claims
    assert gpu_nonce_for(claims).hex() != v.fields["gpu[0]"]["nonce"]
    assert "gpu[0].driver_version" in f  # the dev release lists no GPU versions
    for ok in ("gpu_digest", "gpu_required", "gpu[0].signature", "gpu[0].chain", "tee.chain"):
        assert ok not in f, ok
    # Swap the GPU evidence for other bytes: the claims' digest no longer matches.
    swapped = replace(b, gpu=(GpuEvidence(evidence + b"\0", chain, rims),))
    assert "gpu_digest" in failed(verify_bundle(swapped, policy=None, now=at))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(str.encode))
def test_decode_never_raises_anything_but_decode_error(data):
    with contextlib.suppress(DecodeError):
        AttestationBundle.decode(data)


@settings(max_examples=100, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_from_json_obj_rejects_arbitrary_json(value):
    with pytest.raises(DecodeError):
        AttestationBundle.from_json_obj(value)


def test_a_post_quantum_manifest_refuses_a_node_without_an_x_wing_key(tee):
    """post_quantum.require covers the inner layer: a node attesting no X-Wing key fails
    verification (clients never seal to it, gateways never admit it)."""
    pq_key = bytes(1216)
    plain = make_simulated_bundle(tee, claims_at(T0), MEAS)
    with_pq = make_simulated_bundle(tee, claims_at(T0, pq_public_key=pq_key), MEAS)
    strict = dev_policy(tee, post_quantum={"require": True})
    v = verify_bundle(plain, policy=strict, now=NOW, expected_node_key=NODE_KEY)
    assert failed(v) == {"post_quantum"}
    v = verify_bundle(with_pq, policy=strict, now=NOW, expected_node_key=NODE_KEY)
    assert v.ok and "post_quantum" in {c.name for c in v.checks}
    v = verify_bundle(plain, policy=dev_policy(tee), now=NOW, expected_node_key=NODE_KEY)
    assert v.ok and "post_quantum" not in {c.name for c in v.checks}

"""The node's hardware evidence sources, without hardware: configfs-tsm and the
/dev/sev-guest ioctl emulated over the simulated TEE, NVML faked, the CLI on a machine
with no TEE (this one)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from node import app as node_server
from node import cli as node_cli
from node import evidence as ev
from node.app import NodeConfig, NodeService
from node.evidence import EvidenceError, make_claims, open_source
from openpcc.attestation.bundle import AttestationBundle, verify_bundle
from openpcc.attestation.claims import (
    Claims,
    gpu_evidence_digest_for,
    gpu_nonce_for,
    report_data_for,
)
from openpcc.attestation.nvidia import SpdmEvidence
from openpcc.attestation.policy import MANIFEST_FORMAT, TrustPolicy
from openpcc.attestation.providers import ProviderError
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.attestation.snp import AttestationReport, verify_snp
from tests.test_attestation_providers import (
    NOW,
    T0,
    VCEK_GUID,
    FakeNvml,
    FakeTsmKernel,
    cert_table,
    fake_ioctl,
)

NODE_ID = "07" * 16
KEY = b"\x07" * 32
MODEL = b"\x08" * 32


@pytest.fixture(scope="module")
def tee(tmp_path_factory) -> SimulatedTEE:
    return SimulatedTEE.create(tmp_path_factory.mktemp("devtee"), now=NOW)


@pytest.fixture
def tsm(tmp_path) -> Path:
    root = tmp_path / "tsm"
    root.mkdir()
    return root


def claims_for(tee: str) -> Claims:
    return make_claims(
        node_id=NODE_ID,
        public_key=KEY,
        tee=tee,
        model_digest=MODEL,
        release_id="dev",
        signing_key=b"\x05" * 32,
        now=T0,
    )


def endorsements_file(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj))
    return path


def dev_policy(tee: SimulatedTEE) -> TrustPolicy:
    manifest = {
        "format": MANIFEST_FORMAT,
        "serial": 1,
        "issued_at": T0 - 60,
        "expires_at": T0 + 86400,
        "releases": {"dev": {"model_digests": [MODEL.hex()], "snp": {"measurements": ["00" * 48]}}},
        "gpu": {"require": False},
        "development_roots": [tee.root_fingerprint],
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    return TrustPolicy.unsigned_for_tests(json.dumps(manifest).encode())


def check_snp_bundle(obj: dict[str, Any], tee: SimulatedTEE, claims: Claims) -> AttestationBundle:
    """The bundle is bound to the node's claims and chains to the simulated root.

    A bundle typed ``sev-snp`` must chain to AMD: the verifier ignores development roots
    for it, so under a policy naming the simulated root the one failure left is the
    root. verify_snp, told to trust that root, accepts the report for these claims.
    """
    bundle = AttestationBundle.from_json_obj(obj)
    assert bundle.tee == "sev-snp" and bundle.claims.tee == "sev-snp"
    assert bundle.claims.hpke_public_key == KEY and bundle.claims.issued_at == claims.issued_at
    rd = report_data_for(bundle.claims)
    assert AttestationReport.parse(bundle.evidence).report_data == rd
    v = verify_bundle(bundle, policy=dev_policy(tee), now=NOW, expected_node_key=KEY)
    failed = [c.name for c in v.checks if not c.ok]
    assert failed == ["tee.chain"], v.to_json()["failed"]
    e = bundle.endorsements
    snp = verify_snp(
        bundle.evidence,
        (e.get("vcek") or e["vlek"]).encode(),
        now=NOW,
        ark_ask_chain=e["ask_ark"].encode(),
        trusted_roots=[tee.root_fingerprint],
        expected_report_data=rd,
    )
    assert snp.ok, snp.to_json()["failed"]
    return bundle


def test_cli_choices_match():
    assert node_cli.TEE_CHOICES == ev.TEE_CHOICES and node_cli.GPU_CHOICES == ev.GPU_CHOICES


def test_configfs_tsm_snp(tee, tsm, tmp_path):
    # The host provisioned a certificate table with the VCEK; the operator adds ASK/ARK.
    table = cert_table([(VCEK_GUID, tee.leaf_cert.public_bytes(serialization.Encoding.DER))])
    kernel = FakeTsmKernel(tee, auxblob=table)
    chain = endorsements_file(tmp_path / "e.json", {"ask_ark": tee.root_pem.decode()})
    source = open_source(
        "configfs-tsm", release_id="dev", tsm_root=tsm, fs=kernel, endorsements=chain
    )
    assert source.tee == "sev-snp" and list(tsm.iterdir()) == []  # the probe entry is gone
    claims = claims_for(source.tee)
    bundle = check_snp_bundle(source.bundle(claims), tee, claims)
    assert bundle.endorsements["vcek"] == tee.leaf_pem.decode()
    assert list(tsm.iterdir()) == []


def test_auto_picks_configfs_tsm(tee, tsm, tmp_path):
    e = {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()}
    source = open_source(
        "auto",
        release_id="dev",
        tsm_root=tsm,
        sev_guest=tmp_path / "sev-guest",
        fs=FakeTsmKernel(tee),
        endorsements=endorsements_file(tmp_path / "e.json", e),
    )
    assert source.provider.name == "configfs-tsm"
    claims = claims_for(source.tee)
    check_snp_bundle(source.bundle(claims), tee, claims)


def test_configfs_tsm_tdx(tee, tsm, tmp_path):
    kernel = FakeTsmKernel(tee, provider="tdx_guest")
    with pytest.raises(EvidenceError, match="collateral"):
        open_source("configfs-tsm", release_id="dev", tsm_root=tsm, fs=kernel)
    snp_keys = endorsements_file(tmp_path / "snp.json", {"vcek": "PEM"})
    with pytest.raises(EvidenceError, match=r"\['vcek'\] do not apply to tdx"):
        open_source(
            "configfs-tsm", release_id="dev", tsm_root=tsm, fs=kernel, endorsements=snp_keys
        )
    coll = endorsements_file(tmp_path / "tdx.json", {"collateral": {"tcb_info": "..."}})
    source = open_source("auto", release_id="dev", tsm_root=tsm, fs=kernel, endorsements=coll)
    assert source.tee == "tdx"
    bundle = AttestationBundle.from_json_obj(source.bundle(claims_for(source.tee)))
    assert bundle.tee == "tdx" and bundle.claims.tee == "tdx"
    assert bundle.endorsements == {"collateral": {"tcb_info": "..."}}


def test_unknown_tsm_provider(tee, tsm):
    with pytest.raises(EvidenceError, match="'arm_cca' is not supported"):
        open_source(
            "configfs-tsm", release_id="dev", tsm_root=tsm, fs=FakeTsmKernel(tee, "arm_cca")
        )
    assert list(tsm.iterdir()) == []


def test_sev_guest_device(tee, tmp_path):
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    calls: list = []
    ioctl = fake_ioctl(tee, calls)
    # /dev/sev-guest hands out no VCEK: without --endorsements no bundle can be built.
    bare = open_source("sev-guest", release_id="dev", sev_guest=device, ioctl=ioctl)
    with pytest.raises(EvidenceError, match="give --endorsements FILE"):
        ev.check_source(bare, node_id=NODE_ID, model_digest=MODEL, release_id="dev")
    e = {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()}
    source = open_source(
        "auto",
        release_id="dev",
        tsm_root=tmp_path / "no-tsm",
        sev_guest=device,
        ioctl=ioctl,
        endorsements=endorsements_file(tmp_path / "e.json", e),
    )
    assert source.provider.name == "sev-guest" and source.tee == "sev-snp"
    claims = claims_for(source.tee)
    check_snp_bundle(source.bundle(claims), tee, claims)
    assert len(calls) == 2


def test_no_tee_is_an_error_never_the_simulator(tmp_path):
    missing = {"tsm_root": tmp_path / "tsm", "sev_guest": tmp_path / "sev-guest"}
    with pytest.raises(EvidenceError, match="no TEE found"):
        open_source("auto", release_id="dev", **missing)
    with pytest.raises(EvidenceError, match=r"configfs-tsm: .* does not exist"):
        open_source("configfs-tsm", release_id="dev", **missing)
    with pytest.raises(EvidenceError, match=r"sev-guest: .* does not exist"):
        open_source("sev-guest", release_id="dev", **missing)
    assert issubclass(EvidenceError, ProviderError)
    with pytest.raises(ValueError, match="only to --tee simulated"):
        open_source("auto", tmp_path, release_id="dev", **missing)
    with pytest.raises(ValueError, match="unknown TEE 'snp'"):
        open_source("snp", release_id="dev", **missing)


class NoncedNvml(FakeNvml):
    """The H100 sample with the requested nonce spliced into its SPDM request: the
    signature no longer holds, but the nonce and the digest binding can be checked."""

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle, nonce):
        rep = super().nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)
        rep.attestationReport[4:36] = list(nonce)
        return rep


def test_gpu_evidence(tee, tsm, tmp_path):
    e = {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()}
    rim, ocsp = tmp_path / "driver.rim.xml", tmp_path / "gpu.ocsp"
    rim.write_bytes(b"<rim/>")
    ocsp.write_bytes(b"\x30\x00")
    nvml = NoncedNvml(count=2)
    source = open_source(
        "configfs-tsm",
        release_id="dev",
        tsm_root=tsm,
        fs=FakeTsmKernel(tee),
        endorsements=endorsements_file(tmp_path / "e.json", e),
        gpu="nvml",
        gpu_rims=[rim],
        gpu_ocsp=[ocsp],
        nvml=nvml,
    )
    claims = claims_for(source.tee)
    bundle = AttestationBundle.from_json_obj(source.bundle(claims))
    nonce = gpu_nonce_for(claims)
    assert nvml.nonces == [nonce, nonce] and len(bundle.gpu) == 2
    assert all(SpdmEvidence.parse(g.evidence).nonce == nonce for g in bundle.gpu)
    assert bundle.claims.gpu_evidence_digest == gpu_evidence_digest_for(
        [g.evidence for g in bundle.gpu]
    )
    assert gpu_nonce_for(bundle.claims) == nonce  # the digest does not move the nonce
    assert all(g.rims == (b"<rim/>",) and g.ocsp == (b"\x30\x00",) for g in bundle.gpu)
    assert AttestationReport.parse(bundle.evidence).report_data == report_data_for(bundle.claims)
    # The placeholder RIM/OCSP are unreadable to the verifier: judge the binding without.
    plain = replace(bundle, gpu=tuple(replace(g, rims=(), ocsp=()) for g in bundle.gpu))
    v = verify_bundle(plain, policy=None, now=NOW, expected_node_key=KEY)
    checks = {c.name: c.ok for c in v.checks}
    for name in ("gpu_digest", "gpu[0].nonce", "gpu[1].nonce", "tee.report_data", "node_key"):
        assert checks[name], name


def test_gpu_errors_are_actionable(tee, tsm, tmp_path):
    e = endorsements_file(tmp_path / "e.json", {"vcek": tee.leaf_pem.decode()})
    common: dict[str, Any] = {"release_id": "dev", "tsm_root": tsm, "endorsements": e}
    off = open_source(
        "configfs-tsm", fs=FakeTsmKernel(tee), gpu="nvml", nvml=NoncedNvml(cc=0), **common
    )
    with pytest.raises(EvidenceError, match=r"confidential-computing mode is off.*--gpu none"):
        off.bundle(claims_for(off.tee))
    none = open_source(
        "configfs-tsm", fs=FakeTsmKernel(tee), gpu="nvml", nvml=NoncedNvml(count=0), **common
    )
    with pytest.raises(EvidenceError, match="sees no GPU"):
        none.bundle(claims_for(none.tee))
    with pytest.raises(ValueError, match="need --gpu nvml"):
        open_source("configfs-tsm", fs=FakeTsmKernel(tee), gpu_rims=[e], **common)
    with pytest.raises(EvidenceError, match="cannot read --gpu-ocsp"):
        open_source(
            "configfs-tsm",
            fs=FakeTsmKernel(tee),
            gpu="nvml",
            nvml=NoncedNvml(),
            gpu_ocsp=[tmp_path / "missing"],
            **common,
        )


def test_missing_nvidia_ml_py(tee, tsm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    e = endorsements_file(tmp_path / "e.json", {"vcek": tee.leaf_pem.decode()})
    with pytest.raises(EvidenceError, match=r"nvidia-ml-py is not installed.*pip install"):
        open_source(
            "configfs-tsm",
            release_id="dev",
            tsm_root=tsm,
            fs=FakeTsmKernel(tee),
            endorsements=e,
            gpu="nvml",
        )


class _Engine:
    """NodeService only stores its engine until it starts; bundle() never touches it."""

    url = "http://127.0.0.1:1"


def test_node_asks_the_provider_again_for_fresh_claims(tee, tsm, tmp_path, monkeypatch):
    """The node re-issues its bundle once half the claims' lifetime has passed (not on
    every heartbeat): each time with new claims and a new report over them."""
    e = {"vcek": tee.leaf_pem.decode(), "ask_ark": tee.root_pem.decode()}
    source = open_source(
        "configfs-tsm",
        release_id="dev",
        tsm_root=tsm,
        fs=FakeTsmKernel(tee),
        endorsements=endorsements_file(tmp_path / "e.json", e),
    )
    seen: list[Claims] = []
    real = source.bundle

    def counting(claims: Claims) -> dict[str, Any]:
        seen.append(claims)
        return real(claims)

    monkeypatch.setattr(source, "bundle", counting)
    config = NodeConfig(
        node_id=bytes.fromhex(NODE_ID),
        model_name="m",
        model_digest=MODEL,
        release_id="dev",
        public_url="http://127.0.0.1:1",
        claims_lifetime=100,
    )
    service = NodeService(config, _Engine(), source)  # type: ignore[arg-type]
    clock = [float(T0)]
    monkeypatch.setattr(node_server.time, "time", lambda: clock[0])

    async def three() -> list[dict[str, Any]]:
        first = await service.bundle()
        clock[0] += 10
        again = await service.bundle()  # a heartbeat within the half-life: cached
        clock[0] += 45
        return [first, again, await service.bundle()]

    first, again, fresh = asyncio.run(three())
    assert again is first and len(seen) == 2
    assert [c.issued_at for c in seen] == [T0, T0 + 55]
    new = AttestationBundle.from_json_obj(fresh)
    assert new.claims.issued_at == T0 + 55 and new.claims.hpke_public_key == service.public_key
    assert AttestationReport.parse(new.evidence).report_data == report_data_for(new.claims)


def _serve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(node_cli.NODE_ENV)}
    cmd = [sys.executable, "-m", "openpcc.cli", "node", "serve", "--state", str(tmp_path)]
    cmd += ["--engine-url", "http://127.0.0.1:9", "--model-name", "m", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.skipif(
    Path("/sys/kernel/config/tsm/report").exists() or Path("/dev/sev-guest").exists(),
    reason="this machine has TEE hardware",
)
def test_cli_without_tee_hardware(tmp_path):
    r = _serve(tmp_path, "--tee", "auto")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "openpcc node serve" in line]
    assert len(lines) == 1 and "no TEE found" in lines[0], r.stderr


def test_cli_refuses_simulated_flags_with_hardware_tee(tmp_path):
    r = _serve(tmp_path, "--tee", "auto", "--tee-dir", str(tmp_path / "t"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "apply only to --tee simulated, not --tee auto" in r.stderr
    r = _serve(tmp_path, "--tee", "sev-guest", "--tee-measurement", "00" * 48)
    assert r.returncode == 2 and "apply only to --tee simulated" in r.stderr


def test_release_image_starts_the_node_on_hardware_evidence():
    root = Path(__file__).resolve().parent.parent / "infra" / "node" / "mkosi.extra"
    dropin = root / "usr/lib/systemd/system/openpcc-node.service.d/10-evidence.conf"
    lines = [line for line in dropin.read_text().splitlines() if not line.startswith("#")]
    starts = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")]
    assert starts[0] == ""  # resets the shared unit's command line
    assert starts[1:] == ["/opt/openpcc/bin/openpcc node serve --tee auto --gpu nvml"]
    assert "simulated" not in dropin.read_text().replace("never the simulator", "")
    pre = next(line for line in lines if line.startswith("ExecStartPre=+"))
    compile(pre.split(' -c "', 1)[1].rstrip('"'), "ExecStartPre", "exec")
    assert "ReadWritePaths=-/sys/kernel/config/tsm/report" in lines

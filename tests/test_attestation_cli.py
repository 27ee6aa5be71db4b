"""`openpcc verify` / `openpcc release` as a user runs them: subprocesses on real samples."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from openpcc.attestation.bundle import make_simulated_bundle
from openpcc.attestation.claims import Claims
from openpcc.attestation.policy import MANIFEST_FORMAT
from openpcc.attestation.simulated import SimulatedTEE
from tests.conftest import SAMPLES

S = SAMPLES
MILAN = S / "sev-snp" / "milan-vcek-virtee"
MILAN_MEAS = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
    "3e1a0dc39b2c60bd95b9c480cd81841f"
)
EMR = S / "tdx" / "emr-v4-uptodate-dcapqvl"
EMR_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
H100 = S / "nvidia-gpu" / "h100-nvtrust-sample"
H100_NONCE = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
T_2020, T_2035 = 1577836800, 2051222400


def openpcc(*args: str | Path) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "openpcc.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        pytest.fail(f"stdout is not one JSON object: {proc.stdout!r} {proc.stderr!r}")
    return proc.returncode, out


def failed(out: dict) -> set[str]:
    return {c["name"] for c in out["checks"] if not c["ok"]}


def manifest(**over) -> dict:
    obj = {
        "format": MANIFEST_FORMAT,
        "serial": 1,
        "issued_at": T_2020,
        "expires_at": T_2035,
        "releases": {
            "r1": {
                "model_digests": ["00" * 32],
                "snp": {"measurements": [MILAN_MEAS]},
                "tdx": {
                    "mrtd": [EMR_MRTD],
                    "rtmr0": None,
                    "rtmr1": None,
                    "rtmr2": None,
                    "rtmr3": None,
                },
            }
        },
        "ohttp_key_configs": [],
        "token_key_ids": [],
    }
    obj.update(over)
    return obj


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("release")
    rc, out = openpcc("release", "keygen", "--out", d)
    assert rc == 0 and len(out["key_id"]) == 64
    assert (d / "release-key.pem").stat().st_mode & 0o777 == 0o600
    rc, _ = openpcc("release", "keygen", "--out", d)
    assert rc == 2  # never overwrites a release key
    return d


def sign(keys: Path, tmp: Path, obj: dict, name: str = "signed.json") -> Path:
    src, dst = tmp / f"{name}.manifest.json", tmp / name
    src.write_text(json.dumps(obj, indent=2))
    rc, out = openpcc("release", "sign", src, "--key", keys / "release-key.pem", "--out", dst)
    assert rc == 0, out
    return dst


# --- SNP -----------------------------------------------------------------------------------


def test_snp_sample_valid_then_expired(tmp_path):
    args = ("verify", "snp", MILAN / "report_milan.bin", "--vcek", MILAN / "vcek_milan.der")
    rc, out = openpcc(*args, "--at", "2025-06-01T00:00:00Z")
    assert rc == 0 and out["ok"] and out["platform"] == "sev-snp"
    assert out["judged"] is False and "not judged" in out["note"]
    assert out["fields"]["measurement"] == MILAN_MEAS
    # Hex input (the original .hex file) and Unix-seconds --at give the same verdict.
    rc, out = openpcc(
        "verify",
        "snp",
        MILAN / "report_milan.hex",
        "--vcek",
        MILAN / "vcek_milan.der",
        "--at",
        "1748736000",
    )
    assert rc == 0 and out["ok"]
    rc, out = openpcc(*args, "--at", "2030-06-01T00:00:00Z")
    assert rc == 1 and not out["ok"] and "chain" in failed(out)
    assert any(f.startswith("chain:") for f in out["failed"])


def test_snp_unreadable_input_is_exit_2(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x01\x02 not a report")
    rc, out = openpcc("verify", "snp", garbage, "--vcek", MILAN / "vcek_milan.der")
    assert rc == 2 and out["ok"] is False and "unreadable" in out["error"]
    rc, _ = openpcc("verify", "snp", tmp_path / "missing", "--vcek", MILAN / "vcek_milan.der")
    assert rc == 2
    rc, _ = openpcc("verify", "snp", MILAN / "report_milan.bin", "--vcek", garbage)
    assert rc == 2
    rc, _ = openpcc(
        "verify",
        "snp",
        MILAN / "report_milan.bin",
        "--vcek",
        MILAN / "vcek_milan.der",
        "--at",
        "yesterday",
    )
    assert rc == 2


def test_snp_with_policy(keys, tmp_path):
    base = (
        "verify",
        "snp",
        MILAN / "report_milan.bin",
        "--vcek",
        MILAN / "vcek_milan.der",
        "--at",
        "2025-06-01T00:00:00Z",
        "--release-pubkey",
        keys / "release-key.pub.pem",
    )
    rc, out = openpcc(*base, "--policy", sign(keys, tmp_path, manifest()))
    assert rc == 0 and out["judged"] and "note" not in out and out["release"] == "r1"
    # A measurement not in the release.
    other = manifest()
    other["releases"]["r1"]["snp"]["measurements"] = ["ab" * 48]
    rc, out = openpcc(*base, "--policy", sign(keys, tmp_path, other, "other.json"))
    assert rc == 1 and failed(out) == {"measurement"}
    # A minimum TCB above the sample's (snp 8).
    stale = manifest(snp={"min_tcb": {"Milan": {"snp": 9}}})
    rc, out = openpcc(*base, "--policy", sign(keys, tmp_path, stale, "stale.json"))
    assert rc == 1 and failed(out) == {"min_tcb"}
    # A policy signed by an unpinned key: verification fails (1), no verdict.
    d2 = tmp_path / "k2"
    openpcc("release", "keygen", "--out", d2)
    rc, out = openpcc(
        "verify",
        "snp",
        MILAN / "report_milan.bin",
        "--vcek",
        MILAN / "vcek_milan.der",
        "--at",
        "2025-06-01T00:00:00Z",
        "--release-pubkey",
        d2 / "release-key.pub.pem",
        "--policy",
        tmp_path / "signed.json",
    )
    assert rc == 1 and "not pinned" in out["error"]


# --- TDX / GPU -------------------------------------------------------------------------------


def test_tdx_samples(keys, tmp_path):
    args = ("verify", "tdx", EMR / "tdx_quote", "--collateral", EMR / "tdx_quote_collateral.json")
    rc, out = openpcc(*args, "--at", "2025-07-01T00:00:00Z")
    assert rc == 0 and out["platform"] == "tdx" and out["fields"]["tcb_status"] == "UpToDate"
    rc, out = openpcc(
        *args,
        "--at",
        "2025-07-01T00:00:00Z",
        "--policy",
        sign(keys, tmp_path, manifest()),
        "--release-pubkey",
        keys / "release-key.pub.pem",
    )
    assert rc == 0 and out["judged"] and "mrtd" in {c["name"] for c in out["checks"]}
    rc, out = openpcc(*args, "--at", "2030-01-01T00:00:00Z")  # collateral expired
    assert rc == 1 and "dcap" in failed(out)
    spr = S / "tdx" / "spr-v4-gotdxguest-2023"
    rc, out = openpcc(
        "verify",
        "tdx",
        S / "tdx" / "spr-v4-debug-trustee" / "tdx_quote_4.dat",
        "--collateral",
        spr / "collateral.json",
        "--at",
        "2023-07-01T00:00:00Z",
    )
    assert rc == 1 and {"debug", "dcap"} <= failed(out)
    garbage = tmp_path / "q.bin"
    garbage.write_bytes(b"\x04\x00\x02\x00" + bytes(20))
    rc, out = openpcc("verify", "tdx", garbage, "--collateral", EMR / "tdx_quote_collateral.json")
    assert rc == 2


def test_gpu_sample(tmp_path):
    args = (
        "verify",
        "gpu",
        H100 / "attestation_report.hex",
        "--cert-chain",
        H100 / "gpu_cert_chain.pem",
        *[x for p in sorted((H100 / "rims").iterdir()) for x in ("--rim", p)],
        *[x for p in sorted((H100 / "ocsp").iterdir()) for x in ("--ocsp", p)],
        "--at",
        "2025-08-21T12:00:00Z",
        "--rim-at",
        "2025-10-24T12:00:00Z",
    )
    rc, out = openpcc(*args, "--nonce", H100_NONCE)
    assert rc == 0, out.get("failed")
    assert out["platform"] == "nvidia-gpu" and out["fields"]["measurements_matched"] == "33/33"
    rc, out = openpcc(*args, "--nonce", "00" * 32)
    assert rc == 1 and failed(out) == {"nonce"}
    garbage = tmp_path / "g.bin"
    garbage.write_bytes(b"\x11\xe0" + bytes(10))
    rc, _ = openpcc("verify", "gpu", garbage, "--cert-chain", H100 / "gpu_cert_chain.pem")
    assert rc == 2


# --- bundle and release ------------------------------------------------------------------------


def test_bundle_with_simulated_tee(keys, tmp_path):
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    t = int(now.timestamp())
    tee = SimulatedTEE.create(tmp_path / "tee", now=now)
    claims = Claims(
        "node-1", b"\x01" * 32, "simulated-snp", None, b"\x02" * 32, "dev", t, t + 600, b"\x03" * 32
    )
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(make_simulated_bundle(tee, claims, bytes(48)).encode())
    dev = manifest(
        releases={"dev": {"model_digests": ["02" * 32], "snp": {"measurements": ["00" * 48]}}},
        gpu={"require": False},
        development_roots=[tee.root_fingerprint],
    )
    signed = sign(keys, tmp_path, dev, "dev.json")
    pub = keys / "release-key.pub.pem"
    at = str(t + 60)
    rc, out = openpcc(
        "verify",
        "bundle",
        bundle,
        "--at",
        at,
        "--policy",
        signed,
        "--release-pubkey",
        pub,
        "--node-key",
        "01" * 32,
    )
    assert rc == 0, out.get("failed")
    assert out["platform"] == "bundle" and out["judged"] and out["policy"]["development"]
    # Without a policy the development root is not trusted.
    rc, out = openpcc("verify", "bundle", bundle, "--at", at)
    assert rc == 1 and "tee.chain" in failed(out) and "note" in out
    # Expired claims.
    rc, out = openpcc(
        "verify",
        "bundle",
        bundle,
        "--at",
        str(t + 601),
        "--policy",
        signed,
        "--release-pubkey",
        pub,
    )
    assert rc == 1 and failed(out) == {"claims_window"}
    garbage = tmp_path / "bad.json"
    garbage.write_text('{"version": 1}')
    assert openpcc("verify", "bundle", garbage)[0] == 2
    assert openpcc("verify", "bundle", bundle, "--policy", signed)[0] == 2  # no pubkey


def test_release_verify(keys, tmp_path):
    signed = sign(keys, tmp_path, manifest())
    pub = keys / "release-key.pub.pem"
    rc, out = openpcc("release", "verify", signed, "--pubkey", pub, "--at", "2026-01-01T00:00:00Z")
    assert rc == 0 and out["ok"] and out["releases"] == ["r1"] and out["serial"] == 1
    rc, out = openpcc("release", "verify", signed, "--pubkey", pub, "--at", "2036-01-01")
    assert rc == 1 and "expired" in out["error"]
    rc, out = openpcc(
        "release", "verify", signed, "--pubkey", pub, "--at", "2026-01-01", "--min-serial", "2"
    )
    assert rc == 1 and "rollback" in out["error"]
    # Tampered manifest inside the signed envelope.
    obj = json.loads(signed.read_text())
    import base64

    m = base64.b64decode(obj["manifest"]).replace(b'"serial": 1', b'"serial": 9')
    obj["manifest"] = base64.b64encode(m).decode()
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(obj))
    rc, out = openpcc("release", "verify", bad, "--pubkey", pub, "--at", "2026-01-01")
    assert rc == 1 and "does not verify" in out["error"]
    # A malformed manifest is never signed.
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(manifest(extra=True)))
    rc, _ = openpcc(
        "release", "sign", broken, "--key", keys / "release-key.pem", "--out", tmp_path / "x.json"
    )
    assert rc == 2 and not (tmp_path / "x.json").exists()

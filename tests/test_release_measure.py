"""`openpcc release measure` against the reference tool, on a tiny synthetic OVMF.

A real OVMF build is megabytes and not in the repo, so the test builds the smallest
firmware image sev-snp-measure accepts: a 64 KiB blob with OVMF's GUIDed footer table
(SEV-ES reset block, SEV hash table, SEV metadata with the four SNP sections). The
measurement of that blob means nothing for real hardware; what the test proves is
that our command feeds every image part (OVMF, kernel, initrd, command line, vCPU
count and type) to the measurement exactly as ``sev-snp-measure --mode snp`` does, by
comparing with the tool's own CLI run as a separate process.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import require_module

require_module("sevsnpmeasure")

FOOTER = "96b582de-1fb2-45f7-baea-a366c55a082d"
HASH_TABLE = "7255371f-3a3b-4b04-927b-1da6efa8d454"
RESET_BLOCK = "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
METADATA = "dc886566-984a-4798-a75e-5585a7bf67cc"
SIZE = 64 * 1024
# (gpa, size, type): SNP_SEC_MEM, SNP_SECRETS, CPUID, SNP_KERNEL_HASHES
SECTIONS = [
    (0x800000, 0x1000, 1),
    (0x801000, 0x1000, 2),
    (0x802000, 0x1000, 3),
    (0x810000, 0x1000, 0x10),
]


def _entry(guid: str, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + uuid.UUID(guid).bytes_le


def synthetic_ovmf(path: Path) -> Path:
    meta = b"ASEV" + struct.pack("<III", 16 + 12 * len(SECTIONS), 1, len(SECTIONS))
    meta += b"".join(struct.pack("<III", *s) for s in SECTIONS)
    meta_at = 0x1000  # offset in the file
    table = (
        _entry(RESET_BLOCK, struct.pack("<I", 0xFFFFF000))
        + _entry(HASH_TABLE, struct.pack("<II", 0x810000, 0x400))
        + _entry(METADATA, struct.pack("<I", SIZE - meta_at))
    )
    footer = struct.pack("<H", len(table) + 18) + uuid.UUID(FOOTER).bytes_le
    data = bytearray(SIZE)
    data[meta_at : meta_at + len(meta)] = meta
    end = SIZE - 32
    data[end - 18 - len(table) : end] = table + footer
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel" * 100)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"not really an initrd" * 50)
    return {"ovmf": synthetic_ovmf(tmp_path / "OVMF.fd"), "kernel": kernel, "initrd": initrd}


def _ours(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "release", "measure", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _reference(*args: str) -> str:
    exe = shutil.which("sev-snp-measure")
    assert exe is not None, "sev-snp-measure CLI missing (openpcc[deploy])"
    out = subprocess.run(
        [exe, "--mode", "snp", "--output-format", "hex", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.parametrize(
    "vcpus,vcpu_type,cmdline",
    [(1, "EPYC-v4", "console=ttyS0"), (4, "EPYC-Genoa", "ro quiet openpcc.release=r1")],
)
def test_matches_reference_tool(parts: dict[str, Path], vcpus: int, vcpu_type: str, cmdline: str):
    common = [
        "--ovmf", str(parts["ovmf"]), "--kernel", str(parts["kernel"]),
        "--initrd", str(parts["initrd"]), "--append", cmdline,
        "--vcpus", str(vcpus), "--vcpu-type", vcpu_type,
    ]  # fmt: skip
    ours = _ours(*common)
    assert ours.returncode == 0, ours.stderr
    digest = ours.stdout.strip()
    assert len(bytes.fromhex(digest)) == 48
    assert digest == _reference(*common)


def test_every_part_changes_the_measurement(parts: dict[str, Path], tmp_path: Path):
    base = ["--ovmf", str(parts["ovmf"]), "--kernel", str(parts["kernel"]),
            "--initrd", str(parts["initrd"]), "--append", "a", "--vcpus", "2",
            "--vcpu-type", "EPYC-Milan"]  # fmt: skip
    ref = _ours(*base).stdout
    other = tmp_path / "other"
    other.write_bytes(b"x")
    variants = [
        ["--append", "b"],
        ["--vcpus", "3"],
        ["--vcpu-type", "EPYC-Genoa"],
        ["--initrd", str(other)],
        ["--kernel", str(other)],
    ]
    seen = {ref}
    for change in variants:
        args = list(base)
        args[args.index(change[0]) + 1] = change[1]
        out = _ours(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout not in seen, change
        seen.add(out.stdout)


def test_adds_to_manifest(parts: dict[str, Path], tmp_path: Path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"releases": {"r1": {"model_digests": ["00" * 32]}}}))
    args = ["--ovmf", str(parts["ovmf"]), "--vcpus", "1", "--vcpu-type", "EPYC-v4"]
    for _ in range(2):  # idempotent
        out = _ours(*args, "--manifest", str(manifest), "--release", "r1")
        assert out.returncode == 0, out.stderr
    doc = json.loads(manifest.read_text())
    assert doc["releases"]["r1"]["snp"]["measurements"] == [out.stdout.strip()]
    assert doc["releases"]["r1"]["model_digests"] == ["00" * 32]
    assert out.stdout.strip() == _reference(*args)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--vcpus", "1"], "--vcpu-type"),
        (["--vcpus", "1", "--vcpu-type", "EPYC-Nope"], "unknown --vcpu-type"),
        (["--vcpus", "0", "--vcpu-type", "EPYC"], "at least 1"),
        (["--vcpus", "1", "--vcpu-type", "EPYC", "--append", "x"], "need --kernel"),
    ],
)
def test_refuses_bad_input(parts: dict[str, Path], extra: list[str], message: str):
    out = _ours("--ovmf", str(parts["ovmf"]), *extra)
    assert out.returncode == 2 and message in out.stderr


def test_refuses_firmware_without_sev_metadata(tmp_path: Path):
    blob = tmp_path / "plain.fd"
    blob.write_bytes(bytes(SIZE))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    out = _ours("--ovmf", str(blob), "--kernel", str(kernel), "--vcpus", "1", "--vcpu-type", "EPYC")
    assert out.returncode == 2 and "cannot measure this image" in out.stderr

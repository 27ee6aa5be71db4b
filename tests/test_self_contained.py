"""A clone with nothing beside it carries everything its tests and docs need.

The official vectors and captured evidence once lived in a folder beside the checkout;
a fresh clone then failed to collect. These checks keep it from coming back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT, SAMPLES, VECTORS

# Spelled in two parts so this file does not match itself.
OUTSIDE = ".." + "/shared"
GONE_VARIABLE = "OPENPCC_" + "SHARED"


def tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_file_reads_or_links_outside_the_repo() -> None:
    files = tracked_files()
    assert len(files) > 100, "git ls-files listed almost nothing: not a checkout?"
    offenders = []
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        for needle in (OUTSIDE, GONE_VARIABLE):
            if needle.encode() in data:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []


def test_every_vector_and_sample_folder_names_its_source() -> None:
    folders = [p for p in VECTORS.iterdir() if p.is_dir() and p.name != "__pycache__"]
    folders += [p for p in SAMPLES.iterdir() if p.is_dir()]
    assert {p.name for p in folders} >= {
        "bhttp",
        "ohttp",
        "chunked-ohttp",
        "hpke",
        "blind-rsa",
        "privacypass",
        "sev-snp",
        "tdx",
        "nvidia-gpu",
    }
    for folder in folders:
        readme = folder / "README.md"
        assert readme.is_file(), f"{folder.relative_to(ROOT)} has no README.md"
        text = readme.read_text().lower()
        assert "source" in text or "came from" in text, f"{readme} names no source"
    for tree in (VECTORS, SAMPLES):  # the licence note covers the whole tree
        assert "licen" in (tree / "README.md").read_text().lower(), f"{tree} has no licence note"

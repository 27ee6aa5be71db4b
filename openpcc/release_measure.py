"""`openpcc release measure`: the SEV-SNP launch measurement a node image must produce.

A client trusts a node only if its attestation report's MEASUREMENT is one the signed
release manifest lists (``releases.<id>.snp.measurements``). That value is computed
offline, from the exact parts the hypervisor loads: OVMF firmware, and with measured
direct boot the kernel, initrd and command line (their hashes sit in OVMF's SEV hash
table), plus the vCPU count and type (each vCPU's VMSA page is measured). We call the
reference implementation, ``sev-snp-measure`` (the ``deploy`` extra), instead of
re-deriving AMD's algorithm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_GUEST_FEATURES = 0x1  # SNPActive only, as sev-snp-measure and QEMU default


def measure(
    *,
    ovmf: Path,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    vcpus: int = 1,
    vcpu_type: str | None = None,
    vcpu_sig: int | None = None,
    vmm_type: str = "QEMU",
    guest_features: int = DEFAULT_GUEST_FEATURES,
) -> bytes:
    """The 48-byte SNP launch digest for these image parts (raises ValueError on bad input)."""
    try:
        from sevsnpmeasure import guest, vcpu_types, vmm_types
        from sevsnpmeasure.sev_mode import SevMode
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError("sev-snp-measure is not installed: pip install 'openpcc[deploy]'") from exc
    if vcpus < 1:
        raise ValueError("--vcpus must be at least 1")
    if (initrd is not None or append) and kernel is None:
        raise ValueError("--initrd and --append need --kernel (measured direct boot)")
    try:
        vmm = vmm_types.VMMType[vmm_type]
    except KeyError:
        names = ", ".join(vmm_types.VMMType.__members__)
        raise ValueError(f"unknown --vmm-type {vmm_type!r} ({names})") from None
    if vcpu_sig is None:
        if vcpu_type is None:
            raise ValueError("give --vcpu-type (e.g. EPYC-Genoa) or --vcpu-sig")
        if vcpu_type not in vcpu_types.CPU_SIGS:
            raise ValueError(f"unknown --vcpu-type {vcpu_type!r}")
        vcpu_sig = vcpu_types.CPU_SIGS[vcpu_type]
    for part in (ovmf, kernel, initrd):
        if part is not None and not part.is_file():
            raise ValueError(f"no such file: {part}")
    try:
        return bytes(
            guest.calc_launch_digest(
                SevMode.SEV_SNP,
                vcpus,
                vcpu_sig,
                str(ovmf),
                str(kernel) if kernel else None,
                str(initrd) if initrd else None,
                append,
                guest_features,
                "",
                vmm,
            )
        )
    except (RuntimeError, AssertionError, OSError) as exc:
        # e.g. an OVMF without SEV metadata, or one without a kernel-hashes section.
        raise ValueError(f"cannot measure this image: {exc}") from exc


def add_to_manifest(manifest: Path, release: str, digest: bytes) -> None:
    """Append the measurement to ``releases.<release>.snp.measurements`` (unsigned file)."""
    doc: dict[str, Any] = json.loads(manifest.read_text())
    rel = doc.setdefault("releases", {}).setdefault(release, {})
    values = rel.setdefault("snp", {}).setdefault("measurements", [])
    if digest.hex() not in values:
        values.append(digest.hex())
    manifest.write_text(json.dumps(doc, indent=1) + "\n")


def add_parser(rsub: Any) -> None:
    """Register ``measure`` under the ``release`` group (openpcc/attestation/cli.py)."""
    p = rsub.add_parser(
        "measure",
        help="expected SEV-SNP launch measurement of a node image (hex)",
        description="Compute the SEV-SNP launch measurement from OVMF (+ kernel, initrd and "
        "command line for measured direct boot) and the vCPU count and type, exactly as "
        "the hypervisor will launch the node VM. Prints hex for the release manifest's "
        "releases.<id>.snp.measurements.",
    )
    p.add_argument("--ovmf", type=Path, required=True, help="OVMF firmware (OVMF.fd)")
    p.add_argument("--kernel", type=Path, help="kernel (bzImage or UKI) for direct boot")
    p.add_argument("--initrd", type=Path, help="initrd (with --kernel)")
    p.add_argument("--append", help="kernel command line (with --kernel), byte for byte")
    p.add_argument("--vcpus", type=int, required=True, help="number of vCPUs of the VM")
    p.add_argument("--vcpu-type", help="QEMU CPU model, e.g. EPYC-Milan, EPYC-Genoa")
    p.add_argument("--vcpu-sig", type=lambda s: int(s, 0), help="or the CPUID signature")
    p.add_argument("--vmm-type", default="QEMU", help="QEMU, ec2 or gce")
    p.add_argument("--guest-features", type=lambda s: int(s, 0), default=DEFAULT_GUEST_FEATURES)
    p.add_argument("--manifest", type=Path, help="also add it to this (unsigned) manifest")
    p.add_argument("--release", help="release id in --manifest to add it to")
    p.set_defaults(func=_measure_cmd)


def _measure_cmd(args: argparse.Namespace) -> int:
    if args.manifest is not None and not args.release:
        print("openpcc release measure: --manifest needs --release ID", file=sys.stderr)
        return 2
    try:
        digest = measure(
            ovmf=args.ovmf,
            kernel=args.kernel,
            initrd=args.initrd,
            append=args.append,
            vcpus=args.vcpus,
            vcpu_type=args.vcpu_type,
            vcpu_sig=args.vcpu_sig,
            vmm_type=args.vmm_type,
            guest_features=args.guest_features,
        )
        if args.manifest is not None:
            add_to_manifest(args.manifest, args.release, digest)
    except (ValueError, OSError) as exc:
        print(f"openpcc release measure: {exc}", file=sys.stderr)
        return 2
    print(digest.hex())
    return 0

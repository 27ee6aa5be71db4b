"""AMD SEV-SNP attestation reports: strict parsing and offline verification.

Layout: AMD SEV-SNP ABI spec, ATTESTATION_REPORT (1184 bytes, little-endian), versions
2 to 5. The AMD Secure Processor signs bytes ``[0, 0x2A0)`` with the VCEK (per chip and
TCB) or VLEK (per cloud provider and TCB), ECDSA P-384/SHA-384, with R and S stored as
72-byte little-endian integers. :func:`verify_snp` checks that signature, the
certificate chain to a pinned AMD root (``amd.py``), the TCB the key was issued for,
the debug bit, the REPORT_DATA binding and, given an :class:`SnpPolicy`, the launch
measurement and platform knobs. It never reads the clock: ``now`` is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from openpcc.attestation import amd
from openpcc.attestation.verdict import Verdict
from openpcc.errors import DecodeError, UnsupportedError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIGNING_KEY_NAMES = {0: "VCEK", 1: "VLEK", 7: "none"}

# Reserved (must-be-zero) byte ranges of the signed part, per version.
_MBZ_COMMON = ((0x04C, 0x050), (0x1EB, 0x1EC), (0x1EF, 0x1F0))
_MBZ_V2 = ((0x188, 0x1A0), (0x1F8, 0x2A0))
_MBZ_V3 = ((0x18B, 0x1A0), (0x1F8, 0x2A0))
_MBZ_V5 = ((0x18B, 0x1A0), (0x208, 0x2A0))
_MBZ_SIGNATURE = (0x330, 0x4A0)


@dataclass(frozen=True)
class TcbVersion:
    """An 8-byte TCB_VERSION. Its byte layout depends on the product line.

    Milan/Genoa: ``[bl, tee, 0, 0, 0, 0, snp, ucode]``; Turin:
    ``[fmc, bl, tee, snp, 0, 0, 0, ucode]``. Hence :meth:`components` takes the product.
    """

    raw: int

    def to_bytes(self) -> bytes:
        return self.raw.to_bytes(8, "little")

    def components(self, product: str | None) -> dict[str, int]:
        b = self.to_bytes()
        if product == "Turin":
            return {"fmc": b[0], "bl": b[1], "tee": b[2], "snp": b[3], "ucode": b[7]}
        return {"bl": b[0], "tee": b[1], "snp": b[6], "ucode": b[7]}

    @classmethod
    def from_components(cls, product: str | None, **spl: int) -> TcbVersion:
        """Build a TCB_VERSION; unnamed components are 0."""
        b = bytearray(8)
        where = (
            {"fmc": 0, "bl": 1, "tee": 2, "snp": 3, "ucode": 7}
            if product == "Turin"
            else {"bl": 0, "tee": 1, "snp": 6, "ucode": 7}
        )
        for name, value in spl.items():
            if name not in where:
                raise ValueError(f"no TCB component {name!r} on {product}")
            if not 0 <= value <= 255:
                raise ValueError(f"TCB component {name} out of range: {value}")
            b[where[name]] = value
        return cls(int.from_bytes(b, "little"))

    def __str__(self) -> str:
        return self.to_bytes().hex()


@dataclass(frozen=True)
class GuestPolicy:
    """The 64-bit guest POLICY the hypervisor launched the VM with (ABI spec Table 9)."""

    raw: int

    def _bit(self, n: int) -> bool:
        return bool(self.raw >> n & 1)

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return self.raw >> 8 & 0xFF

    @property
    def smt_allowed(self) -> bool:
        return self._bit(16)

    @property
    def reserved_one(self) -> bool:
        return self._bit(17)

    @property
    def migrate_ma(self) -> bool:
        return self._bit(18)

    @property
    def debug(self) -> bool:
        return self._bit(19)

    @property
    def single_socket(self) -> bool:
        return self._bit(20)

    @property
    def cxl_allowed(self) -> bool:
        return self._bit(21)

    @property
    def mem_aes_256_xts(self) -> bool:
        return self._bit(22)

    @property
    def rapl_disabled(self) -> bool:
        return self._bit(23)

    @property
    def ciphertext_hiding(self) -> bool:
        return self._bit(24)

    @property
    def page_swap_disabled(self) -> bool:
        return self._bit(25)

    def to_json(self) -> dict[str, Any]:
        return {
            "raw": hex(self.raw),
            "abi": f"{self.abi_major}.{self.abi_minor}",
            "smt_allowed": self.smt_allowed,
            "migrate_ma": self.migrate_ma,
            "debug": self.debug,
            "single_socket": self.single_socket,
            "cxl_allowed": self.cxl_allowed,
            "mem_aes_256_xts": self.mem_aes_256_xts,
            "rapl_disabled": self.rapl_disabled,
            "ciphertext_hiding": self.ciphertext_hiding,
            "page_swap_disabled": self.page_swap_disabled,
        }


@dataclass(frozen=True)
class PlatformInfo:
    """PLATFORM_INFO: how the host was configured when the report was made."""

    raw: int

    @property
    def smt_enabled(self) -> bool:
        return bool(self.raw & 1)

    @property
    def tsme_enabled(self) -> bool:
        return bool(self.raw >> 1 & 1)

    @property
    def ecc_enabled(self) -> bool:
        return bool(self.raw >> 2 & 1)

    @property
    def rapl_disabled(self) -> bool:
        return bool(self.raw >> 3 & 1)

    @property
    def ciphertext_hiding(self) -> bool:
        return bool(self.raw >> 4 & 1)

    @property
    def alias_check_complete(self) -> bool:
        return bool(self.raw >> 5 & 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "raw": hex(self.raw),
            "smt_enabled": self.smt_enabled,
            "tsme_enabled": self.tsme_enabled,
            "ecc_enabled": self.ecc_enabled,
            "rapl_disabled": self.rapl_disabled,
            "ciphertext_hiding": self.ciphertext_hiding,
            "alias_check_complete": self.alias_check_complete,
        }


@dataclass(frozen=True)
class AttestationReport:
    """A parsed SNP ATTESTATION_REPORT; ``raw`` keeps the exact signed bytes."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int

    @classmethod
    def parse(cls, data: bytes) -> AttestationReport:
        """Parse exactly 1184 bytes. Short/long input: DecodeError; unknown version:
        UnsupportedError. Reserved-field contents are reported by :meth:`problems`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError("SNP report must be bytes")
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise DecodeError(f"SNP report must be {REPORT_SIZE} bytes, got {len(data)}")
        version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x000)
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedError(f"unsupported SNP report version {version}")
        vmpl, sig_algo, cur_tcb, pinfo, key_info = struct.unpack_from("<IIQQI", data, 0x030)
        v3 = version >= 3

        def u64(off: int) -> int:
            return int(struct.unpack_from("<Q", data, off)[0])

        return cls(
            raw=data,
            version=version,
            guest_svn=guest_svn,
            policy=GuestPolicy(policy),
            family_id=data[0x010:0x020],
            image_id=data[0x020:0x030],
            vmpl=vmpl,
            signature_algo=sig_algo,
            current_tcb=TcbVersion(cur_tcb),
            platform_info=PlatformInfo(pinfo),
            key_info=key_info,
            report_data=data[0x050:0x090],
            measurement=data[0x090:0x0C0],
            host_data=data[0x0C0:0x0E0],
            id_key_digest=data[0x0E0:0x110],
            author_key_digest=data[0x110:0x140],
            report_id=data[0x140:0x160],
            report_id_ma=data[0x160:0x180],
            reported_tcb=TcbVersion(u64(0x180)),
            cpuid_fam_id=data[0x188] if v3 else None,
            cpuid_mod_id=data[0x189] if v3 else None,
            cpuid_step=data[0x18A] if v3 else None,
            chip_id=data[0x1A0:0x1E0],
            committed_tcb=TcbVersion(u64(0x1E0)),
            current_build=data[0x1E8],
            current_minor=data[0x1E9],
            current_major=data[0x1EA],
            committed_build=data[0x1EC],
            committed_minor=data[0x1ED],
            committed_major=data[0x1EE],
            launch_tcb=TcbVersion(u64(0x1F0)),
            launch_mit_vector=u64(0x1F8) if version >= 5 else None,
            current_mit_vector=u64(0x200) if version >= 5 else None,
            signature_r=int.from_bytes(data[0x2A0:0x2E8], "little"),
            signature_s=int.from_bytes(data[0x2E8:0x330], "little"),
        )

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info >> 1 & 1)

    @property
    def signing_key(self) -> int:
        """0 = VCEK, 1 = VLEK, 7 = none (bits 2..4 of the key-info word)."""
        return self.key_info >> 2 & 0x7

    @property
    def product(self) -> str | None:
        """Product line from the CPUID fields (v3+); None for v2 reports."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return amd.product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def problems(self) -> list[str]:
        """Format violations a genuine AMD-SP never produces (MBZ bytes, reserved bits)."""
        out = []
        ranges = _MBZ_V2 if self.version == 2 else _MBZ_V5 if self.version >= 5 else _MBZ_V3
        for start, end in (*_MBZ_COMMON, *ranges, _MBZ_SIGNATURE):
            if any(self.raw[start:end]):
                out.append(f"reserved bytes 0x{start:03X}..0x{end - 1:03X} are not zero")
        if self.key_info >> 5:
            out.append(f"reserved key-info bits set: {self.key_info:#x}")
        if not self.policy.reserved_one:
            out.append("policy bit 17 (reserved, must be 1) is clear")
        return out


@dataclass(frozen=True, kw_only=True)
class SnpPolicy:
    """What the client accepts beyond "genuine and well-formed".

    ``measurements`` has no default on purpose: ``None`` means "any launch
    measurement" and must be written out; an empty set accepts nothing. Values may be
    bytes or hex. ``trusted_roots`` names extra roots (SHA-256 fingerprints, hex) that
    are accepted next to the pinned AMD ARKs: the simulated TEE's development root.
    """

    measurements: frozenset[bytes] | Iterable[bytes | str] | None
    allow_debug: bool = False
    allow_smt: bool = True
    allow_migration_agent: bool = False
    vmpl: int | None = 0
    min_tcb: Mapping[str, int] | None = None
    min_guest_svn: int = 0
    require_single_socket: bool = False
    trusted_roots: frozenset[str] | Iterable[str] = frozenset()

    def __post_init__(self) -> None:
        if self.measurements is not None:
            ms = frozenset(
                bytes.fromhex(m) if isinstance(m, str) else bytes(m) for m in self.measurements
            )
            if any(len(m) != 48 for m in ms):
                raise ValueError("SNP measurements are 48 bytes")
            object.__setattr__(self, "measurements", ms)
        roots = frozenset(r.lower().replace(":", "") for r in self.trusted_roots)
        object.__setattr__(self, "trusted_roots", roots)


def _tcb_json(tcb: TcbVersion, product: str | None) -> dict[str, Any]:
    return {"raw": str(tcb), **tcb.components(product)}


def _verify_signature(report: AttestationReport, cert: x509.Certificate) -> tuple[bool, str]:
    if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        return False, f"unsupported SIGNATURE_ALGO {report.signature_algo}"
    if report.signing_key not in (0, 1):
        return False, f"report signed by no usable key (SIGNING_KEY={report.signing_key})"
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return False, "endorsement key is not an ECDSA P-384 key"
    der = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False, "ECDSA P-384 signature over bytes 0x000..0x29F does not verify"
    return True, f"signed by the {SIGNING_KEY_NAMES[report.signing_key]}"


def _check_tcb(
    report: AttestationReport, info: amd.EndorsementInfo, product: str | None
) -> tuple[bool, str]:
    problems = list(info.errors)
    reported = report.reported_tcb.components(product)
    for name, value in reported.items():
        cert_value = info.tcb.get(name)
        if cert_value is None:
            problems.append(f"certificate lacks the {name} SPL extension")
        elif value != cert_value:
            # The AMD-SP derives the VCEK/VLEK from REPORTED_TCB, so a genuine pair is
            # equal; reported > certified means a stale certificate or a forged TCB.
            problems.append(f"REPORTED_TCB {name}={value} but certificate says {cert_value}")
    if report.signing_key == 0:
        if info.hwid is None:
            problems.append("VCEK has no hwID extension")
        elif not any(report.chip_id):
            pass  # CHIP_ID masked by the guest (MASK_CHIP_ID): nothing to compare
        elif len(info.hwid) == 8:
            # Turin VCEKs carry the 8-byte short hwID.
            if not hmac.compare_digest(info.hwid, report.chip_id[:8]):
                problems.append("VCEK hwID does not match CHIP_ID")
        elif not hmac.compare_digest(info.hwid, report.chip_id):
            problems.append("VCEK hwID does not match CHIP_ID")
    if problems:
        return False, "; ".join(problems)
    return True, f"REPORTED_TCB {report.reported_tcb} matches the certificate"


def verify_snp(
    report: bytes | AttestationReport,
    endorsement: bytes | x509.Certificate,
    *,
    now: datetime,
    ark_ask_chain: bytes | Sequence[bytes | x509.Certificate] | None = None,
    expected_report_data: bytes | None = None,
    policy: SnpPolicy | None = None,
    trusted_roots: Iterable[str] = (),
) -> Verdict:
    """Verify one SNP report against its VCEK/VLEK certificate (PEM or DER).

    ``ark_ask_chain`` is the ASK/ASVK + ARK bundle (KDS order); by default the embedded
    pinned chain for the report's product is used. Its root must be a pinned AMD ARK or
    have a fingerprint in ``trusted_roots`` / ``policy.trusted_roots``.
    Unreadable report or certificate: DecodeError. Everything else is a failed Check.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rep = report if isinstance(report, AttestationReport) else AttestationReport.parse(report)
    cert = amd.load_certificate(endorsement)
    chain = None if ark_ask_chain is None else amd.load_certificates(ark_ask_chain)
    info = amd.endorsement_info(cert)
    verdict = Verdict(platform="sev-snp")

    problems = rep.problems()
    verdict.add("report_parse", not problems, "; ".join(problems) or f"version {rep.version}")

    # Product: CPUID (v3+) is authoritative and signed; v2 reports rely on the cert.
    product = rep.product or info.product
    vlek = rep.signing_key == 1
    verdict.add("signature", *_verify_signature(rep, cert))

    chain_problems: list[str] = []
    if rep.product and info.product and rep.product != info.product:
        chain_problems.append(f"report CPUID says {rep.product}, certificate {info.product}")
    if rep.signing_key in (0, 1) and info.kind != SIGNING_KEY_NAMES[rep.signing_key]:
        chain_problems.append(
            f"report signed by {SIGNING_KEY_NAMES[rep.signing_key]}, certificate is a {info.kind}"
        )
    roots = set(trusted_roots) | set(policy.trusted_roots if policy else ())
    result: amd.ChainResult | None = None
    if chain is None and product is None:
        chain_problems.append("cannot tell the product line, and no chain given")
    else:
        if chain is None:
            assert product is not None
            chain = list(amd.pinned_chain(product, vlek))
        result = amd.verify_chain(
            cert, chain, now=now, product=product, vlek=vlek, trusted_roots=roots
        )
        if not result.ok:
            chain_problems.append(result.detail)
    verdict.add("chain", not chain_problems, "; ".join(chain_problems) or result.detail)
    if result is not None and result.root == "trusted":
        verdict.platform = "simulated-snp"

    verdict.add("tcb", *_check_tcb(rep, info, product))

    allow_debug = policy.allow_debug if policy else False
    verdict.add(
        "debug",
        not rep.policy.debug or allow_debug,
        "guest policy allows debugging (bit 19)" if rep.policy.debug else "debug disallowed",
    )

    if expected_report_data is not None:
        same = len(expected_report_data) == 64 and hmac.compare_digest(
            rep.report_data, expected_report_data
        )
        verdict.add("report_data", same, "matches" if same else "REPORT_DATA differs")

    if policy is not None:
        verdict.judged = True
        _apply_policy(verdict, rep, policy, product)

    verdict.fields.update(
        {
            "version": rep.version,
            "product": product,
            "signing_key": SIGNING_KEY_NAMES.get(rep.signing_key, str(rep.signing_key)),
            "measurement": rep.measurement.hex(),
            "report_data": rep.report_data.hex(),
            "host_data": rep.host_data.hex(),
            "guest_svn": rep.guest_svn,
            "vmpl": rep.vmpl,
            "policy": rep.policy.to_json(),
            "platform_info": rep.platform_info.to_json(),
            "reported_tcb": _tcb_json(rep.reported_tcb, product),
            "current_tcb": _tcb_json(rep.current_tcb, product),
            "committed_tcb": _tcb_json(rep.committed_tcb, product),
            "launch_tcb": _tcb_json(rep.launch_tcb, product),
            "firmware": f"{rep.current_major}.{rep.current_minor} build {rep.current_build}",
            "chip_id": rep.chip_id[:8].hex() + "..." if any(rep.chip_id) else "masked",
            "root": result.root_fingerprint if result else None,
        }
    )
    return verdict


def _apply_policy(
    verdict: Verdict, rep: AttestationReport, policy: SnpPolicy, product: str | None
) -> None:
    allowed = policy.measurements
    if allowed is None:
        verdict.add("measurement", True, "not constrained by policy")
    else:
        assert isinstance(allowed, frozenset)
        hit = any(hmac.compare_digest(rep.measurement, m) for m in allowed)
        verdict.add("measurement", hit, "in allowed set" if hit else "not in allowed set")

    smt_bad = not policy.allow_smt and (rep.policy.smt_allowed or rep.platform_info.smt_enabled)
    verdict.add("smt", not smt_bad, "SMT allowed/enabled but policy forbids it" if smt_bad else "")

    ma_bad = rep.policy.migrate_ma and not policy.allow_migration_agent
    verdict.add("migration_agent", not ma_bad, "migration agent allowed" if ma_bad else "")

    if policy.vmpl is not None:
        ok = rep.vmpl == policy.vmpl
        verdict.add("vmpl", ok, f"VMPL {rep.vmpl}, policy wants {policy.vmpl}")

    if policy.min_tcb is not None:
        have = rep.reported_tcb.components(product)
        low = [f"{k}={have.get(k)} < {v}" for k, v in policy.min_tcb.items() if have.get(k, -1) < v]
        verdict.add("min_tcb", not low, "; ".join(low) or "at or above minimum")

    if policy.min_guest_svn:
        ok = rep.guest_svn >= policy.min_guest_svn
        verdict.add("guest_svn", ok, f"{rep.guest_svn} vs minimum {policy.min_guest_svn}")

    if policy.require_single_socket:
        verdict.add("single_socket", rep.policy.single_socket, "")


# --- Azure confidential VMs: SNP report inside the paravisor's HCL report -------------

HCL_SNP_OFFSET = 0x20
HCL_RUNTIME_HEADER_OFFSET = 0x4C0
HCL_RUNTIME_DATA_OFFSET = 0x4D4


@dataclass(frozen=True)
class AzureHclReport:
    """The vTPM NV blob of an Azure CVM: SNP report + the runtime data it commits to."""

    snp_report: bytes
    report_type: int
    hash_type: int
    runtime_data: bytes
    runtime_json: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, data: bytes) -> AzureHclReport:
        if len(data) < HCL_RUNTIME_DATA_OFFSET or data[:4] != b"HCLA":
            raise DecodeError("not an Azure HCL report")
        _size, _ver, rtype, htype, var_size = struct.unpack_from(
            "<5I", data, HCL_RUNTIME_HEADER_OFFSET
        )
        end = HCL_RUNTIME_DATA_OFFSET + var_size
        if end > len(data):
            raise DecodeError("HCL runtime data runs past the end")
        runtime = data[HCL_RUNTIME_DATA_OFFSET:end]
        try:
            parsed = json.loads(runtime)
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(f"HCL runtime data is not JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise DecodeError("HCL runtime data is not a JSON object")
        return cls(data[HCL_SNP_OFFSET:HCL_RUNTIME_HEADER_OFFSET], rtype, htype, runtime, parsed)

    def expected_report_data(self) -> bytes:
        """Azure's binding: SHA-256(runtime data) || 32 zero bytes (hash_type 1)."""
        if self.hash_type != 1:
            raise UnsupportedError(f"HCL hash type {self.hash_type}")
        return hashlib.sha256(self.runtime_data).digest() + bytes(32)

    def attestation_key(self) -> rsa.RSAPublicKey:
        """The vTPM attestation key ``HCLAkPub`` (JWK) the runtime data commits to."""
        import base64

        for key in self.runtime_json.get("keys", []):
            if isinstance(key, dict) and key.get("kid") == "HCLAkPub" and key.get("kty") == "RSA":
                try:
                    n, e = (
                        int.from_bytes(base64.urlsafe_b64decode(key[k] + "=" * (-len(key[k]) % 4)))
                        for k in ("n", "e")
                    )
                    return rsa.RSAPublicNumbers(e, n).public_key()
                except (KeyError, TypeError, ValueError) as err:
                    raise DecodeError(f"bad HCLAkPub JWK: {err}") from err
        raise DecodeError("runtime data has no HCLAkPub RSA key")


def verify_azure_snp(
    hcl_report: bytes,
    vcek: bytes | x509.Certificate,
    *,
    now: datetime,
    tpm_quote: tuple[bytes, bytes] | None = None,
    policy: SnpPolicy | None = None,
    ark_ask_chain: bytes | Sequence[bytes | x509.Certificate] | None = None,
) -> Verdict:
    """Verify an Azure CVM's HCL report: the SNP report (as :func:`verify_snp`), its
    REPORT_DATA binding to the runtime data, and optionally a TPM2_Quote
    ``(TPMS_ATTEST message, raw RSA signature)`` made by the bound attestation key.
    The quote's nonce and PCRs are the caller's to judge."""
    hcl = AzureHclReport.parse(hcl_report)
    verdict = verify_snp(
        hcl.snp_report,
        vcek,
        now=now,
        ark_ask_chain=ark_ask_chain,
        expected_report_data=hcl.expected_report_data(),
        policy=policy,
    )
    if tpm_quote is not None:
        message, signature = tpm_quote
        try:
            hcl.attestation_key().verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
            ok, detail = message[:4] == b"\xffTCG", "TPM quote signed by HCLAkPub"
        except InvalidSignature:
            ok, detail = False, "TPM quote signature does not verify under HCLAkPub"
        verdict.add("vtpm_quote", ok, detail)
    return verdict

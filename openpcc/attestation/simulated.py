"""A simulated SEV-SNP TEE for development machines without AMD hardware.

It emits reports in the real SNP format (version 3, 1184 bytes), signed by a
development "VCEK" whose certificate chains to a development root generated on the
machine. Verification uses the very same :func:`openpcc.attestation.snp.verify_snp`;
the only difference is the root. Because the root is not one of the pinned AMD ARKs,
the ``chain`` check fails unless the caller explicitly trusts the root's fingerprint
(``trusted_roots=`` or ``SnpPolicy.trusted_roots``), and a trusted-dev-root verdict is
labelled ``simulated-snp`` so it can never pass for real hardware silently.

Files written by :meth:`SimulatedTEE.create` (the root's private key is discarded):
``dev-root.pem``, ``dev-vcek.pem`` and ``dev-vcek-key.pem`` (PKCS#8, unencrypted: this
is a development tool, not a secret store).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from openpcc.attestation import amd
from openpcc.attestation.snp import REPORT_SIZE, SIGNED_SIZE, TcbVersion
from openpcc.errors import DecodeError

ROOT_FILE = "dev-root.pem"
LEAF_FILE = "dev-vcek.pem"
KEY_FILE = "dev-vcek-key.pem"

_CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}
DEFAULT_POLICY = 0x30000  # SMT allowed, reserved bit 17, debug off, ABI 0.0
DEFAULT_TCB = {"bl": 10, "tee": 0, "snp": 23, "ucode": 84}


def _der_int(v: int) -> bytes:
    body = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big", signed=True)
    return bytes([0x02, len(body)]) + body


def _der_ia5(s: str) -> bytes:
    return bytes([0x16, len(s)]) + s.encode("ascii")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OpenPCC development"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass(frozen=True)
class SimulatedTEE:
    """The development root, the leaf "VCEK" and its key; see the module docstring."""

    root_cert: x509.Certificate
    leaf_cert: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    product: str
    chip_id: bytes
    tcb: dict[str, int]

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        now: datetime | None = None,
        product: str = "Genoa",
        tcb: dict[str, int] | None = None,
        validity: timedelta = timedelta(days=3650),
    ) -> SimulatedTEE:
        """Generate a fresh development root and leaf and store them in ``directory``."""
        if product not in _CPUID:
            raise ValueError(f"unknown product {product!r}")
        now = now or datetime.now(UTC)
        tcb = dict(tcb or DEFAULT_TCB)
        TcbVersion.from_components(product, **tcb)  # validates names and ranges
        chip_id = os.urandom(64)
        root_key = ec.generate_private_key(ec.SECP384R1())
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        not_before, not_after = now - timedelta(days=1), now + validity
        root_name = _name("OpenPCC simulated ARK (development only, not AMD)")
        root = (
            x509.CertificateBuilder()
            .subject_name(root_name)
            .issuer_name(root_name)
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(root_key, hashes.SHA384())
        )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name("OpenPCC simulated VCEK (development only)"))
            .issuer_name(root_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )

        def ext(oid: str, value: bytes) -> x509.UnrecognizedExtension:
            return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value)

        oids = {
            "bl": amd.OID_BL_SPL,
            "tee": amd.OID_TEE_SPL,
            "snp": amd.OID_SNP_SPL,
            "ucode": amd.OID_UCODE_SPL,
            "fmc": amd.OID_FMC_SPL,
        }
        leaf = leaf.add_extension(ext(amd.OID_STRUCT_VERSION, _der_int(0)), critical=False)
        leaf = leaf.add_extension(ext(amd.OID_PRODUCT_NAME, _der_ia5(product)), critical=False)
        for name in TcbVersion(0).components(product):
            value = tcb.get(name, 0)
            leaf = leaf.add_extension(ext(oids[name], _der_int(value)), critical=False)
        hwid = chip_id[:8] if product == "Turin" else chip_id
        leaf = leaf.add_extension(ext(amd.OID_HWID, hwid), critical=False)
        leaf_cert = leaf.sign(root_key, hashes.SHA384())

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / ROOT_FILE).write_bytes(root.public_bytes(serialization.Encoding.PEM))
        (d / LEAF_FILE).write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
        key_path = d / KEY_FILE
        key_path.write_bytes(
            leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cls.load(d)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> SimulatedTEE:
        """Load what :meth:`create` wrote; product, TCB and chip id come from the leaf."""
        d = Path(directory)
        root = amd.load_certificate((d / ROOT_FILE).read_bytes())
        leaf = amd.load_certificate((d / LEAF_FILE).read_bytes())
        try:
            key = serialization.load_pem_private_key((d / KEY_FILE).read_bytes(), None)
        except ValueError as e:
            raise DecodeError(f"unreadable development key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise DecodeError("development key is not an EC key")
        info = amd.endorsement_info(leaf)
        if info.product is None or info.hwid is None or info.errors:
            raise DecodeError("development leaf lacks product/hwID extensions")
        chip_id = info.hwid.ljust(64, b"\0")
        return cls(root, leaf, key, info.product, chip_id, dict(info.tcb))

    @property
    def root_fingerprint(self) -> str:
        """What a policy names to trust this development root (SHA-256 of its DER, hex)."""
        return amd.fingerprint(self.root_cert)

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def leaf_pem(self) -> bytes:
        return self.leaf_cert.public_bytes(serialization.Encoding.PEM)

    def issue_report(
        self,
        report_data: bytes,
        *,
        measurement: bytes = bytes(48),
        policy: int = DEFAULT_POLICY,
        vmpl: int = 0,
        guest_svn: int = 0,
        reported_tcb: dict[str, int] | None = None,
        host_data: bytes = bytes(32),
        platform_info: int = 0x1,
    ) -> bytes:
        """A signed version-3 report, field for field as the AMD-SP lays it out."""
        if len(report_data) != 64 or len(measurement) != 48 or len(host_data) != 32:
            raise ValueError("report_data is 64 bytes, measurement 48, host_data 32")
        tcb = TcbVersion.from_components(self.product, **(reported_tcb or self.tcb)).raw
        own = TcbVersion.from_components(self.product, **self.tcb).raw
        fam, mod, step = _CPUID[self.product]
        r = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", r, 0x000, 3, guest_svn, policy)
        struct.pack_into("<IIQQI", r, 0x030, vmpl, 1, own, platform_info, 0)
        r[0x050:0x090] = report_data
        r[0x090:0x0C0] = measurement
        r[0x0C0:0x0E0] = host_data
        r[0x140:0x160] = os.urandom(32)  # REPORT_ID
        r[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
        struct.pack_into("<Q", r, 0x180, tcb)
        r[0x188:0x18B] = bytes([fam, mod, step])
        r[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", r, 0x1E0, own)
        r[0x1E8:0x1EB] = bytes([0, 55, 1])  # current firmware 1.55 build 0
        r[0x1EC:0x1EF] = bytes([0, 55, 1])
        struct.pack_into("<Q", r, 0x1F0, own)
        return self.sign_report(bytes(r))

    def sign_report(self, report: bytes) -> bytes:
        """(Re-)sign bytes 0..0x29F of a report with the development leaf key.

        Tests use this to build reports that real hardware would never sign (debug
        on, stale TCB); the result still verifies only under an explicitly trusted root.
        """
        if len(report) not in (SIGNED_SIZE, REPORT_SIZE):
            raise ValueError("need the signed part or a whole report")
        body = report[:SIGNED_SIZE]
        der = self.leaf_key.sign(body, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(72, "little") + s.to_bytes(72, "little")
        return body + sig + bytes(REPORT_SIZE - SIGNED_SIZE - len(sig))


SIMULATED_MEASUREMENT_LABEL = b"OpenPCC simulated measurement v1\x00"


def simulated_measurement(release_id: str) -> bytes:
    """The 48-byte launch measurement the simulated TEE reports for a release.

    A real TEE measures the image; the simulator has none, so it reports a value derived
    from the release id, which a development trust policy can pin like a real one.
    """
    return hashlib.sha384(SIMULATED_MEASUREMENT_LABEL + release_id.encode()).digest()

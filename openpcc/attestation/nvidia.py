"""NVIDIA confidential-computing GPU evidence (H100/H200/B200, NVSwitch): offline checks.

The evidence is an SPDM 1.1 GET_MEASUREMENTS request (carrying the verifier's 32-byte
nonce) followed by the MEASUREMENTS response, signed with ECDSA P-384 by the GPU's
firmware alias key (the first certificate of the device chain). Golden values come
from NVIDIA's signed RIMs (SWID XML + XMLDSig). This follows the facts of NVIDIA's
nvtrust local verifier (check order, RIM index i vs block i+1, NVDEC-dependent
index 35) without its code: signatures and X.509 go through ``cryptography``, RIM XML
signatures through ``signxml``, and every time-dependent check takes an injected time.
"""

from __future__ import annotations

import base64
import hmac
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from openpcc.attestation.certs import load_certificate, load_certificates
from openpcc.attestation.tdx import _coerce_binary, _dss, _utc, verify_chain
from openpcc.attestation.verdict import Verdict
from openpcc.errors import DecodeError, TruncatedError, UnsupportedError

__all__ = [
    "GpuPolicy",
    "MeasurementBlock",
    "OpaqueData",
    "Rim",
    "SpdmEvidence",
    "nvidia_corim_root_ca",
    "nvidia_device_root_ca",
    "parse_nvtrust_dump",
    "parse_rim",
    "verify_gpu",
]

SPDM_GET_MEASUREMENTS = 0xE0
SPDM_MEASUREMENTS = 0x60
REQUEST_LEN = 37  # version, code, param1, param2, nonce[32], slot id
SIGNATURE_LEN = 96  # raw r||s, P-384
DMTF_SPEC = 0x01
NVDEC_ENABLED = 0xAA
NVDEC_DISABLED = 0x55
NVDEC_GATED_RIM_INDEX = 35  # nvtrust skips this index when NVDEC0 is disabled
# Hopper puts DiceTcbInfo under 2.23.133.5.4.1; Blackwell under 2.23.133.5.4.1.1.
TCG_DICE_TCB_INFO_OIDS = frozenset({"2.23.133.5.4.1", "2.23.133.5.4.1.1"})
OID_SHA384 = bytes.fromhex("0609608648016503040202")

# NVIDIA opaque-data TLV ids (nvtrust spdm_msrt_resp_msg.py).
OPAQUE_DRIVER_VERSION = 3
OPAQUE_GPU_INFO = 4
OPAQUE_VBIOS_VERSION = 6
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_MSRSCNT = 12
OPAQUE_BOARD_ID = 14
OPAQUE_CHIP_SKU = 15
OPAQUE_CHIP_SKU_MOD = 16
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_PROJECT_SKU_MOD = 19
OPAQUE_FWID = 20
OPAQUE_PROTECTED_PCIE_STATUS = 21
OPAQUE_VERSION = 34
OPAQUE_CHIP_INFO = 35
OPAQUE_FEATURE_FLAG = 36

_ROOTS = Path(__file__).resolve().parent / "roots" / "nvidia"
_SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
_HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
_DS_NS = "http://www.w3.org/2000/09/xmldsig#"


def nvidia_device_root_ca() -> x509.Certificate:
    """Pinned ``NVIDIA Device Identity CA`` (roots every GPU/NVSwitch device chain)."""
    return x509.load_pem_x509_certificate((_ROOTS / "nvidia_device_identity_ca.pem").read_bytes())


def nvidia_corim_root_ca() -> x509.Certificate:
    """Pinned ``NVIDIA CoRIM signing Root CA`` (roots the RIM signer chains)."""
    return x509.load_pem_x509_certificate(
        (_ROOTS / "nvidia_corim_signing_root_ca.pem").read_bytes()
    )


# --- evidence --------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementBlock:
    index: int  # 1-based SPDM block index
    spec: int  # MeasurementSpecification (1 = DMTF)
    dmtf_type: int
    value: bytes


@dataclass(frozen=True)
class OpaqueData:
    """NVIDIA opaque-data TLVs (type u16, length u16, value), by numeric id."""

    fields: dict[int, bytes]

    @classmethod
    def parse(cls, data: bytes) -> OpaqueData:
        out: dict[int, bytes] = {}
        off = 0
        while off < len(data):
            if off + 4 > len(data):
                raise TruncatedError("opaque data TLV header cut")
            typ, length = struct.unpack_from("<HH", data, off)
            off += 4
            if off + length > len(data):
                raise TruncatedError(f"opaque data TLV {typ} cut")
            out[typ] = data[off : off + length]
            off += length
        return cls(out)

    def _text(self, typ: int) -> str | None:
        raw = self.fields.get(typ)
        if raw is None:
            return None
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def driver_version(self) -> str | None:
        return self._text(OPAQUE_DRIVER_VERSION)

    @property
    def vbios_version(self) -> str | None:
        """Formatted as NVIDIA prints it, e.g. ``96.00.9F.00.01`` (from 8 LE bytes)."""
        raw = self.fields.get(OPAQUE_VBIOS_VERSION)
        if raw is None or len(raw) != 8:
            return None
        h = int.from_bytes(raw, "little").to_bytes(8, "big").hex().upper()
        digits = h[8:16] + h[6:8]
        return ".".join(digits[i : i + 2] for i in range(0, 10, 2))

    @property
    def project(self) -> str | None:
        return self._text(OPAQUE_PROJECT)

    @property
    def project_sku(self) -> str | None:
        return self._text(OPAQUE_PROJECT_SKU)

    @property
    def chip_sku(self) -> str | None:
        return self._text(OPAQUE_CHIP_SKU)

    @property
    def chip_info(self) -> str | None:
        return self._text(OPAQUE_CHIP_INFO)

    @property
    def fwid(self) -> bytes | None:
        return self.fields.get(OPAQUE_FWID)

    @property
    def nvdec0_status(self) -> int | None:
        raw = self.fields.get(OPAQUE_NVDEC0_STATUS)
        return raw[0] if raw else None

    @property
    def protected_pcie_status(self) -> int | None:
        raw = self.fields.get(OPAQUE_PROTECTED_PCIE_STATUS)
        return raw[0] if raw else None


@dataclass(frozen=True)
class SpdmEvidence:
    """SPDM GET_MEASUREMENTS request + MEASUREMENTS response, parsed by lengths."""

    spdm_version: int
    request_param1: int
    request_param2: int
    nonce: bytes  # the verifier's nonce (in the request)
    slot_id: int
    response_param1: int
    response_param2: int
    blocks: tuple[MeasurementBlock, ...]
    responder_nonce: bytes
    opaque: OpaqueData
    opaque_raw: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    signed: bytes = field(repr=False)  # request || response without signature
    trailing: bytes = field(repr=False, default=b"")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview | str) -> SpdmEvidence:
        buf = _coerce_binary(data)
        if len(buf) < REQUEST_LEN + 8:
            raise TruncatedError("SPDM evidence shorter than request + response header")
        ver, code, p1, p2 = buf[0], buf[1], buf[2], buf[3]
        if code != SPDM_GET_MEASUREMENTS:
            raise UnsupportedError(f"not an SPDM GET_MEASUREMENTS request (code {code:#x})")
        if ver not in (0x11, 0x12):
            raise UnsupportedError(f"unsupported SPDM version {ver:#x}")
        if not p1 & 0x01:
            raise UnsupportedError("request did not ask for a signature")
        nonce, slot = buf[4:36], buf[36]
        resp = buf[REQUEST_LEN:]
        rver, rcode, rp1, rp2, nblocks = resp[0], resp[1], resp[2], resp[3], resp[4]
        if rcode != SPDM_MEASUREMENTS:
            raise UnsupportedError(f"not an SPDM MEASUREMENTS response (code {rcode:#x})")
        if rver != ver:
            raise DecodeError(f"SPDM version mismatch: request {ver:#x}, response {rver:#x}")
        rec_len = int.from_bytes(resp[5:8], "little")
        off = 8
        if off + rec_len > len(resp):
            raise TruncatedError("measurement record cut")
        blocks = _parse_blocks(resp[off : off + rec_len], nblocks)
        off += rec_len
        if off + 34 > len(resp):
            raise TruncatedError("responder nonce / opaque length cut")
        rnonce = resp[off : off + 32]
        (olen,) = struct.unpack_from("<H", resp, off + 32)
        off += 34
        if off + olen + SIGNATURE_LEN > len(resp):
            raise TruncatedError("opaque data or signature cut")
        opaque_raw = resp[off : off + olen]
        off += olen
        signature = resp[off : off + SIGNATURE_LEN]
        sig_end = REQUEST_LEN + off
        return cls(
            spdm_version=ver,
            request_param1=p1,
            request_param2=p2,
            nonce=nonce,
            slot_id=slot,
            response_param1=rp1,
            response_param2=rp2,
            blocks=blocks,
            responder_nonce=rnonce,
            opaque=OpaqueData.parse(opaque_raw),
            opaque_raw=opaque_raw,
            signature=signature,
            signed=buf[:sig_end],
            trailing=buf[sig_end + SIGNATURE_LEN :],
        )

    def measurements(self) -> dict[int, bytes]:
        """Block index (1-based) -> measurement value."""
        return {b.index: b.value for b in self.blocks}


def _parse_blocks(rec: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    blocks: list[MeasurementBlock] = []
    off = 0
    seen: set[int] = set()
    for _ in range(count):
        if off + 4 > len(rec):
            raise TruncatedError("measurement block header cut")
        index, spec = rec[off], rec[off + 1]
        (size,) = struct.unpack_from("<H", rec, off + 2)
        off += 4
        if off + size > len(rec):
            raise TruncatedError(f"measurement block {index} cut")
        body = rec[off : off + size]
        off += size
        if spec != DMTF_SPEC:
            raise UnsupportedError(f"measurement block {index} is not DMTF format ({spec})")
        if size < 3:
            raise DecodeError(f"measurement block {index} too short")
        dmtf_type = body[0]
        (vsize,) = struct.unpack_from("<H", body, 1)
        if 3 + vsize != size:
            raise DecodeError(f"measurement block {index}: value size {vsize} != {size - 3}")
        if index in seen:
            raise DecodeError(f"duplicate measurement block index {index}")
        seen.add(index)
        blocks.append(MeasurementBlock(index, spec, dmtf_type, body[3:]))
    if off != len(rec):
        raise DecodeError("measurement record length does not match its blocks")
    return tuple(blocks)


# --- RIMs ------------------------------------------------------------------------


@dataclass(frozen=True)
class RimMeasurement:
    index: int  # 0-based RIM index; compares with SPDM block index + 1
    active: bool
    alternatives: tuple[bytes, ...]
    size: int


@dataclass(frozen=True)
class Rim:
    """A parsed RIM (SWID tag). Values come from the *signed* element only."""

    colloquial_version: str
    product: str
    measurements: dict[int, RimMeasurement]
    chain: list[x509.Certificate]  # leaf (signer) first, from KeyInfo


def _rim_chain(root_el: Any) -> list[x509.Certificate]:
    certs = []
    for el in root_el.iter(f"{{{_DS_NS}}}X509Certificate"):
        try:
            der = base64.b64decode("".join((el.text or "").split()))
        except ValueError as exc:
            raise DecodeError(f"RIM: X509Certificate in KeyInfo is not base64: {exc}") from exc
        certs.append(load_certificate(der, "RIM: X509Certificate in KeyInfo"))
    return _order_chain(certs)


def _order_chain(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Order leaf-first by issuer/subject names (KeyInfo order is not guaranteed)."""
    if not certs:
        return certs
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers]
    if len(leaves) != 1:
        return certs
    ordered = [leaves[0]]
    by_subject = {c.subject: c for c in certs}
    while ordered[-1].issuer != ordered[-1].subject and ordered[-1].issuer in by_subject:
        nxt = by_subject[ordered[-1].issuer]
        if nxt in ordered:
            break
        ordered.append(nxt)
    return ordered


def _rim_from_element(el: Any, chain: list[x509.Certificate]) -> Rim:
    meta = el.find(f"{{{_SWID_NS}}}Meta")
    if meta is None:
        raise DecodeError("RIM has no Meta element")
    payload = el.find(f"{{{_SWID_NS}}}Payload")
    if payload is None:
        raise DecodeError("RIM has no Payload element")
    out: dict[int, RimMeasurement] = {}
    for res in payload.iter(f"{{{_SWID_NS}}}Resource"):
        if res.get("type") != "Measurement":
            continue
        try:
            index = int(res.get("index"))
            n = int(res.get("alternatives", "1"))
            size = int(res.get("size", "48"))
            alts = tuple(bytes.fromhex(res.get(f"{{{_HASH_NS}}}Hash{j}")) for j in range(n))
        except (TypeError, ValueError) as e:
            raise DecodeError(f"RIM measurement unreadable: {e}") from e
        if index in out:
            raise DecodeError(f"RIM lists index {index} twice")
        out[index] = RimMeasurement(index, res.get("active") == "True", alts, size)
    return Rim(
        colloquial_version=meta.get("colloquialVersion", ""),
        product=meta.get("product", ""),
        measurements=out,
        chain=chain,
    )


def parse_rim(xml: bytes) -> Rim:
    """Parse a RIM without checking its signature (inspection, tests)."""
    from lxml import etree

    try:
        root = etree.fromstring(xml, parser=etree.XMLParser(resolve_entities=False))
        chain = _rim_chain(root)
    except (etree.XMLSyntaxError, ValueError) as e:
        raise DecodeError(f"RIM is not readable XML: {e}") from e
    return _rim_from_element(root, chain)


def _verify_rim(xml: bytes, root_ca: x509.Certificate, now: datetime) -> tuple[Rim, str | None]:
    """XMLDSig (signxml) with the embedded signer, then chain to the pinned root.

    Returns the RIM built from the element the signature covers, so golden values
    cannot come from an unsigned (wrapped) part of the document.
    """
    from lxml import etree
    from signxml import DigestAlgorithm, SignatureConfiguration, SignatureMethod, XMLVerifier
    from signxml.exceptions import InvalidInput
    from signxml.exceptions import InvalidSignature as XmlInvalidSignature

    unsigned = parse_rim(xml)
    if not unsigned.chain:
        return unsigned, "RIM carries no signer certificate"
    signer = unsigned.chain[0]
    config = SignatureConfiguration(
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
        verification_time=now,
    )
    try:
        result = XMLVerifier().verify(
            xml,
            x509_cert=signer.public_bytes(serialization.Encoding.PEM).decode(),
            expect_config=config,
        )
    except (XmlInvalidSignature, InvalidInput, etree.XMLSyntaxError, ValueError) as e:
        return unsigned, f"XML signature invalid: {e}"
    signed_el = result.signed_xml if not isinstance(result, list) else result[0].signed_xml
    rim = _rim_from_element(signed_el, unsigned.chain)
    err = verify_chain(unsigned.chain, root_ca, now)
    if err:
        return rim, f"RIM signer chain: {err}"
    return rim, None


# --- policy and verification -----------------------------------------------------


@dataclass(frozen=True)
class GpuPolicy:
    """What the client accepts for a GPU. ``None`` allow-lists are not checked."""

    allowed_driver_versions: frozenset[str] | None = None
    allowed_vbios_versions: frozenset[str] | None = None
    require_ocsp: bool = False

    def __post_init__(self) -> None:
        if self.allowed_driver_versions is not None:
            object.__setattr__(
                self, "allowed_driver_versions", frozenset(self.allowed_driver_versions)
            )
        if self.allowed_vbios_versions is not None:
            vb = frozenset(s.upper() for s in self.allowed_vbios_versions)
            object.__setattr__(self, "allowed_vbios_versions", vb)


def verify_gpu(
    evidence_bytes: bytes | str,
    cert_chain_pem: bytes | str,
    *,
    now: datetime,
    expected_nonce: bytes | None,
    rims: Sequence[bytes] = (),
    ocsp: Sequence[bytes] = (),
    policy: GpuPolicy | None = None,
    rim_now: datetime | None = None,
    device_root: x509.Certificate | None = None,
    rim_root: x509.Certificate | None = None,
) -> Verdict:
    """Verify one GPU's SPDM evidence offline.

    Device checks (chain, device OCSP) run at ``now``; RIM checks (XMLDSig, RIM chain,
    RIM OCSP) at ``rim_now`` (default ``now``). Production passes one instant; the
    split exists because cached RIM OCSP responses are fetched at other times than
    device ones (the shared sample needs 2025-08-21 and 2025-10-24). ``ocsp`` holds
    DER responses for any certs of both chains, matched by CertID. Without RIMs the
    ``measurements`` check fails: unverified firmware is not accepted.
    """
    v = Verdict(platform="nvidia-gpu", judged=policy is not None)
    now = _utc(now)
    rim_now = _utc(rim_now) if rim_now is not None else now
    device_root = device_root or nvidia_device_root_ca()
    rim_root = rim_root or nvidia_corim_root_ca()
    try:
        ev = SpdmEvidence.parse(evidence_bytes)
    except DecodeError as e:
        v.add("evidence_parse", False, str(e))
        return v
    v.add("evidence_parse", True, f"SPDM {ev.spdm_version >> 4}.{ev.spdm_version & 0xF}")
    op = ev.opaque
    v.fields.update(
        {
            "nonce": ev.nonce.hex(),
            "driver_version": op.driver_version,
            "vbios_version": op.vbios_version,
            "measurement_count": len(ev.blocks),
            "project": op.project,
            "project_sku": op.project_sku,
            "chip_sku": op.chip_sku,
            "fwid": op.fwid.hex() if op.fwid else None,
            "nvdec0_status": _status_name(op.nvdec0_status),
            "protected_pcie_status": _status_name(op.protected_pcie_status),
            "cc_mode": "not carried in the SPDM evidence",
        }
    )
    if op.chip_info:
        v.fields["chip_info"] = op.chip_info

    try:
        chain = _load_pem_chain(cert_chain_pem)
    except DecodeError as e:
        chain = []
        v.add("chain", False, str(e))
    if chain:
        _check_signature(v, ev, chain[0])
        err = _device_chain_error(chain, device_root, now)
        v.add("chain", err is None, err or "device chain reaches the NVIDIA Device Identity CA")
        _check_fwid(v, ev, chain[0])
    elif not v.failures():
        v.add("signature", False, "no device certificate")
        v.add("chain", False, "empty certificate chain")

    responses = _load_ocsp(ocsp)
    ocsp_required = bool(policy and policy.require_ocsp)
    if chain and (responses or ocsp_required):
        full = chain if _same(chain[-1], device_root) else [*chain, device_root]
        err = _ocsp_chain(full[1:], full, responses, now)  # leaf is never OCSP-checked
        v.add("ocsp", err is None, err or f"{len(full) - 2} device certs GOOD")

    if expected_nonce is not None:
        ok = hmac.compare_digest(ev.nonce, bytes(expected_nonce))
        v.add("nonce", ok, "" if ok else "request nonce differs from the expected nonce")

    _check_rims(v, ev, rims, responses, rim_root, rim_now, ocsp_required)

    if policy is not None:
        if policy.allowed_driver_versions is not None:
            ok = op.driver_version in policy.allowed_driver_versions
            v.add("driver_version", ok, f"driver {op.driver_version}")
        if policy.allowed_vbios_versions is not None:
            vb = (op.vbios_version or "").upper()
            v.add("vbios_version", vb in policy.allowed_vbios_versions, f"VBIOS {vb}")
    return v


def _check_signature(v: Verdict, ev: SpdmEvidence, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        v.add("signature", False, "leaf key is not ECDSA P-384")
        return
    try:
        key.verify(_dss(ev.signature), ev.signed, ec.ECDSA(hashes.SHA384()))
        v.add("signature", True, "leaf key signed request || response")
    except (InvalidSignature, ValueError):
        v.add("signature", False, "SPDM signature does not verify with the leaf key")


def _device_chain_error(
    chain: list[x509.Certificate], root: x509.Certificate, now: datetime
) -> str | None:
    if len(chain) == 1 and _same(chain[0], root):
        return "chain holds only the root: no device certificate"
    if _is_ca_cert(chain[0]):
        return "first certificate is a CA, not the device's attestation leaf"
    return verify_chain(chain, root, now)


def _check_fwid(v: Verdict, ev: SpdmEvidence, leaf: x509.Certificate) -> None:
    """The leaf's DICE TcbInfo FWID must be the firmware that signed (opaque FWID)."""
    opaque_fwid = ev.opaque.fwid
    if opaque_fwid is None:
        return  # older firmware does not report it
    exts = [
        e.value.value
        for e in leaf.extensions
        if e.oid.dotted_string in TCG_DICE_TCB_INFO_OIDS
        and isinstance(e.value, x509.UnrecognizedExtension)
    ]
    if not exts:
        v.add("fwid", False, "leaf has no TCG DICE TcbInfo extension")
        return
    fwids = [f for raw in exts for f in _sha384_fwids(raw)]
    ok = opaque_fwid in fwids
    v.add("fwid", ok, "" if ok else "leaf certificate FWID differs from the evidence FWID")


def _sha384_fwids(der: bytes) -> list[bytes]:
    """48-byte digests following the SHA-384 OID in a DER blob (the FWID entries).

    A targeted scan rather than a full DiceTcbInfo decoder: NVIDIA's encoding puts
    FWID = SEQUENCE { OID sha384, OCTET STRING[48] } inside the extension.
    """
    out = []
    start = 0
    while (i := der.find(OID_SHA384, start)) >= 0:
        j = i + len(OID_SHA384)
        if der[j : j + 2] == b"\x04\x30" and len(der) >= j + 2 + 48:
            out.append(der[j + 2 : j + 50])
        start = j
    return out


def _check_rims(
    v: Verdict,
    ev: SpdmEvidence,
    rims: Sequence[bytes],
    responses: list[ocsp.OCSPResponse],
    rim_root: x509.Certificate,
    rim_now: datetime,
    ocsp_required: bool,
) -> None:
    if not rims:
        v.add("rim_signature", False, "no RIMs supplied")
        v.add("measurements", False, "no RIMs supplied: measurements not compared")
        return
    parsed: list[Rim] = []
    errors: list[str] = []
    ocsp_errors: list[str] = []
    for i, xml in enumerate(rims):
        try:
            rim, err = _verify_rim(bytes(xml), rim_root, rim_now)
        except DecodeError as e:
            errors.append(f"RIM {i}: {e}")
            continue
        if err:
            errors.append(f"RIM {i} ({rim.colloquial_version}): {err}")
            continue
        parsed.append(rim)
        if responses or ocsp_required:
            full = rim.chain if _same(rim.chain[-1], rim_root) else [*rim.chain, rim_root]
            oerr = _ocsp_chain(full[:-1], full, responses, rim_now)
            if oerr:
                ocsp_errors.append(f"RIM {rim.colloquial_version}: {oerr}")
    v.add("rim_signature", not errors, "; ".join(errors) or f"{len(parsed)} RIMs signed by NVIDIA")
    if responses or ocsp_required:
        v.add("rim_ocsp", not ocsp_errors, "; ".join(ocsp_errors) or "RIM signer chains GOOD")

    op = ev.opaque
    driver = [r for r in parsed if r.colloquial_version == op.driver_version]
    vbios_v = (op.vbios_version or "").upper()
    vbios = [r for r in parsed if r.colloquial_version.upper() == vbios_v]
    missing = [n for n, found in (("driver", driver), ("VBIOS", vbios)) if not found]
    v.add(
        "rim_versions",
        not missing,
        f"no signed {' and '.join(missing)} RIM for this evidence"
        if missing
        else f"driver {op.driver_version}, VBIOS {vbios_v}",
    )
    if missing:
        v.add("measurements", False, "golden values incomplete (missing RIM)")
        return
    _compare_measurements(v, ev, driver[0], vbios[0])


def _compare_measurements(v: Verdict, ev: SpdmEvidence, driver: Rim, vbios: Rim) -> None:
    golden: dict[int, RimMeasurement] = {}
    for rim in (driver, vbios):
        for idx, m in rim.measurements.items():
            if not m.active:
                continue
            if idx in golden:
                v.add("measurements", False, f"driver and VBIOS RIMs both define index {idx}")
                return
            golden[idx] = m
    runtime = ev.measurements()
    nvdec_disabled = ev.opaque.nvdec0_status == NVDEC_DISABLED
    matched, mismatched, skipped = 0, [], []
    for idx, m in sorted(golden.items()):
        value = runtime.get(idx + 1)
        ok = value is not None and len(value) == m.size and value in m.alternatives
        if ok:
            matched += 1
        elif idx == NVDEC_GATED_RIM_INDEX and nvdec_disabled:
            skipped.append(idx)
        else:
            mismatched.append(idx)
    counted = len(golden) - len(skipped)
    v.fields["measurements_matched"] = f"{matched}/{counted}"
    detail = f"{matched}/{counted} golden measurements match"
    if skipped:
        detail += f" (index {skipped} skipped: NVDEC0 disabled)"
    if mismatched:
        detail += f"; mismatched RIM indices {mismatched}"
    v.add("measurements", not mismatched and counted > 0, detail)


# --- OCSP ------------------------------------------------------------------------


def _load_ocsp(blobs: Iterable[bytes]) -> list[ocsp.OCSPResponse]:
    out = []
    for blob in blobs:
        try:
            out.append(ocsp.load_der_ocsp_response(bytes(blob)))
        except ValueError as e:
            raise DecodeError(f"OCSP response unreadable: {e}") from e
    return out


def _ocsp_chain(
    to_check: list[x509.Certificate],
    full: list[x509.Certificate],
    responses: list[ocsp.OCSPResponse],
    now: datetime,
) -> str | None:
    """Each cert in ``to_check`` (not the root) needs a GOOD, fresh, signed response."""
    for cert in to_check:
        if _same(cert, full[-1]):
            continue
        pos = next(i for i, c in enumerate(full) if _same(c, cert))
        issuer = full[pos + 1]
        err = _ocsp_one(cert, issuer, responses, now)
        if err:
            return f"{cert.subject.rfc4514_string()}: {err}"
    return None


def _ocsp_one(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    responses: list[ocsp.OCSPResponse],
    now: datetime,
) -> str | None:
    found = False
    last_err = "no OCSP response for this certificate"
    for resp in responses:
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            continue
        for single in resp.responses:
            if single.serial_number != cert.serial_number:
                continue
            if not _issuer_matches(single, issuer):
                continue
            found = True
            err = _ocsp_response_error(resp, single, issuer, now)
            if err is None:
                return None
            last_err = err
    return last_err if found or responses else "no OCSP response for this certificate"


def _issuer_matches(single: ocsp.OCSPSingleResponse, issuer: x509.Certificate) -> bool:
    """RFC 6960 CertID: issuerKeyHash covers the subjectPublicKey bits, not the SPKI."""
    h = hashes.Hash(single.hash_algorithm)
    h.update(_subject_public_key_bits(issuer))
    return hmac.compare_digest(single.issuer_key_hash, h.finalize())


def _subject_public_key_bits(cert: x509.Certificate) -> bytes:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def _ocsp_response_error(
    resp: ocsp.OCSPResponse,
    single: ocsp.OCSPSingleResponse,
    issuer: x509.Certificate,
    now: datetime,
) -> str | None:
    signer = issuer
    if resp.certificates:
        signer = resp.certificates[0]
        if not _same(signer, issuer):
            try:
                signer.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                return "OCSP responder certificate not issued by the certificate's issuer"
            try:
                eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                return "OCSP responder certificate lacks the OCSPSigning EKU"
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                return "OCSP responder certificate lacks the OCSPSigning EKU"
            if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
                return f"OCSP responder certificate not valid at {now.isoformat()}"
    key = signer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm)
            )
        else:
            return "unsupported OCSP responder key type"
    except InvalidSignature:
        return "OCSP response signature invalid"
    this_update = single.this_update_utc
    next_update = single.next_update_utc
    if now < this_update or (next_update is not None and now > next_update):
        return f"OCSP response not current at {now.isoformat()} ({this_update} .. {next_update})"
    if single.certificate_status != ocsp.OCSPCertStatus.GOOD:
        return f"certificate status {single.certificate_status.name}"
    return None


# --- helpers ---------------------------------------------------------------------


def _load_pem_chain(pem: bytes | str) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else bytes(pem)
    return load_certificates(data)


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)


def _is_ca_cert(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _status_name(value: int | None) -> str | None:
    if value is None:
        return None
    return {NVDEC_ENABLED: "enabled", NVDEC_DISABLED: "disabled"}.get(value, f"{value:#04x}")


def parse_nvtrust_dump(text: str | bytes) -> list[dict[str, Any]]:
    """Read nvtrust's jsonpickle evidence dumps (the multi-GPU samples).

    Returns one dict per device: ``kind`` ("gpu"/"nvswitch"), ``id``, ``report``
    (SPDM bytes), ``chain_pem`` (bytes), and the driver/VBIOS versions NVML claimed
    (unauthenticated: compare with the evidence's opaque data instead).
    """
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise DecodeError(f"not JSON: {e}") from e
    out: list[dict[str, Any]] = []
    try:
        for gpu in doc.get("gpus", []):
            certs = gpu["CertificateChains"]["GpuAttestationCertificateChain"]
            out.append(
                {
                    "kind": "gpu",
                    "id": gpu.get("UUID"),
                    "report": base64.b64decode(gpu["AttestationReport"]["py/b64"]),
                    "chain_pem": b"".join(base64.b64decode(c["pem"]) for c in certs),
                    "driver_version": gpu.get("DriverVersion"),
                    "vbios_version": gpu.get("VbiosVersion"),
                }
            )
        for sw in doc.get("nvswitches", []):
            certs = sw["attestation_cert_chain"]
            out.append(
                {
                    "kind": "nvswitch",
                    "id": sw.get("uuid"),
                    "report": base64.b64decode(sw["attestation_report"]["py/b64"]),
                    "chain_pem": b"".join(base64.b64decode(c["pem"]) for c in certs),
                    "driver_version": None,
                    "vbios_version": None,
                }
            )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DecodeError(f"unexpected nvtrust dump layout: {e}") from e
    return out

"""Intel TDX DCAP quotes (v4, v5): parsing and offline verification.

TCB evaluation (collateral signatures, CRLs, QE identity, TCB level matching, the
TDX module identity) is delegated to ``dcap-qvl``: it is a complete QVL and the
collateral format our samples and fetchers use is its ``QuoteCollateralV3`` JSON.
We add, independently of dcap-qvl and with ``cryptography`` only, the four cheap
signature checks (quote signature, QE-report binding, QE-report signature, PCK chain
to the pinned Intel SGX Root CA) so that a binding bug in one implementation does not
go unnoticed, and so quotes without collateral still get their signatures checked.
Everything dcap-qvl cannot know (expected REPORTDATA, MRTD/RTMR allow-lists, which
TCB statuses are acceptable) is decided here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from openpcc.attestation.certs import load_certificates
from openpcc.attestation.verdict import Verdict
from openpcc.errors import DecodeError, TruncatedError, UnsupportedError

__all__ = [
    "ACCEPTABLE_WITH_POLICY",
    "INTEL_QE_VENDOR_ID",
    "TDX_TEE_TYPE",
    "TdReport",
    "TdxPolicy",
    "TdxQuote",
    "intel_sgx_root_ca",
    "verify_tdx",
]

TDX_TEE_TYPE = 0x81
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
HEADER_LEN = 48
TD_REPORT10_LEN = 584
TD_REPORT15_LEN = 648
QE_REPORT_LEN = 384
CERT_QE_REPORT = 6
CERT_PCK_CHAIN = 5
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28

#: TCB statuses a policy may opt into. OutOfDate*, Revoked and "no matching level"
#: are never acceptable: the platform is known-vulnerable or unknown to Intel.
ACCEPTABLE_WITH_POLICY = frozenset(
    {"SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"}
)

_ROOTS = Path(__file__).resolve().parent / "roots" / "intel"


def intel_sgx_root_ca() -> x509.Certificate:
    """The pinned Intel SGX Root CA (P-256, valid 2018-05-21 .. 2049-12-31)."""
    return x509.load_pem_x509_certificate((_ROOTS / "intel_sgx_root_ca.pem").read_bytes())


@dataclass(frozen=True)
class TdReport:
    """TD report body (TDX 1.0, or 1.5 with TEE_TCB_SVN2 and MRSERVICETD)."""

    tee_tcb_svn: bytes
    mrseam: bytes
    mrsignerseam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mrservicetd: bytes | None = None

    @property
    def td_attributes_int(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        """TDATTRIBUTES bit 0: the host can read and write TD memory."""
        return bool(self.td_attributes_int & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.td_attributes_int & TD_ATTR_SEPT_VE_DISABLE)

    @classmethod
    def _parse(cls, body: bytes) -> TdReport:
        sizes = (16, 48, 48, 8, 8, 8, 48, 48, 48, 48, 48, 48, 48, 48, 64)
        parts: list[bytes] = []
        off = 0
        for size in sizes:
            parts.append(body[off : off + size])
            off += size
        svn2 = mrservicetd = None
        if len(body) == TD_REPORT15_LEN:
            svn2, mrservicetd = body[off : off + 16], body[off + 16 : off + 64]
        return cls(
            tee_tcb_svn=parts[0],
            mrseam=parts[1],
            mrsignerseam=parts[2],
            seam_attributes=parts[3],
            td_attributes=parts[4],
            xfam=parts[5],
            mrtd=parts[6],
            mrconfigid=parts[7],
            mrowner=parts[8],
            mrownerconfig=parts[9],
            rtmrs=(parts[10], parts[11], parts[12], parts[13]),
            report_data=parts[14],
            tee_tcb_svn2=svn2,
            mrservicetd=mrservicetd,
        )


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX DCAP quote (header, TD report, ECDSA signature data).

    ``raw`` is the input cut at the end of the signature data: real quotes arrive in
    fixed-size buffers with zero (or arbitrary) trailing bytes, which are ignored.
    """

    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int  # 2 = TDX 1.0 (always for v4), 3 = TDX 1.5
    report: TdReport
    signed_region: bytes
    signature: bytes  # raw r||s, P-256
    attestation_key: bytes  # raw X||Y, P-256
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    raw: bytes = field(repr=False)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview | str) -> TdxQuote:
        """Parse by lengths; raise DecodeError/UnsupportedError on anything else."""
        buf = _coerce_binary(data)
        if len(buf) < HEADER_LEN:
            raise TruncatedError("TDX quote shorter than its 48-byte header")
        version, key_type, tee_type = struct.unpack_from("<HHI", buf, 0)
        qe_vendor_id = buf[12:28]
        user_data = buf[28:48]
        if tee_type != TDX_TEE_TYPE:
            raise UnsupportedError(f"not a TDX quote (TEE type {tee_type:#x}, version {version})")
        if version not in (4, 5):
            raise UnsupportedError(f"unsupported TDX quote version {version}")
        if key_type != ATT_KEY_ECDSA_P256:
            raise UnsupportedError(f"unsupported attestation key type {key_type}")
        off = HEADER_LEN
        if version == 4:
            body_type, body_len = 2, TD_REPORT10_LEN
        else:
            _need(buf, off, 6)
            body_type, body_len = struct.unpack_from("<HI", buf, off)
            off += 6
            expected = {2: TD_REPORT10_LEN, 3: TD_REPORT15_LEN}.get(body_type)
            if expected is None:
                raise UnsupportedError(f"unsupported TDX quote v5 body type {body_type}")
            if body_len != expected:
                raise DecodeError(f"body type {body_type} must be {expected} bytes, not {body_len}")
        _need(buf, off, body_len)
        report = TdReport._parse(buf[off : off + body_len])
        off += body_len
        signed_end = off
        _need(buf, off, 4)
        (sig_len,) = struct.unpack_from("<I", buf, off)
        off += 4
        _need(buf, off, sig_len)
        end = off + sig_len
        sig = _Reader(buf[off:end])
        signature = sig.take(64)
        att_key = sig.take(64)
        cert_type, cert_len = sig.u16(), sig.u32()
        if cert_type != CERT_QE_REPORT:
            raise UnsupportedError(f"certification data type {cert_type} (expected 6)")
        qe = _Reader(sig.take(cert_len))
        qe_report = qe.take(QE_REPORT_LEN)
        qe_sig = qe.take(64)
        qe_auth = qe.take(qe.u16())
        inner_type, inner_len = qe.u16(), qe.u32()
        if inner_type != CERT_PCK_CHAIN:
            raise UnsupportedError(f"QE certification data type {inner_type} (expected 5)")
        pck_pem = qe.take(inner_len)
        return cls(
            version=version,
            att_key_type=key_type,
            tee_type=tee_type,
            qe_vendor_id=qe_vendor_id,
            user_data=user_data,
            body_type=body_type,
            report=report,
            signed_region=buf[:signed_end],
            signature=signature,
            attestation_key=att_key,
            qe_report=qe_report,
            qe_report_signature=qe_sig,
            qe_auth_data=qe_auth,
            pck_chain_pem=pck_pem,
            raw=buf[:end],
        )

    def pck_chain(self) -> list[x509.Certificate]:
        """The PEM chain from the certification data (leaf first)."""
        return load_certificates(self.pck_chain_pem.rstrip(b"\0"), "PCK certificate chain")


def _hexset(values: Iterable[bytes | str] | None) -> frozenset[bytes] | None:
    if values is None:
        return None
    out = set()
    for v in values:
        out.add(bytes.fromhex(v) if isinstance(v, str) else bytes(v))
    return frozenset(out)


@dataclass(frozen=True)
class TdxPolicy:
    """What the client accepts for a TDX node. ``None`` means "do not check".

    Allow-lists take bytes or hex strings. ``accepted_tcb_statuses`` may only add
    statuses from :data:`ACCEPTABLE_WITH_POLICY` to UpToDate.
    """

    mrtd: frozenset[bytes] | None = None
    rtmr0: frozenset[bytes] | None = None
    rtmr1: frozenset[bytes] | None = None
    rtmr2: frozenset[bytes] | None = None
    rtmr3: frozenset[bytes] | None = None
    mrseam: frozenset[bytes] | None = None
    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    rejected_advisories: frozenset[str] = frozenset()
    min_tcb_eval_data_number: int | None = None
    min_tee_tcb_svn: bytes | None = None  # component-wise minimum of the 16 SVN bytes
    allow_debug: bool = False
    require_sept_ve_disable: bool = False

    def __post_init__(self) -> None:
        for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrseam"):
            object.__setattr__(self, name, _hexset(getattr(self, name)))
        statuses = frozenset(self.accepted_tcb_statuses)
        bad = statuses - ACCEPTABLE_WITH_POLICY - {"UpToDate"}
        if bad:
            raise ValueError(f"TCB statuses can never be accepted: {sorted(bad)}")
        object.__setattr__(self, "accepted_tcb_statuses", statuses)
        object.__setattr__(self, "rejected_advisories", frozenset(self.rejected_advisories))
        if isinstance(self.min_tee_tcb_svn, str):
            object.__setattr__(self, "min_tee_tcb_svn", bytes.fromhex(self.min_tee_tcb_svn))


def verify_tdx(
    quote_bytes: bytes | str,
    collateral_json: str | bytes | Mapping[str, Any] | None,
    *,
    now: datetime,
    expected_report_data: bytes | None = None,
    policy: TdxPolicy | None = None,
    root_ca: x509.Certificate | None = None,
) -> Verdict:
    """Verify a TDX quote offline at ``now`` and judge it against ``policy``.

    ``collateral_json`` is dcap-qvl's ``QuoteCollateralV3`` JSON (what the samples
    store); without it the signature checks still run but ``dcap`` fails, since the
    TCB status is then unknown. ``root_ca`` replaces the pinned Intel root (tests).
    """
    v = Verdict(platform="tdx", judged=policy is not None)
    now = _utc(now)
    root = root_ca or intel_sgx_root_ca()
    try:
        quote = TdxQuote.parse(quote_bytes)
    except DecodeError as e:
        v.add("quote_parse", False, str(e))
        return v
    v.add("quote_parse", True, f"v{quote.version} body type {quote.body_type}")
    rep = quote.report
    v.fields.update(
        {
            "quote_version": quote.version,
            "body_type": quote.body_type,
            "mrtd": rep.mrtd.hex(),
            "rtmr0": rep.rtmrs[0].hex(),
            "rtmr1": rep.rtmrs[1].hex(),
            "rtmr2": rep.rtmrs[2].hex(),
            "rtmr3": rep.rtmrs[3].hex(),
            "mrseam": rep.mrseam.hex(),
            "mrconfigid": rep.mrconfigid.hex(),
            "report_data": rep.report_data.hex(),
            "td_attributes": rep.td_attributes.hex(),
            "xfam": rep.xfam.hex(),
            "tee_tcb_svn": rep.tee_tcb_svn.hex(),
        }
    )
    if rep.mrservicetd is not None:
        v.fields["mrservicetd"] = rep.mrservicetd.hex()

    _check_signatures(v, quote, root, now)
    eval_number = _check_dcap(v, quote, collateral_json, root, now, policy)

    allow_debug = policy.allow_debug if policy else False
    if rep.debug:
        v.add("debug", allow_debug, "TD is a debug TD (TDATTRIBUTES bit 0)")
    else:
        v.add("debug", True, "debug off")

    if expected_report_data is not None:
        ok = hmac.compare_digest(rep.report_data, bytes(expected_report_data))
        v.add("report_data", ok, "" if ok else "REPORTDATA differs from the expected value")

    if policy is not None:
        _check_policy(v, quote, policy, eval_number)
    return v


def _check_signatures(v: Verdict, quote: TdxQuote, root: x509.Certificate, now: datetime) -> None:
    """Quote signature, QE binding, QE report signature, PCK chain (cryptography only)."""
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key
        )
        att_key.verify(_dss(quote.signature), quote.signed_region, ec.ECDSA(hashes.SHA256()))
        v.add("quote_signature", True, "attestation key signed header and TD report")
    except (InvalidSignature, ValueError) as e:
        v.add("quote_signature", False, f"quote signature invalid {e}".strip())

    want = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    qe_report_data = quote.qe_report[320:384]
    ok = hmac.compare_digest(qe_report_data, want)
    v.add("qe_binding", ok, "" if ok else "QE report does not bind the attestation key")

    try:
        chain = quote.pck_chain()
    except DecodeError as e:
        v.add("pck_chain", False, str(e))
        return
    if not chain:
        v.add("pck_chain", False, "no PCK certificate in the quote")
        return
    try:
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
            raise ValueError("PCK key is not EC")
        leaf_key.verify(_dss(quote.qe_report_signature), quote.qe_report, ec.ECDSA(hashes.SHA256()))
        v.add("qe_signature", True, "PCK key signed the QE report")
    except (InvalidSignature, ValueError) as e:
        v.add("qe_signature", False, f"QE report signature invalid {e}".strip())
    err = verify_chain(chain, root, now)
    v.add("pck_chain", err is None, err or "PCK chain reaches the pinned Intel SGX Root CA")


def verify_chain(
    chain: list[x509.Certificate], root: x509.Certificate, now: datetime
) -> str | None:
    """Check ``chain`` (leaf first) links to ``root`` and every cert is valid at ``now``.

    Returns None when valid, else the reason. The chain may or may not include the
    root itself; a self-signed last cert other than ``root`` is refused. We do the
    links by hand because X.509 PolicyBuilder enforces the web-PKI profile, which
    vendor attestation PKIs (Intel, NVIDIA) do not follow.
    """
    if not chain:
        return "empty certificate chain"
    root_der = root.public_bytes(serialization.Encoding.DER)
    certs = list(chain)
    if certs[-1].public_bytes(serialization.Encoding.DER) != root_der:
        certs.append(root)
    for i, cert in enumerate(certs[:-1]):
        issuer = certs[i + 1]
        if i + 1 < len(certs) - 1 and issuer.public_bytes(serialization.Encoding.DER) == root_der:
            return "root certificate in the middle of the chain"
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as e:
            return (
                f"{cert.subject.rfc4514_string()} is not issued by "
                f"{issuer.subject.rfc4514_string()} ({type(e).__name__})"
            )
        if not _is_ca(issuer):
            return f"{issuer.subject.rfc4514_string()} is not a CA"
    for cert in certs:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (
                f"{cert.subject.rfc4514_string()} not valid at {now.isoformat()} "
                f"({cert.not_valid_before_utc.isoformat()} .. "
                f"{cert.not_valid_after_utc.isoformat()})"
            )
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_dcap(
    v: Verdict,
    quote: TdxQuote,
    collateral_json: str | bytes | Mapping[str, Any] | None,
    root: x509.Certificate,
    now: datetime,
    policy: TdxPolicy | None,
) -> int | None:
    """Run dcap-qvl; record status/advisories; return the tcbEvaluationDataNumber."""
    import dcap_qvl

    try:
        fmspc = dcap_qvl.parse_quote(quote.raw).fmspc()
        v.fields["fmspc"] = fmspc.upper()
    except Exception:  # best effort: the binding rejects odd PCK certs
        v.fields["fmspc"] = None
    if collateral_json is None:
        v.add("dcap", False, "no collateral: TCB status unknown")
        return None
    try:
        text = _collateral_text(collateral_json)
        collateral = dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as e:
        v.add("dcap", False, f"collateral unreadable: {e}")
        return None
    eval_number: int | None = None
    try:
        eval_number = int(json.loads(collateral.tcb_info)["tcbEvaluationDataNumber"])
        v.fields["tcb_eval_data_number"] = eval_number
    except (ValueError, KeyError, TypeError):
        pass
    root_der = root.public_bytes(serialization.Encoding.DER)
    try:
        report = dcap_qvl.verify_with_root_ca(quote.raw, collateral, root_der, int(now.timestamp()))
    except Exception as e:  # the Rust binding raises ValueError (or panics)
        msg = str(e).removeprefix("Verification failed: ")
        v.fields["tcb_status"] = msg
        v.add("dcap", False, msg)
        return eval_number
    status = str(report.status)
    advisories = sorted(str(a) for a in report.advisory_ids)
    v.fields["tcb_status"] = status
    v.fields["advisory_ids"] = advisories
    accepted = policy.accepted_tcb_statuses if policy else frozenset({"UpToDate"})
    ok = status in accepted
    detail = f"TCB status {status}" + (
        f", advisories {', '.join(advisories)}" if advisories else ""
    )
    if not ok:
        detail += " (not accepted by policy)"
    v.add("dcap", ok, detail)
    return eval_number


def _check_policy(v: Verdict, quote: TdxQuote, policy: TdxPolicy, eval_number: int | None) -> None:
    rep = quote.report
    allow_lists: list[tuple[str, frozenset[bytes] | None, bytes]] = [
        ("mrtd", policy.mrtd, rep.mrtd),
        ("rtmr0", policy.rtmr0, rep.rtmrs[0]),
        ("rtmr1", policy.rtmr1, rep.rtmrs[1]),
        ("rtmr2", policy.rtmr2, rep.rtmrs[2]),
        ("rtmr3", policy.rtmr3, rep.rtmrs[3]),
        ("mrseam", policy.mrseam, rep.mrseam),
    ]
    for name, allowed, value in allow_lists:
        if allowed is None:
            continue
        ok = value in allowed
        v.add(name, ok, "" if ok else f"{name} {value.hex()} not in policy")
    if policy.rejected_advisories:
        hit = sorted(set(v.fields.get("advisory_ids", [])) & policy.rejected_advisories)
        v.add("advisories", not hit, f"rejected advisories present: {hit}" if hit else "")
    if policy.min_tcb_eval_data_number is not None:
        ok = eval_number is not None and eval_number >= policy.min_tcb_eval_data_number
        v.add(
            "min_tcb",
            ok,
            f"tcbEvaluationDataNumber {eval_number} (min {policy.min_tcb_eval_data_number})",
        )
    if policy.min_tee_tcb_svn is not None:
        pairs = zip(rep.tee_tcb_svn, policy.min_tee_tcb_svn, strict=False)
        low = [i for i, (have, need) in enumerate(pairs) if have < need]
        v.add("min_tee_tcb_svn", not low, f"TEE_TCB_SVN components below minimum: {low}")
    if policy.require_sept_ve_disable:
        v.add("sept_ve_disable", rep.sept_ve_disable, "TDATTRIBUTES bit 28 SEPT_VE_DISABLE")


# --- helpers ---------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def take(self, n: int) -> bytes:
        _need(self.data, self.off, n)
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])


def _need(buf: bytes, off: int, n: int) -> None:
    if off + n > len(buf):
        raise TruncatedError(f"quote truncated: need {n} bytes at offset {off}, have {len(buf)}")


def _dss(raw: bytes) -> bytes:
    half = len(raw) // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def _coerce_binary(data: bytes | bytearray | memoryview | str) -> bytes:
    """Accept binary evidence or its hex text (with optional 0x prefix / whitespace)."""
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        if not raw or not _looks_hex(raw):
            return raw
        text = raw.decode("ascii")
    text = "".join(text.split())
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise DecodeError(f"evidence is neither binary nor hex: {e}") from e


_HEX = frozenset(b"0123456789abcdefABCDEFxX \t\r\n")


def _looks_hex(raw: bytes) -> bool:
    return len(raw) >= 2 and all(b in _HEX for b in raw)


def _collateral_text(collateral: str | bytes | Mapping[str, Any]) -> str:
    if isinstance(collateral, Mapping):
        return json.dumps(dict(collateral))
    if isinstance(collateral, bytes | bytearray):
        return bytes(collateral).decode("utf-8")
    return collateral


def _utc(now: datetime) -> datetime:
    """Naive datetimes are taken as UTC (the samples' instants are all UTC)."""
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)

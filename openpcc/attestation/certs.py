"""Loading X.509 certificates that come from outside (evidence, endorsements, bundles).

Why a module of its own: ``cryptography`` parses a certificate's names, extensions,
validity and key lazily, on first access, and what it raises there for hostile DER is not
always a ValueError (a name attribute with an ASN.1 string tag it does not know raised
``KeyError: 156`` from ``Certificate.issuer``, found by the RIM fuzz target). So every
certificate from outside is loaded here and has those parts read once, inside the
typed-error boundary: whatever the library raises becomes our ``DecodeError`` with a
short reason, and code after the load may touch any field without a try.
"""

from __future__ import annotations

import warnings

from cryptography import x509

from openpcc.errors import DecodeError

__all__ = ["load_certificate", "load_certificates", "readable"]

_PEM = b"-----BEGIN"


def readable(cert: x509.Certificate, what: str = "certificate") -> x509.Certificate:
    """``cert`` once every lazily parsed part a verifier reads has parsed.

    Catches ``Exception``, not a list: the point is that no exception type of the
    library's (ValueError, KeyError, UnsupportedAlgorithm, ...) reaches a caller."""
    try:
        with warnings.catch_warnings():
            # AMD's VCEK/VLEK certificates have serial number 0: a deprecation warning.
            warnings.filterwarnings("ignore", message=".*serial number.*")
            cert.serial_number  # noqa: B018
            cert.subject  # noqa: B018
            cert.issuer  # noqa: B018
            cert.extensions  # noqa: B018
            cert.not_valid_before_utc  # noqa: B018
            cert.not_valid_after_utc  # noqa: B018
            cert.public_key()
            cert.signature_algorithm_oid  # noqa: B018
            cert.signature_hash_algorithm  # noqa: B018
    except Exception as exc:
        raise DecodeError(f"{what} unreadable: {_reason(exc)}") from exc
    return cert


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """One certificate, PEM or DER, from outside."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*serial number.*")
            if data.lstrip().startswith(_PEM):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
    except Exception as exc:
        raise DecodeError(f"{what} unreadable: {_reason(exc)}") from exc
    return readable(cert, what)


def load_certificates(pem: bytes, what: str = "certificate chain") -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order, from outside."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*serial number.*")
            certs = x509.load_pem_x509_certificates(pem)
    except Exception as exc:
        raise DecodeError(f"{what} unreadable: {_reason(exc)}") from exc
    return [readable(c, what) for c in certs]


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

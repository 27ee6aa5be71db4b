"""Node admission: node credentials and signed registrations (docs/PROTOCOL.md, Node API).

Why: with one registration secret shared by every node, anyone holding it re-registered
a victim node's id with its own URL and took all of the victim's traffic, or filled the
registry for everyone. Now two things must hold before a gateway lists a node:

- **A credential** (``opnc1.<name>.<secret>``) the operator issued to that node or pool,
  with its own cap on how many nodes it may list (``gateway credentials add``). It says
  *who may ask*; the gateway keeps the credentials in a 0600 file, like its OHTTP keys.
- **A signature by the attested node.** The claims a node's TEE signs carry a per-boot
  Ed25519 ``signing_key``; every registration is signed with it over the exact body and a
  millisecond time (``OpenPCC-Node-Signature``). Only the machine whose evidence the
  gateway verified can list itself, under the node id its claims name, at the URL it
  signed; a copied registration is stale after ``REGISTRATION_WINDOW`` seconds and an
  older time than one already heard is refused.

The forward key (openpcc/forwarding.py) is derived from the node's credential, so a
credential leaked from one pool says nothing about another's nodes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.errors import DecodeError, OpenPCCError
from openpcc.files import file_stamp, write_private

__all__ = [
    "CREDENTIALS_FORMAT",
    "REGISTRATION_WINDOW",
    "SIGNATURE_HEADER",
    "AdmissionError",
    "Credential",
    "CredentialStore",
    "parse_credential",
    "sign_registration",
    "verify_registration",
]

log = logging.getLogger("openpcc.admission")

SIGNATURE_HEADER = "OpenPCC-Node-Signature"
REGISTRATION_WINDOW = 60  # seconds a registration's time may differ from the gateway's
CREDENTIALS_FORMAT = "openpcc-node-credentials/1"
CREDENTIAL_PREFIX = "opnc1"
MAX_CREDENTIALS = 4096
KNOWN_RECHECK = 1.0  # seconds between file looks on the per-request path
_SIGNED_LABEL = b"openpcc node registration v1\x00"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_CREDENTIAL = re.compile(rf"{CREDENTIAL_PREFIX}\.({_NAME.pattern})\.([A-Za-z0-9_-]{{43}})")
_SIGNATURE = re.compile(r"t=(\d{1,15}), sig=([A-Za-z0-9_-]{86})")


class AdmissionError(OpenPCCError):
    """A registration the gateway will not take; ``status_hint`` says why in HTTP terms."""

    status_hint = 401


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- signatures


def _signed_message(t_ms: int, body: bytes) -> bytes:
    return _SIGNED_LABEL + struct.pack(">Q", t_ms) + hashlib.sha256(body).digest()


def sign_registration(key: ed25519.Ed25519PrivateKey, body: bytes, now: float | None = None) -> str:
    """The ``OpenPCC-Node-Signature`` value for ``body``, sent at ``now``."""
    t_ms = int((time.time() if now is None else now) * 1000)
    return f"t={t_ms}, sig={_b64(key.sign(_signed_message(t_ms, body)))}"


def verify_registration(signing_key: bytes, body: bytes, value: str | None, now: float) -> int:
    """The signed time (Unix ms) if ``value`` is ``signing_key``'s signature over ``body``
    made within ``REGISTRATION_WINDOW`` seconds of ``now``; else AdmissionError (401)."""
    m = _SIGNATURE.fullmatch(value or "")
    if m is None:
        raise AdmissionError(f"missing or malformed {SIGNATURE_HEADER}")
    t_ms = int(m.group(1))
    try:
        public = ed25519.Ed25519PublicKey.from_public_bytes(signing_key)
        public.verify(_unb64(m.group(2)), _signed_message(t_ms, body))
    except (InvalidSignature, ValueError):
        raise AdmissionError("registration not signed by the attested node key") from None
    if abs(now - t_ms / 1000) > REGISTRATION_WINDOW:
        raise AdmissionError(f"registration time is more than {REGISTRATION_WINDOW} s off")
    return t_ms


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credential:
    """One admission credential: a name (in logs and metrics), its secret, its node cap."""

    name: str
    secret: bytes
    max_nodes: int

    @property
    def token(self) -> str:
        """What the node is given (``--admission-credential``); shown once, at ``add``."""
        return f"{CREDENTIAL_PREFIX}.{self.name}.{_b64(self.secret)}"


def parse_credential(token: str) -> tuple[str, bytes]:
    """(name, secret) of an ``opnc1.<name>.<secret>`` credential; DecodeError otherwise."""
    m = _CREDENTIAL.fullmatch(token.strip())
    if m is None:
        raise DecodeError(f"an admission credential looks like {CREDENTIAL_PREFIX}.NAME.SECRET")
    return m.group(1), _unb64(m.group(2))


class CredentialStore:
    """The gateway's node credentials (a 0600 JSON file), reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_name: dict[str, Credential] = {}
        self._looked_at = -math.inf

    # -- file -------------------------------------------------------------------------
    def _read(self) -> dict[str, Credential]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DecodeError(f"{self.path}: not a credentials file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != CREDENTIALS_FORMAT:
            raise DecodeError(f"{self.path}: format must be {CREDENTIALS_FORMAT}")
        items = doc.get("credentials")
        if not isinstance(items, list) or len(items) > MAX_CREDENTIALS:
            raise DecodeError(f"{self.path}: credentials must be a list")
        out: dict[str, Credential] = {}
        for item in items:
            try:
                name, secret, cap = item["name"], _unb64(item["secret"]), item["max_nodes"]
            except (KeyError, TypeError, ValueError):
                raise DecodeError(f"{self.path}: malformed credential entry") from None
            if not isinstance(name, str) or not _NAME.fullmatch(name) or len(secret) != 32:
                raise DecodeError(f"{self.path}: malformed credential entry")
            if type(cap) is not int or cap < 1:
                raise DecodeError(f"{self.path}: max_nodes of {name!r} must be positive")
            out[name] = Credential(name, secret, cap)
        return out

    def _write(self, creds: dict[str, Credential]) -> None:
        doc: dict[str, Any] = {
            "format": CREDENTIALS_FORMAT,
            "credentials": [
                {"name": c.name, "secret": _b64(c.secret), "max_nodes": c.max_nodes}
                for c in sorted(creds.values(), key=lambda c: c.name)
            ],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.path, (json.dumps(doc, indent=1) + "\n").encode())

    def current(self) -> dict[str, Credential]:
        """The credentials as the file says now (read again only when it changed)."""
        self._looked_at = time.monotonic()
        stamp = file_stamp(self.path)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._by_name = self._read()
            except DecodeError as exc:  # a bad edit must not drop every node at once
                log.error("keeping the node credentials in use: %s", exc)
        return self._by_name

    # -- operator commands ----------------------------------------------------------------
    def add(self, name: str, max_nodes: int) -> Credential:
        if not _NAME.fullmatch(name):
            raise ValueError(f"credential names match {_NAME.pattern}")
        if max_nodes < 1:
            raise ValueError("--max-nodes must be positive")
        creds = self._read()
        if name in creds:
            raise ValueError(f"credential {name!r} exists (revoke it first to replace it)")
        cred = Credential(name, secrets.token_bytes(32), max_nodes)
        creds[name] = cred
        self._write(creds)
        return cred

    def revoke(self, name: str) -> None:
        creds = self._read()
        if creds.pop(name, None) is None:
            raise ValueError(f"no credential {name!r}")
        self._write(creds)

    def known(self, name: str) -> Credential | None:
        """The credential ``name``, looking at the file at most once a second: for the
        per-request path (forwards), where ``current``'s stat per call is not needed."""
        if time.monotonic() - self._looked_at >= KNOWN_RECHECK:
            self.current()
        return self._by_name.get(name)

    # -- per registration -------------------------------------------------------------
    def check(self, token: str) -> Credential:
        """The credential ``token`` is, or AdmissionError (401)."""
        try:
            name, secret = parse_credential(token)
        except DecodeError:
            raise AdmissionError("missing or malformed admission credential") from None
        cred = self.current().get(name)
        if cred is None or not hmac.compare_digest(cred.secret, secret):
            raise AdmissionError("unknown admission credential")
        return cred

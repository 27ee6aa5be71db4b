"""One exception hierarchy for the whole core.

Parsers and protocol state machines raise only these, so a service can map any
failure on hostile input to a typed, user-actionable error (and an HTTP status)
without catching bare ``Exception``. Each type carries its one ``status_hint`` (as h11's
``error_status_hint``): the HTTP status a service answers when this error ends a request,
set once per type, never per call site (``openpcc.service.http.problem_for``).
"""

from __future__ import annotations


class OpenPCCError(Exception):
    """Base class of every error the core raises on purpose."""

    status_hint: int = 500


class DecodeError(OpenPCCError, ValueError):
    """Bytes or text do not form a valid message of the expected format."""

    status_hint = 400


class TruncatedError(DecodeError):
    """Input ended before the message did (a cut stream, never a complete one)."""


class LimitExceededError(DecodeError):
    """Input is well-formed so far but exceeds a configured size or count limit."""

    status_hint = 413


class UnsupportedError(DecodeError):
    """Well-formed input naming something we do not implement (suite, token type, key id)."""


class EncodeError(OpenPCCError, ValueError):
    """A value cannot be encoded (out of range, too long, wrong type)."""


class StateError(OpenPCCError):
    """A sans-IO state machine was driven out of order (e.g. data after the final chunk)."""


class DecryptError(OpenPCCError):
    """Authenticated decryption failed: wrong key, tampered or reordered ciphertext."""

    status_hint = 400


class VerificationError(OpenPCCError):
    """A signature, token or attestation did not verify."""

    status_hint = 403


class KeyStoreError(OpenPCCError):
    """A party's key folder is unreadable, malformed or full (issuer and gateway)."""

"""One exception hierarchy for the whole core.

Parsers and protocol state machines raise only these, so a service can map any
failure on hostile input to a typed, user-actionable error (and an HTTP status)
without catching bare ``Exception``.
"""

from __future__ import annotations


class OpenPCCError(Exception):
    """Base class of every error the core raises on purpose."""


class DecodeError(OpenPCCError, ValueError):
    """Bytes or text do not form a valid message of the expected format."""


class TruncatedError(DecodeError):
    """Input ended before the message did (a cut stream, never a complete one)."""


class LimitExceededError(DecodeError):
    """Input is well-formed so far but exceeds a configured size or count limit."""


class UnsupportedError(DecodeError):
    """Well-formed input naming something we do not implement (suite, token type, key id)."""


class EncodeError(OpenPCCError, ValueError):
    """A value cannot be encoded (out of range, too long, wrong type)."""


class StateError(OpenPCCError):
    """A sans-IO state machine was driven out of order (e.g. data after the final chunk)."""


class DecryptError(OpenPCCError):
    """Authenticated decryption failed: wrong key, tampered or reordered ciphertext."""


class VerificationError(OpenPCCError):
    """A signature, token or attestation did not verify."""

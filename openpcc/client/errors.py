"""Typed client errors: each names what failed and what the user can do about it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from openpcc.errors import (
    DecodeError,
    DecryptError,
    OpenPCCError,
    TruncatedError,
    VerificationError,
)


class ClientError(OpenPCCError):
    """Base of every error the client SDK raises on purpose."""


class NoVerifiedNodeError(ClientError):
    """No node serving the model passed attestation under the trust policy."""

    def __init__(self, model: str, reasons: dict[str, list[str]]) -> None:
        self.model = model
        self.reasons = reasons
        detail = "; ".join(f"{nid[:8]}: {', '.join(r)}" for nid, r in reasons.items()) or "none"
        super().__init__(f"no attested node serves model {model!r} (rejected: {detail})")


class GatewayError(ClientError):
    """The gateway refused the request (token, routing, capacity)."""

    def __init__(self, status: int, problem: dict[str, Any] | None) -> None:
        self.status = status
        self.problem = problem or {}
        title = self.problem.get("title", "error")
        detail = self.problem.get("detail", "")
        super().__init__(f"gateway answered {status} {title}" + (f": {detail}" if detail else ""))


class TokenRejectedError(GatewayError):
    """The gateway did not accept the Privacy Pass token (spent, unknown key, bad)."""


class NoCapacityError(GatewayError):
    """None of the chosen candidate nodes could take the request."""


class NodeError(ClientError):
    """The attested node answered with an error (e.g. a request outside its allow-list)."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        super().__init__(f"node answered {status}: {body[:300].decode(errors='replace')}")


class TruncatedResponseError(ClientError, TruncatedError):
    """The answer stopped before the node's authenticated end of stream."""


class RelayError(ClientError):
    """The relay or the transport failed before the gateway answered."""


class TamperedResponseError(ClientError, DecryptError):
    """An answer (or the discovery documents) failed authentication: altered on the way."""


class MalformedResponseError(ClientError, DecodeError):
    """An answer was not well-formed at some layer (OHTTP, Binary HTTP, sealed, JSON)."""


class UntrustedError(ClientError, VerificationError):
    """Something the release manifest pins did not match (a gateway key, a token key)."""


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """Every failure a caller of the client can see is a ClientError, the cause chained.

    The core's own errors keep their meaning (a TamperedResponseError is still a
    DecryptError), so ``except DecryptError`` goes on working.
    """
    try:
        yield
    except ClientError:
        raise
    except TruncatedError as exc:
        raise TruncatedResponseError(f"the answer was cut off: {exc}") from exc
    except DecryptError as exc:
        raise TamperedResponseError(f"an answer failed authentication: {exc}") from exc
    except VerificationError as exc:
        raise UntrustedError(str(exc)) from exc
    except DecodeError as exc:
        raise MalformedResponseError(f"malformed answer: {exc}") from exc
    except OpenPCCError as exc:
        raise ClientError(str(exc)) from exc

"""Client side of OpenPCC: the token wallet and the private-inference SDK.

The SDK (``openpcc.client.client``) pulls in HPKE and attestation code, so it is
loaded lazily; ``from openpcc.client import TokenWallet`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from openpcc.client.wallet import (
    IssuerAuthError,
    IssuerError,
    KeyConsistencyError,
    QuotaExceededError,
    TokenWallet,
    WalletError,
    WalletStoreError,
)

__all__ = [
    "Client",
    "IssuerAuthError",
    "IssuerError",
    "KeyConsistencyError",
    "QuotaExceededError",
    "SyncClient",
    "TokenWallet",
    "WalletError",
    "WalletStoreError",
]

_LAZY = {"Client": "openpcc.client.client", "SyncClient": "openpcc.client.client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openpcc.client' has no attribute {name!r}")

"""Client side of OpenPCC: the token wallet and the private-inference SDK.

Both pull in aiohttp and crypto code, so they are loaded on first use: importing a
light module of this package (``profile``, ``errors``) while ``openpcc`` builds its
parser costs nothing more.
"""

from __future__ import annotations

import importlib
from typing import Any

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

_LAZY = {
    "Client": "openpcc.client.client",
    "SyncClient": "openpcc.client.client",
    **{name: "openpcc.client.wallet" for name in __all__ if name not in ("Client", "SyncClient")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openpcc.client' has no attribute {name!r}")

"""What each party actually received, computed from its own audit log.

Used by `openpcc demo` to print the views and by the privacy audit test to assert
DESIGN.md §1. Each check searches everything the party recorded (peer address,
headers, raw body bytes and the values it decrypted) for a secret.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from openpcc.audit import read_audit

PARTIES = ("issuer", "relay", "gateway", "node")
# DESIGN.md §1: True = may see, False = must never see.
ALLOWED: dict[str, dict[str, bool]] = {
    "issuer": {"client_addr": True, "account": True, "token": False, "prompt": False,
               "cache_salt": False},
    "relay": {"client_addr": True, "account": False, "token": False, "prompt": False,
              "cache_salt": False},
    "gateway": {"client_addr": False, "account": False, "token": True, "prompt": False,
                "cache_salt": False},
    "node": {"client_addr": False, "account": False, "token": False, "prompt": True,
             "cache_salt": True},
}  # fmt: skip


def _haystack(records: list[dict[str, Any]]) -> bytes:
    """Every byte a party recorded: raw bodies, headers and the values it decrypted."""
    parts = []
    for r in records:
        parts += [
            str(r.get("peer")).encode(),
            json.dumps(r.get("headers"), ensure_ascii=False).encode(),
            json.dumps(r.get("notes"), ensure_ascii=False).encode(),
            bytes.fromhex(str(r.get("body_hex", ""))),
        ]
    return b"\n".join(parts)


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def tokens_seen(audit: dict[str, Path]) -> list[str]:
    """The PrivateToken values the gateway redeemed (from its own notes)."""
    out = []
    for r in read_audit(audit["gateway"]):
        inner = (r.get("notes") or {}).get("inner") or {}
        for name, value in inner.get("headers", []):
            if name.lower() == "authorization" and "token=" in value:
                out.append(value.split("token=", 1)[1].strip().strip('"'))
    return out


def party_views(
    audit: dict[str, Path],
    *,
    prompt: str,
    client_addr: str,
    account_secrets: list[str],
    cache_salts: list[bytes] = (),  # type: ignore[assignment]
) -> dict[str, dict[str, bool]]:
    """For each party: did it receive the client address, account, token, prompt, the
    client's cache-scope salt (hex or raw)?"""
    tokens = tokens_seen(audit)
    needles = {
        "account": [a.encode() for a in account_secrets],
        # A token could travel as its base64 text or as raw bytes.
        "token": [t[:40].encode() for t in tokens] + [_b64url_decode(t)[:64] for t in tokens],
        "prompt": [prompt.encode()],
        "cache_salt": [s.hex().encode() for s in cache_salts] + list(cache_salts),
    }
    views = {}
    for party in PARTIES:
        records = read_audit(audit[party])
        hay = _haystack(records)
        views[party] = {
            "requests": bool(records),
            "client_addr": any(r.get("peer") == client_addr for r in records),
            **{what: any(n in hay for n in ns) for what, ns in needles.items()},
        }
    return views


def print_views(views: dict[str, dict[str, bool]], out: Any = print) -> bool:
    """Print the table; True when every party stayed within DESIGN.md §1."""
    out("What each party received (from its own audit log; ✓ = present):")
    all_ok = True
    out(
        f"  {'party':8} {'client IP':>10} {'account':>8} {'token':>6} {'prompt':>7} "
        f"{'cache salt':>11}   verdict"
    )
    what = ("client_addr", "account", "token", "prompt", "cache_salt")
    for party in PARTIES:
        v = views[party]
        marks = [("✓" if v[k] else "·") for k in what]
        ok = all(v[k] <= ALLOWED[party][k] for k in what)
        all_ok = all_ok and ok
        out(
            f"  {party:8} {marks[0]:>10} {marks[1]:>8} {marks[2]:>6} {marks[3]:>7} "
            f"{marks[4]:>11}   " + ("as DESIGN.md §1 allows" if ok else "VIOLATES DESIGN.md §1")
        )
    return all_ok

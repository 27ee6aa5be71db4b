"""Flag and environment values every party parses the same way.

Free of aiohttp: a party's config module imports this, and ``--help`` or a config error
must never pay for the server.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*$")
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@\s]+$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_size(text: str | int) -> int:
    """``"8m"``, ``"64KiB"`` or ``1048576`` -> bytes (powers of 1024, as nginx does)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"bad size {text!r} (e.g. 65536, 64k, 8m)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(match.group(1)) * scale


def parse_bool(text: str | bool) -> bool:
    """One meaning of a boolean in the environment for every party: 1/true/yes/on."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"bad boolean {text!r} (1/0, true/false, yes/no, on/off)")


def split_list(text: str | None) -> list[str]:
    """Environment lists are separated by commas or whitespace."""
    return [item for item in re.split(r"[,\s]+", text or "") if item]


def parse_origins(specs: list[str]) -> tuple[str, ...]:
    """``--allow-origin`` values as a browser serializes them (lower case, no path): it
    compares Access-Control-Allow-Origin with its origin byte for byte."""
    out = []
    for spec in specs:
        origin = spec.strip().rstrip("/").lower()
        if origin != "*" and not _ORIGIN.match(origin):
            raise ValueError(f"bad origin {spec!r} (scheme://host[:port], or *)")
        out.append(origin)
    return ("*",) if "*" in out else tuple(dict.fromkeys(out))

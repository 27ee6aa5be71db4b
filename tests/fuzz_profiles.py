"""Hypothesis profiles for the hardening fuzz tests (issue 9), picked by ``OPENPCC_FUZZ``.

``dev`` (the default of a plain ``pytest``) runs each parser and HTTP-endpoint fuzz case
300 times, ``ci`` (what ``scripts/dev test`` and CI run) 10 000 times, ``long`` 100 000:

    OPENPCC_FUZZ=long python -m pytest -m fuzz

Only the tests that apply ``PARSER``/``HTTP`` use these; the rest of the suite keeps
its own explicit settings. Why not ``settings.load_profile``: that would change every
other hypothesis test's defaults as a side effect of importing this module.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

VOLUME = {"dev": 300, "ci": 10_000, "long": 100_000}
PROFILE = os.environ.get("OPENPCC_FUZZ") or "dev"
if PROFILE not in VOLUME:
    raise RuntimeError(f"OPENPCC_FUZZ must be one of {sorted(VOLUME)}, not {PROFILE!r}")

_COMMON = {
    "deadline": None,
    "database": None,  # no example files written; failures print their reproducer
    "suppress_health_check": list(HealthCheck),
    "phases": [Phase.explicit, Phase.generate, Phase.shrink],
}
for name, volume in VOLUME.items():
    settings.register_profile(f"openpcc-parser-{name}", max_examples=volume, **_COMMON)
    # Over HTTP every case is a real request to a real process (~1 ms each on loopback).
    settings.register_profile(f"openpcc-http-{name}", max_examples=volume, **_COMMON)

PARSER = settings.get_profile(f"openpcc-parser-{PROFILE}")
HTTP = settings.get_profile(f"openpcc-http-{PROFILE}")

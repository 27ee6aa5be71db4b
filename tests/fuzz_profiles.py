"""Hypothesis profiles for the hardening fuzz tests (issue 9), picked by ``OPENPCC_FUZZ``.

``ci`` (default) runs each parser and HTTP-endpoint fuzz case 10 000 times, ``long``
100 000 times:

    OPENPCC_FUZZ=long python -m pytest -m fuzz

Only the tests that apply ``PARSER``/``HTTP`` use these; the rest of the suite keeps
its own explicit settings. Why not ``settings.load_profile``: that would change every
other hypothesis test's defaults as a side effect of importing this module.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILE = os.environ.get("OPENPCC_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise RuntimeError(f"OPENPCC_FUZZ must be 'ci' or 'long', not {PROFILE!r}")

_COMMON = {
    "deadline": None,
    "database": None,  # no example files written; failures print their reproducer
    "suppress_health_check": list(HealthCheck),
    "phases": [Phase.explicit, Phase.generate, Phase.shrink],
}
settings.register_profile("openpcc-parser-ci", max_examples=10_000, **_COMMON)
settings.register_profile("openpcc-parser-long", max_examples=100_000, **_COMMON)
# Over HTTP every case is a real request to a real process (~1 ms each on loopback).
settings.register_profile("openpcc-http-ci", max_examples=10_000, **_COMMON)
settings.register_profile("openpcc-http-long", max_examples=100_000, **_COMMON)

PARSER = settings.get_profile(f"openpcc-parser-{PROFILE}")
HTTP = settings.get_profile(f"openpcc-http-{PROFILE}")

"""Hypothesis profiles for the hardening fuzz tests (issue 9), picked by ``OPENPCC_FUZZ``.

``dev`` (the default of a plain ``pytest``) runs each parser and HTTP-endpoint fuzz case
300 times, ``ci`` (what ``scripts/dev test`` and CI run) 10 000 times, ``long`` 100 000,
``explore`` 100 000 with fresh randomness:

    OPENPCC_FUZZ=long python -m pytest -m fuzz

``dev`` and ``ci`` are derandomized: hypothesis draws the same examples on every run
(seeded from each test's name), so a red CI means the commit, never the draw. ``long`` and
``explore`` search with fresh randomness each run; what they find is added to the
explicit examples (``FOUND`` in tests/test_fuzz_parsers.py), which every profile replays.

Only the tests that apply ``PARSER``/``HTTP`` use these; the rest of the suite keeps
its own explicit settings. Why not ``settings.load_profile``: that would change every
other hypothesis test's defaults as a side effect of importing this module.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

VOLUME = {"dev": 300, "ci": 10_000, "long": 100_000, "explore": 100_000}
REPRODUCIBLE = {"dev", "ci"}
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
    fixed = name in REPRODUCIBLE
    settings.register_profile(
        f"openpcc-parser-{name}", max_examples=volume, derandomize=fixed, **_COMMON
    )
    # Over HTTP every case is a real request to a real process (~1 ms each on loopback).
    settings.register_profile(
        f"openpcc-http-{name}", max_examples=volume, derandomize=fixed, **_COMMON
    )

PARSER = settings.get_profile(f"openpcc-parser-{PROFILE}")
HTTP = settings.get_profile(f"openpcc-http-{PROFILE}")

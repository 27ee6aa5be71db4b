"""Short soak in CI (issue 9): ~60 s, 20 concurrent streams through the full path.

The long run is ``python -m bench.soak --minutes 10 --streams 50`` (bench/soak.py has
the criteria and why). Here: zero errors, per-process RSS flat within +20 % after the
warm-up, open fds / threads / client asyncio tasks not growing.
"""

from __future__ import annotations

import json

import pytest

from bench.soak import run_soak


@pytest.mark.slow
def test_short_soak_has_no_errors_and_no_growth() -> None:
    doc = run_soak(1.0, 20, sample_every=1.0)
    report = json.dumps({k: doc[k] for k in ("requests_ok", "errors", "verdicts")}, indent=1)
    assert not doc["errors"], report
    assert doc["requests_ok"] >= 200, report  # it really carried load
    growing = [
        f"{proc}.{metric}"
        for proc, v in doc["verdicts"].items()
        for metric, x in v.items()
        if not x["flat"]
    ]
    assert not growing, report
    assert doc["passed"]

"""bench/bench_gateway.py still measures what it claims, in a few seconds.

Its pieces run for real (nginx node, issuer, gateway, load generator, nginx proxy) on a
handful of requests: every sealed request is answered 200 outside and inside the
encapsulation with the node's exact bytes, and the check that makes a run invalid
does see inner failures (replayed tokens). Like the relay suite, this fails rather
than skips when nginx is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_gateway as bench

N = 40


def test_gateway_and_nginx_answer_every_request(tmp_path: Path) -> None:
    with bench.stack(tmp_path) as st:
        prepared = st.build(N)
        requests = prepared.write(tmp_path / "requests.bin")
        answers = tmp_path / "answers.bin"

        def send_all() -> dict:
            return bench.load(
                st.gateway_port,
                bench.GATEWAY_PATH,
                requests,
                concurrency=4,
                duration=30,
                responses_file=answers,
            )

        gw = send_all()
        assert gw["statuses"] == {"200": N} and gw["pool_exhausted"], gw
        assert st.check(prepared, answers) == {"200": N}

        # The same bytes again: tokens are spent, so the gateway answers 200 outside but
        # 401 inside. Only opening the answers shows it, and the run must then be invalid.
        again = send_all()
        inner = st.check(prepared, answers)
        assert again["statuses"] == {"200": N} and inner == {"401": N}
        with pytest.raises(RuntimeError, match="invalid run"):
            bench._require_ok("gateway", again, inner)

        proxy = bench.start_nginx_proxy(st.upstream.port, tmp_path)
        try:
            ng = bench.load(
                proxy.port, bench.RELAY_PATH, requests, concurrency=4, duration=0.5, cycle=True
            )
        finally:
            proxy.stop()
        assert set(ng["statuses"]) == {"200"} and ng["requests"] > N, ng

"""The service kit's generic parts for ``--workers`` and the event loop, in-process:
/metrics merged over workers, the listener rules, uvloop by default.
(The issuer as a process with --workers: tests/test_issuer_workers.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from aiohttp import web

from openpcc.service import serve as kit
from openpcc.service.http import Metrics
from openpcc.service.limits import ServeSettings
from openpcc.service.workers import WorkerShare, _retire_dump, merge_dumps, reserve_ports


def _worker(folder: Path, index: int, tokens: int, inflight: int, requests: int) -> None:
    m = Metrics("openpcc_test")
    m.describe("tokens_total", "tokens")
    m.inc("tokens_total", tokens, outcome="ok")
    m.set("inflight", inflight)
    share = WorkerShare(index, folder, requests=requests, metrics=m)
    share.dump()


def test_merged_metrics_sum_counters_label_gauges_and_keep_the_dead(tmp_path: Path) -> None:
    # (Below 10**6: Metrics.render prints 6 significant digits, and the dumps are its text.)
    _worker(tmp_path, 0, 300_001, 2, 10)
    _worker(tmp_path, 1, 4, 5, 7)
    text = merge_dumps(tmp_path)
    assert 'openpcc_test_tokens_total{outcome="ok"} 300005' in text
    assert "# HELP openpcc_test_tokens_total tokens" in text
    assert 'openpcc_test_inflight{worker="0"} 2' in text
    assert 'openpcc_test_inflight{worker="1"} 5' in text
    assert 'openpcc_worker_requests_total{worker="0"} 10' in text
    # Worker 1 dies and comes back empty: its counters stay in the sums, its gauges go.
    _retire_dump(tmp_path, 1)
    _worker(tmp_path, 1, 1, 0, 1)
    text = merge_dumps(tmp_path)
    assert 'openpcc_test_tokens_total{outcome="ok"} 300006' in text
    assert 'openpcc_worker_requests_total{worker="1"} 8' in text
    assert 'openpcc_test_inflight{worker="1"} 0' in text
    _retire_dump(tmp_path, 1)  # twice: the gone file accumulates
    assert 'openpcc_test_tokens_total{outcome="ok"} 300006' in merge_dumps(tmp_path)
    assert json.loads((tmp_path / "gone-1.json").read_text())["requests_by_worker"] == {"1": 8}


def test_reserved_port_is_shared_and_gets_no_connections() -> None:
    ports, held = reserve_ports([("public", "127.0.0.1", 0)])
    try:
        import socket

        port = ports["public"]
        assert port > 0
        with socket.socket() as worker:  # a worker binds the same port and listens
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            for _ in range(20):  # every connection reaches the listening socket
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    conn, _ = worker.accept()
                    conn.close()
    finally:
        for sock in held:
            sock.close()


def test_workers_need_app_factories() -> None:
    with pytest.raises(ValueError, match="factory"):
        kit.serve([kit.Listener(web.Application(), "127.0.0.1", 0)], settings=ServeSettings(),
                  workers=2)  # fmt: skip
    with pytest.raises(ValueError, match="workers must be"):
        kit.serve([], settings=ServeSettings(), workers=0)
    app = web.Application()
    assert kit.Listener(lambda: app, "h", 1).built().app is app


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
def test_uvloop_is_the_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kit.EVENT_LOOP_ENV, raising=False)
    assert kit.use_uvloop_default()
    monkeypatch.setenv(kit.EVENT_LOOP_ENV, "asyncio")
    assert not kit.use_uvloop_default()
    assert os.environ[kit.EVENT_LOOP_ENV] == "asyncio"

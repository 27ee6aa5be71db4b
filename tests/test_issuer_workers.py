"""`issuer serve --workers N`: N processes on one port (SO_REUSEPORT) sharing the state
store, as operators run it: the real CLI on port 0, real HTTP, both state backends; and
the issuer on a host without OpenSSL 3 (gmpy2 fallback)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from openpcc.privacypass import batched, issuance
from tests.harness import ROOT, cli
from tests.test_issuer_service import (  # noqa: F401 - backend_args is a fixture
    SINGLE,
    Issuer,
    backend_args,
    fetch_directory,
    make_requests,
    post,
    start_issuer,
    stop,
)


def workers_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


def wait_for(check, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


@pytest.fixture
def two(tmp_path: Path, backend_args: list[str]) -> Iterator[Issuer]:  # noqa: F811
    iss = start_issuer(
        tmp_path / "state", backend_args, tmp_path / "issuer.log", ["--workers", "2"]
    )
    wait_for(lambda: len(workers_of(iss.proc.proc.pid)) == 2)
    yield iss
    stop(iss)


async def fresh_connections(n: int, send) -> list:  # type: ignore[no-untyped-def]
    """``n`` requests, each on a connection of its own: the kernel spreads connections
    (not requests) over the workers' sockets."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        return await asyncio.gather(*(send(s, i) for i in range(n)))


async def test_two_workers_on_one_port_both_issue_and_metrics_add_up(two: Issuer) -> None:
    key = two.add_account("alice", quota=1000)
    assert set(two.proc.ports) == {"public"}
    async with aiohttp.ClientSession() as s:
        entry = (await fetch_directory(s, two.url)).select_key()
    pairs = make_requests(entry.token_key, 40)

    async def send(s: aiohttp.ClientSession, i: int) -> tuple[int, bytes, object]:
        return await post(s, two.url, pairs[i][0].encode(), SINGLE, key)

    results = await fresh_connections(40, send)
    assert [status for status, _, _ in results] == [200] * 40
    tokens = [
        issuance.finalize_token(st, body)
        for (_, st), (_, body, _) in zip(pairs, results, strict=True)
    ]
    for t in tokens:
        issuance.verify_token(entry.token_key, t)

    # Whichever worker answers the scrape answers for both (counters summed), and each
    # worker's share of the requests is there by worker index (no pid, no address).
    def settled() -> bool:
        text = scrape(two.url)
        return metric(text, "openpcc_issuer_tokens_issued_total") == 40

    wait_for(settled, 5)
    text = scrape(two.url)
    served = [metric(text, "openpcc_worker_requests_total", f'{{worker="{i}"}}') for i in (0, 1)]
    assert all(n > 0 for n in served), served
    assert metric(text, "openpcc_issuer_issuance_requests_total", '{outcome="ok"}') == 40


async def test_quota_is_exact_across_workers(two: Issuer) -> None:
    key = two.add_account("racer", quota=23)
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, two.url)).select_key().token_key
    reqs = [r.encode() for r, _ in make_requests(tk, 50)]

    async def send(s: aiohttp.ClientSession, i: int) -> tuple[int, bytes, object]:
        return await post(s, two.url, reqs[i], SINGLE, key)

    statuses = sorted(status for status, _, _ in await fresh_connections(50, send))
    assert (statuses.count(200), statuses.count(429)) == (23, 27)


async def test_sigterm_to_the_parent_drains_every_worker(tmp_path: Path) -> None:
    iss = start_issuer(
        tmp_path / "state", [], tmp_path / "issuer.log",
        ["--workers", "2", "--shutdown-timeout", "60"],
    )  # fmt: skip
    parent = iss.proc.proc
    try:
        wait_for(lambda: len(workers_of(parent.pid)) == 2)
        pids = workers_of(parent.pid)
        key = iss.add_account("batch", quota=100_000)
        async with aiohttp.ClientSession() as s:
            tk = (await fetch_directory(s, iss.url)).select_key().token_key
        # 16 connections land on both workers but for a chance of 2 in 65,536.
        bodies = [
            batched.encode_batch_request([r for r, _ in make_requests(tk, 60)]) for _ in range(16)
        ]
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}

        async def send(s: aiohttp.ClientSession, i: int) -> tuple[int, bytes, object]:
            return await post(s, iss.url, bodies[i], batched.REQUEST_MEDIA_TYPE, key)

        load = asyncio.ensure_future(fresh_connections(16, send))

        def both_signing() -> bool:
            return all(cpu_seconds(pid) - cpu0[pid] > 0.05 for pid in pids)

        await asyncio.to_thread(wait_for, both_signing, 30)
        assert not load.done(), "the load ended before SIGTERM: make the batches larger"
        os.kill(parent.pid, signal.SIGTERM)  # the parent only: it must reach the workers
        results = await load
        assert [status for status, _, _ in results] == [200] * 16  # none cut off
        assert all(len(batched.decode_batch_response(body)) == 60 for _, body, _ in results)
        assert parent.wait(30) == 0
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its parent"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", iss.proc.port), timeout=2).close()
        assert "SIGTERM: stopping 2 worker(s)" in iss.proc.output()
    finally:
        stop(iss)


async def test_a_dead_worker_is_started_again_and_counters_never_drop(tmp_path: Path) -> None:
    iss = start_issuer(tmp_path / "state", [], tmp_path / "issuer.log", ["--workers", "2"])
    parent = iss.proc.proc.pid
    try:
        wait_for(lambda: len(workers_of(parent)) == 2)
        key = iss.add_account("alice", quota=1000)
        async with aiohttp.ClientSession() as s:
            tk = (await fetch_directory(s, iss.url)).select_key().token_key
        reqs = [r.encode() for r, _ in make_requests(tk, 20)]

        async def send(s: aiohttp.ClientSession, i: int) -> tuple[int, bytes, object]:
            return await post(s, iss.url, reqs[i], SINGLE, key)

        assert {status for status, _, _ in await fresh_connections(10, send)} == {200}
        time.sleep(1.5)  # every worker has written its counters since
        before = workers_of(parent)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # One scan per check: two scans could see the victim's zombie (len 2) and then its
        # reaping (gone) before the new worker exists or the restart is logged (the CI
        # failure of 2026-12-07).
        wait_for(lambda: len(w := workers_of(parent)) == 2 and victim not in w)
        assert "starting it again" in iss.proc.output()
        again = await fresh_connections(10, lambda s, i: send(s, i + 10))
        assert {status for status, _, _ in again} == {200}
        wait_for(lambda: metric(scrape(iss.url), "openpcc_issuer_tokens_issued_total") == 20, 5)
    finally:
        stop(iss)


def test_a_port_in_use_ends_the_service_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "openpcc.cli", "issuer", "serve", "--state",
             str(tmp_path / "state"), "--port", str(port), "--workers", "2"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert out.returncode == 1
    assert "cannot listen on 127.0.0.1:" in out.stderr and "Traceback" not in out.stderr


def test_workers_flag_is_validated(tmp_path: Path) -> None:
    out = cli("issuer", "serve", "--state", str(tmp_path), "--workers", "0")
    assert out.returncode == 2 and "--workers must be 1..64" in out.stderr
    out = cli("issuer", "serve", "--help")
    assert "OPENPCC_ISSUER_WORKERS" in out.stdout


async def test_without_libcrypto_the_issuer_signs_on_gmpy2(tmp_path: Path) -> None:
    """As on a host without OpenSSL 3: a warning, then the same tokens from gmpy2; told
    to use OpenSSL there, the issuer does not start."""
    nowhere = {"OPENPCC_LIBCRYPTO": str(tmp_path / "no" / "libcrypto.so.3")}
    out = cli("issuer", "serve", "--state", str(tmp_path / "s"), "--port", "0",
              env={**nowhere, "OPENPCC_RSA_BACKEND": "openssl"})  # fmt: skip
    assert out.returncode == 2 and "no OpenSSL 3 libcrypto" in out.stderr
    iss = start_issuer(tmp_path / "state", [], tmp_path / "issuer.log", env=nowhere)
    try:
        assert "RSA private operation on gmpy2" in iss.proc.output()
        assert "falls back to gmpy2" in iss.proc.output()
        key = iss.add_account("alice", quota=5)
        async with aiohttp.ClientSession() as s:
            entry = (await fetch_directory(s, iss.url)).select_key()
            ((req, state),) = make_requests(entry.token_key, 1)
            status, body, _ = await post(s, iss.url, req.encode(), SINGLE, key)
        assert status == 200
        issuance.verify_token(entry.token_key, issuance.finalize_token(state, body))
    finally:
        stop(iss)

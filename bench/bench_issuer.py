"""Issuer throughput: BlindSign per core against `openssl speed`, the real service on one
core, and the service with --workers 2 against --workers 1.

Baselines in the same run: `openssl speed rsa2048` sign/s (the system libcrypto our
OpenSSL backend calls, pinned to the same core as our in-process loop, rounds
interleaved) and, kept for continuity with older files, `cryptography`'s RSA-2048 PSS
sign rate. The service runs as a separate process (SQLite backend) and is driven over
loopback HTTP with single and batched requests.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench._harness import cpu_seconds
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, TokenChallenge
from openpcc.privacypass.blindrsa import PrivateKey, blind_sign, rsa_backend
from openpcc.privacypass.directory import IssuerDirectory
from tests.harness import Proc, spawn, wait_http

CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "bench", b"", ())
SPEED_SECONDS = int(os.environ.get("OPENPCC_BENCH_OPENSSL_SECONDS", "2"))
ROUNDS = int(os.environ.get("OPENPCC_BENCH_ROUNDS", "3"))
CORE = 1 if (os.cpu_count() or 1) > 1 else 0  # the in-process loop and `openssl speed`


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def openssl_speed_sign_per_s(seconds: int, core: int) -> float:
    """`openssl speed -mr -seconds N rsa2048` on one core: RSA-2048 private ops (sign) per
    second of user CPU time (its default divisor; ``-elapsed`` would use wall time).

    ``-mr`` prints ``+F2:<k>:2048:<sign>:<verify>...``: rates in OpenSSL 3, seconds per
    operation in 1.1 (hence the inversion of a value below 1)."""
    out = subprocess.run(
        ["taskset", "-c", str(core), "openssl", "speed", "-mr", "-seconds", str(seconds),
         "rsa2048"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("+F2:"))
    value = float(line.split(":")[3])
    return value if value >= 1 else 1 / value


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per CPU second of this thread (user + system) over about ``seconds`` of it:
    `openssl speed` divides by its user CPU time too, so other load on a shared VM
    slows neither side's figure."""
    n, t0 = 0, time.thread_time()
    while (elapsed := time.thread_time() - t0) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


def threads_rate(fn: Callable[[], object], threads: int, seconds: float) -> float:
    """Calls per second of ``fn`` run by ``threads`` threads at once (ctypes releases the
    GIL in the OpenSSL call, so they can use several cores)."""
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            fn()
            counts[i] += 1

    t0 = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def primitives() -> dict[str, Any]:
    """BlindSign per core, both backends, against `openssl speed` on the same core."""
    sk = rsa.generate_private_key(65537, 2048)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    ours = PrivateKey(sk)
    n = sk.public_key().public_numbers().n
    blinded = os.urandom(256)
    while int.from_bytes(blinded, "big") >= n:
        blinded = os.urandom(256)
    backend = rsa_backend()
    fns = {
        "openssl": lambda: blind_sign(ours, blinded, backend=backend),
        "gmpy2": lambda: blind_sign(ours, blinded, backend="gmpy2"),
        "cryptography_pss": lambda: sk.sign(b"x" * 98, pss, hashes.SHA384()),
    }
    for fn in fns.values():
        fn()  # the native key and the blinding state exist before timing
    affinity = os.sched_getaffinity(0)
    samples: dict[str, list[float]] = {"openssl_speed": [], **{k: [] for k in fns}}
    try:
        os.sched_setaffinity(0, {CORE})
        for _ in range(ROUNDS):  # interleaved: drift on a shared VM hits both sides
            samples["openssl_speed"].append(openssl_speed_sign_per_s(SPEED_SECONDS, CORE))
            for name, fn in fns.items():  # the secondary ones for half as long
                seconds = SPEED_SECONDS if name == "openssl" else SPEED_SECONDS / 2
                samples[name].append(rate(fn, seconds))
    finally:
        os.sched_setaffinity(0, affinity)
    speed = samples["openssl_speed"]
    ratios = [a / b for a, b in zip(samples["openssl"], speed, strict=True)]
    med = {k: statistics.median(v) for k, v in samples.items()}
    threads = {
        str(t): round(threads_rate(fns["openssl"], t, SPEED_SECONDS), 1)
        for t in (1, 2)
        if t <= len(affinity)
    }
    return {
        "backend": backend,
        "openssl_speed_sign_per_s": round(med["openssl_speed"], 1),
        "blind_sign_openssl_per_s": round(med["openssl"], 1),
        "blind_sign_gmpy2_per_s": round(med["gmpy2"], 1),
        "cryptography_pss_sign_per_s": round(med["cryptography_pss"], 1),
        "ratio_rounds": [round(r, 3) for r in ratios],
        "issuer_vs_openssl": round(statistics.median(ratios), 3),
        "gmpy2_vs_openssl": round(med["gmpy2"] / med["openssl_speed"], 3),
        "blind_sign_threads_per_s": threads,
        "samples": {k: [round(x, 1) for x in v] for k, v in samples.items()},
    }


def _bodies(token_key: bytes, batch: int, count: int) -> list[tuple[bytes, str]]:
    """``count`` request bodies of ``batch`` tokens, built before any timing."""
    out = []
    for _ in range(count):
        reqs = [issuance.begin_token_request(token_key, CHALLENGE)[0] for _ in range(batch)]
        if batch == 1:
            out.append((reqs[0].encode(), "application/private-token-request"))
        else:
            out.append((batched.encode_batch_request(reqs), batched.REQUEST_MEDIA_TYPE))
    return out


async def _drive(
    url: str, key: str, bodies: list[tuple[bytes, str]], concurrency: int, fresh: bool
) -> float:
    """Seconds to send every body (``concurrency`` at a time); ``fresh``: a connection per
    request, so the kernel spreads them over the workers' sockets as it would many
    clients'."""
    headers = {"Authorization": f"Bearer {key}"}
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(force_close=fresh, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def client() -> None:
            while queue:
                body, ctype = queue.pop()
                async with s.post(
                    url + "/token-request", data=body, headers={**headers, "Content-Type": ctype}
                ) as r:
                    assert r.status == 200, await r.text()
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0


def _start(tmp: Path, name: str, *extra: str, pin: str | None = None) -> tuple[Proc, str, bytes]:
    state = tmp / name
    key = _cli("issuer", "account", "add", "bench", "--quota", "100000000", "--state", str(state))
    cmd = [sys.executable, "-m", "openpcc.cli", "issuer", "serve", "--port", "0",
           "--state", str(state), *extra]  # fmt: skip
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    proc = spawn(name, cmd, tmp, env={"OMP_NUM_THREADS": "1"})
    wait_http(proc.url + "/healthz", proc)
    raw = urllib.request.urlopen(proc.url + "/.well-known/private-token-issuer-directory").read()
    return proc, key, IssuerDirectory.parse(raw).select_key().token_key


def service_one_core(tmp: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Tokens/s through the real service pinned to one core, one request at a time, and
    tokens per CPU second of the service."""
    # taskset pins the service to one core so "single-core issuance rate" means that.
    proc, key, token_key = _start(tmp, "issuer-one-core", pin="0")
    try:
        results, per_cpu = {}, {}
        for batch, total in ((1, 300), (10, 500), (100, 1000)):
            bodies = _bodies(token_key, batch, total // batch)
            cpu0 = cpu_seconds(proc.proc.pid, group=True)
            secs = asyncio.run(_drive(proc.url, key, bodies, 1, False))
            results[batch] = total / secs
            per_cpu[batch] = total / max(cpu_seconds(proc.proc.pid, group=True) - cpu0, 1e-9)
    finally:
        proc.stop()
    return results, per_cpu


def workers_scaling(tmp: Path, pinned: bool) -> dict[str, Any]:
    """--workers 2 against --workers 1, both started now, driven in alternating rounds
    over many connections; CPU seconds of each service's processes say how many cores
    each kept busy.

    ``pinned``: --workers 1 on one core, --workers 2 on two (what a second process buys
    per core). Unpinned, one worker already signs on several cores: its executor threads
    run the OpenSSL call without the GIL, so concurrent batches sign in parallel."""
    cpus = sorted(os.sched_getaffinity(0))
    pins = (str(cpus[0]), ",".join(map(str, cpus[:2]))) if pinned else (None, None)
    one = _start(tmp, f"issuer-w1-{pinned}", pin=pins[0])
    two = _start(tmp, f"issuer-w2-{pinned}", "--workers", "2", pin=pins[1])
    loads = {"batch_100": (100, 16, 8), "batch_1": (1, 400, 16)}  # batch, requests, clients
    out: dict[str, Any] = {"service_cores": {"1": pins[0] or "any", "2": pins[1] or "any"}}
    try:
        for label, (batch, requests, clients) in loads.items():
            bodies = {n: _bodies(tk, batch, requests) for n, (_, _, tk) in ((1, one), (2, two))}
            rates: dict[int, list[float]] = {1: [], 2: []}
            cores: dict[int, list[float]] = {1: [], 2: []}
            per_cpu: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(ROUNDS):
                for n, (proc, key, _) in ((1, one), (2, two)):
                    cpu0 = cpu_seconds(proc.proc.pid, group=True)
                    secs = asyncio.run(_drive(proc.url, key, bodies[n], clients, True))
                    cpu = cpu_seconds(proc.proc.pid, group=True) - cpu0
                    cores[n].append(cpu / secs)
                    rates[n].append(batch * requests / secs)
                    per_cpu[n].append(batch * requests / max(cpu, 1e-9))
            ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
            out[label] = {
                "clients": clients,
                "workers_1_tokens_per_s": round(statistics.median(rates[1]), 1),
                "workers_2_tokens_per_s": round(statistics.median(rates[2]), 1),
                "workers_1_cores_busy": round(statistics.median(cores[1]), 2),
                "workers_2_cores_busy": round(statistics.median(cores[2]), 2),
                "workers_1_tokens_per_cpu_s": round(statistics.median(per_cpu[1]), 1),
                "workers_2_tokens_per_cpu_s": round(statistics.median(per_cpu[2]), 1),
                "ratio_rounds": [round(r, 3) for r in ratios],
                "ratio": round(statistics.median(ratios), 3),
            }
    finally:
        one[0].stop()
        two[0].stop()
    return out


def run() -> dict[str, Any]:
    prim = primitives()
    tmp = Path(tempfile.mkdtemp(prefix="bench-issuer-"))
    load_before = os.getloadavg()
    results, per_cpu = service_one_core(tmp)
    scaling = workers_scaling(tmp, pinned=True)
    free = workers_scaling(tmp, pinned=False)
    crypto_rate = prim["cryptography_pss_sign_per_s"]
    speed = prim["openssl_speed_sign_per_s"]
    return {
        "rsa_backend": prim["backend"],
        "openssl_rsa2048_pss_sign_per_s": crypto_rate,
        "openssl_speed_rsa2048_sign_per_s": speed,
        "blind_sign_in_process_per_s": prim["blind_sign_openssl_per_s"],
        "blind_sign_in_process_per_s_gmpy2": prim["blind_sign_gmpy2_per_s"],
        "blind_sign_threads_per_s": prim["blind_sign_threads_per_s"],
        "primitive_rounds": {"issuer_vs_openssl": prim["ratio_rounds"], **prim["samples"]},
        "service_tokens_per_s": {f"batch_{b}": round(r, 1) for b, r in results.items()},
        "service_tokens_per_cpu_s": {f"batch_{b}": round(r, 1) for b, r in per_cpu.items()},
        "loadavg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "workers_scaling": {
            "cpus": os.cpu_count(),
            "load_generator": "this process, unpinned: on the same cores as the service",
            "pinned": scaling,
            "unpinned": free,
        },
        "summary": {
            "openssl_sign_per_s_one_core": crypto_rate,
            "issuer_tokens_per_s_single": round(results[1], 1),
            "issuer_tokens_per_s_batch_100": round(results[100], 1),
            "ratio_single_vs_openssl": round(results[1] / crypto_rate, 3),
            "ratio_batch100_vs_openssl": round(results[100] / crypto_rate, 3),
            "batch100_per_token_speedup_vs_single": round(results[100] / results[1], 2),
            "ceiling_blind_sign_in_process_vs_openssl": round(
                prim["blind_sign_openssl_per_s"] / crypto_rate, 3
            ),
            "issuer_vs_openssl": prim["issuer_vs_openssl"],
            "gmpy2_vs_openssl_speed": prim["gmpy2_vs_openssl"],
            "ratio_batch100_vs_openssl_speed": round(results[100] / speed, 3),
            "ratio_batch100_per_cpu_s_vs_openssl_speed": round(per_cpu[100] / speed, 3),
            "issuer_workers_scaling": scaling["batch_100"]["ratio"],
            "issuer_workers_scaling_batch_1": scaling["batch_1"]["ratio"],
            "issuer_workers_scaling_unpinned": free["batch_100"]["ratio"],
            "cpus": os.cpu_count(),
        },
    }

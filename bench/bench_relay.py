"""Relay throughput and per-chunk latency: `openpcc relay serve` vs nginx, same config, one run.

- Throughput: a load generator (own process, raw sockets, keep-alive) POSTs 256-byte
  OHTTP requests through each relay to a fast upstream (an nginx that answers 64 bytes
  at once), for a fixed time; requests/s and the ratio python/nginx (goal >= 0.5).
- Per-chunk latency: the fake gateway streams 16-byte records, each stamped with
  CLOCK_MONOTONIC when sent; the client stamps arrival. Direct-to-gateway is the floor.
- Ceiling: a bare aiohttp server answering 64 bytes itself (no upstream hop), same load:
  what the framework allows at all; the relay does two HTTP exchanges per request.
- Memory: the Python relay's RSS after the load (and its high-water mark).

Where uvloop is installed (extra `openpcc[uvloop]`), the Python relay runs a second time
with `--uvloop`. Both relays run one worker (one core), so the ratio compares like with like.
Loopback only, bounded loops.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._harness import percentile  # noqa: E402
from tests.harness import spawn  # noqa: E402
from tests.relay_support.procs import (  # noqa: E402
    Proc,
    RelaySettings,
    free_port,
    nginx_binary,
    start_gateway,
    start_nginx_relay,
    start_python_relay,
    wait_http,
)

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
DURATION = 3.0
CONCURRENCY = 32
BODY = os.urandom(256)
LATENCY_REQUESTS = 5
TICKS, TICK_GAP = 40, 0.005

UPSTREAM_CONF = """
worker_processes 1;
pid run/nginx.pid;
error_log stderr crit;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location = /gateway {{ default_type message/ohttp-res; return 200 "{body}"; }}
        location = /healthz {{ return 200 "ok"; }}
    }}
}}
"""


def start_fast_upstream(workdir: Path) -> Proc:
    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix="upstream-", dir=workdir))
    for sub in ("run", "tmp"):
        (prefix / sub).mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(UPSTREAM_CONF.format(port=port, body="x" * 64))
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    cmd = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", directives]
    proc = spawn("upstream", cmd, prefix, report=False, ports={"public": port})
    proc.workdir = prefix
    wait_http(proc.url + "/healthz", proc)
    return proc


# A bare aiohttp server answering 64 bytes with no upstream hop: the framework's own ceiling
# on this machine, so the relay's ratio can be read against what aiohttp allows at all.
BARE_AIOHTTP = """
import sys
from aiohttp import web
async def answer(request):
    await request.read()
    return web.Response(body=b"x" * 64, content_type="message/ohttp-res")
app = web.Application()
app.router.add_post("/", answer)
async def healthz(_request):
    return web.Response(text="ok")
app.router.add_get("/healthz", healthz)
if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def aiohttp_floor_rps(workdir: Path, loop: str) -> float:
    port = free_port()
    cmd = [sys.executable, "-c", BARE_AIOHTTP, str(port), loop]
    bare = spawn(f"bare-aiohttp-{loop}", cmd, workdir, report=False, ports={"public": port})
    try:
        wait_http(bare.url + "/healthz", bare)
        load(port, duration=0.5)
        return load(port)["rps"]
    finally:
        bare.stop()


# -- load generator (runs in its own process) ------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"content-length:" in lower:
        start = lower.index(b"content-length:") + 15
        await reader.readexactly(int(lower[start : lower.index(b"\r\n", start)]))
    else:  # chunked
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _connection(port: int, deadline: float, counts: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = (
        b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: message/ohttp-req\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY)
    ) + BODY
    while time.monotonic() < deadline:
        writer.write(req)
        try:
            status = await _read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            # keepalive_requests reached (nginx closes after 1000): reconnect, as clients do.
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            continue
        counts[status] = counts.get(status, 0) + 1
    writer.close()


async def _load(port: int, concurrency: int, duration: float) -> dict[str, Any]:
    counts: dict[int, int] = {}
    t0 = time.monotonic()
    deadline = t0 + duration
    await asyncio.gather(*(_connection(port, deadline, counts) for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    return {"statuses": counts, "seconds": elapsed}


def load(port: int, concurrency: int = CONCURRENCY, duration: float = DURATION) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "load", str(port), str(concurrency), str(duration)],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    ok = result["statuses"].get("200", 0)
    result["rps"] = round(ok / result["seconds"], 1)
    return result


# -- measurements ----------------------------------------------------------------------------


def chunk_latencies_ms(port: int, path: str) -> list[float]:
    """Per-record delay from the gateway's send to our receipt, through ``port``."""
    delays: list[float] = []
    body = f"ticks {TICKS} {TICK_GAP}\n".encode()
    for _ in range(LATENCY_REQUESTS):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", path, body=body, headers={"Content-Type": "message/ohttp-req"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        buf = b""
        while True:
            data = resp.read1(65536)
            now = time.monotonic()
            if not data:
                break
            buf += data
            while len(buf) >= 16:
                sent, _ = struct.unpack("<dQ", buf[:16])
                buf = buf[16:]
                delays.append((now - sent) * 1000)
        conn.close()
    return delays


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _pct(values: list[float], q: float) -> float:
    return round(percentile(values, q), 3)


def run() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    procs: list[Proc] = []
    try:
        upstream = start_fast_upstream(workdir)
        gateway = start_gateway(workdir)
        procs += [upstream, gateway]
        results: dict[str, Any] = {}
        kinds = ["python", *(["python-uvloop"] if HAVE_UVLOOP else []), "nginx"]
        for kind in kinds:
            settings = RelaySettings(
                upstream.port,
                max_body="8m",
                max_concurrency=4096,
                rate=1_000_000,
                burst=1_000_000,
                read_timeout=30,
                connect_timeout=5,
            )
            lat_settings = RelaySettings(
                gateway.port, max_body="8m", max_concurrency=4096, rate=1_000_000, burst=1_000_000
            )
            if kind.startswith("python"):
                settings.extra_args = ["--rate-limit", "0"]
                if kind == "python-uvloop":
                    settings.extra_args.append("--uvloop")
                    lat_settings.extra_args = ["--uvloop"]
                relay = start_python_relay(settings, workdir, access_log=False)
                lat_relay = start_python_relay(lat_settings, workdir, access_log=False)
            else:
                relay = start_nginx_relay(settings, workdir)
                lat_relay = start_nginx_relay(lat_settings, workdir)
            procs += [relay, lat_relay]
            load(relay.port, duration=0.5)  # warm up connections and caches
            throughput = load(relay.port)
            delays = chunk_latencies_ms(lat_relay.port, "/")
            entry = {
                "rps": throughput["rps"],
                "statuses": throughput["statuses"],
                "chunk_latency_ms_p50": _pct(delays, 0.5),
                "chunk_latency_ms_p99": _pct(delays, 0.99),
                "chunks": len(delays),
            }
            if kind.startswith("python"):
                entry["rss_kib"] = rss_kib(relay.proc.pid)
            results[kind] = entry
            relay.stop()
            lat_relay.stop()
        floors = {"asyncio": aiohttp_floor_rps(workdir, "asyncio")}
        if HAVE_UVLOOP:
            floors["uvloop"] = aiohttp_floor_rps(workdir, "uvloop")
        results["bare_aiohttp_rps"] = floors
        direct = chunk_latencies_ms(gateway.port, "/gateway")
        results["direct_chunk_latency_ms_p50"] = _pct(direct, 0.5)
        ratio = results["python"]["rps"] / max(results["nginx"]["rps"], 1e-9)
        summary = {
            "python_rps": results["python"]["rps"],
            "nginx_rps": results["nginx"]["rps"],
            "rps_ratio_python_over_nginx": round(ratio, 3),
            "goal_ratio": 0.5,
            "python_chunk_latency_ms_p50": results["python"]["chunk_latency_ms_p50"],
            "nginx_chunk_latency_ms_p50": results["nginx"]["chunk_latency_ms_p50"],
            "direct_chunk_latency_ms_p50": results["direct_chunk_latency_ms_p50"],
            "python_chunk_latency_ms_p99": results["python"]["chunk_latency_ms_p99"],
            "nginx_chunk_latency_ms_p99": results["nginx"]["chunk_latency_ms_p99"],
            "bare_aiohttp_no_upstream_over_nginx": round(
                floors["asyncio"] / max(results["nginx"]["rps"], 1e-9), 3
            ),
            "python_rss_mib_after_load": round(results["python"]["rss_kib"]["VmRSS"] / 1024, 1),
            "python_rss_mib_peak": round(results["python"]["rss_kib"]["VmHWM"] / 1024, 1),
        }
        if HAVE_UVLOOP:  # the relay's opt-in --uvloop (extra openpcc[uvloop])
            fast = results["python-uvloop"]
            summary["python_uvloop_rps"] = fast["rps"]
            summary["rps_ratio_python_uvloop_over_nginx"] = round(
                fast["rps"] / max(results["nginx"]["rps"], 1e-9), 3
            )
            summary["python_uvloop_chunk_latency_ms_p50"] = fast["chunk_latency_ms_p50"]
            summary["bare_aiohttp_uvloop_no_upstream_over_nginx"] = round(
                floors["uvloop"] / max(results["nginx"]["rps"], 1e-9), 3
            )
        return {
            "summary": summary,
            "details": results,
            "config": {
                "duration_s": DURATION,
                "concurrency": CONCURRENCY,
                "request_bytes": len(BODY),
                "response_bytes": 64,
                "workers": "1 (python relay: one process; nginx: worker_processes 1)",
                "cpus": os.cpu_count(),
            },
        }
    finally:
        for proc in procs:
            proc.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        port, conc, dur = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
        print(json.dumps(asyncio.run(_load(port, conc, dur))))
    else:
        print(json.dumps(run(), indent=2))

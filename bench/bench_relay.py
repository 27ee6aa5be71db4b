"""Relay throughput and per-chunk latency: `openpcc relay serve` vs nginx, same config, one run.

- Throughput: a load generator (own process, raw sockets, keep-alive) POSTs 256-byte
  OHTTP requests through each relay to a fast upstream (an nginx that answers 64 bytes
  at once), for a fixed time; requests/s and the ratio python/nginx (goal >= 0.5). The
  relays take turns for ROUNDS rounds and each ratio is the median of the rounds' own
  ratios (the VM is shared: same-round ratios, not absolute numbers, are what compare).
  Each relay's CPU time per request comes from /proc (nginx: its worker).
- Relays: the default (`python`: the lean server, relay/server.py, on uvloop where it is
  installed), the same on asyncio's loop (`--no-uvloop`), the previous aiohttp server
  (`--http-server aiohttp`) on both loops, and nginx (`infra/relay/nginx.conf`).
- Per-chunk latency: the fake gateway streams 16-byte records, each stamped with
  CLOCK_MONOTONIC when sent; the client stamps arrival. Direct-to-gateway is the floor.
- Floors: bare servers answering 64 bytes themselves (no upstream hop), same load: aiohttp,
  and a minimal asyncio protocol (what any Python asyncio server allows at all); the
  relay does two HTTP exchanges per request.
- Memory: the Python relay's RSS after the load (and its high-water mark).

All relays run one worker (one core), so the ratio compares like with like. Loopback
only, bounded loops.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import statistics
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

from bench._harness import cpu_seconds, percentile  # noqa: E402
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
DURATION = 2.0
ROUNDS = int(os.environ.get("OPENPCC_BENCH_RELAY_ROUNDS", "3"))
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


# The same with no framework: a minimal asyncio protocol that finds the head's end and
# Content-Length, and answers 64 bytes (no validation, no limits). What a Python asyncio
# process can do at all per request on this machine, with one HTTP exchange.
BARE_PROTOCOL = """
import asyncio, sys
ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: message/ohttp-res\\r\\n"
          b"Content-Length: 64\\r\\n\\r\\n" + b"x" * 64)
class Bare(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.buf = transport, b""
    def data_received(self, data):
        buf = self.buf + data
        while True:
            end = buf.find(b"\\r\\n\\r\\n")
            if end < 0:
                break
            at = buf.lower().find(b"content-length:", 0, end)
            n = int(buf[at + 15 : buf.find(b"\\r\\n", at)]) if at >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            buf = buf[end + 4 + n :]
            self.t.write(ANSWER)
        self.buf = buf
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(Bare, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await asyncio.Event().wait()
if sys.argv[2] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def floor_rps(workdir: Path, server: str, loop: str) -> float:
    """Requests/s of a bare server (``aiohttp`` or ``protocol``) answering by itself."""
    port = free_port()
    script = BARE_AIOHTTP if server == "aiohttp" else BARE_PROTOCOL
    cmd = [sys.executable, "-c", script, str(port), loop]
    bare = spawn(f"bare-{server}-{loop}", cmd, workdir, report=False, ports={"public": port})
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


def nginx_worker(master: int) -> int:
    """The one worker of an nginx master (``worker_processes 1``), not its cache helpers."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            title = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == master and b"worker process" in title:
            return int(stat.parent.name)
    raise RuntimeError(f"nginx {master} has no worker")


# Each Python relay: its flags. "python" is the default (lean server, uvloop where installed).
PYTHON_RELAYS = {
    "python": [],
    "python-asyncio": ["--no-uvloop"],
    "python-aiohttp": ["--http-server", "aiohttp"],
    "python-aiohttp-asyncio": ["--http-server", "aiohttp", "--no-uvloop"],
}


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def run() -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    procs: list[Proc] = []
    try:
        upstream = start_fast_upstream(workdir)
        gateway = start_gateway(workdir)
        procs += [upstream, gateway]
        kinds = [k for k in PYTHON_RELAYS if HAVE_UVLOOP or "asyncio" not in k] + ["nginx"]
        if not HAVE_UVLOOP:  # then the default runs on asyncio's loop already
            kinds = ["python", "python-aiohttp", "nginx"]
        relays: dict[str, tuple[Proc, Proc, int]] = {}
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
                settings.extra_args = ["--rate-limit", "0", *PYTHON_RELAYS[kind]]
                lat_settings.extra_args = list(PYTHON_RELAYS[kind])
                relay = start_python_relay(settings, workdir, access_log=False)
                lat_relay = start_python_relay(lat_settings, workdir, access_log=False)
                pid = relay.proc.pid
            else:
                relay = start_nginx_relay(settings, workdir)
                lat_relay = start_nginx_relay(lat_settings, workdir)
                pid = nginx_worker(relay.proc.pid)
            procs += [relay, lat_relay]
            relays[kind] = (relay, lat_relay, pid)
            load(relay.port, duration=0.5)  # warm up connections and caches

        # Throughput: the relays take turns, ROUNDS times; ratios are same-round ratios.
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for _ in range(ROUNDS):
            for kind in kinds:
                relay, _, pid = relays[kind]
                before = cpu_seconds(pid)
                got = load(relay.port)
                used = cpu_seconds(pid) - before
                ok = got["statuses"].get("200", 0)
                got["cpu_us_per_request"] = round(used / max(ok, 1) * 1e6, 1)
                got["cpu_utilisation"] = round(used / got["seconds"], 3)
                rounds[kind].append(got)
        results: dict[str, Any] = {}
        for kind in kinds:
            runs = rounds[kind]
            ratios = [
                r["rps"] / max(n["rps"], 1e-9) for r, n in zip(runs, rounds["nginx"], strict=True)
            ]
            relay, lat_relay, _ = relays[kind]
            delays = chunk_latencies_ms(lat_relay.port, "/")
            entry: dict[str, Any] = {
                "rps": _median([r["rps"] for r in runs]),
                "rps_ratio_over_nginx": round(_median(ratios), 3),
                "cpu_us_per_request": _median([r["cpu_us_per_request"] for r in runs]),
                "rounds": [
                    {k: r[k] for k in ("rps", "statuses", "cpu_us_per_request", "cpu_utilisation")}
                    for r in runs
                ],
                "round_ratios_over_nginx": [round(x, 3) for x in ratios],
                "chunk_latency_ms_p50": _pct(delays, 0.5),
                "chunk_latency_ms_p99": _pct(delays, 0.99),
                "chunks": len(delays),
            }
            if kind.startswith("python"):
                entry["rss_kib"] = rss_kib(relay.proc.pid)
            results[kind] = entry
        for relay, lat_relay, _ in relays.values():
            relay.stop()
            lat_relay.stop()
        nginx_rps = results["nginx"]["rps"]

        # Floors: bare servers with no upstream hop, against the median nginx rate above.
        loops = ["asyncio", *(["uvloop"] if HAVE_UVLOOP else [])]
        floors = {loop: floor_rps(workdir, "aiohttp", loop) for loop in loops}
        protocol_floors = {loop: floor_rps(workdir, "protocol", loop) for loop in loops}
        results["bare_aiohttp_rps"] = floors
        results["bare_protocol_rps"] = protocol_floors
        direct = chunk_latencies_ms(gateway.port, "/gateway")
        results["direct_chunk_latency_ms_p50"] = _pct(direct, 0.5)
        py = results["python"]
        summary = {
            "python_rps": py["rps"],
            "nginx_rps": nginx_rps,
            "rps_ratio_python_over_nginx": py["rps_ratio_over_nginx"],
            "goal_ratio": 0.5,
            "python_server": "lean",
            "python_event_loop": "uvloop" if HAVE_UVLOOP else "asyncio",
            "python_cpu_us_per_request": py["cpu_us_per_request"],
            "nginx_cpu_us_per_request": results["nginx"]["cpu_us_per_request"],
            "python_chunk_latency_ms_p50": py["chunk_latency_ms_p50"],
            "nginx_chunk_latency_ms_p50": results["nginx"]["chunk_latency_ms_p50"],
            "direct_chunk_latency_ms_p50": results["direct_chunk_latency_ms_p50"],
            "python_chunk_latency_ms_p99": py["chunk_latency_ms_p99"],
            "nginx_chunk_latency_ms_p99": results["nginx"]["chunk_latency_ms_p99"],
            "bare_aiohttp_no_upstream_over_nginx": round(floors["asyncio"] / nginx_rps, 3),
            "bare_protocol_no_upstream_over_nginx": round(
                protocol_floors["asyncio"] / nginx_rps, 3
            ),
            "python_rss_mib_after_load": round(py["rss_kib"]["VmRSS"] / 1024, 1),
            "python_rss_mib_peak": round(py["rss_kib"]["VmHWM"] / 1024, 1),
            # The previous server (aiohttp), same run: the before/after of relay/server.py.
            "python_aiohttp_rps": results["python-aiohttp"]["rps"],
            "rps_ratio_python_aiohttp_over_nginx": results["python-aiohttp"][
                "rps_ratio_over_nginx"
            ],
            "python_aiohttp_cpu_us_per_request": results["python-aiohttp"]["cpu_us_per_request"],
        }
        if HAVE_UVLOOP:
            # "python" runs on uvloop now (the default): these keys keep their meaning.
            summary["python_uvloop_rps"] = py["rps"]
            summary["rps_ratio_python_uvloop_over_nginx"] = py["rps_ratio_over_nginx"]
            summary["python_uvloop_chunk_latency_ms_p50"] = py["chunk_latency_ms_p50"]
            summary["bare_aiohttp_uvloop_no_upstream_over_nginx"] = round(
                floors["uvloop"] / nginx_rps, 3
            )
            summary["bare_protocol_uvloop_no_upstream_over_nginx"] = round(
                protocol_floors["uvloop"] / nginx_rps, 3
            )
            for kind in ("python-asyncio", "python-aiohttp-asyncio"):
                key = kind.replace("-", "_")
                summary[f"{key}_rps"] = results[kind]["rps"]
                summary[f"rps_ratio_{key}_over_nginx"] = results[kind]["rps_ratio_over_nginx"]
                summary[f"{key}_cpu_us_per_request"] = results[kind]["cpu_us_per_request"]
        return {
            "summary": summary,
            "details": results,
            "config": {
                "duration_s": DURATION,
                "rounds": ROUNDS,
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

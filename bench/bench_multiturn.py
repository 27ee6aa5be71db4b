"""Multi-turn chat with conversation-scoped prefix caching (issue 17): direct vLLM vs private.

Conversations of TURNS turns share one system prompt; every turn adds a user message and
resends the whole history, with the assistant's actual previous answers, as chat apps,
browser assistants and agents do. ``concurrency`` is the number of conversations in
flight at once; each conversation runs its turns back to back. Four modes in one run,
against the same vLLM, one after the other at each load level:

- ``direct_shared``: straight to vLLM, no ``cache_salt``: every conversation shares the
  prefix cache (the system prompt is prefilled once for everyone). The ceiling, and what
  no private deployment may offer (cross-user cache timing).
- ``direct_conv``: straight to vLLM, one random ``cache_salt`` per conversation: each
  conversation reuses its own history, nothing else. The fair baseline: the isolation
  the private path gives.
- ``private_conv``: client -> relay -> gateway -> node -> vLLM with the SDK's default
  conversation cache scope (``Client.chat_completions_stream(model, messages)``): the
  client derives one salt per conversation, the node namespaces it.
- ``private_request``: the private path with ``cache_scope=None``: a fresh namespace per
  request (the behaviour before issue 17): every turn prefills its whole history.

Reported per mode: output tokens/s, TTFT p50/p99 for turn 1 and for turns >= 2, TPOT,
vLLM's prefix-cache hit rate over the mode (``vllm:prefix_cache_queries`` / ``_hits``
from its /metrics, before and after), the cached share of each turn's prompt (usage
``prompt_tokens_details.cached_tokens``), and for private modes the route affinity (turn
n answered by the node that answered turn n-1) and the requests per node. With
ROUTE_NODES >= 2 (the CPU default) a second part restarts the stack with that many
nodes in front of the same vLLM and runs the private conversation load under each
gateway ``--affinity-slack`` of ROUTE_SLACKS and once with the client's affinity off:
the routing's affinity hit rate, load spread and what it does to the cache.

Settings (environment): see bench/README.md ("Multi-turn").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import multiprocessing
import os
import random
import secrets
import statistics
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench._harness import ExternalEngine, _gpus, bench_model_dir, cpu_seconds, traced_workdir


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


ON_CPU = "OPENPCC_BENCH_VLLM_MODEL" not in os.environ  # the generated tiny model
TURNS = int(_env("OPENPCC_BENCH_MT_TURNS", "6"))
# CPU defaults keep the tiny model's 1,024 positions (its byte-level tokenizer makes a
# "w123" word about 6 tokens): ~300-token system prompt, ~36-token user turns, 32 out.
# The GPU run (bench/gpu/device_run_multiturn.sh) sets 1,000 / 150 / 128 (one token a
# word with its WordLevel tokenizer).
SYSTEM_WORDS = int(_env("OPENPCC_BENCH_MT_SYSTEM_WORDS", "50"))
USER_WORDS = int(_env("OPENPCC_BENCH_MT_USER_WORDS", "6"))
MAX_TOKENS = int(_env("OPENPCC_BENCH_MAX_TOKENS", "32"))
LOADS = tuple(
    tuple(int(x) for x in pair.split(":"))
    for pair in _env("OPENPCC_BENCH_MT_LOADS", "2:4,4:8").split(",")
)  # (concurrent conversations, conversations)
MODES = tuple(
    _env("OPENPCC_BENCH_MT_MODES", "direct_shared,direct_conv,private_conv,private_request").split(
        ","
    )
)
CLIENT_PROCS = int(_env("OPENPCC_BENCH_CLIENT_PROCS", "1"))
# Rounds per load level, in alternating mode order: 2 on the shared CPU VM, 1 on the GPU.
ROUNDS = int(_env("OPENPCC_BENCH_MT_ROUNDS", "2" if ON_CPU else "1"))
ROUTE_NODES = int(_env("OPENPCC_BENCH_MT_ROUTE_NODES", "2" if ON_CPU else "0"))
ROUTE_LOAD = tuple(int(x) for x in _env("OPENPCC_BENCH_MT_ROUTE_LOAD", "8:8").split(":"))
ROUTE_SLACKS = tuple(
    int(x) for x in _env("OPENPCC_BENCH_MT_ROUTE_SLACKS", "4,0,1000000").split(",")
)
NO_LOAD_AWARE = 1_000_000  # a slack no load difference reaches: the first candidate always
VOCAB = 127_999  # "w1".."w127999": one token each with the GPU run's WordLevel tokenizer

_rng0 = random.Random("system")
SYSTEM_PROMPT = " ".join(f"w{_rng0.randrange(1, VOCAB)}" for _ in range(SYSTEM_WORDS))


def _user_message(tag: str, conv: int, turn: int) -> str:
    rng = random.Random(f"{tag}/{conv}/{turn}")
    return " ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(USER_WORDS))


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


# ---------------------------------------------------------------- one turn, each path

# The node that answered the request in flight in this task (the SDK records it when the
# sealed response head arrives; a ContextVar keeps concurrent conversations apart).
_ANSWERED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "_ANSWERED", default=None
)


def _hook_node_ids(client: Any) -> str:
    """How this SDK tells which node answered: 'hook' (exact, per request), 'last' (the
    client's ``last_node_id`` read at the first token: approximate under concurrency),
    or 'none'."""
    orig = getattr(client, "_answered_by", None)
    if orig is not None and hasattr(client, "last_node_id"):

        def answered_by(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            sink = _ANSWERED.get()
            if sink is not None:
                sink.append(client.last_node_id)
            return out

        client._answered_by = answered_by
        return "hook"
    return "last" if hasattr(client, "last_node_id") else "none"


def _body_params() -> dict[str, Any]:
    return {
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def _record(
    t0: float, stamps: list[float], usage: dict[str, Any] | None, node: Any = None
) -> dict[str, Any]:
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    out_tokens = usage.get("completion_tokens") or len(stamps)
    first = stamps[0] if stamps else None
    tpot = (stamps[-1] - first) / (out_tokens - 1) if first is not None and out_tokens > 1 else None
    return {
        "t0": t0,
        "t1": time.perf_counter(),
        "ttft": (first - t0) if first is not None else None,
        "tpot": tpot,
        "out_tokens": out_tokens,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "node": node.hex() if isinstance(node, bytes) else node,
    }


async def _direct_turn(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    messages: list[dict[str, str]],
    salt: str | None,
) -> tuple[dict[str, Any], str]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, **_body_params()}
    if salt is not None:
        body["cache_salt"] = salt
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        buf = b""
        async for piece in r.content.iter_any():
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: {"):
                    continue
                obj = json.loads(event[6:])
                for c in obj.get("choices") or []:
                    content = (c.get("delta") or {}).get("content")
                    if content:
                        stamps.append(time.perf_counter())
                        text.append(content)
                if obj.get("usage"):
                    usage = obj["usage"]
    return _record(t0, stamps, usage), "".join(text)


async def _private_turn(
    client: Any, model: str, messages: list[dict[str, str]], scope_kw: dict[str, Any], how: str
) -> tuple[dict[str, Any], str]:
    sink: list[Any] = []
    token = _ANSWERED.set(sink)
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    usage = None
    node = None
    try:
        async for chunk in client.chat_completions_stream(
            model, messages, **_body_params(), **scope_kw
        ):
            for c in chunk.get("choices") or []:
                content = (c.get("delta") or {}).get("content")
                if content:
                    if not stamps and how == "last":
                        node = client.last_node_id
                    stamps.append(time.perf_counter())
                    text.append(content)
            if chunk.get("usage"):
                usage = chunk["usage"]
    finally:
        _ANSWERED.reset(token)
    if sink:
        node = sink[-1]
    return _record(t0, stamps, usage, node), "".join(text)


# ------------------------------------------------------------ load-generator processes


def _worker(conn: Any, engine_url: str, model: str, config: str, index: int) -> None:
    """One load-generator process. In: ("load", mode, concurrency, conversation ids,
    tag), ("refill", variant, n) or None to stop; out: per-request records."""

    async def main() -> None:
        from openpcc.client.profile import client_from_config

        clients: dict[str, tuple[Any, Any, str]] = {}

        def get_client(variant: str) -> tuple[Any, Any, str]:
            # Each (process, variant) keeps its own wallet file: shared files serialise on
            # a lock. "noaffinity" is the same profile with the client's affinity off.
            if variant not in clients:
                base = Path(config)
                cfg = json.loads(base.read_text())
                cfg["wallet"] = str(base.parent / f"bench-mt-wallet-{variant}-{index}.json")
                if variant == "noaffinity":
                    cfg["affinity"] = False
                path = base.parent / f"bench-mt-client-{variant}-{index}.json"
                path.write_text(json.dumps(cfg))
                client, wallet, _, _ = client_from_config(path)
                clients[variant] = (client, wallet, _hook_node_ids(client))
            return clients[variant]

        scoped = (
            "cache_scope"
            in inspect.signature(type(get_client("default")[0]).chat_completions_stream).parameters
        )
        try:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=timeout
            ) as s:
                # Warm both paths (attestation verdicts, connections, vLLM) on a prompt that
                # shares nothing with the measured conversations.
                warm = [{"role": "user", "content": "w1 w2 w3 warm-up"}]
                await _direct_turn(s, engine_url, model, warm, secrets.token_hex(32))
                client, _, how = get_client("default")
                await _private_turn(
                    client, model, warm, {"cache_scope": None} if scoped else {}, how
                )
                conn.send({"ready": True, "cache_scope": scoped, "node_ids": how})
                while (msg := conn.recv()) is not None:
                    if msg[0] == "refill":
                        _, variant, n = msg
                        _, wallet, _ = get_client(variant)
                        need = n + wallet.low_water + 1 - wallet.count()
                        if need > 0:
                            await wallet.refill(need)
                        conn.send("ok")
                        continue
                    _, mode, conc, convs, tag = msg
                    conn.send(await _run_load(s, engine_url, model, get_client, scoped,
                                              mode, conc, convs, tag))  # fmt: skip
        finally:
            for client, wallet, _ in clients.values():
                await client.aclose()
                await wallet.aclose()

    asyncio.run(main())


async def _run_load(
    s: aiohttp.ClientSession,
    engine_url: str,
    model: str,
    get_client: Any,
    scoped: bool,
    mode: str,
    conc: int,
    convs: list[int],
    tag: str,
) -> dict[str, Any]:
    variant = "noaffinity" if mode.endswith("_noaffinity") else "default"
    base = mode.removesuffix("_noaffinity")
    client, how, scope_kw = None, "none", {}
    if base.startswith("private"):
        client, _, how = get_client(variant)
        # private_conv: the SDK's default, the conversation's scope; else a fresh one each
        scope_kw = {"cache_scope": None} if base != "private_conv" and scoped else {}
    sem = asyncio.Semaphore(conc)
    records: list[dict[str, Any]] = []

    async def conversation(conv: int) -> None:
        salt = secrets.token_hex(32) if base == "direct_conv" else None
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        async with sem:
            for turn in range(1, TURNS + 1):
                messages.append({"role": "user", "content": _user_message(tag, conv, turn)})
                if base.startswith("direct"):
                    rec, answer = await _direct_turn(s, engine_url, model, messages, salt)
                else:
                    rec, answer = await _private_turn(client, model, messages, scope_kw, how)
                rec.update(conv=conv, turn=turn)
                records.append(rec)
                messages.append({"role": "assistant", "content": answer})

    t0 = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    await asyncio.gather(*(conversation(c) for c in convs))
    return {"records": records, "t0": t0, "t1": time.perf_counter()}


def _share(total: int, parts: int, i: int) -> int:
    return total // parts + (1 if i < total % parts else 0)


class _Generators:
    """CLIENT_PROCS load-generator processes driven over pipes."""

    def __init__(self, engine_url: str, model: str, config: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        for i in range(CLIENT_PROCS):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(theirs, engine_url, model, str(config), i))
            p.start()
            self.pipes.append(mine)
            self.procs.append(p)
        hello = [pipe.recv() for pipe in self.pipes]
        self.cache_scope = all(h["cache_scope"] for h in hello)
        self.node_ids = hello[0]["node_ids"]

    def refill(self, variant: str, conversations: int) -> None:
        k = len(self.pipes)
        for i, pipe in enumerate(self.pipes):
            pipe.send(("refill", variant, _share(conversations, k, i) * TURNS + 2))
        for pipe in self.pipes:
            assert pipe.recv() == "ok"

    def run(self, mode: str, conc: int, conversations: int, tag: str) -> list[dict[str, Any]]:
        k = len(self.pipes)
        ids = list(range(conversations))
        for i, pipe in enumerate(self.pipes):
            pipe.send(("load", mode, max(1, _share(conc, k, i)), ids[i::k], tag))
        return [pipe.recv() for pipe in self.pipes]

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for p in self.procs:
            p.join(30)


# ------------------------------------------------------------------ what is measured


def vllm_counters(engine_url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters (summed over engines; ``_total`` or not)."""
    with urllib.request.urlopen(engine_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"queries": 0.0, "hits": 0.0}
    names = {
        "vllm:prefix_cache_queries": "queries",
        "vllm:prefix_cache_hits": "hits",
        "vllm:prefix_cache_queries_total": "queries",
        "vllm:prefix_cache_hits_total": "hits",
    }
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            with contextlib.suppress(ValueError):
                out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def _node_requests(trace_dir: Path, names: dict[int, str]) -> dict[str, int]:
    """Requests each node process has forwarded to the engine so far (its stage trace)."""
    out: dict[str, int] = {}
    for path in trace_dir.glob("node-*.tsv"):
        pid = int(path.stem.rsplit("-", 1)[1])
        if pid not in names:  # a node of an earlier stack
            continue
        with path.open("rb") as fh:
            out[names[pid]] = sum(1 for line in fh if line.startswith(b"upstream_sent\t"))
    return out


def mode_stats(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Statistics over one or more rounds of a mode (each a list of per-process parts)."""
    recs = [r | {"conv": (i, r["conv"])} for i, parts in enumerate(rounds)
            for p in parts for r in p["records"]]  # fmt: skip
    wall = sum(max(p["t1"] for p in parts) - min(p["t0"] for p in parts) for parts in rounds)
    first = [r["ttft"] for r in recs if r["turn"] == 1 and r["ttft"] is not None]
    later = [r["ttft"] for r in recs if r["turn"] >= 2 and r["ttft"] is not None]
    tpots = [r["tpot"] for r in recs if r["tpot"] is not None]
    out_tokens = sum(r["out_tokens"] for r in recs)

    def cached_share(rs: list[dict[str, Any]]) -> float | None:
        num = sum(r["cached_tokens"] or 0 for r in rs)
        den = sum(r["prompt_tokens"] or 0 for r in rs)
        if den == 0 or all(r["cached_tokens"] is None for r in rs):
            return None
        return round(num / den, 4)

    by_turn: dict[int, list[dict[str, Any]]] = {}
    for r in recs:
        by_turn.setdefault(r["turn"], []).append(r)
    out: dict[str, Any] = {
        "requests": len(recs),
        "conversations": len({r["conv"] for r in recs}),
        "output_tokens": out_tokens,
        "wall_s": round(wall, 2),
        "output_tok_per_s": round(out_tokens / wall, 1),
        "ttft_turn1_p50_ms": _ms(_pct(first, 50)),
        "ttft_turn1_p99_ms": _ms(_pct(first, 99)),
        "ttft_turn2plus_p50_ms": _ms(_pct(later, 50)),
        "ttft_turn2plus_p99_ms": _ms(_pct(later, 99)),
        "ttft_all_p50_ms": _ms(_pct(first + later, 50)),
        "tpot_p50_ms": round(_pct(tpots, 50) * 1000, 3) if tpots else None,
        "prompt_tokens_mean_by_turn": {
            t: round(statistics.fmean(r["prompt_tokens"] or 0 for r in rs), 1)
            for t, rs in sorted(by_turn.items())
        },
        "cached_share_turn1": cached_share(by_turn.get(1, [])),
        "cached_share_turn2plus": cached_share([r for r in recs if r["turn"] >= 2]),
    }
    nodes = [r for r in recs if r["node"] is not None]
    if nodes:
        seq: dict[int, dict[int, str]] = {}
        for r in nodes:
            seq.setdefault(r["conv"], {})[r["turn"]] = r["node"]
        pairs = [
            (turns[t], turns[t - 1]) for turns in seq.values() for t in turns if t - 1 in turns
        ]
        out["affinity_pairs"] = len(pairs)
        out["affinity_hit_rate"] = (
            round(sum(a == b for a, b in pairs) / len(pairs), 4) if pairs else None
        )
        out["requests_by_node_id"] = dict(Counter(r["node"][:8] for r in nodes))
    return out


def summarize(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures from its rounds (``_Bench.measure``)."""
    from bench.bench_private_path import stage_split

    stats = mode_stats([r["parts"] for r in raws])
    stats["rounds"] = len(raws)
    q, h = sum(r["queries"] for r in raws), sum(r["hits"] for r in raws)
    stats["vllm_prefix_cache"] = {
        "queries": int(q),
        "hits": int(h),
        "hit_rate": round(h / q, 4) if q else None,
    }
    stats["cpu_share_of_wall"] = {
        k: round(sum(r["cpu"][k] for r in raws) / stats["wall_s"], 3) for k in raws[0]["cpu"]
    }
    if raws[0]["samples"] is not None:
        stats["requests_by_node"] = {
            n: sum(r["nodes"].get(n, 0) for r in raws) for n in raws[0]["nodes"]
        }
        samples: dict[str, dict[str, list[float]]] = {}
        for r in raws:
            for party, stages in r["samples"].items():
                for stage, xs in stages.items():
                    samples.setdefault(party, {}).setdefault(stage, []).extend(xs)
        split = stage_split(samples)
        stats["split"] = {
            k: split[k]
            for k in ("first_byte_split_ms", "engine_headers_ms", "engine_first_data_ms",
                      "chunk_p50_us_by_party", "chunk_added_us_p50")
        }  # fmt: skip
    return stats


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


class _Bench:
    """One stack in front of the engine, its load generators, and the measurement of a mode."""

    def __init__(self, engine: Any, stack: Any, trace_dir: Path) -> None:
        from openpcc.service.stagetrace import TraceReader

        self.engine = engine
        self.stack = stack
        self.trace_dir = trace_dir
        self.reader = TraceReader(trace_dir)
        self.pids = {s.name: s.proc.pid for s in stack.procs.services}
        self.node_names = {pid: n for n, pid in self.pids.items() if n.startswith("node")}
        if engine.pgid is not None:
            self.pids["vllm"] = engine.pgid
        self.gens = _Generators(engine.url, engine.served_model_name, stack.config_path)
        self.pids |= {f"client {i} (load generator)": p.pid for i, p in enumerate(self.gens.procs)}

    def measure(self, mode: str, conc: int, conversations: int, tag: str) -> dict[str, Any]:
        """One round of one mode: raw samples, engine counters, CPU and node deltas."""
        private = mode.startswith("private")
        if private:
            self.gens.refill("noaffinity" if mode.endswith("_noaffinity") else "default",
                             conversations)  # fmt: skip
        self.reader.take()
        nodes0 = _node_requests(self.trace_dir, self.node_names)
        m0 = vllm_counters(self.engine.url)
        cpu0 = {k: cpu_seconds(p, group=k == "vllm") for k, p in self.pids.items()}
        parts = self.gens.run(mode, conc, conversations, tag)
        cpu1 = {k: cpu_seconds(p, group=k == "vllm") for k, p in self.pids.items()}
        m1 = vllm_counters(self.engine.url)
        nodes1 = _node_requests(self.trace_dir, self.node_names)
        return {
            "parts": parts,
            "queries": m1["queries"] - m0["queries"],
            "hits": m1["hits"] - m0["hits"],
            "cpu": {k: cpu1[k] - cpu0[k] for k in cpu0},
            "nodes": {n: nodes1.get(n, 0) - nodes0.get(n, 0) for n in sorted(nodes1)},
            "samples": self.reader.take() if private else None,
        }

    def close(self) -> None:
        self.gens.close()


def compare(modes: dict[str, Any]) -> dict[str, Any]:
    """The ratios the report quotes, from one load level's modes."""

    def tps(m: str) -> float | None:
        return modes[m]["output_tok_per_s"] if m in modes else None

    def ttft(m: str, k: str) -> float | None:
        return modes[m][k] if m in modes else None

    return {
        "private_conv_vs_direct_conv": _ratio(tps("private_conv"), tps("direct_conv")),
        "private_conv_vs_direct_shared": _ratio(tps("private_conv"), tps("direct_shared")),
        "private_request_vs_direct_conv": _ratio(tps("private_request"), tps("direct_conv")),
        "private_conv_vs_private_request": _ratio(tps("private_conv"), tps("private_request")),
        "direct_conv_vs_direct_shared": _ratio(tps("direct_conv"), tps("direct_shared")),
        "ttft_turn2plus_added_ms_p50": _diff(
            ttft("private_conv", "ttft_turn2plus_p50_ms"),
            ttft("direct_conv", "ttft_turn2plus_p50_ms"),
        ),
        "ttft_turn2plus_added_ms_p99": _diff(
            ttft("private_conv", "ttft_turn2plus_p99_ms"),
            ttft("direct_conv", "ttft_turn2plus_p99_ms"),
        ),
        "ttft_turn1_added_ms_p50": _diff(
            ttft("private_conv", "ttft_turn1_p50_ms"), ttft("direct_conv", "ttft_turn1_p50_ms")
        ),
    }


# ----------------------------------------------------------------------------- engine


def _card_label() -> str:
    """The results file's card label (h200, h100, ...) from the harness's GPU list."""
    names = " ".join(_gpus())
    for card in ("H200", "H100", "A100", "L40S", "L4"):
        if card in names:
            return card.lower()
    return "gpu"


def _stack(state: Path, engine: Any, nodes: int, slack: int | None) -> Any:
    """A local stack (issuer, gateway, relay, ``nodes`` nodes) in front of ``engine``."""
    from openpcc.devstack.local import DEMO_ACCOUNT, start_local_stack
    from openpcc.devstack.processes import run_cli

    saved = os.environ.get("OPENPCC_GATEWAY_AFFINITY_SLACK")
    if slack is not None:  # the gateway reads every flag from OPENPCC_GATEWAY_<FLAG> too
        os.environ["OPENPCC_GATEWAY_AFFINITY_SLACK"] = str(slack)
    try:
        stack = start_local_stack(
            state,
            engine_url=engine.url,
            model_name=engine.served_model_name,
            nodes=nodes,
            log=lambda *_: None,
        )
    finally:
        if saved is None:
            os.environ.pop("OPENPCC_GATEWAY_AFFINITY_SLACK", None)
        else:
            os.environ["OPENPCC_GATEWAY_AFFINITY_SLACK"] = saved
    # The demo account's quota (1,000 tokens an hour) is below what the private loads spend.
    run_cli("issuer", "account", "set-quota", DEMO_ACCOUNT, "--quota", "10000000",
            "--per", "3600", "--state", str(state / "issuer"))  # fmt: skip
    return stack


def _gateway_has_slack() -> bool:
    from openpcc.devstack.processes import openpcc_cmd

    out = subprocess.run(
        openpcc_cmd("gateway", "serve", "--help"), capture_output=True, text=True, timeout=60
    )
    return "--affinity-slack" in out.stdout


def _stats_engine(model_dir: str, **kwargs: Any) -> Any:
    """The node's vLLM command (node/engine.py), with vLLM's statistics on: without them
    its /metrics never counts prefix-cache queries and hits. Prompt token details give
    each answer's cached-token count. Neither logs any prompt or output."""
    from node.engine import VLLMEngine

    class StatsEngine(VLLMEngine):
        def command(self) -> list[str]:
            cmd = [a for a in super().command() if a != "--disable-log-stats"]
            if _env("OPENPCC_BENCH_MT_PROMPT_DETAILS", "1") == "1":
                cmd.append("--enable-prompt-tokens-details")
            return cmd

    return StatsEngine(
        model_dir,
        extra_args=json.loads(_env("OPENPCC_BENCH_VLLM_ARGS", '["--enforce-eager"]')),
        dtype=_env("OPENPCC_BENCH_DTYPE", "auto"),
        max_model_len=int(_env("OPENPCC_BENCH_MAX_MODEL_LEN", "1024")),
        startup_timeout=float(_env("OPENPCC_BENCH_STARTUP_TIMEOUT", "300")),
        **kwargs,
    )


def serve_engine(port: int) -> None:
    """Start the bench's vLLM on ``port`` and keep it until killed (detach the caller:
    ``setsid``). Settings as for ``run``."""
    model_dir = os.environ["OPENPCC_BENCH_VLLM_MODEL"]
    engine = _stats_engine(
        model_dir,
        port=port,
        log_path=Path(_env("OPENPCC_BENCH_VLLM_LOG", "/tmp/vllm-bench.log")),
    )

    async def main() -> None:
        await engine.start()
        print(f"engine ready at {engine.url} ({engine.served_model_name})", flush=True)
        while True:
            await asyncio.sleep(3600)

    asyncio.run(main())


def _partial(result: dict[str, Any]) -> None:
    """Results so far, after each mode (OPENPCC_BENCH_MT_PARTIAL): a device command
    stopped at its time limit still returns what it measured."""
    path = os.environ.get("OPENPCC_BENCH_MT_PARTIAL")
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def run() -> dict[str, Any]:
    state, trace_dir = traced_workdir("bench-multiturn-")  # every party started below traces
    external = os.environ.get("OPENPCC_BENCH_MT_ENGINE_URL")
    model_dir = None if external else bench_model_dir(state)
    extra = json.loads(_env("OPENPCC_BENCH_VLLM_ARGS", '["--enforce-eager"]'))  # as recorded
    # As in bench_private_path: on the CPU backend vLLM's OpenMP threads busy-wait on every
    # core they get, so vLLM gets core 0 and everything else the other cores.
    cores = sorted(os.sched_getaffinity(0))
    pinned = _env("OPENPCC_BENCH_PIN", "1" if ON_CPU else "0") == "1" and len(cores) >= 2
    if external:
        engine: Any = ExternalEngine(external)
        pinned = False
    else:
        engine = _stats_engine(
            model_dir,
            env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[0])} if pinned else {},
            log_path=Path(_env("OPENPCC_BENCH_VLLM_LOG", str(state / "vllm.log"))),
        )
    loop = asyncio.new_event_loop()
    if pinned:
        os.sched_setaffinity(0, cores[:1])  # inherited by vLLM and its engine core
    t_start = time.perf_counter()
    loop.run_until_complete(engine.start())
    engine_start_s = time.perf_counter() - t_start
    if pinned:
        os.sched_setaffinity(0, cores[1:])  # inherited by the parties and load generators
    loads: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    notes: list[str] = []
    info: dict[str, Any] = {}
    try:
        stack = _stack(state / "stack-1", engine, 1, None)
        try:
            bench = _Bench(engine, stack, trace_dir)
            info = {"sdk_cache_scope": bench.gens.cache_scope, "node_ids": bench.gens.node_ids}
            try:
                for conc, convs in LOADS:
                    modes = [m for m in MODES if m != "private_conv" or bench.gens.cache_scope]
                    if len(modes) < len(MODES):
                        notes.append("private_conv skipped: the SDK has no cache_scope yet")
                    raws: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
                    # Rounds alternate the order (ABCD DCBA ...), so a drift of the shared
                    # machine during the run weighs on every mode alike.
                    for rnd in range(ROUNDS):
                        for mode in modes if rnd % 2 == 0 else modes[::-1]:
                            t = time.perf_counter()
                            raw = bench.measure(mode, conc, convs, f"{mode}/c{conc}/r{rnd}")
                            raws[mode].append(raw)
                            one = summarize([raw])
                            print(f"  c={conc} round {rnd} {mode}: {one['output_tok_per_s']} "
                                  f"tok/s, hit rate {one['vllm_prefix_cache']['hit_rate']} "
                                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
                            done = {m: summarize(r) for m, r in raws.items() if r}
                            loads[f"concurrency_{conc}"] = {
                                "conversations": convs,
                                "modes": done,
                                "compare": compare(done),
                            }
                            _partial({"loads": loads, "notes": notes, **info})
            finally:
                bench.close()
        finally:
            stack.procs.stop()
        if ROUTE_NODES >= 2 and info.get("sdk_cache_scope"):
            routing = _routing(engine, state, trace_dir, notes)
            _partial({"loads": loads, "routing": routing, "notes": notes, **info})
    finally:
        loop.run_until_complete(engine.stop())
        loop.close()
        os.sched_setaffinity(0, cores)
    summary = {
        k: {x: v["compare"][x] for x in ("private_conv_vs_direct_conv",
                                          "private_conv_vs_direct_shared",
                                          "ttft_turn2plus_added_ms_p50")}
        | {f"{m}_hit_rate": v["modes"][m]["vllm_prefix_cache"]["hit_rate"] for m in v["modes"]}
        for k, v in loads.items()
    }  # fmt: skip
    label = os.environ.get("OPENPCC_BENCH_LABEL") or ("cpu" if ON_CPU else _card_label())
    return {
        "result_name": "multiturn_" + label,
        "model": model_dir,
        "engine_args": extra,
        "engine_start_s": round(engine_start_s, 1),
        "turns": TURNS,
        "system_words": SYSTEM_WORDS,
        "user_words": USER_WORDS,
        "max_tokens": MAX_TOKENS,
        "client_processes": CLIENT_PROCS,
        "rounds": ROUNDS,
        "cores": {"engine": cores[:1], "rest": cores[1:]} if pinned else "shared",
        **info,
        "notes": notes,
        "loads": loads,
        "routing": routing,
        "summary": summary,
    }


def _routing(engine: Any, state: Path, trace_dir: Path, notes: list[str]) -> dict[str, Any]:
    """ROUTE_NODES nodes in front of the same vLLM: private conversations under each
    gateway slack, and once with the client's affinity off. The nodes namespace every
    salt with their own per-boot key, so a turn sent to another node misses the cache."""
    conc, convs = ROUTE_LOAD
    has_slack = _gateway_has_slack()
    if not has_slack:
        notes.append("routing: the gateway has no --affinity-slack; default routing only")
    slacks = ROUTE_SLACKS if has_slack else (None,)
    out: dict[str, Any] = {"nodes": ROUTE_NODES, "concurrency": conc, "conversations": convs}
    runs: dict[str, Any] = {}
    for i, slack in enumerate(slacks):
        stack = _stack(state / f"stack-route-{i}", engine, ROUTE_NODES, slack)
        try:
            bench = _Bench(engine, stack, trace_dir)
            try:
                name = (
                    "default"
                    if slack is None
                    else ("affinity_only" if slack >= NO_LOAD_AWARE else f"slack_{slack}")
                )
                runs[name] = summarize(
                    [bench.measure("private_conv", conc, convs, f"route/{name}")]
                )
                runs[name]["slack"] = slack
                print(f"  routing {name}: affinity {runs[name].get('affinity_hit_rate')}, "
                      f"spread {runs[name].get('requests_by_node')}", flush=True)  # fmt: skip
                if i == 0:
                    runs["no_affinity"] = summarize(
                        [bench.measure("private_conv_noaffinity", conc, convs, "route/noaffinity")]
                    )
                    runs["no_affinity"]["slack"] = slack
                    print(f"  routing no_affinity: "
                          f"affinity {runs['no_affinity'].get('affinity_hit_rate')}, "
                          f"spread {runs['no_affinity'].get('requests_by_node')}",
                          flush=True)  # fmt: skip
            finally:
                bench.close()
        finally:
            stack.procs.stop()
    out["runs"] = runs
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["serve-engine"]:
        serve_engine(int(sys.argv[2]) if len(sys.argv) > 2 else 8000)
    else:
        raise SystemExit("usage: python -m bench.bench_multiturn serve-engine [PORT]")

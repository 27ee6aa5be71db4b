"""Bounded soak through the full private path: zero errors, flat memory, no leaks.

    python -m bench.soak --minutes 10 --streams 50

Starts issuer, relay, gateway and node(s) as separate processes on loopback with the
fast fake engine (bench/fake_stack.py), then keeps ``--streams`` concurrent streaming
chats going for ``--minutes`` through client -> relay -> gateway -> node -> engine, with
real tokens, attestation checks and both encryption layers. Every few seconds it
samples each party's RSS, open file descriptors and threads, and the client's own RSS,
fds and asyncio task count. Pass criteria (why: a leak shows as a trend, not a level):

- zero failed requests (every answer complete and exactly the engine's text);
- RSS flat per process: after the warm-up (first 25 % of samples), the mean of the last
  quarter of samples is within +20 % of the mean of the first quarter;
- open fds and threads (servers) and asyncio tasks (client) not growing: last-quarter
  mean at most first-quarter mean + a small slack (connection pools fluctuate).

Writes bench/results/soak.json (or ``--out``); exit status 0 only if all criteria hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fake_stack import PARTIES, fake_stack, proc_sample
from openpcc.client.profile import client_from_config

EXPECTED = "Hello from the fake engine."
RSS_GROWTH = 0.20
COUNT_SLACK = {"fds": 8, "threads": 2, "tasks": 8}
WARMUP = 0.25


def _quarters(xs: list[float]) -> tuple[float, float]:
    """(first-quarter mean, last-quarter mean) of the samples after the warm-up."""
    xs = xs[int(len(xs) * WARMUP) :]
    q = max(1, len(xs) // 4)
    return statistics.fmean(xs[:q]), statistics.fmean(xs[-q:])


def judge(samples: dict[str, list[dict[str, int]]]) -> dict[str, Any]:
    """Per process and metric: first/last quarter means and whether it is flat."""
    verdicts: dict[str, Any] = {}
    for name, series in samples.items():
        out: dict[str, Any] = {}
        for metric in series[0]:
            first, last = _quarters([float(s[metric]) for s in series])
            if metric == "rss_kib":
                ok = last <= first * (1 + RSS_GROWTH)
            else:
                ok = last <= first + COUNT_SLACK[metric]
            out[metric] = {
                "first_quarter": round(first, 1),
                "last_quarter": round(last, 1),
                "flat": ok,
            }
        verdicts[name] = out
    return verdicts


async def _drive(
    config: Path, pids: dict[str, int], seconds: float, streams: int, sample_every: float
) -> dict[str, Any]:
    client, wallet, model, _ = client_from_config(config)
    samples: dict[str, list[dict[str, int]]] = {n: [] for n in [*pids, "client"]}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds
    me = os.getpid()

    async def one_stream(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            t0 = time.monotonic()
            try:
                parts = []
                async for chunk in client.chat_completions_stream(
                    model, [{"role": "user", "content": f"soak {i}/{n}"}], max_tokens=8
                ):
                    parts += [(c.get("delta") or {}).get("content") or "" for c in chunk["choices"]]
                if "".join(parts) != EXPECTED:
                    raise AssertionError(f"wrong answer {''.join(parts)!r}")
                latencies.append(time.monotonic() - t0)
            except Exception as exc:  # counted, reported, and the soak fails
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            for name, pid in pids.items():
                samples[name].append(proc_sample(pid))
            s = proc_sample(me)
            del s["threads"]  # the client's thread pool is not what we watch
            samples["client"].append({**s, "tasks": len(asyncio.all_tasks())})
            await asyncio.sleep(sample_every)

    try:
        await client.verified_nodes()  # attestation once, before the clock starts
        t0 = time.monotonic()
        await asyncio.gather(sampler(), *(one_stream(i) for i in range(streams)))
        elapsed = time.monotonic() - t0
    finally:
        await client.aclose()
        await wallet.aclose()
    lat = sorted(latencies)
    return {
        "requests_ok": len(latencies),
        "errors": errors,
        "elapsed_s": round(elapsed, 1),
        "requests_per_s": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "latency_s": {
            "p50": round(lat[len(lat) // 2], 3) if lat else None,
            "p99": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
        },
        "samples": samples,
    }


def run_soak(
    minutes: float,
    streams: int,
    *,
    nodes: int = 1,
    sample_every: float = 2.0,
    state: Path | None = None,
) -> dict[str, Any]:
    """Run the soak; return the result document (``passed`` says whether it held)."""
    with tempfile.TemporaryDirectory(prefix="openpcc-soak-") as tmp:
        base = state or Path(tmp)
        with fake_stack(base, nodes=nodes, quota=10_000_000) as fs:
            names = [s.name for s in fs.stack.procs.services]
            pids = {n: fs.pid(n) for n in names if n.rstrip("0123456789") in PARTIES}
            result = asyncio.run(
                _drive(fs.stack.config_path, pids, minutes * 60, streams, sample_every)
            )
    verdicts = judge(result["samples"])
    flat = all(m["flat"] for v in verdicts.values() for m in v.values())
    return {
        "name": "soak",
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "minutes": minutes,
            "streams": streams,
            "nodes": nodes,
            "sample_every_s": sample_every,
            "rss_growth_limit": RSS_GROWTH,
            "warmup_fraction": WARMUP,
        },
        "passed": not result["errors"] and result["requests_ok"] > 0 and flat,
        "verdicts": verdicts,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = p.parse_args(argv)
    doc = run_soak(args.minutes, args.streams, nodes=args.nodes, sample_every=args.sample_every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    summary = {k: doc[k] for k in ("passed", "requests_ok", "requests_per_s", "errors")}
    print(json.dumps(summary | {"latency_s": doc["latency_s"]}))
    for name, v in doc["verdicts"].items():
        print(
            f"{name:8} "
            + "  ".join(
                f"{m}: {x['first_quarter']:.0f}->{x['last_quarter']:.0f}"
                + ("" if x["flat"] else " GROWING")
                for m, x in v.items()
            )
        )
    print(f"wrote {args.out}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

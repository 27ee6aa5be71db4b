"""What preparing HPKE setups in the background costs a streaming answer's wake-ups.

The client prepares its next requests' X-Wing setups (about 1 ms of CPU each) while an
answer may still be streaming (openpcc/client/prepared.py). This measures the one thing
that can cost: how late the event loop wakes for a streamed chunk meanwhile. A separate
process sends an 8-byte timestamp every 6.5 ms (a GPU's inter-token gap) over a socket
pair; the loop reads each and records how late it woke. Three arms, interleaved over
rounds, all on one core (``taskset`` when available, as on the 2-core VM's party core):

* **none**: nothing else runs;
* **thread**: 3 setups in a worker thread every 33 ms (the first design);
* **steps**: the shipped ``PreparedSenders`` refilling 3 setups every 33 ms, one per
  loop step.

``python -m bench bench_prepared`` writes ``bench/results/prepared.json``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any

from openpcc.client.prepared import PreparedSenders
from openpcc.service.serve import use_uvloop_default
from openpcc.wire import hpke, sealed

ROUNDS = int(os.environ.get("OPENPCC_BENCH_PREPARED_ROUNDS", "4"))
WAKES = 400
GAP_S = 0.0065
REFILL_EVERY_S = 0.033
ARMS = ("none", "thread", "steps")


def _sender(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        time.sleep(GAP_S)
        sock.send(time.perf_counter_ns().to_bytes(8, "big"))
    sock.close()


async def _arm(arm: str, nodes: list[sealed.NodeKey]) -> list[float]:
    a, b = socket.socketpair()
    a.setblocking(False)
    loop = asyncio.get_running_loop()
    proc = mp.get_context("fork").Process(target=_sender, args=(b, WAKES))
    proc.start()
    b.close()
    done = False
    pool = PreparedSenders(depth=1)

    async def background() -> None:
        while not done:
            if arm == "thread":
                await asyncio.to_thread(lambda: [sealed.wrap_sender(n) for n in nodes])
            elif arm == "steps":
                pool._wraps.clear()  # used up, as requests would: refill makes them again
                pool.refill(None, nodes)
                if pool._task is not None:
                    await pool._task
            await asyncio.sleep(REFILL_EVERY_S)

    task = asyncio.create_task(background()) if arm != "none" else None
    late: list[float] = []
    while data := await loop.sock_recv(a, 8):
        late.append((time.perf_counter_ns() - int.from_bytes(data, "big")) / 1000)
    done = True
    if task is not None:
        await task
    await pool.aclose()
    proc.join()
    a.close()
    return late


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_us": round(statistics.median(xs), 1),
        "p90_us": round(xs[int(len(xs) * 0.9)], 1),
        "p99_us": round(xs[int(len(xs) * 0.99)], 1),
        "mean_us": round(statistics.fmean(xs), 1),
    }


def _run(coro: Any) -> list[float]:
    """On uvloop where the parties use it (the client too: openpcc.service.serve)."""
    if use_uvloop_default():
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def run() -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, shared
    kem = hpke.KEM_XWING
    nodes = [
        sealed.NodeKey(bytes([i + 1]) * 16, hpke.generate_key_pair(kem_id=kem).public_key)
        for i in range(3)
    ]
    late: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(ROUNDS):
        for arm in ARMS:
            late[arm] += _run(_arm(arm, nodes))
    return {
        "kem": "X-Wing",
        "setups_per_refill": len(nodes),
        "refill_every_ms": REFILL_EVERY_S * 1000,
        "wake_gap_ms": GAP_S * 1000,
        "rounds": ROUNDS,
        "event_loop": "uvloop" if use_uvloop_default() else "asyncio",
        "summary": {arm: _summary(xs) for arm, xs in late.items()},
    }

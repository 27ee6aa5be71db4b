"""The vLLM supervisor: flags, restart and clean stop (fake server), then real vLLM (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from node.engine import EngineError, ExternalEngine, VLLMEngine, _group_alive
from tests.conftest import require_module

# A stand-in for `python -m vllm.entrypoints.openai.api_server`: it parses the same
# flags, serves /health and /v1/models, and starts a child in its process group the way
# vLLM starts EngineCore, so group handling is tested without vLLM's 30-80 s start.
FAKE_SERVER = """\
import argparse, asyncio, os, subprocess, sys
from aiohttp import web

if os.path.exists(os.environ.get("FAKE_CRASH_FILE", "/nonexistent")):
    sys.exit(3)
p = argparse.ArgumentParser()
p.add_argument("-m")
p.add_argument("--port", type=int)
p.add_argument("--host")
p.add_argument("--served-model-name")
args, _ = p.parse_known_args()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
print("fake vllm child", child.pid, flush=True)

async def health(request):
    return web.Response(text="")

async def models(request):
    return web.json_response({"data": [{"id": args.served_model_name}]})

app = web.Application()
app.router.add_get("/health", health)
app.router.add_get("/v1/models", models)
web.run_app(app, host=args.host, port=args.port, print=None)
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """An executable that VLLMEngine runs in place of ``python``."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return exe


def _group_pids(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------
# fast: flags, environment, and the supervisor against the fake server
# ------------------------------------------------------------------------------------


def test_command_never_logs_prompts(tmp_path: Path) -> None:
    eng = VLLMEngine(tmp_path, port=1234, served_model_name="m")
    cmd = eng.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--no-enable-log-requests" in cmd
    assert not any(a.startswith("--enable-log") for a in cmd)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert eng.url == "http://127.0.0.1:1234"
    for bad in ("--enable-log-requests", "--enable-log-outputs=true"):
        with pytest.raises(ValueError, match="never log prompts"):
            VLLMEngine(tmp_path, extra_args=[bad])


def test_child_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # DEBUG would log prompt inputs
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = VLLMEngine(tmp_path).child_env()
    assert env["VLLM_LOGGING_LEVEL"] == "INFO"
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    env = VLLMEngine(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "4"}).child_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_served_name_default(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    assert VLLMEngine(model).served_model_name == "my-model"
    (model / "OPENPCC_TEST_MODEL.txt").write_text("random weights")
    assert VLLMEngine(model).served_model_name == "openpcc-tiny-random"


async def test_supervisor_restarts_and_stops(tmp_path: Path, fake_python: Path) -> None:
    log = tmp_path / "engine.log"
    eng = VLLMEngine(
        tmp_path, python=str(fake_python), log_path=log, startup_timeout=30, backoff_initial=0.1
    )
    async with eng:
        assert eng.ready.is_set() and await eng.healthy()
        first = eng.pgid
        assert first is not None
        old = _group_pids(first)
        assert len(old) >= 2  # the server and its child

        os.killpg(first, signal.SIGKILL)  # a crash of the whole tree
        deadline = time.monotonic() + 30
        while eng.restarts < 1 or not eng.ready.is_set():
            assert time.monotonic() < deadline, "no restart"
            await asyncio.sleep(0.05)
        assert eng.pgid != first
        assert not any(_alive(pid) for pid in old)
        assert await eng.healthy()

        os.kill(eng.pid, signal.SIGKILL)  # only the server dies: its child is orphaned
        orphaned = [p for p in _group_pids(eng.pgid) if p != eng.pid]
        await eng.wait_ready(30)
        while eng.restarts < 2:
            await asyncio.sleep(0.05)
        await eng.wait_ready(30)
        assert not any(_alive(pid) for pid in orphaned)  # the old group was killed too
        last = eng.pgid
        pids = _group_pids(last)
    assert not eng.ready.is_set()
    assert not any(_alive(pid) for pid in pids)
    assert not _group_alive(last)
    assert log.read_text().count("--- openpcc: starting vLLM") == 3


async def test_start_failure_reports_log(tmp_path: Path, fake_python: Path) -> None:
    crash = tmp_path / "crash"
    crash.touch()
    eng = VLLMEngine(tmp_path, python=str(fake_python), env={"FAKE_CRASH_FILE": str(crash)})
    with pytest.raises(EngineError, match="exited with 3 while starting"):
        await eng.start()


async def test_gives_up_after_max_restarts(tmp_path: Path, fake_python: Path) -> None:
    crash = tmp_path / "crash"
    eng = VLLMEngine(
        tmp_path,
        python=str(fake_python),
        env={"FAKE_CRASH_FILE": str(crash)},
        max_restarts=2,
        backoff_initial=0.05,
        health_interval=0,
    )
    async with eng:
        crash.touch()  # every restart now fails at once
        os.killpg(eng.pgid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while eng.failed is None:
            assert time.monotonic() < deadline, "supervisor never gave up"
            await asyncio.sleep(0.05)
        assert not eng.ready.is_set()
        with pytest.raises(EngineError, match="gave up"):
            await eng.wait_ready(30)
        assert eng.restarts == 2
        assert isinstance(eng.failed, EngineError)


async def test_external_engine(tmp_path: Path, fake_python: Path) -> None:
    async with VLLMEngine(tmp_path, python=str(fake_python), served_model_name="m") as eng:
        ext = ExternalEngine(eng.url + "/v1/", served_model_name="m")
        assert ext.url == eng.url
        async with ext:
            assert ext.ready.is_set() and ext.restarts == 0
            assert await ext.healthy()
        assert not ext.ready.is_set()
        assert await eng.healthy()  # stopping an external engine leaves it alone
        wrong = ExternalEngine(eng.url, served_model_name="other", startup_timeout=1)
        with pytest.raises(EngineError, match=r"not ready: .* lists \['m'\], not 'other'"):
            await wrong.start()
        assert wrong.problem == f"engine at {eng.url} lists ['m'], not 'other'"


# ------------------------------------------------------------------------------------
# slow: real vLLM (CPU) on the random-weights test model; one start, one restart
# ------------------------------------------------------------------------------------

PROMPT_MARKER = "zebra-QUOKKA-7f3a"  # must never appear in vLLM's log


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm(tmp_path_factory: pytest.TempPathFactory):
    require_module("vllm")
    from node.tinymodel import make_tiny_model

    base = tmp_path_factory.mktemp("vllm")
    info = make_tiny_model(base / "model", seed=0)
    eng = VLLMEngine(
        info["dir"],
        log_path=base / "vllm.log",
        extra_args=["--enforce-eager"],  # skips torch.compile: ~30 s start instead of ~70 s
        startup_timeout=400,
    )
    await eng.start()
    yield eng
    await eng.stop()


def _chat(prompt: str, **extra: object) -> dict:
    return {
        "model": "openpcc-tiny-random",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "ignore_eos": True,  # random weights may pick EOS early; we want a full stream
        **extra,
    }


async def _post(url: str, body: dict) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json=body) as r,
    ):
        return r.status, await r.text()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_lists_model(vllm: VLLMEngine) -> None:
    async with aiohttp.ClientSession() as s, s.get(vllm.url + "/v1/models") as r:
        body = await r.json()
    assert [m["id"] for m in body["data"]] == ["openpcc-tiny-random"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_streams_chat(vllm: VLLMEngine) -> None:
    events: list[tuple[float, str]] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            vllm.url + "/v1/chat/completions",
            json=_chat(f"say something {PROMPT_MARKER}", stream=True, max_tokens=32),
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append((time.monotonic(), line[5:].strip()))
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert len(chunks) >= 5
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text  # garbage from random weights, but something
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[0][0] < events[-1][0]  # the first chunk came before the end


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_accepts_cache_salt(vllm: VLLMEngine) -> None:
    status, body = await _post(vllm.url, _chat(f"{PROMPT_MARKER} salted", cache_salt="u1-x"))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] is not None
    # The field is really parsed (not ignored): vLLM validates it.
    status, body = await _post(vllm.url, _chat("x", cache_salt=""))
    assert status == 400 and "cache_salt" in body


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_restarts_after_kill(vllm: VLLMEngine) -> None:
    import psutil

    old_pgid = vllm.pgid
    assert old_pgid is not None
    old = _group_pids(old_pgid)
    names = {psutil.Process(p).name() for p in old}
    assert any("EngineCore" in n for n in names), names  # vLLM's own children
    os.killpg(old_pgid, signal.SIGKILL)
    deadline = time.monotonic() + 400
    while vllm.restarts < 1 or not vllm.ready.is_set():
        assert time.monotonic() < deadline, "vLLM did not come back"
        await asyncio.sleep(0.5)
    assert not any(_alive(p) for p in old)
    status, body = await _post(vllm.url, _chat(f"again {PROMPT_MARKER}"))
    assert status == 200, body


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_log_has_no_prompt(vllm: VLLMEngine) -> None:
    assert vllm.log_path is not None
    text = vllm.log_path.read_text(errors="replace")
    assert "Application startup complete" in text  # the log is really vLLM's
    assert PROMPT_MARKER not in text
    assert "quokka" not in text.lower()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_vllm_stop_leaves_nothing(vllm: VLLMEngine) -> None:
    pgid = vllm.pgid
    assert pgid is not None
    pids = _group_pids(pgid)
    t0 = time.monotonic()
    await vllm.stop()
    assert time.monotonic() - t0 < 30
    assert not any(_alive(p) for p in pids)
    assert not _group_alive(pgid)
    assert not vllm.ready.is_set()
    await vllm.stop()  # idempotent (the fixture stops again)

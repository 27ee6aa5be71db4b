"""`openpcc proxy` with the official `openai` SDK, against the real local_stack as processes.

The fake engine (tests/node_support/fake_engine.py) stands in for vLLM, as in
tests/test_private_path.py; the proxy runs as its own `openpcc proxy` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from openpcc.devstack.local import LocalStack
from openpcc.devstack.processes import Processes, free_port, run_cli
from tests.conftest import FAKE_MODEL

MODEL = FAKE_MODEL
ANSWER = "Hello from the fake engine."
WORDS = 6  # the fake engine's answer, in events


def start_proxy(
    procs: Processes, config: Path, log: Path, env: dict[str, str] | None = None
) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.start("proxy", ["proxy", "--port", str(port), "--config", str(config)], log, url=url,
                env=env)  # fmt: skip
    return url


@pytest.fixture(scope="module")
def proxy(local_stack: LocalStack) -> Iterator[str]:
    procs = Processes()
    url = start_proxy(procs, local_stack.config_path, local_stack.state / "logs" / "proxy.log")
    yield url
    procs.stop()


def sdk(proxy: str) -> openai.AsyncOpenAI:
    # max_retries=0: a retried 5xx/429 would spend another token and hide the first error.
    return openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0)


async def release(engine: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(engine + "/_control/release") as r:
        assert r.status == 200


# ---------------------------------------------------------------- happy paths


async def test_chat_completion_non_streamed(proxy: str) -> None:
    async with sdk(proxy) as oai:
        resp = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
    assert resp.choices[0].message.content == ANSWER


async def test_chat_completion_streamed(proxy: str) -> None:
    async with sdk(proxy) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream]
    assert len(pieces) == WORDS
    assert "".join(pieces) == ANSWER


async def test_legacy_completions_both_ways(proxy: str) -> None:
    async with sdk(proxy) as oai:
        whole = await oai.completions.create(model=MODEL, prompt="Once", max_tokens=8)
        stream = await oai.completions.create(model=MODEL, prompt="Once", stream=True)
        pieces = [c.choices[0].text async for c in stream]
    assert whole.choices[0].text == ANSWER
    assert "".join(pieces) == ANSWER


async def test_models_lists_what_verified_nodes_serve(proxy: str) -> None:
    async with sdk(proxy) as oai:
        models = [m.id async for m in oai.models.list()]
        one = await oai.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("nope")
    assert models == [MODEL]
    assert one.id == MODEL


async def test_sse_is_framed_exactly_like_openai(proxy: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as s, s.post(proxy + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == ANSWER


async def test_streaming_is_incremental(proxy: str, fake_engine: str) -> None:
    """GATE holds the engine's last event: every earlier chunk must already be here."""
    async with sdk(proxy) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "GATE now"}], stream=True
        )
        got: list[str] = []
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
            if len(got) == WORDS - 1:
                assert "".join(got) == ANSWER.removesuffix(".")
                await release(fake_engine)  # only now may the last word be generated
    assert "".join(got) == ANSWER


async def test_concurrent_requests(proxy: str) -> None:
    async def one(i: int) -> str:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async with sdk(proxy) as oai:
        answers = await asyncio.gather(*(one(i) for i in range(8)))
        whole = await asyncio.gather(
            *(
                oai.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"w{i}"}]
                )
                for i in range(4)
            )
        )
    assert answers == [ANSWER] * 8
    assert [w.choices[0].message.content for w in whole] == [ANSWER] * 4


# ---------------------------------------------------------------- error mapping


async def test_a_field_the_node_refuses_is_a_400(proxy: str) -> None:
    async with sdk(proxy) as oai:
        with pytest.raises(openai.BadRequestError) as err:
            await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], user="alice"
            )
        with pytest.raises(openai.BadRequestError):  # also before a stream starts
            await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, stream=True
            )
    assert err.value.status_code == 400
    assert "attested node refused" in err.value.message


async def test_no_verified_node_is_a_503(proxy: str) -> None:
    async with sdk(proxy) as oai:
        with pytest.raises(openai.InternalServerError) as err:
            await oai.chat.completions.create(
                model="not-served", messages=[{"role": "user", "content": "hi"}]
            )
    assert err.value.status_code == 503
    assert err.value.body["code"] == "no_verified_node"


async def test_truncation_mid_stream_is_an_error_not_a_short_answer(proxy: str) -> None:
    async with sdk(proxy) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "DIE please"}], stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    assert got == ["Hello", " from"]
    assert err.value.body["code"] == "truncated_response"


async def test_truncation_in_raw_sse_has_no_done(proxy: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "DIE"}], "stream": True}
    async with aiohttp.ClientSession() as s, s.post(proxy + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
    assert b"[DONE]" not in raw
    last = json.loads(raw.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "api_error"


async def test_bad_requests_are_openai_shaped(proxy: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.post(proxy + "/v1/embeddings", json={"model": MODEL}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "unknown_url"
        async with s.get(proxy + "/v1/chat/completions") as r:
            assert r.status == 405


async def test_quota_exhausted_is_a_429(local_stack: LocalStack, tmp_path: Path) -> None:
    out = run_cli("issuer", "account", "add", "broke", "--quota", "0",
                  "--state", str(local_stack.state / "issuer"))  # fmt: skip
    key_file = tmp_path / "api-key"
    key_file.write_text(out.strip().splitlines()[-1])
    cfg = json.loads(local_stack.config_path.read_text())
    cfg |= {"api_key_file": str(key_file), "wallet": str(tmp_path / "wallet.json")}
    config = tmp_path / "client.json"
    config.write_text(json.dumps(cfg))
    procs = Processes()
    try:
        url = start_proxy(procs, config, tmp_path / "proxy.log")
        async with sdk(url) as oai:
            with pytest.raises(openai.RateLimitError) as err:
                await oai.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
                )
        assert err.value.status_code == 429
        assert int(err.value.response.headers["Retry-After"]) >= 1
        assert err.value.body["code"] == "token_quota_exhausted"
    finally:
        procs.stop()


# ---------------------------------------------------------------- spending guards


async def test_foreign_host_and_origin_are_refused(proxy: str) -> None:
    """A web page (or a rebound DNS name) must not spend the user's tokens."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    url = proxy + "/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers={"Host": "evil.example"}) as r:
            assert r.status == 403
        async with s.post(url, json=body, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with s.post(url, json=body, headers={"Origin": "http://localhost:3000"}) as r:
            assert r.status == 200


def test_non_loopback_bind_needs_allow_remote_and_a_key(local_stack: LocalStack) -> None:
    cmd = [sys.executable, "-m", "openpcc.cli", "proxy", "--config", str(local_stack.config_path),
           "--host", "0.0.0.0", "--port", str(free_port())]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPCC_PROXY_")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "--allow-remote" in out.stderr
    out = subprocess.run([*cmd, "--allow-remote"], capture_output=True, text=True, timeout=60,
                         env=env)  # fmt: skip
    assert out.returncode == 2 and "OPENPCC_PROXY_API_KEY" in out.stderr


async def test_api_key_when_configured(local_stack: LocalStack, tmp_path: Path) -> None:
    procs = Processes()
    try:
        url = start_proxy(procs, local_stack.config_path, tmp_path / "proxy.log",
                          env={"OPENPCC_PROXY_API_KEY": "s3cret-proxy-key"})  # fmt: skip
        msgs = [{"role": "user", "content": "hi"}]
        async with sdk(url) as oai:
            with pytest.raises(openai.AuthenticationError):
                await oai.chat.completions.create(model=MODEL, messages=msgs)
        async with openai.AsyncOpenAI(
            base_url=url + "/v1", api_key="s3cret-proxy-key", max_retries=0
        ) as oai:
            resp = await oai.chat.completions.create(model=MODEL, messages=msgs)
        assert resp.choices[0].message.content == ANSWER
    finally:
        procs.stop()

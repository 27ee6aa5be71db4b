"""The official `openai` SDK sending privately with no local server: the httpx transports.

Same local_stack as tests/test_proxy.py (fake engine, every party a process); the SDK runs
in this process with `OpenPCCTransport` (async) or `http_client(...)` (blocking).
Both `httpx` (openai 1.x/2.x) and `httpx2` (openai 3.x) clients are exercised.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import openai
import pytest

from openpcc.client.openai_transport import (
    OpenPCCTransport,
    async_http_client,
    frontend_from_config,
    http_client,
)
from openpcc.devstack.local import LocalStack
from tests.test_proxy import ANSWER, MODEL, WORDS, release

HTTPX = [m for m in ("httpx", "httpx2") if importlib.util.find_spec(m) is not None]


@pytest.fixture(params=HTTPX)
def httpx_mod(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(request.param)


@pytest.fixture
async def oai(local_stack: LocalStack, httpx_mod: ModuleType) -> AsyncIterator[openai.AsyncOpenAI]:
    frontend = frontend_from_config(local_stack.config_path)
    http = httpx_mod.AsyncClient(transport=OpenPCCTransport(frontend))
    client = openai.AsyncOpenAI(
        base_url="http://openpcc.local/v1",
        api_key="unused",
        http_client=http,
        max_retries=0,
    )
    yield client
    await client.close()
    await frontend.aclose()


MSGS: list[Any] = [{"role": "user", "content": "hi"}]


async def test_transport_chat_non_streamed(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8)
    assert resp.choices[0].message.content == ANSWER


async def test_transport_chat_streamed(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    pieces = [c.choices[0].delta.content async for c in stream]
    assert len(pieces) == WORDS and "".join(pieces) == ANSWER


async def test_transport_completions_and_models(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.completions.create(model=MODEL, prompt="Once", max_tokens=8)
    stream = await oai.completions.create(model=MODEL, prompt="Once", stream=True)
    assert whole.choices[0].text == ANSWER
    assert "".join([c.choices[0].text async for c in stream]) == ANSWER
    assert [m.id async for m in oai.models.list()] == [MODEL]


async def test_transport_streams_incrementally(oai: openai.AsyncOpenAI, fake_engine: str) -> None:
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "GATE"}], stream=True
    )
    got: list[str] = []
    async for chunk in stream:
        got.append(chunk.choices[0].delta.content or "")
        if len(got) == WORDS - 1:
            await release(fake_engine)  # the last word does not exist before this
    assert "".join(got) == ANSWER


async def test_transport_concurrent(oai: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert await asyncio.gather(*(one(i) for i in range(6))) == [ANSWER] * 6


async def test_transport_error_mapping(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=MODEL, messages=MSGS, user="alice")
    with pytest.raises(openai.InternalServerError) as err:
        await oai.chat.completions.create(model="not-served", messages=MSGS)
    assert err.value.status_code == 503
    stream = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "DIE"}], stream=True
    )
    with pytest.raises(openai.APIError) as cut:
        _ = [c async for c in stream]
    assert cut.value.body["code"] == "truncated_response"


async def test_closing_a_stream_early_is_clean(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    async for _ in stream:
        break
    await stream.close()
    resp = await oai.chat.completions.create(model=MODEL, messages=MSGS)  # still usable
    assert resp.choices[0].message.content == ANSWER


async def test_async_http_client_helper(local_stack: LocalStack) -> None:
    frontend = frontend_from_config(local_stack.config_path)
    try:
        async with openai.AsyncOpenAI(
            base_url="http://openpcc.local/v1",
            api_key="unused",
            http_client=async_http_client(frontend),
        ) as oai:
            resp = await oai.chat.completions.create(model=MODEL, messages=MSGS)
        assert resp.choices[0].message.content == ANSWER
    finally:
        await frontend.aclose()


def test_blocking_sdk_with_http_client(local_stack: LocalStack) -> None:
    with openai.OpenAI(
        base_url="http://openpcc.local/v1",
        api_key="unused",
        http_client=http_client(local_stack.config_path),
        max_retries=0,
    ) as oai:
        resp = oai.chat.completions.create(model=MODEL, messages=MSGS)
        stream = oai.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
        pieces = [c.choices[0].delta.content for c in stream]
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="not-served", messages=MSGS)
    assert resp.choices[0].message.content == ANSWER
    assert "".join(pieces) == ANSWER


def test_readme_three_lines_work(local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's OpenAI-SDK example, run as written against a local_stack `openpcc up` made."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## OpenAI SDK, privately", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    monkeypatch.setenv("OPENPCC_CLIENT_CONFIG", str(local_stack.config_path))
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    with scope["client"] as oai:
        resp = oai.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.choices[0].message.content == ANSWER


def test_openpcc_http_client_is_lazy() -> None:
    """`openpcc.http_client` is the transport's, and `import openpcc` alone loads no httpx."""
    code = (
        "import sys, openpcc; assert 'httpx' not in sys.modules and 'openai' not in sys.modules;"
        "from openpcc.client import openai_transport as t;"
        "assert openpcc.http_client is t.http_client;"
        "assert openpcc.async_http_client is t.async_http_client"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_the_openai_drop_in_keeps_one_cache_scope_per_conversation(
    oai: openai.AsyncOpenAI, fake_engine: str
) -> None:
    """Issue 17, with no API change: every turn of one conversation reaches the engine
    under one cache namespace; another conversation under another; `extra_body`
    `cache_scope: None` opts out (fresh per request) and never reaches the node."""
    marker = "dropin-" + os.urandom(4).hex()
    first = [{"role": "user", "content": marker}]
    turn2 = [*first, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "go"}]
    other = [{"role": "user", "content": marker + " other"}]
    for msgs in (first, turn2, other):
        await oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
    for _ in range(2):
        await oai.chat.completions.create(
            model=MODEL, messages=first, max_tokens=4, extra_body={"cache_scope": None}
        )
    salts = await _engine_salts(fake_engine, marker)
    assert len(salts) == 5
    assert salts[0] == salts[1] != salts[2]
    assert len({salts[0], salts[3], salts[4]}) == 3


async def _engine_salts(engine: str, marker: str) -> list[str]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(engine + "/_control/received") as r:
        recs = await r.json()
    return [rec["body"]["cache_salt"] for rec in recs if marker in json.dumps(rec.get("body"))]

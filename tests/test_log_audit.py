"""Log and metric audit (issue 9): no process writes what it must not keep.

One local stack (issuer, relay, gateway, node as separate processes; the fast fake
engine stands in for vLLM, whose own log is checked by
tests/test_engine.py::test_vllm_log_has_no_prompt). A private chat from 127.0.0.2
with a unique prompt, a replayed token, a wrong API key and some garbage exercise the
success and the error paths; then every party's log file (``STATE/logs/*.log``) and
every ``/metrics`` page are searched for the prompt, the token, the API key, the
account name and the client address. Audit logs are excluded on purpose: they are
opt-in recordings of what each party received (that is what the demo prints).
"""

from __future__ import annotations

import asyncio
import base64
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fake_stack import FakeStack, fake_stack
from openpcc.client.errors import TokenRejectedError
from openpcc.client.profile import client_from_config
from openpcc.devstack.views import tokens_seen

CLIENT_ADDR = "127.0.0.2"
PROMPT = f"my unique secret prompt {os.urandom(6).hex()}"


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStack]:
    with fake_stack(tmp_path_factory.mktemp("audit"), audit=True) as s:
        yield s


async def _exercise(fs: FakeStack) -> None:
    client, wallet, model, session = client_from_config(
        fs.stack.config_path, local_addr=CLIENT_ADDR
    )
    try:
        msgs = [{"role": "user", "content": PROMPT}]
        text = [c async for c in client.chat_completions_stream(model, msgs, max_tokens=8)]
        assert text
        token = await wallet.take()

        class Same:
            async def take(self) -> object:
                return token

        client._tokens = Same()
        await client.chat_completions(model, msgs, max_tokens=4)
        with pytest.raises(TokenRejectedError):  # the replay: an error path that sees a token
            await client.chat_completions(model, msgs, max_tokens=4)
    finally:
        await client.aclose()
        await wallet.aclose()
        if session is not None:
            await session.close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_logs_and_metrics_hold_no_prompt_token_key_account_or_address(fs: FakeStack) -> None:
    asyncio.run(_exercise(fs))
    # Error paths with secrets in them: a near-miss API key, garbage to each service.
    bad_key = {"Authorization": f"Bearer {fs.api_key}x", "Content-Type": "x/y"}
    assert _post(fs.url("issuer") + "/token-request", b"\x00" * 9, bad_key) in (401, 415)
    junk = PROMPT.encode()
    for name, path, ctype in (
        ("relay", "/", "message/ohttp-req"),
        ("gateway", "/gateway", "message/ohttp-chunked-req"),
        ("node", "/v1/sealed", "application/openpcc-sealed-request"),
    ):
        assert 400 <= _post(fs.url(name) + path, junk, {"Content-Type": ctype}) < 500

    from openpcc.client.cachescope import CACHE_SECRET_FILE, CacheSecret, derive_salt

    secret = CacheSecret(fs.stack.config_path.parent / CACHE_SECRET_FILE).current()
    salt = derive_salt(secret, "conversation", model=fs.stack.model,
                       messages=[{"role": "user", "content": PROMPT}])  # fmt: skip
    assert salt is not None
    tokens = tokens_seen({"gateway": fs.stack.audit["gateway"]})
    assert len(tokens) >= 2, "the gateway audit must show the tokens it redeemed"
    needles: dict[str, list[bytes]] = {
        "prompt": [PROMPT.encode(), PROMPT.encode().hex().encode()],
        "api key": [fs.api_key.encode()],
        "account": [fs.account.encode()],
        "client address": [CLIENT_ADDR.encode()],
        "token": [],
        "cache salt": [salt.hex().encode(), salt],
    }
    for t in tokens:
        raw = base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))
        nonce = raw[2:34]
        needles["token"] += [t[:40].encode(), raw.hex()[:64].encode(), nonce.hex().encode()]
        needles["token"] += [base64.b64encode(raw)[:40]]

    haystacks: dict[str, bytes] = {}
    logs = sorted((fs.stack.state / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"issuer", "relay", "gateway", "node"}
    for p in logs:
        haystacks[f"log {p.name}"] = p.read_bytes()
    for name in ("issuer", "relay", "gateway", "node"):
        with urllib.request.urlopen(fs.url(name) + "/metrics", timeout=10) as r:
            assert r.status == 200
            haystacks[f"{name} /metrics"] = r.read()
    assert b"openpcc_gateway" in haystacks["gateway /metrics"]  # we read real metrics

    leaks = [
        f"{what} in {where}"
        for where, hay in haystacks.items()
        for what, forms in needles.items()
        for form in forms
        if form and form in hay
    ]
    assert not leaks, leaks
    # And the audit logs (opt-in) did record them: the search above could find them.
    relay_audit = Path(fs.stack.audit["relay"]).read_bytes()
    node_audit = Path(fs.stack.audit["node"]).read_bytes()
    assert CLIENT_ADDR.encode() in relay_audit and PROMPT.encode() in node_audit

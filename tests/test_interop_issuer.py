"""Issuance over HTTP against Cloudflare's privacypass-ts, in both directions.

(a) privacypass-ts as the client of OUR issuer service (separate process);
(b) OUR wallet as the client of an issuer built on privacypass-ts (node:http server),
    with and without generic batching (the wallet falls back to single requests on 415).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from openpcc.client import IssuerAuthError, TokenWallet
from openpcc.privacypass import issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, Token, TokenChallenge
from openpcc.privacypass.directory import IssuerDirectory
from tests.conftest import INTEROP, run_node
from tests.test_wallet import Issuer, start_issuer, stop

pytestmark = pytest.mark.interop

CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "issuer.test", b"", ())


@pytest.fixture(scope="module")
def our_issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Issuer]:
    iss = start_issuer(tmp_path_factory.mktemp("interop-issuer") / "state")
    yield iss
    stop(iss.proc)


@pytest.mark.parametrize("count", [1, 5])
def test_privacypass_ts_client_gets_tokens_from_our_issuer(our_issuer: Issuer, count: int) -> None:
    key = our_issuer.add_account(f"pp-ts-{count}")
    out = run_node(
        "pp_client_fetch.mjs",
        {
            "issuer_url": our_issuer.url,
            "api_key": key,
            "challenge": CHALLENGE.encode().hex(),
            "count": count,
        },
    )
    assert out["verified"] == [True] * count
    token_key = IssuerDirectory.parse(our_issuer.directory()).select_key().token_key
    assert bytes.fromhex(out["token_key"]) == token_key
    tokens = [Token.decode(bytes.fromhex(t)) for t in out["tokens"]]
    for tok in tokens:
        issuance.verify_token(token_key, tok, expected_challenge=CHALLENGE)
    assert len({t.nonce for t in tokens}) == count


class JsIssuer:
    """tests/interop/pp_issuer_server.mjs as a child process on a port the OS picked."""

    def __init__(self, api_key: str, *, batch: bool) -> None:
        self.batch = batch
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed; run scripts/dev test to install interop peers")
        self.proc = subprocess.Popen(
            [node, str(INTEROP / "pp_issuer_server.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=INTEROP,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"api_key": api_key, "batch": batch}).encode())
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.proc.kill()
            pytest.fail(f"pp_issuer_server.mjs did not start:\n{err}")
        info = json.loads(line)
        self.url = f"http://127.0.0.1:{info['port']}"
        self.token_key = bytes.fromhex(info["token_key"])

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/stats") as r:
            return dict(await r.json())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def js_issuer(request: pytest.FixtureRequest) -> Iterator[JsIssuer]:
    iss = JsIssuer("js-api-key", batch=request.param)
    yield iss
    iss.close()


@pytest.mark.parametrize("js_issuer", [True, False], ids=["batch", "single-only"], indirect=True)
async def test_our_wallet_gets_tokens_from_privacypass_ts_issuer(
    js_issuer: JsIssuer, tmp_path: Path
) -> None:
    async with TokenWallet(
        js_issuer.url,
        "js-api-key",
        tmp_path / "t.json",
        challenge=CHALLENGE,
        batch_size=6,
        low_water=0,
    ) as w:
        tokens = [await w.take() for _ in range(6)]
    for tok in tokens:
        issuance.verify_token(js_issuer.token_key, tok, expected_challenge=CHALLENGE)
    assert len({t.nonce for t in tokens}) == 6
    # privacypass-ts's Origin accepts what our wallet finalized.
    verdict = run_node(
        "privacypass.mjs",
        {
            "mode": "verify",
            "token_key": js_issuer.token_key.hex(),
            "token": tokens[0].encode().hex(),
        },
    )
    assert verdict == {"verified": True}
    stats = await js_issuer.stats()
    if js_issuer.batch:
        assert stats == {"single": 0, "batch": 1, "rejected_batch": 0}
    else:  # one 415 to the batch, then one single request per token
        assert stats == {"single": 6, "batch": 0, "rejected_batch": 1}


@pytest.mark.parametrize("js_issuer", [True], indirect=True)
async def test_privacypass_ts_issuer_rejects_wrong_key(js_issuer: JsIssuer, tmp_path: Path) -> None:
    async with TokenWallet(
        js_issuer.url, "not-the-key", tmp_path / "t.json", challenge=CHALLENGE, batch_size=2
    ) as w:
        with pytest.raises(IssuerAuthError):
            await w.take()

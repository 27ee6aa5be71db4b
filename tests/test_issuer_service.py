"""The issuer as operators run it: a separate process, real HTTP, both state backends."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, TokenChallenge
from openpcc.privacypass.directory import IssuerDirectory
from tests.harness import Proc, cli, openpcc

CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "issuer.test", b"", ())
SINGLE = "application/private-token-request"


@dataclass
class Issuer:
    proc: Proc
    state: Path
    backend_args: list[str]

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def log(self) -> Path:
        return self.proc.log

    def add_account(self, name: str, quota: int, per: int = 3600) -> str:
        out = cli(
            "issuer", "account", "add", name, "--quota", str(quota), "--per", str(per),
            "--state", str(self.state), *self.backend_args,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("issuer", *args, "--state", str(self.state), *self.backend_args)


def start_issuer(
    state: Path,
    backend_args: list[str],
    log: Path,
    serve_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Issuer:
    args = ["issuer", "serve", "--state", str(state), *backend_args, *(serve_args or [])]
    return Issuer(openpcc(log.stem, log.parent, *args, env=env), state, backend_args)


def stop(issuer: Issuer) -> None:
    issuer.proc.stop(signal.SIGINT)


_redis_db = iter(range(1, 16))


@pytest.fixture(params=["sqlite", "redis"])
def backend_args(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "sqlite":
        return []
    url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + f"/{next(_redis_db)}"
    return ["--redis", url]


@pytest.fixture
def issuer(tmp_path: Path, backend_args: list[str]) -> Iterator[Issuer]:
    iss = start_issuer(tmp_path / "state", backend_args, tmp_path / "issuer.log")
    yield iss
    stop(iss)


async def fetch_directory(session: aiohttp.ClientSession, url: str) -> IssuerDirectory:
    async with session.get(url + "/.well-known/private-token-issuer-directory") as r:
        assert r.status == 200
        assert r.content_type == "application/private-token-issuer-directory"
        assert "max-age=" in r.headers["Cache-Control"]
        return IssuerDirectory.parse(await r.read())


def make_requests(token_key: bytes, n: int) -> list[tuple[issuance.TokenRequest, object]]:
    return [issuance.begin_token_request(token_key, CHALLENGE) for _ in range(n)]


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, ctype: str, key: str | None
) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    headers = {"Content-Type": ctype}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with session.post(url + "/token-request", data=body, headers=headers) as r:
        return r.status, await r.read(), r.headers


async def test_single_and_batched_issuance_give_valid_unlinkable_tokens(issuer: Issuer) -> None:
    key = issuer.add_account("alice", quota=20)
    async with aiohttp.ClientSession() as s:
        directory = await fetch_directory(s, issuer.url)
        assert directory.issuer_request_uri == "/token-request"
        entry = directory.select_key()
        ((req, state),) = make_requests(entry.token_key, 1)
        status, body, headers = await post(s, issuer.url, req.encode(), SINGLE, key)
        assert status == 200 and headers["Content-Type"] == "application/private-token-response"
        token = issuance.finalize_token(state, body)
        issuance.verify_token(entry.token_key, token, expected_challenge=CHALLENGE)

        pairs = make_requests(entry.token_key, 10)
        status, body, headers = await post(
            s,
            issuer.url,
            batched.encode_batch_request([r for r, _ in pairs]),
            batched.REQUEST_MEDIA_TYPE,
            key,
        )
        assert status == 200 and headers["Content-Type"] == batched.RESPONSE_MEDIA_TYPE
        responses = batched.decode_batch_response(body)
        tokens = [
            issuance.finalize_token(st, rsp) for (_, st), rsp in zip(pairs, responses, strict=True)
        ]
        for t in tokens:
            issuance.verify_token(entry.token_key, t)
        assert len({t.nonce for t in tokens}) == 10


async def test_batch_body_arriving_in_pieces_is_read_whole(issuer: Issuer) -> None:
    """A large batch reaches the handler in several socket reads (found by bench_gateway:
    a single read() returned part of the body and the batch was refused as truncated)."""
    key = issuer.add_account("pieces", quota=300)
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, issuer.url)).select_key().token_key
        pairs = make_requests(tk, 300)
        body = batched.encode_batch_request([r for r, _ in pairs])

        async def trickle() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]
                await asyncio.sleep(0.002)

        headers = {"Content-Type": batched.REQUEST_MEDIA_TYPE, "Authorization": f"Bearer {key}"}
        async with s.post(issuer.url + "/token-request", data=trickle(), headers=headers) as r:
            assert r.status == 200, await r.text()
            responses = batched.decode_batch_response(await r.read())
    tokens = [
        issuance.finalize_token(st, rsp) for (_, st), rsp in zip(pairs, responses, strict=True)
    ]
    assert len({t.nonce for t in tokens}) == 300


async def test_quota_429_with_retry_after_and_no_partial_batches(issuer: Issuer) -> None:
    key = issuer.add_account("bob", quota=5, per=3600)
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, issuer.url)).select_key().token_key
        batch = batched.encode_batch_request([r for r, _ in make_requests(tk, 4)])
        assert (await post(s, issuer.url, batch, batched.REQUEST_MEDIA_TYPE, key))[0] == 200
        status, body, headers = await post(s, issuer.url, batch, batched.REQUEST_MEDIA_TYPE, key)
        assert status == 429
        assert 0 < int(headers["Retry-After"]) <= 3600
        assert headers["Content-Type"] == "application/problem+json"
        assert json.loads(body)["status"] == 429
        # The refused batch took nothing: exactly one token is left.
        ((req, _),) = make_requests(tk, 1)
        assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 200
        assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 429


async def test_fifty_racing_requests_never_over_issue(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("racer", quota=23)
    # A second replica on the same state: the limit must hold across processes too.
    second = start_issuer(issuer.state, issuer.backend_args, tmp_path / "second.log")
    try:
        async with aiohttp.ClientSession() as s:
            tk = (await fetch_directory(s, issuer.url)).select_key().token_key
            reqs = [r.encode() for r, _ in make_requests(tk, 50)]
            urls = [issuer.url, second.url]
            results = await asyncio.gather(
                *(post(s, urls[i % 2], body, SINGLE, key) for i, body in enumerate(reqs))
            )
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) == 23
        assert statuses.count(429) == 27
    finally:
        stop(second)


async def test_bad_input_is_refused_and_consumes_no_quota(issuer: Issuer) -> None:
    key = issuer.add_account("carol", quota=1)
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, issuer.url)).select_key().token_key
        ((good, _),) = make_requests(tk, 1)
        wrong_key_id = issuance.TokenRequest(
            (good.truncated_token_key_id + 1) % 256, good.blinded_msg
        )
        type1 = b"\x00\x01" + good.encode()[2:]
        # blinded_msg >= n (found by HTTP fuzzing: this used to reach BlindSign and be a 500).
        too_big = issuance.TokenRequest(
            good.truncated_token_key_id, b"\xff" * len(good.blinded_msg)
        )
        cases = [
            (good.encode()[:-1], SINGLE, key, 400),  # truncated
            (good.encode() + b"\x00", SINGLE, key, 413),  # longer than a request
            (type1, SINGLE, key, 400),  # wrong token type
            (wrong_key_id.encode(), SINGLE, key, 400),  # unknown key id
            (too_big.encode(), SINGLE, key, 400),  # representative out of range
            (batched.encode_batch_request([too_big, good]), batched.REQUEST_MEDIA_TYPE, key, 400),
            (b"", SINGLE, key, 400),
            (good.encode(), "application/json", key, 415),
            (good.encode(), SINGLE, None, 401),
            (good.encode(), SINGLE, "opcc_not-a-key", 401),
            (b"\x00" * 10_000, SINGLE, key, 413),
            (b"\x80" + b"\x00" * 3, batched.REQUEST_MEDIA_TYPE, key, 400),
        ]
        for body, ctype, k, expected in cases:
            status, resp, headers = await post(s, issuer.url, body, ctype, k)
            assert status == expected, (body[:8], ctype, status, resp)
            assert headers["Content-Type"] == "application/problem+json"
            problem = json.loads(resp)
            assert problem["status"] == expected and problem["title"]
            if k:
                assert k not in resp.decode()
        async with s.get(issuer.url + "/token-request") as r:
            assert r.status == 405
        # None of the above used the single token of quota.
        assert (await post(s, issuer.url, good.encode(), SINGLE, key))[0] == 200
        assert issuer.proc.alive()


async def test_revoked_account_is_refused(issuer: Issuer) -> None:
    key = issuer.add_account("dave", quota=5)
    assert issuer.admin("account", "revoke", "dave").returncode == 0
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, issuer.url)).select_key().token_key
        ((req, _),) = make_requests(tk, 1)
        assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 401
    assert issuer.admin("account", "revoke", "nobody").returncode == 1


async def test_restart_keeps_quota_and_keys(issuer: Issuer, tmp_path: Path) -> None:
    key = issuer.add_account("erin", quota=2)
    async with aiohttp.ClientSession() as s:
        before = await fetch_directory(s, issuer.url)
        tk = before.select_key().token_key
        for req, _ in make_requests(tk, 2):
            assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 200
    stop(issuer)
    again = start_issuer(issuer.state, issuer.backend_args, tmp_path / "again.log")
    try:
        async with aiohttp.ClientSession() as s:
            after = await fetch_directory(s, again.url)
            assert after == before
            ((req, _),) = make_requests(tk, 1)
            assert (await post(s, again.url, req.encode(), SINGLE, key))[0] == 429
    finally:
        stop(again)


async def test_rotation_publishes_next_key_while_old_key_keeps_issuing(issuer: Issuer) -> None:
    key = issuer.add_account("frank", quota=10)
    async with aiohttp.ClientSession() as s:
        old = (await fetch_directory(s, issuer.url)).select_key()
        rotated = issuer.admin("keys", "rotate", "--not-before-in", "3600")
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        directory = await fetch_directory(s, issuer.url)
        assert len(directory.token_keys) == 2
        upcoming = directory.token_keys[0]
        assert upcoming.not_before is not None and upcoming.not_before > time.time() + 3000
        assert directory.select_key() == old  # clients keep using the key in force
        ((req, _),) = make_requests(upcoming.token_key, 1)
        assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 400
        ((req, st),) = make_requests(old.token_key, 1)
        status, body, _ = await post(s, issuer.url, req.encode(), SINGLE, key)
        assert status == 200
        issuance.verify_token(old.token_key, issuance.finalize_token(st, body))
    keys_dir = issuer.state / "keys"
    pems = list(keys_dir.glob("*.pem"))
    assert len(pems) == 2
    for pem in pems:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    listed = [json.loads(line) for line in issuer.admin("keys", "list").stdout.splitlines()]
    assert sorted(k["state"] for k in listed) == ["issuing", "upcoming"]


async def test_metrics_and_logs_carry_no_secrets(issuer: Issuer) -> None:
    key = issuer.add_account("gina", quota=3)
    async with aiohttp.ClientSession() as s:
        tk = (await fetch_directory(s, issuer.url)).select_key().token_key
        ((req, _),) = make_requests(tk, 1)
        assert (await post(s, issuer.url, req.encode(), SINGLE, key))[0] == 200
        await post(s, issuer.url, req.encode(), SINGLE, key + "x")
        async with s.get(issuer.url + "/metrics") as r:
            metrics = await r.text()
    assert 'openpcc_issuer_issuance_requests_total{outcome="ok"} 1' in metrics
    assert "openpcc_issuer_tokens_issued_total 1" in metrics
    log = issuer.log.read_text()
    for secret in (key, "gina", "127.0.0.1:", req.blinded_msg.hex()[:32]):
        assert secret not in metrics
        if secret != "127.0.0.1:":
            assert secret not in log
    assert '127.0.0.1"' not in log  # no access log lines


# -- CORS (opt-in: --allow-origin) ---------------------------------------------------------

PAGE = "https://app.example"
DIRECTORY = "/.well-known/private-token-issuer-directory"


def cors_of(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


async def answers_for(
    s: aiohttp.ClientSession, url: str, origin: str, key: str
) -> dict[str, tuple[int, dict[str, str], str | None]]:
    """What a page from ``origin`` gets for each kind of answer: status, CORS, Vary."""
    tk = (await fetch_directory(s, url)).select_key().token_key
    ((req, _),) = make_requests(tk, 1)
    o = {"Origin": origin}
    auth = {**o, "Authorization": f"Bearer {key}"}
    calls: dict[str, tuple[str, str, dict[str, str], bytes]] = {
        "preflight": (
            "OPTIONS",
            "/token-request",
            {
                **o,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
            b"",
        ),
        "directory": ("GET", DIRECTORY, o, b""),
        "ok": ("POST", "/token-request", {**auth, "Content-Type": SINGLE}, req.encode()),
        "429": ("POST", "/token-request", {**auth, "Content-Type": SINGLE}, req.encode()),
        "401": ("POST", "/token-request", {**o, "Content-Type": SINGLE}, req.encode()),
        "415": ("POST", "/token-request", {**auth, "Content-Type": "text/plain"}, b"x"),
        "400": ("POST", "/token-request", {**auth, "Content-Type": SINGLE}, b"\x00\x02"),
        "413": ("POST", "/token-request", {**auth, "Content-Type": SINGLE}, bytes(4096)),
        "405": ("GET", "/token-request", o, b""),
        "healthz": ("GET", "/healthz", o, b""),
    }
    out = {}
    for name, (method, path, headers, body) in calls.items():
        async with s.request(method, url + path, headers=headers, data=body) as r:
            await r.read()
            out[name] = (r.status, cors_of(r.headers), r.headers.get("Vary"))
    return out


STATUSES = {"preflight": 204, "directory": 200, "ok": 200, "429": 429, "401": 401}
STATUSES |= {"415": 415, "400": 400, "413": 413, "405": 405, "healthz": 200}


async def test_cors_echoes_listed_origins_on_every_answer(tmp_path: Path) -> None:
    allow = ["--allow-origin", PAGE, "--allow-origin", "http://127.0.0.1:5173"]
    iss = start_issuer(tmp_path / "state", [], tmp_path / "issuer.log", allow)
    try:
        key = iss.add_account("webpage", quota=1)
        async with aiohttp.ClientSession() as s:
            mine = await answers_for(s, iss.url, PAGE, key)
            other = await answers_for(s, iss.url, "https://other.example", key)
    finally:
        stop(iss)
    assert {k: v[0] for k, v in mine.items()} == STATUSES
    for name, (_, cors, vary) in mine.items():
        if name == "healthz":
            assert cors == {} and vary is None
            continue
        assert cors["access-control-allow-origin"] == PAGE, name
        assert cors["access-control-expose-headers"] == "Retry-After"
        assert "access-control-allow-credentials" not in cors
        assert vary == "Origin"
    assert mine["preflight"][1] == {
        "access-control-allow-origin": PAGE,
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "authorization, content-type, accept",
        "access-control-max-age": "86400",
        "access-control-expose-headers": "Retry-After",
    }
    # Another origin: the same answers (quota is spent: 429), none readable by its page.
    assert {k: v[0] for k, v in other.items()} == STATUSES | {"ok": 429}
    for name, (_, cors, vary) in other.items():
        assert "access-control-allow-origin" not in cors, name
        assert "access-control-expose-headers" not in cors
        assert vary == (None if name == "healthz" else "Origin")


async def test_cors_any_origin_from_the_environment(tmp_path: Path) -> None:
    env = {"OPENPCC_ISSUER_ALLOW_ORIGIN": "*"}
    iss = start_issuer(tmp_path / "state", [], tmp_path / "issuer.log", env=env)
    try:
        key = iss.add_account("anyone", quota=1)
        async with aiohttp.ClientSession() as s:
            got = await answers_for(s, iss.url, PAGE, key)
    finally:
        stop(iss)
    assert {k: v[0] for k, v in got.items()} == STATUSES
    for name, (_, cors, vary) in got.items():
        assert cors.get("access-control-allow-origin") == (None if name == "healthz" else "*")
        assert vary is None


async def test_no_cors_by_default(tmp_path: Path) -> None:
    iss = start_issuer(tmp_path / "state", [], tmp_path / "issuer.log")
    try:
        key = iss.add_account("plain", quota=1)
        async with aiohttp.ClientSession() as s:
            got = await answers_for(s, iss.url, PAGE, key)
    finally:
        stop(iss)
    # OPTIONS is the 405 of any unrouted method; nothing carries CORS or Vary.
    assert {k: v[0] for k, v in got.items()} == STATUSES | {"preflight": 405}
    assert all(cors == {} and vary is None for _, cors, vary in got.values())


def test_bad_allow_origin_is_refused(tmp_path: Path) -> None:
    out = cli("issuer", "serve", "--state", str(tmp_path), "--allow-origin", "app.example")
    assert out.returncode == 2 and "bad origin" in out.stderr


def test_account_cli(tmp_path: Path) -> None:
    state = ["--state", str(tmp_path)]
    out = cli("issuer", "account", "add", "h1", "--quota", "7", "--per", "60", *state)
    assert out.returncode == 0
    api_key = out.stdout.strip().splitlines()[-1]
    assert api_key.startswith("opcc_") and len(api_key) > 40
    assert cli("issuer", "account", "add", "h1", "--quota", "1", *state).returncode == 1
    assert cli("issuer", "account", "set-quota", "h1", "--quota", "9", *state).returncode == 0
    rows = [json.loads(x) for x in cli("issuer", "account", "list", *state).stdout.splitlines()]
    assert rows == [
        {
            "name": "h1",
            "quota": 9,
            "per_seconds": 86400,
            "revoked": False,
            "created_at": rows[0]["created_at"],
        }
    ]
    # The key itself is stored only as a hash.
    assert api_key.encode() not in (tmp_path / "issuer.sqlite3").read_bytes()


def test_key_rotation_refuses_a_lifetime_gateways_cannot_cover(tmp_path: Path) -> None:
    """Seen in an attack: `keys rotate --lifetime` took 400 days, longer than any gateway
    remembers spent tokens. The key's lifetime plus its lead must fit --max-key-lifetime
    (31 days by default, below the gateway's default 32-day --spent-ttl)."""
    state = ["--state", str(tmp_path / "state")]
    too_long = cli("issuer", "keys", "rotate", "--lifetime", str(400 * 86400), *state)
    assert too_long.returncode == 2
    assert "exceeds --max-key-lifetime" in too_long.stderr and "Traceback" not in too_long.stderr
    assert cli("issuer", "keys", "rotate", *state).returncode == 0  # 30 days + 1 h: fits
    edge = ["--lifetime", str(31 * 86400 - 3600)]
    assert cli("issuer", "keys", "rotate", *edge, *state).returncode == 0
    more = cli("issuer", "keys", "rotate", "--lifetime", str(400 * 86400),
               "--max-key-lifetime", str(401 * 86400), *state)  # fmt: skip
    assert more.returncode == 0  # an operator whose gateways keep spent tokens longer
    env_cap = cli("issuer", "keys", "rotate", *state,
                  env={"OPENPCC_ISSUER_MAX_KEY_LIFETIME": "86400"})  # fmt: skip
    assert env_cap.returncode == 2

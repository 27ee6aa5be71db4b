"""Two gateways and two issuers as separate processes sharing one Redis, each behind
its own relay, two nodes registered with one gateway each, concurrent clients.

What replication must not break (DESIGN.md §5): any request can land on any replica,
a node registered with one replica is served by all of them, a quota is one quota
however many issuers take from it, and a token spent at one gateway is spent at all
of them. The key folders are shared by the replicas (one
state dir each for issuers and gateways), as the Kubernetes Secrets are.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from openpcc.client.errors import TokenRejectedError
from tests.conftest import require_module
from tests.ops_support import Stack, chat, get

require_module("redis")

CLIENTS_PER_SIDE = 4
CHATS_PER_CLIENT = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("replicas")
    # Its own Redis database: other tests share the session's redis-server.
    redis = redis_url.rsplit("/", 1)[0] + "/7"
    stack = Stack(base)
    try:
        stack.simulated_tee()
        issuer_state, gateway_state = base / "issuer", base / "gateway"
        # The first replica of each creates the shared key; the second loads it.
        i1 = stack.issuer("issuer1", issuer_state, redis)
        i2 = stack.issuer("issuer2", issuer_state, redis)
        ga = stack.gateway("gatewayA", gateway_state, i1.url, redis)
        gb = stack.gateway("gatewayB", gateway_state, i2.url, redis)
        ra = stack.relay("relayA", ga.url)
        rb = stack.relay("relayB", gb.url)
        engine = stack.engine()
        # Each node registers with one replica only: the shared registry in Redis
        # brings it to the other (docs/gateway.md, "Shared node registry").
        stack.node("node1", engine.url, [ga.internal])
        stack.node("node2", engine.url, [gb.internal])
        for g in ("gatewayA", "gatewayB"):
            stack.wait(g, "/readyz")
        policy = stack.release(ga.url, i1.url)
        yield {"stack": stack, "redis": redis, "policy": policy,
               "issuers": [i1, i2], "gateways": [ga, gb], "relays": [ra, rb]}  # fmt: skip
    finally:
        stack.stop()


def _account(cluster: dict, quota: int) -> Path:
    stack: Stack = cluster["stack"]
    name = f"acct-{uuid.uuid4().hex[:8]}"
    return stack.account(stack.dir / "issuer", name, quota, cluster["redis"])


def test_each_replica_serves_the_node_registered_with_the_other(cluster: dict) -> None:
    for g in cluster["gateways"]:
        deadline = time.monotonic() + 15
        while 'nodes{health="healthy"} 2' not in get(g.url + "/metrics")[1].decode():
            assert time.monotonic() < deadline, f"{g.name} does not list both nodes"
            time.sleep(0.1)


def test_replicas_share_keys(cluster: dict) -> None:
    ga, gb = cluster["gateways"]
    i1, i2 = cluster["issuers"]
    assert get(ga.url + "/.well-known/ohttp-gateway") == get(gb.url + "/.well-known/ohttp-gateway")
    well_known = "/.well-known/private-token-issuer-directory"
    assert get(i1.url + well_known) == get(i2.url + well_known)


async def test_concurrent_clients_through_both_replicas(cluster: dict) -> None:
    stack: Stack = cluster["stack"]
    key = _account(cluster, 1000)
    configs = []
    for side in range(2):
        relay, issuer = cluster["relays"][side], cluster["issuers"][side]
        for i in range(CLIENTS_PER_SIDE):
            name = f"c{side}-{i}-{uuid.uuid4().hex[:6]}"
            configs.append(stack.client_config(name, relay.url, issuer.url, key, cluster["policy"]))

    async def one_client(config: Path) -> list[str]:
        return [await chat(config, f"hello {n}") for n in range(CHATS_PER_CLIENT)]

    answers = await asyncio.gather(*(one_client(c) for c in configs))
    assert len(answers) == 2 * CLIENTS_PER_SIDE
    assert all(a == "Hello from the fake engine." for per in answers for a in per)
    # Both gateways and both issuers carried traffic.
    for svc in cluster["gateways"]:
        assert 'route="ohttp"' in get(svc.url + "/metrics")[1].decode()
    for svc in cluster["issuers"]:
        assert 'outcome="ok"' in get(svc.url + "/metrics")[1].decode()


async def test_quota_is_shared_exactly_across_issuers(cluster: dict) -> None:
    from openpcc.client.wallet import QuotaExceededError, TokenWallet

    stack: Stack = cluster["stack"]
    quota, batch, attempts = 40, 5, 14  # room for exactly 8 batches, 14 race for it
    api_key = _account(cluster, quota).read_text().strip()
    wallets = [
        TokenWallet(
            cluster["issuers"][n % 2].url,
            api_key,
            stack.dir / f"quota-wallet-{uuid.uuid4().hex[:8]}.json",
            batch_size=batch,
            low_water=0,
        )
        for n in range(attempts)
    ]

    async def attempt(w: TokenWallet) -> int:
        try:
            return await w.refill(batch)
        except QuotaExceededError:
            return 0

    try:
        got = await asyncio.gather(*(attempt(w) for w in wallets))
    finally:
        for w in wallets:
            await w.aclose()
    assert sum(got) == quota
    assert sorted(got) == [0] * (attempts - quota // batch) + [batch] * (quota // batch)
    # Issued at both replicas, not all at one.
    assert {n % 2 for n, g in enumerate(got) if g} == {0, 1}


class _OneToken:
    """A token source that hands out the same token every time: a replay attempt."""

    def __init__(self, token: object) -> None:
        self.token = token

    async def take(self) -> object:
        return self.token


async def test_token_spent_at_one_gateway_is_refused_at_the_other(cluster: dict) -> None:
    from datetime import UTC, datetime

    from openpcc.attestation.policy import TrustPolicy
    from openpcc.client.attest import BundleVerifier
    from openpcc.client.client import Client
    from openpcc.client.wallet import TokenWallet

    stack: Stack = cluster["stack"]
    policy_path, pub_path = cluster["policy"]
    policy = TrustPolicy.from_signed(
        policy_path.read_bytes(), [pub_path.read_bytes()], datetime.now(UTC)
    )
    api_key = _account(cluster, 10).read_text().strip()
    wallet = TokenWallet(
        cluster["issuers"][0].url, api_key, stack.dir / "replay-wallet.json", batch_size=1
    )
    token = await wallet.take()
    await wallet.aclose()
    replay = _OneToken(token)
    ra, rb = cluster["relays"]
    messages = [{"role": "user", "content": "once"}]
    async with Client(ra.url, tokens=replay, verifier=BundleVerifier(policy), trust=policy) as a:
        first = await a.chat_completions("fake-model", messages, max_tokens=4)
    assert first["choices"][0]["message"]["content"]
    async with Client(rb.url, tokens=replay, verifier=BundleVerifier(policy), trust=policy) as b:
        with pytest.raises(TokenRejectedError):
            await b.chat_completions("fake-model", messages, max_tokens=4)
    # And at the first gateway again.
    async with Client(ra.url, tokens=replay, verifier=BundleVerifier(policy), trust=policy) as a:
        with pytest.raises(TokenRejectedError):
            await a.chat_completions("fake-model", messages, max_tokens=4)
    # B refused it as spent (the shared Redis set), not as invalid or unknown.
    metrics = get(cluster["gateways"][1].url + "/metrics")[1].decode()
    assert 'openpcc_gateway_redemptions_total{outcome="spent"}' in metrics

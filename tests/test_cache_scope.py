"""Conversation cache scopes, affinity and load-aware routing as pure functions (issue 17).

The end-to-end halves live with the stack: tests/test_private_path.py (salt and node per
conversation, per client; the party views), tests/test_openai_sdk.py (the drop-in),
tests/test_node.py (the node's checks), tests/test_vllm_prefix_cache.py (real vLLM).
"""

from __future__ import annotations

import json
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.forward import route
from openpcc.client.cachescope import (
    CACHE_SECRET_LIFETIME,
    Affinity,
    CacheSecret,
    canonical_json,
    conversation_prefix,
    derive_salt,
)
from openpcc.client.client import Client, VerifiedNode
from openpcc.errors import DecodeError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "cache_scope_v1.json").read_text())


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: str(c["scope"]))
def test_the_vectors(case: dict) -> None:
    secret = bytes.fromhex(VECTORS["secret"])
    canon = canonical_json(
        {"messages": conversation_prefix(case["messages"]), "model": case["model"]}
    )
    assert canon.hex() == case["canonical_hex"]
    salt = derive_salt(secret, case["scope"], model=case["model"], messages=case["messages"])
    assert (salt.hex() if salt else None) == case["salt"]


def test_one_conversation_one_salt_others_differ() -> None:
    secret, other = bytes(32), bytes([1]) * 32
    turn1 = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and?"}]

    def salt(msgs: list, key: bytes = secret, model: str = "m") -> bytes | None:
        return derive_salt(key, "conversation", model=model, messages=msgs)

    assert salt(turn1) == salt(turn2)
    assert salt(turn1) != salt([turn1[0], {"role": "user", "content": "hello!"}])
    assert salt(turn1) != salt(turn1, model="n")
    assert salt(turn1) != salt(turn1, key=other)  # another client
    named = derive_salt(secret, "agent-7", model="m", messages=turn1)
    assert named == derive_salt(secret, "agent-7", model="x", messages=[])  # shared on purpose
    assert named not in (salt(turn1), derive_salt(other, "agent-7"))
    assert derive_salt(secret, None, model="m", messages=turn1) is None
    assert derive_salt(secret, "conversation", model="m", messages=None) is None


def test_the_cache_secret_is_kept_0600_and_replaced_after_a_week(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    path = tmp_path / "cache-secret.json"
    cs = CacheSecret(path, clock=lambda: now[0])
    first = cs.current()
    assert len(first) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CacheSecret(path, clock=lambda: now[0]).current() == first  # a restart keeps it
    now[0] += CACHE_SECRET_LIFETIME - 1
    assert CacheSecret(path, clock=lambda: now[0]).current() == first
    now[0] += 1
    fresh = CacheSecret(path, clock=lambda: now[0]).current()
    assert fresh != first and json.loads(path.read_text())["secret"] == fresh.hex()
    path.write_text("{not json")
    with pytest.raises(DecodeError):
        CacheSecret(path).current()


def test_affinity_memory_is_bounded_least_recently_used() -> None:
    aff = Affinity(entries=2)
    aff.put(b"a", b"n1")
    aff.put(b"b", b"n2")
    assert aff.get(b"a") == b"n1"  # a is now the most recent
    aff.put(b"c", b"n3")
    assert aff.get(b"b") is None and aff.get(b"a") == b"n1" and len(aff) == 2


@dataclass(frozen=True)
class Reg:
    node_id: bytes


def test_route_honours_the_first_candidate_until_it_is_overloaded() -> None:
    a, b, c = Reg(b"a"), Reg(b"b"), Reg(b"c")
    load = {b"a": 5, b"b": 1, b"c": 3}
    rng = random.Random(0)
    # Within the slack (5 <= 1 + 4): the client's first choice, then least-loaded.
    assert route([a, b, c], b"a", load.__getitem__, 4, rng) == [a, b, c]  # type: ignore[list-item,arg-type]
    # Beyond it: least-loaded first; the first choice takes its place by load.
    load[b"a"] = 6
    assert route([a, b, c], b"a", load.__getitem__, 4, rng) == [b, c, a]  # type: ignore[list-item,arg-type]
    # No usable first choice (not a candidate, or unhealthy so not in usable): by load.
    assert route([b, c], b"a", load.__getitem__, 4, rng) == [b, c]  # type: ignore[list-item,arg-type]
    # Slack 0: pure least-loaded unless the first choice is among the least loaded.
    assert route([a, b, c], b"c", load.__getitem__, 0, rng) == [b, c, a]  # type: ignore[list-item,arg-type]
    # Ties are broken at random, not by position.
    even = {b"a": 0, b"b": 0, b"c": 0}
    firsts = {route([a, b, c], None, even.__getitem__, 4, random.Random(i))[0].node_id
              for i in range(50)}  # type: ignore[list-item,arg-type]  # fmt: skip
    assert firsts == {b"a", b"b", b"c"}


def test_the_client_lists_the_conversation_node_first() -> None:
    nodes = [VerifiedNode(bytes([i]) * 16, bytes(32), ("m",), 1e12) for i in range(6)]
    client = Client("http://relay.invalid", tokens=None, verifier=None, k=3,  # type: ignore[arg-type]
                    rng=random.Random(1))  # fmt: skip
    salt = bytes(32)
    assert client._affinity is not None
    client._affinity.put(salt, nodes[4].node_id)
    for _ in range(20):
        chosen = client._candidates(nodes, salt)
        assert chosen[0] is nodes[4] and len(set(map(id, chosen))) == 3
    # Another conversation, or the node gone from the verified list: random, as before.
    firsts = {client._candidates(nodes, bytes([9]) * 32)[0].node_id for _ in range(60)}
    assert len(firsts) > 3
    assert all(c is not nodes[4] for c in client._candidates(nodes[:4], salt))
    off = Client("http://relay.invalid", tokens=None, verifier=None, affinity=False)  # type: ignore[arg-type]
    assert off._affinity is None


def test_the_client_seals_to_x_wing_nodes_whenever_there_are_any() -> None:
    """Issue 20: one KEM per envelope, X-Wing (v2) whenever a node attests it; X25519
    (v1) only when none does. The conversation's node yields to that rule."""
    pq = bytes(1216)
    legacy = [VerifiedNode(bytes([i]) * 16, bytes(32), ("m",), 1e12) for i in range(4)]
    xwing = [VerifiedNode(bytes([9 + i]) * 16, bytes(32), ("m",), 1e12, pq_public_key=pq)
             for i in range(2)]  # fmt: skip
    client = Client("http://relay.invalid", tokens=None, verifier=None, k=3,  # type: ignore[arg-type]
                    rng=random.Random(1))  # fmt: skip
    assert client._affinity is not None
    client._affinity.put(bytes(32), legacy[0].node_id)
    for _ in range(20):
        chosen = client._candidates(legacy + xwing, bytes(32))
        assert sorted(n.node_id for n in chosen) == sorted(n.node_id for n in xwing)
        assert {n.sealing_key for n in chosen} == {pq}
    chosen = client._candidates(legacy, None)
    assert len(chosen) == 3 and {n.sealing_key for n in chosen} == {bytes(32)}

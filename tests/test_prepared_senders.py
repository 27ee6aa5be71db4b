"""HPKE sender setups prepared off the request path (openpcc/client/prepared.py)."""

from __future__ import annotations

import asyncio

import pytest

from openpcc.client.prepared import FirstBytePending, PreparedSenders
from openpcc.errors import EncodeError
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestReceiver

REQUEST = bhttp.encode_request(bhttp.Request(b"POST", b"https", b"n", b"/x", [], b"hello"))


def _nodes(kem: int, n: int = 3) -> tuple[list[sealed.NodeKey], list[hpke.KeyPair]]:
    pairs = [hpke.generate_key_pair(kem_id=kem) for _ in range(n)]
    return [sealed.NodeKey(bytes([i + 1]) * 16, p.public_key) for i, p in enumerate(pairs)], pairs


@pytest.mark.parametrize("kem", [hpke.KEM_DHKEM_X25519_HKDF_SHA256, hpke.KEM_XWING])
def test_prepared_setups_are_used_once_and_what_they_seal_opens(kem: int) -> None:
    nodes, pairs = _nodes(kem)
    gw = hpke.generate_key_pair(kem_id=kem)
    config = ohttp.KeyConfig(7, kem, gw.public_key, (ohttp.SymmetricSuite(1, 1),))

    async def go() -> None:
        pool = PreparedSenders(depth=2)
        pool.refill(config, nodes)
        assert pool._task is not None
        await pool._task
        envelopes, encs = [], set()
        for _ in range(3):  # two prepared per key, then a miss set up on the spot
            senders = pool.wraps(nodes)
            encs.update(s.enc for s in senders)
            envelopes.append(sealed.seal_request(nodes, "m", REQUEST, senders=senders).envelope)
            outer = pool.outer(config)
            encs.add(outer.hpke_context.enc)
            wire = outer.seal_chunk(b"inner", final=True)
            receiver = ChunkedRequestReceiver(
                {7: hpke.load_private_key(gw.private_key, kem_id=kem)}
            )
            got = receiver.receive_data(wire) + receiver.end_of_input()
            assert b"".join(got) == b"inner"
        assert (pool.hits, pool.misses) == (2 * 4, 4)
        assert len(encs) == 3 * 4  # a fresh encapsulation every time: none reused
        for env in envelopes:
            for node, pair in zip(nodes, pairs, strict=True):
                opened = sealed.open_request(env, node.node_id, pair.private_key, pair.public_key)
                assert bhttp.decode_request(opened.bhttp_request).content == b"hello"
        # A used setup is refused rather than sealed with again.
        used = pool.wraps(nodes[:1])
        sealed.seal_request(nodes[:1], "m", REQUEST, senders=used)
        with pytest.raises(EncodeError, match="unused"):
            sealed.seal_request(nodes[:1], "m", REQUEST, senders=used)
        await pool.aclose()

    asyncio.run(go())


def test_refill_drops_setups_for_keys_no_longer_current() -> None:
    nodes, _ = _nodes(hpke.KEM_DHKEM_X25519_HKDF_SHA256, 2)
    gw = hpke.generate_key_pair()
    config = ohttp.KeyConfig(1, 0x0020, gw.public_key, (ohttp.SymmetricSuite(1, 1),))
    rotated = ohttp.KeyConfig(
        2, 0x0020, hpke.generate_key_pair().public_key, config.symmetric_suites
    )

    async def go() -> None:
        pool = PreparedSenders(depth=1)
        pool.refill(config, nodes)
        assert pool._task is not None
        await pool._task
        pool.refill(rotated, nodes[1:])  # the gateway rotated; node 0 left the directory
        assert pool._task is not None
        await pool._task
        pool.outer(config)
        pool.wraps(nodes[:1])
        assert pool.hits == 0 and pool.misses == 2  # nothing kept for the old keys
        pool.outer(rotated)
        pool.wraps(nodes[1:])
        assert pool.hits == 2
        await pool.aclose()

    asyncio.run(go())


def test_a_prepared_setup_of_the_other_kem_is_refused() -> None:
    x, _ = _nodes(hpke.KEM_DHKEM_X25519_HKDF_SHA256, 1)
    w, _ = _nodes(hpke.KEM_XWING, 1)
    with pytest.raises(EncodeError, match="suite"):
        sealed.seal_request(x, "m", REQUEST, senders=[sealed.wrap_sender(w[0])])


def test_no_setup_is_made_while_a_request_awaits_its_first_byte_and_steps_yield() -> None:
    """Issue 19: refills run on the loop one setup per step, none while a request is
    between its start and its first byte (its sealing and wait never share the
    interpreter with a refill)."""
    nodes, _ = _nodes(hpke.KEM_DHKEM_X25519_HKDF_SHA256, 3)
    gw = hpke.generate_key_pair()
    config = ohttp.KeyConfig(1, 0x0020, gw.public_key, (ohttp.SymmetricSuite(1, 1),))

    async def go() -> None:
        pool = PreparedSenders(depth=2)
        with FirstBytePending(pool) as pending, FirstBytePending(pool):
            pool.refill(config, nodes)
            await asyncio.sleep(0.05)
            assert not pool._outer and not pool._wraps  # two requests wait: nothing made
            pending.release()
            pending.release()  # idempotent: the other request still holds it
            await asyncio.sleep(0.05)
            assert not pool._outer and not pool._wraps
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            assert pool._task is not None
            while not pool._task.done():
                ticks += 1
                await asyncio.sleep(0)

        assert pool._task is not None
        await asyncio.gather(pool._task, ticker())
        made = len(pool._outer[pool._outer_key(config)]) + sum(map(len, pool._wraps.values()))
        assert made == 2 + 2 * 3
        assert ticks >= made  # the loop ran other work between every two setups
        assert FirstBytePending(None).__enter__().release() is None  # no pool: holds nothing
        await pool.aclose()

    asyncio.run(go())

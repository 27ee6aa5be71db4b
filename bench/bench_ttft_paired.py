"""The private path's own added time to first token, paired, and what X-Wing adds.

The whole local stack (issuer, relay, gateway, two nodes) on the fake engine, which
answers at once, so what is timed is OpenPCC's own work: sealing, tokens, both
encryption layers, every hop. One request at a time, 20 ms apart (a user's turns), in
rounds of five arms in random order, so slow spells of this shared machine hit every
arm alike; each delta is the median of per-round differences:

* **direct**: the same streaming chat request straight to the engine (the baseline);
* **xwing**: the private path as shipped: X-Wing on both layers (OHTTP to the gateway,
  sealed request v2 to the nodes), the client's HPKE sender setups prepared off the
  request path (openpcc/client/prepared.py);
* **x25519**: the same client on X25519 for both layers (its manifest, re-signed with
  the stack's release key, pins only the gateway's X25519 config, and it seals v1 to
  the same nodes' X25519 keys);
* **xwing_unprepared**, **x25519_unprepared**: both without the prepared setups.

``cpu_ttft_added_ms_p50`` = xwing - direct; ``pq_ttft_added_ms_p50_delta`` = xwing -
x25519 (issue 20). Also, per layer on one core with keys parsed as each party holds
them: the client's sealing of a 3-candidate envelope and the node's opening of it (v2
vs v1), the outer chunked OHTTP request both ways, the sizes, and where an X-Wing
decapsulation's time goes.

``python -m bench bench_ttft_paired`` writes ``bench/results/ttft_paired.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench._harness import per_call_seconds
from bench.fake_stack import MODEL, fake_stack
from openpcc.client.profile import client_from_config
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender

PAIRS = int(os.environ.get("OPENPCC_BENCH_TTFT_PAIRS", "150"))
WARMUP = 10
THINK = float(os.environ.get("OPENPCC_BENCH_TTFT_THINK", "0.02"))  # seconds between requests
KEMS = {"x25519": hpke.KEM_DHKEM_X25519_HKDF_SHA256, "xwing": hpke.KEM_XWING}


def _x25519_profile(state: Path, config_path: Path) -> Path:
    """The stack's client profile, but under a manifest (re-signed with the stack's
    release key) pinning only the gateway's X25519 config: the outer layer on X25519."""
    from openpcc.attestation.policy import SignedManifest, load_release_private_key

    manifest = json.loads((state / "release" / "manifest.json").read_text())
    manifest["ohttp_key_configs"] = [
        c
        for c in manifest["ohttp_key_configs"]
        if ohttp.KeyConfig.parse(bytes.fromhex(c)).kem_id == KEMS["x25519"]
    ]
    key = load_release_private_key((state / "release" / "release-key.pem").read_bytes())
    out = state / "bench-x25519"
    out.mkdir(exist_ok=True)
    signed = out / "trust-policy.json"
    signed.write_bytes(SignedManifest.sign(json.dumps(manifest).encode(), key).encode())
    cfg = json.loads(config_path.read_text())
    cfg.update(policy=str(signed), wallet=str(out / "wallet.json"), manifest_url="off")
    profile = out / "client.json"
    profile.write_text(json.dumps(cfg))
    return profile


def _x25519_only(verifier: Any) -> Any:
    """The same verdicts without the nodes' X-Wing keys: the client then seals v1."""

    def verify(entry: dict[str, Any], now: Any) -> Any:
        return dataclasses.replace(verifier(entry, now), pq_public_key=None)

    return verify


async def _direct_ttft(session: aiohttp.ClientSession, url: str) -> float:
    """The same request straight to the engine, with the per-request cache salt the
    node would add (equal engine work)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "stream": True,
        "cache_salt": secrets.token_hex(32),
    }
    t0 = time.perf_counter()
    first = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for piece in r.content.iter_any():
            if first is None and b'"content"' in piece:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no content")
    return first


async def _ttft(client: Any) -> float:
    """Seconds to the first content delta (the stream is read to its end)."""
    t0 = time.perf_counter()
    first = None
    async for chunk in client.chat_completions_stream(
        MODEL, [{"role": "user", "content": "Hello"}], max_tokens=8
    ):
        if first is None and any(
            (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
        ):
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no content")
    return first


async def _paired(config_path: Path, state: Path, engine_url: str) -> dict[str, Any]:
    """Rounds of five requests in random order (see the module docstring)."""
    arms: dict[str, Any] = {}
    session = aiohttp.ClientSession()
    closers: list[Any] = [session.close]
    for prepare in (True, False):
        for kem in ("xwing", "x25519"):
            profile = config_path if kem == "xwing" else _x25519_profile(state, config_path)
            client, wallet, _, client_session = client_from_config(profile)
            if kem == "x25519":
                client._verifier = _x25519_only(client._verifier)
            if not prepare:
                client._prepared = None
            arms[f"{kem}{'' if prepare else '_unprepared'}"] = client
            closers += [client.aclose, wallet.aclose]
            if client_session is not None:
                closers.append(client_session.close)
    rng = random.Random(20)
    samples: dict[str, list[float]] = {name: [] for name in (*arms, "direct")}
    try:
        for name, c in arms.items():
            want = KEMS["x25519" if name.startswith("x25519") else "xwing"]
            assert (await c.key_config()).kem_id == want
            pq = [n.pq_public_key is not None for n in await c.verified_nodes()]
            assert all(pq) if want == KEMS["xwing"] else not any(pq)
        for i in range(WARMUP + PAIRS):
            order: list[tuple[str, Any]] = [*arms.items(), ("direct", None)]
            rng.shuffle(order)
            for name, c in order:
                t = await (_direct_ttft(session, engine_url) if c is None else _ttft(c))
                if i >= WARMUP:
                    samples[name].append(t * 1000)
                await asyncio.sleep(THINK)
    finally:
        for close in closers:
            await close()

    def delta(a: str, b: str) -> dict[str, Any]:
        d = [x - y for x, y in zip(samples[a], samples[b], strict=True)]
        q = statistics.quantiles(d, n=20)
        return {
            "p50_ms": round(statistics.median(d), 3),
            "p5_p95_ms": [round(q[0], 3), round(q[-1], 3)],
        }

    return {
        "pairs": PAIRS,
        "think_ms": THINK * 1000,
        "ttft_ms_p50": {k: round(statistics.median(v), 3) for k, v in samples.items()},
        "xwing_minus_direct": delta("xwing", "direct"),
        "x25519_minus_direct": delta("x25519", "direct"),
        "xwing_unprepared_minus_direct": delta("xwing_unprepared", "direct"),
        "xwing_minus_x25519": delta("xwing", "x25519"),
        "xwing_minus_x25519_unprepared": delta("xwing_unprepared", "x25519_unprepared"),
        "prepared_minus_unprepared_xwing": delta("xwing", "xwing_unprepared"),
        "prepared_minus_unprepared_x25519": delta("x25519", "x25519_unprepared"),
    }


def _chat_inner(envelope: bytes) -> bytes:
    return bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"gateway",
            b"/v1/infer",
            [
                (b"authorization", b'PrivateToken token="' + b"A" * 460 + b'"'),
                (b"content-type", sealed.REQUEST_MEDIA_TYPE.encode()),
            ],
            envelope,
        )
    )


def _layers(kem: int) -> dict[str, Any]:
    """µs per operation on one core, as each party holds its keys."""
    chat = bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"node",
            b"/v1/chat/completions",
            [(b"content-type", b"application/json")],
            b'{"model":"m","messages":[{"role":"user","content":"Hello"}],"stream":true}',
        )
    )
    pairs = [hpke.generate_key_pair(kem_id=kem) for _ in range(3)]
    nodes = [sealed.NodeKey(bytes([i]) * 16, p.public_key) for i, p in enumerate(pairs)]
    sk0 = hpke.load_private_key(pairs[0].private_key, kem_id=kem)
    envelope = sealed.seal_request(nodes, "m", chat).envelope
    gw = hpke.generate_key_pair(kem_id=kem)
    config = ohttp.KeyConfig(1, kem, gw.public_key, (ohttp.SymmetricSuite(1, 1),))
    keys = {1: hpke.load_private_key(gw.private_key, kem_id=kem)}
    inner = _chat_inner(envelope)
    wire = ChunkedRequestSender(config).seal_chunk(inner, final=True)

    def outer_open() -> None:
        r = ChunkedRequestReceiver(keys)
        r.receive_data(wire)
        r.end_of_input()

    header = sealed.parse_envelope_header(envelope)
    return {
        "inner_seal_3_candidates_us": per_call_seconds(
            lambda: sealed.seal_request(nodes, "m", chat)
        )
        * 1e6,
        "inner_open_us": per_call_seconds(
            lambda: sealed.open_request(envelope, nodes[0].node_id, sk0, pairs[0].public_key)
        )
        * 1e6,
        "outer_seal_us": per_call_seconds(
            lambda: ChunkedRequestSender(config).seal_chunk(inner, final=True)
        )
        * 1e6,
        "outer_open_us": per_call_seconds(outer_open) * 1e6,
        "envelope_header_bytes": header.length,
        "outer_request_bytes": len(wire),
    }


def _decap_split() -> dict[str, Any]:
    """Where an X-Wing receiver setup's time goes, by profiling pycryptodome's HPKE (its
    own functions, by name): the KEM proper (ML-KEM-768 decapsulation, X25519, the SHA3
    combiner) against RFC 9180's key schedule and the rest, which pycryptodome drives
    from Python (HMAC and SHA-256 objects per step). The KEM share is about what a
    native HPKE would leave of the decapsulation."""
    import cProfile
    import pstats

    kp = hpke.generate_key_pair(kem_id=KEMS["xwing"])
    sk = hpke.load_private_key(kp.private_key, kem_id=KEMS["xwing"])
    suite = hpke.Suite(kem_id=KEMS["xwing"])
    enc = hpke.setup_sender(kp.public_key, b"i", suite=suite).enc
    total = per_call_seconds(lambda: hpke.setup_receiver(sk, enc, b"i", suite=suite)) * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        hpke.setup_receiver(sk, enc, b"i", suite=suite)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def cum(fn: str, file_part: str) -> float:
        return sum(
            v[3]
            for (file, _, name), v in stats.items()
            if name == fn and file_part in file.replace("\\", "/")
        )

    whole = cum("setup_receiver", "openpcc/wire/hpke.py")
    kem = cum("_decaps", "PublicKey/Hybrid.py")
    schedule = cum("_key_schedule", "Protocol/HPKE.py")
    return {
        "setup_receiver_us": round(total, 1),
        "kem_share": round(kem / whole, 3),
        "key_schedule_share": round(schedule / whole, 3),
        "kem_us_estimate": round(total * kem / whole, 1),
    }


def run() -> dict[str, Any]:
    layers = {name: _layers(kem) for name, kem in KEMS.items()}
    split = _decap_split()
    for v in layers.values():
        for k in list(v):
            if k.endswith("_us"):
                v[k] = round(v[k], 1)
    with tempfile.TemporaryDirectory(prefix="bench-pq-") as tmp:
        state = Path(tmp)
        with fake_stack(state, nodes=2, quota=8 * (PAIRS + WARMUP) + 100) as fs:
            paired = asyncio.run(_paired(fs.stack.config_path, state, fs.engine_url))
    x, w = layers["x25519"], layers["xwing"]
    critical = {  # what lies on the request's path (the client seals 3 wraps)
        k: round(w[k] - x[k], 1)
        for k in ("inner_seal_3_candidates_us", "inner_open_us", "outer_seal_us", "outer_open_us")
    }
    return {
        "result_name": "ttft_paired",
        "layers": layers,
        "xwing_minus_x25519_us": critical,
        "xwing_minus_x25519_sum_ms": round(sum(critical.values()) / 1000, 3),
        "xwing_decap_split": split,
        "paired_ttft": paired,
        "summary": {
            "cpu_ttft_added_ms_p50": paired["xwing_minus_direct"]["p50_ms"],
            "pq_ttft_added_ms_p50_delta": paired["xwing_minus_x25519"]["p50_ms"],
            "pq_ttft_added_ms_p50_delta_unprepared": paired["xwing_minus_x25519_unprepared"][
                "p50_ms"
            ],
        },
    }


if __name__ == "__main__":
    result = run()
    out = Path(__file__).parent / "results" / "ttft_paired.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

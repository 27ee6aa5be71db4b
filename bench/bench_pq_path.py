"""What post-quantum X-Wing costs the private path: X-Wing vs X25519 on both layers.

Issue 20: the stack uses X-Wing (MLKEM768-X25519, HPKE KEM 0x647A) on the outer layer
(OHTTP to the gateway) and the inner one (sealed request v2 to the nodes). This
measures, in one run on one machine:

* **added TTFT, paired A/B**: the whole local stack on the fake engine (it answers at
  once, so the parties' own work is what is timed), one client on X-Wing for both
  layers and one on X25519 for both (its manifest pins only the gateway's X25519
  config and it seals v1 to the same nodes' X25519 keys), each with the HPKE sender
  setups prepared off the request path (openpcc/client/prepared.py, the default) and
  without; one request at a time, the four in random order per round, 20 ms apart;
  a delta is the median of per-round differences;
* **per layer**, one core, keys parsed as each party holds them: the client's sealing
  of a 3-candidate envelope and the node's opening of it (v2 vs v1), the outer
  encapsulation and decapsulation (chunked OHTTP, the chat request), and the sizes.

``python -m bench.bench_pq_path`` writes ``bench/results/pq_path.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._harness import per_call_seconds
from bench.fake_stack import MODEL, fake_stack
from openpcc.client.profile import client_from_config
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender

PAIRS = int(os.environ.get("OPENPCC_BENCH_PQ_PAIRS", "150"))
WARMUP = 10
THINK = float(os.environ.get("OPENPCC_BENCH_PQ_THINK", "0.02"))  # seconds between requests
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


async def _paired(config_path: Path, state: Path) -> dict[str, Any]:
    """Rounds of four requests in random order: X-Wing and X25519, each with the HPKE
    setups prepared off the request path (the default) and without; a short think time
    between requests, as between a user's turns, lets the preparation run."""
    arms: dict[str, Any] = {}
    closers: list[Any] = []
    for prepare in (True, False):
        for kem in ("xwing", "x25519"):
            profile = config_path if kem == "xwing" else _x25519_profile(state, config_path)
            client, wallet, _, _ = client_from_config(profile)
            if kem == "x25519":
                client._verifier = _x25519_only(client._verifier)
            if not prepare:
                client._prepared = None
            arms[f"{kem}{'' if prepare else '_unprepared'}"] = client
            closers += [client, wallet]
    rng = random.Random(20)
    samples: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for name, c in arms.items():
            want = KEMS["x25519" if name.startswith("x25519") else "xwing"]
            assert (await c.key_config()).kem_id == want
            pq = [n.pq_public_key is not None for n in await c.verified_nodes()]
            assert all(pq) if want == KEMS["xwing"] else not any(pq)
        for i in range(WARMUP + PAIRS):
            order = list(arms.items())
            rng.shuffle(order)
            for name, c in order:
                t = await _ttft(c)
                if i >= WARMUP:
                    samples[name].append(t * 1000)
                await asyncio.sleep(THINK)
    finally:
        for x in closers:
            await x.aclose()

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


def run() -> dict[str, Any]:
    layers = {name: _layers(kem) for name, kem in KEMS.items()}
    for v in layers.values():
        for k in list(v):
            if k.endswith("_us"):
                v[k] = round(v[k], 1)
    with tempfile.TemporaryDirectory(prefix="bench-pq-") as tmp:
        state = Path(tmp)
        with fake_stack(state, nodes=2, quota=8 * (PAIRS + WARMUP) + 100) as fs:
            paired = asyncio.run(_paired(fs.stack.config_path, state))
    x, w = layers["x25519"], layers["xwing"]
    critical = {  # what lies on the request's path (the client seals 3 wraps)
        k: round(w[k] - x[k], 1)
        for k in ("inner_seal_3_candidates_us", "inner_open_us", "outer_seal_us", "outer_open_us")
    }
    return {
        "result_name": "pq_path",
        "layers": layers,
        "xwing_minus_x25519_us": critical,
        "xwing_minus_x25519_sum_ms": round(sum(critical.values()) / 1000, 3),
        "paired_ttft": paired,
        "summary": {
            "pq_ttft_added_ms_p50_delta": paired["xwing_minus_x25519"]["p50_ms"],
            "pq_ttft_added_ms_p50_delta_unprepared": paired["xwing_minus_x25519_unprepared"][
                "p50_ms"
            ],
        },
    }


if __name__ == "__main__":
    result = run()
    out = Path(__file__).parent / "results" / "pq_path.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))

"""Issuer throughput: tokens/s through the real service vs raw RSA signing, one core.

Baseline in the same run: `cryptography` (OpenSSL) RSA-2048 PSS sign rate on this
core. The service runs as a separate process (SQLite backend) and is driven over
loopback HTTP with single and batched requests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench._harness import per_call_seconds
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import TOKEN_TYPE_BLIND_RSA, TokenChallenge
from openpcc.privacypass.blindrsa import PrivateKey, blind_sign
from openpcc.privacypass.directory import IssuerDirectory
from tests.harness import spawn, wait_http

CHALLENGE = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "bench", b"", ())


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


async def _drive(url: str, key: str, token_key: bytes, batch: int, total: int) -> float:
    """Seconds to obtain ``total`` tokens in requests of ``batch`` (client work excluded)."""
    rounds = total // batch
    bodies = []
    for _ in range(rounds):
        reqs = [issuance.begin_token_request(token_key, CHALLENGE)[0] for _ in range(batch)]
        if batch == 1:
            bodies.append((reqs[0].encode(), "application/private-token-request"))
        else:
            bodies.append((batched.encode_batch_request(reqs), batched.REQUEST_MEDIA_TYPE))
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        for body, ctype in bodies:
            async with s.post(
                url + "/token-request", data=body, headers={**headers, "Content-Type": ctype}
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
        return time.perf_counter() - t0


def run() -> dict[str, Any]:
    sk = rsa.generate_private_key(65537, 2048)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    openssl_s = per_call_seconds(lambda: sk.sign(b"x" * 98, pss, hashes.SHA384()))
    # The issuer's own primitive in-process (gmpy2 powmod_sec CRT, base blinding, s^e == m
    # fault check): the ceiling for the service, whatever HTTP and batching save.
    blinded = os.urandom(256)
    while int.from_bytes(blinded, "big") >= sk.public_key().public_numbers().n:
        blinded = os.urandom(256)
    ours = PrivateKey(sk)
    blind_s = per_call_seconds(lambda: blind_sign(ours, blinded))

    tmp = Path(tempfile.mkdtemp(prefix="bench-issuer-"))
    key = _cli("issuer", "account", "add", "bench", "--quota", "1000000", "--state", str(tmp))
    # taskset pins the service to one core so "single-core issuance rate" means that.
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "openpcc.cli", "issuer", "serve",
           "--port", "0", "--state", str(tmp)]  # fmt: skip
    proc = spawn("issuer", cmd, tmp, env={"OMP_NUM_THREADS": "1"})
    url = proc.url
    try:
        wait_http(url + "/healthz", proc)
        raw = urllib.request.urlopen(url + "/.well-known/private-token-issuer-directory").read()
        token_key = IssuerDirectory.parse(raw).select_key().token_key
        results = {}
        for batch, total in ((1, 300), (10, 500), (100, 1000)):
            secs = asyncio.run(_drive(url, key, token_key, batch, total))
            results[batch] = total / secs
    finally:
        proc.stop()
    openssl_rate = 1 / openssl_s
    return {
        "openssl_rsa2048_pss_sign_per_s": round(openssl_rate, 1),
        "blind_sign_in_process_per_s": round(1 / blind_s, 1),
        "service_tokens_per_s": {f"batch_{b}": round(r, 1) for b, r in results.items()},
        "summary": {
            "openssl_sign_per_s_one_core": round(openssl_rate, 1),
            "issuer_tokens_per_s_single": round(results[1], 1),
            "issuer_tokens_per_s_batch_100": round(results[100], 1),
            "ratio_single_vs_openssl": round(results[1] / openssl_rate, 3),
            "ratio_batch100_vs_openssl": round(results[100] / openssl_rate, 3),
            "batch100_per_token_speedup_vs_single": round(results[100] / results[1], 2),
            "ceiling_blind_sign_in_process_vs_openssl": round(1 / blind_s / openssl_rate, 3),
        },
    }

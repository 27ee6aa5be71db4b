"""`openpcc demo`: the protocol layers end to end, in one process.

Until the private request path (gateway, node, vLLM) exists, this demo drives the
real codecs over real bytes with every party's role played in-process, and prints
what each party could read. It runs no model and opens no socket, and says so.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from openpcc.privacypass import auth, issuance
from openpcc.wire import bhttp, hpke, ohttp
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="show one private chat's layers and each party's view")
    p.add_argument("prompt", nargs="?", default="Who can read this prompt?")
    p.set_defaults(func=run)


def _short(b: bytes) -> str:
    return f"{len(b)} B [{b[:12].hex()}…]"


def run(args: argparse.Namespace) -> int:
    out = print
    out("OpenPCC codec demo: every layer is real, but all parties run in this process")
    out("and no model runs (the gateway/node/vLLM path is not built yet).\n")

    # 1. Issuer: a token key; the client gets one token for a blinded message.
    issuer_key = issuance.IssuerKey.generate()
    challenge = auth.TokenChallenge(
        auth.TOKEN_TYPE_BLIND_RSA, "issuer.openpcc.local", b"", ("gateway.openpcc.local",)
    )
    req, state = issuance.begin_token_request(issuer_key.token_key, challenge)
    issuer_saw = req.encode()
    resp = issuance.issue(issuer_key, req)
    token = issuance.finalize_token(state, resp)
    out(f"1. issuer   signed a blinded TokenRequest {_short(issuer_saw)} for account 'demo'")

    # 2. Client: Binary HTTP request carrying the token, chunked-OHTTP to the gateway.
    gateway = hpke.generate_key_pair()
    config = ohttp.KeyConfig(
        1,
        hpke.KEM_DHKEM_X25519_HKDF_SHA256,
        gateway.public_key,
        (ohttp.SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),),
    )
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": args.prompt}]})
    message = bhttp.encode_request(
        bhttp.Request(
            b"POST",
            b"https",
            b"gateway.openpcc.local",
            b"/v1/chat/completions",
            [
                (b"authorization", auth.format_authorization(token).encode()),
                (b"content-type", b"application/json"),
            ],
            body.encode(),
        )
    )
    sender = ChunkedRequestSender(config)
    wire = sender.seal_chunk(message[:64]) + sender.seal_chunk(message[64:], final=True)
    out(f"2. client   sealed {_short(message)} of Binary HTTP into {_short(wire)} chunked OHTTP")
    relay_saw = wire
    out(f"3. relay    forwarded {len(relay_saw)} opaque bytes (it also knows the client IP)")

    # 3. Gateway: decapsulate, redeem the token, answer in chunks.
    receiver = ChunkedRequestReceiver({1: gateway.private_key})
    plain = b"".join(receiver.receive_data(wire)) + receiver.end_of_input()
    inner = bhttp.decode_request(plain)
    token_header = dict(inner.headers)[b"authorization"].decode()
    redeemed = issuance.verify_token(issuer_key, auth.parse_authorization_token(token_header))
    out(f"4. gateway  redeemed token nonce {redeemed.nonce.hex()[:16]}… for {inner.path.decode()}")

    answer = bhttp.encode_response(
        bhttp.Response(200, [(b"content-type", b"text/plain")], b"(codec demo: no model ran)")
    )
    rsender = receiver.response_sender()
    rwire = rsender.seal_chunk(answer, final=True)
    rrecv = sender.response_receiver()
    reply = bhttp.decode_response(b"".join(rrecv.receive_data(rwire)) + rrecv.end_of_input())
    out(f"5. client   got {reply.status}: {reply.content.decode()}\n")

    out("What each party received:")
    views = {
        "issuer": "account 'demo' + one 259-byte blinded request (cannot see the token it signed)",
        "relay": f"client IP + {len(relay_saw)} B request / {len(rwire)} B response ciphertext",
        "gateway": "token, path and prompt - in this demo only: the node-sealed inner layer "
        "that hides the prompt from the gateway is part of the private request path",
    }
    for party, view in views.items():
        out(f"  {party:8} {view}")
    if args.prompt.encode() in relay_saw:
        raise SystemExit("BUG: the relay could read the prompt")
    return 0

"""Interop with @cloudflare/privacypass-ts 0.8.1 (tests/interop/privacypass.mjs), type 0x0002."""

from __future__ import annotations

import pytest

from openpcc.privacypass import blindrsa
from openpcc.privacypass.auth import (
    PrivateTokenChallenge,
    TokenChallenge,
    format_authorization,
    format_www_authenticate,
    parse_authorization_token,
    parse_www_authenticate,
)
from openpcc.privacypass.issuance import (
    IssuerKey,
    begin_token_request,
    decode_token_key,
    encode_token_key,
    finalize_token,
    issue,
    verify_token,
)
from tests.conftest import run_node

pytestmark = pytest.mark.interop

SCRIPT = "privacypass.mjs"


def js(mode: str, **kw):
    return run_node(SCRIPT, {"mode": mode, **kw})


@pytest.fixture(scope="module")
def ours() -> IssuerKey:
    return IssuerKey.generate()


@pytest.fixture(scope="module")
def challenge() -> TokenChallenge:
    return TokenChallenge(2, "issuer.example", b"\x11" * 32, ("origin.example",))


def _pkcs8_der(ik: IssuerKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return ik.private_key.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).hex()


def test_ts_client_our_issuer(ours: IssuerKey, challenge: TokenChallenge) -> None:
    step = js("client_begin", token_key=ours.token_key.hex(), challenge=challenge.encode().hex())
    resp = issue(ours, bytes.fromhex(step["token_request"]))
    fin = js("client_finish", state=step["state"], token_response=resp.encode().hex())
    assert fin["verified"] is True
    tok = verify_token(ours.token_key, bytes.fromhex(fin["token"]), expected_challenge=challenge)
    assert tok.token_key_id == ours.token_key_id


def test_our_client_ts_issuer(ours: IssuerKey, challenge: TokenChallenge) -> None:
    req, state = begin_token_request(ours.token_key, challenge)
    out = js("issue", pkcs8=_pkcs8_der(ours), token_request=req.encode().hex())
    token = finalize_token(state, bytes.fromhex(out["token_response"]))
    verify_token(ours, token, expected_challenge=challenge)
    assert js("verify", token_key=ours.token_key.hex(), token=token.encode().hex())["verified"]


def test_ts_rejects_tampered_token(ours: IssuerKey, challenge: TokenChallenge) -> None:
    req, state = begin_token_request(ours.token_key, challenge)
    raw = bytearray(finalize_token(state, issue(ours, req)).encode())
    raw[-1] ^= 1
    assert js("verify", token_key=ours.token_key.hex(), token=raw.hex())["verified"] is False


def test_ts_generated_key(challenge: TokenChallenge) -> None:
    """Their key: same SPKI encoding and key id as ours; full flow both ways."""
    k = js("keygen")
    token_key = bytes.fromhex(k["token_key"])
    pub = decode_token_key(token_key)
    assert encode_token_key(pub) == token_key
    sk = blindrsa.PrivateKey.from_pem(_der_to_pem(bytes.fromhex(k["pkcs8"])))
    ik = IssuerKey(sk)
    assert ik.token_key == token_key
    assert ik.token_key_id.hex() == k["token_key_id"]
    # our client against their issuer with their key
    req, state = begin_token_request(token_key, challenge)
    out = js("issue", pkcs8=k["pkcs8"], token_request=req.encode().hex())
    verify_token(token_key, finalize_token(state, bytes.fromhex(out["token_response"])))


def test_our_key_id_matches_ts(ours: IssuerKey) -> None:
    k = js("token_key_of", pkcs8=_pkcs8_der(ours))
    assert k["token_key"] == ours.token_key.hex()
    assert k["token_key_id"] == ours.token_key_id.hex()


def test_headers_both_ways(ours: IssuerKey, challenge: TokenChallenge) -> None:
    req, state = begin_token_request(ours.token_key, challenge)
    token = finalize_token(state, issue(ours, req))
    ptc = PrivateTokenChallenge(challenge.encode(), ours.token_key, 30)
    our_www = format_www_authenticate(ptc)
    our_two = format_www_authenticate(
        [ptc, PrivateTokenChallenge(challenge.encode(), ours.token_key)]
    )
    our_auth = format_authorization(token)
    out = js(
        "headers",
        challenge=challenge.encode().hex(),
        token_key=ours.token_key.hex(),
        max_age=30,
        token=token.encode().hex(),
        parse_www=[our_www, our_two],
        parse_auth=[our_auth],
    )
    # privacypass-ts emits unquoted values by default, quoted on request: we take both
    for header in (out["www_authenticate"], out["www_authenticate_quoted"]):
        assert parse_www_authenticate(header) == [ptc]
    for header in (out["authorization"], out["authorization_quoted"]):
        assert parse_authorization_token(header) == token
    # and privacypass-ts reads what we emit
    assert out["parsed_www"][0] == [
        {
            "token_challenge": challenge.encode().hex(),
            "token_key": ours.token_key.hex(),
            "max_age": 30,
        }
    ]
    assert [c["max_age"] for c in out["parsed_www"][1]] == [30, None]
    assert out["parsed_auth"] == [[token.encode().hex()]]


def _der_to_pem(der: bytes) -> bytes:
    import base64

    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n"
    ).encode()


def test_generic_batch_ts_client_our_issuer(ours: IssuerKey, challenge: TokenChallenge) -> None:
    import functools

    from openpcc.privacypass import batched

    out = js(
        "batch_client", token_key=ours.token_key.hex(), challenge=challenge.encode().hex(), count=3
    )
    reqs = batched.decode_batch_request(bytes.fromhex(out["batch_request"]))
    assert len(reqs) == 3
    resp = batched.issue_batch(reqs, functools.partial(issue, ours))
    for state, item in zip(out["states"], batched.decode_batch_response(resp), strict=True):
        fin = js("client_finish", state=state, token_response=item.encode().hex())
        assert fin["verified"]
        verify_token(ours, bytes.fromhex(fin["token"]), expected_challenge=challenge)
    parsed = js("batch_parse_response", batch_response=resp.hex())["items"]
    assert [i["token_type"] for i in parsed] == [2, 2, 2]


def test_generic_batch_our_client_ts_issuer(ours: IssuerKey, challenge: TokenChallenge) -> None:
    from openpcc.privacypass import batched

    pairs = [begin_token_request(ours.token_key, challenge) for _ in range(2)]
    body = batched.encode_batch_request([r for r, _ in pairs])
    out = js("batch_issue", pkcs8=_pkcs8_der(ours), batch_request=body.hex())
    items = batched.decode_batch_response(bytes.fromhex(out["batch_response"]))
    assert len(items) == 2
    for (_, state), item in zip(pairs, items, strict=True):
        assert item is not None
        verify_token(ours, finalize_token(state, item), expected_challenge=challenge)
    # an absent item, as privacypass-ts parses it
    absent = batched.encode_batch_response([None, (2, items[0])])
    parsed = js("batch_parse_response", batch_response=absent.hex())["items"]
    assert parsed[0] is None and parsed[1]["response"] == items[0].encode().hex()

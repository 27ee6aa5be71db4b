"""Privacy Pass: RFC 9578 type-2 vectors, RFC 9577 A.1/A.2, the issuer directory, fuzzing."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from openpcc.errors import (
    DecodeError,
    EncodeError,
    OpenPCCError,
    TruncatedError,
    UnsupportedError,
    VerificationError,
)
from openpcc.privacypass import auth, blindrsa
from openpcc.privacypass.auth import (
    PrivateTokenChallenge,
    Token,
    TokenChallenge,
    b64url_decode,
    b64url_encode,
    format_authorization,
    format_www_authenticate,
    parse_auth_header,
    parse_authorization,
    parse_authorization_token,
    parse_www_authenticate,
    select_challenge,
)
from openpcc.privacypass.directory import IssuerDirectory, TokenKeyEntry
from openpcc.privacypass.issuance import (
    IssuerKey,
    TokenRequest,
    TokenResponse,
    begin_token_request,
    decode_token_key,
    encode_token_key,
    finalize_token,
    issue,
    token_key_id,
    verify_token,
)
from tests.conftest import load_vector

T2 = load_vector("privacypass/rfc9578_type2_blindrsa_issuance.json")["vectors"]
T1 = load_vector("privacypass/rfc9578_type1_voprf_p384_issuance.json")["vectors"]
A1 = load_vector("privacypass/rfc9577_challenge_and_redemption.json")["vectors"]
A2 = load_vector("privacypass/rfc9577_www_authenticate_headers.json")["vectors"]
DIR = load_vector("privacypass/rfc9578_issuer_directory_example.json")
DERIVED = load_vector("privacypass/derived_examples.json")  # NOT official


def h(v: dict, k: str) -> bytes:
    return bytes.fromhex(v[k])


@pytest.fixture(scope="module")
def issuer_key() -> IssuerKey:
    return IssuerKey.generate()


@pytest.fixture(scope="module")
def rfc_key() -> IssuerKey:
    return IssuerKey(blindrsa.PrivateKey.from_pem(h(T2[0], "skS")))


# --------------------------------------------------------------------- RFC 9578 type 2


def test_five_type2_vectors() -> None:
    assert len(T2) == 5


@pytest.mark.parametrize("v", T2, ids=lambda v: f"v{v['vector']}")
def test_rfc9578_type2_token_key(v: dict) -> None:
    pks = h(v, "pkS")
    assert len(pks) == 342
    ik = IssuerKey(blindrsa.PrivateKey.from_pem(h(v, "skS")))
    assert ik.token_key == pks  # our SPKI encoding of the PEM key is byte-exact
    pub = decode_token_key(pks)
    assert pub == ik.public_key
    assert encode_token_key(pub) == pks
    kid = token_key_id(pks)
    assert kid.hex() == v["derived"]["token_key_id"]
    assert token_key_id(pub) == kid == ik.token_key_id
    assert ik.truncated_key_id == int(v["derived"]["truncated_token_key_id"], 16)


@pytest.mark.parametrize("v", T2, ids=lambda v: f"v{v['vector']}")
def test_rfc9578_type2_client_issuer_origin(v: dict) -> None:
    req, state = begin_token_request(
        h(v, "pkS"),
        h(v, "token_challenge"),
        nonce=h(v, "nonce"),
        r=h(v, "blind"),
        salt=h(v, "salt"),
    )
    assert req.encode() == h(v, "token_request")
    assert state.token_input.hex() == v["derived"]["token_input"]
    parts = v["parts"]["token_request"]
    dec = TokenRequest.decode(h(v, "token_request"))
    assert dec == req
    assert dec.truncated_token_key_id == int(parts["truncated_token_key_id"], 16)
    assert dec.blinded_msg.hex() == parts["blinded_msg"]

    ik = IssuerKey(blindrsa.PrivateKey.from_pem(h(v, "skS")))
    resp = issue(ik, h(v, "token_request"))
    assert resp.encode() == h(v, "token_response")
    assert TokenResponse.decode(h(v, "token_response")) == resp

    token = finalize_token(state, h(v, "token_response"))
    assert token.encode() == h(v, "token")
    tparts = v["parts"]["token"]
    dtok = Token.decode(h(v, "token"))
    assert dtok == token
    assert dtok.nonce.hex() == tparts["nonce"]
    assert dtok.challenge_digest.hex() == tparts["challenge_digest"]
    assert dtok.token_key_id.hex() == tparts["token_key_id"]
    assert dtok.authenticator.hex() == tparts["authenticator"]

    out = verify_token(h(v, "pkS"), h(v, "token"), expected_challenge=h(v, "token_challenge"))
    assert out == token
    chal = TokenChallenge.decode(h(v, "token_challenge"))
    verify_token(ik, token, expected_challenge=chal)
    # the challenge object re-encodes byte-exactly
    assert chal.encode() == h(v, "token_challenge")
    d = v["derived"]["token_challenge_decoded"]
    assert chal.issuer_name == d["issuer_name"]
    assert chal.redemption_context.hex() == d["redemption_context"]
    assert ",".join(chal.origin_info) == d["origin_info"]


def test_client_with_challenge_object_and_key_object(rfc_key: IssuerKey) -> None:
    v = T2[0]
    chal = TokenChallenge.decode(h(v, "token_challenge"))
    req, _ = begin_token_request(
        rfc_key.public_key, chal, nonce=h(v, "nonce"), r=h(v, "blind"), salt=h(v, "salt")
    )
    assert req.encode() == h(v, "token_request")


def test_full_flow_fresh_key(issuer_key: IssuerKey) -> None:
    chal = TokenChallenge(2, "issuer.example", b"\x07" * 32, ("a.example", "b.example"))
    req, state = begin_token_request(issuer_key.token_key, chal)
    wire = req.encode()
    assert len(wire) == 259
    resp = issue(issuer_key, TokenRequest.decode(wire))
    token = finalize_token(state, TokenResponse.decode(resp.encode()))
    raw = token.encode()
    assert len(raw) == 354
    verify_token(issuer_key.token_key, raw, expected_challenge=chal)
    verify_token(issuer_key.public_key, raw)
    assert "ClientState" in repr(state) and state.inv.hex() not in repr(state)


def test_verify_token_rejections(issuer_key: IssuerKey, rfc_key: IssuerKey) -> None:
    v = T2[0]
    tok = h(v, "token")
    with pytest.raises(VerificationError, match="another key"):
        verify_token(issuer_key, tok)
    bad = bytearray(tok)
    bad[-1] ^= 1
    with pytest.raises(VerificationError):
        verify_token(rfc_key, bytes(bad))
    bad = bytearray(tok)
    bad[5] ^= 1  # nonce: signature covers it
    with pytest.raises(VerificationError):
        verify_token(rfc_key, bytes(bad))
    other = TokenChallenge(2, "issuer.example")
    with pytest.raises(VerificationError, match="challenge"):
        verify_token(rfc_key, tok, expected_challenge=other)
    with pytest.raises(UnsupportedError):
        verify_token(rfc_key, h(T1[0], "token"))
    with pytest.raises(TruncatedError):
        verify_token(rfc_key, tok[:-1])
    with pytest.raises(DecodeError):
        verify_token(rfc_key, tok + b"\x00")


def test_finalize_rejects_bad_response(issuer_key: IssuerKey) -> None:
    _req, state = begin_token_request(issuer_key.token_key, TokenChallenge(2, "i"))
    other, _ = begin_token_request(issuer_key.token_key, TokenChallenge(2, "i"))
    with pytest.raises(VerificationError):
        finalize_token(state, issue(issuer_key, other))
    with pytest.raises(TruncatedError):
        finalize_token(state, b"\x00" * 255)


def test_issue_checks_key_id_and_type(issuer_key: IssuerKey, rfc_key: IssuerKey) -> None:
    with pytest.raises(UnsupportedError, match="key id"):
        # the vector request names the RFC key, not ours (different truncated ids)
        assert issuer_key.truncated_key_id != rfc_key.truncated_key_id
        issue(issuer_key, h(T2[0], "token_request"))
    with pytest.raises(UnsupportedError):
        issue(issuer_key, h(T1[0], "token_request"))
    # out-of-range blinded message is a decode error, not a crash
    with pytest.raises(DecodeError):
        issue(rfc_key, b"\x00\x02" + bytes([rfc_key.truncated_key_id]) + b"\xff" * 256)
    # a raw PrivateKey works as well as an IssuerKey
    assert issue(rfc_key.private_key, h(T2[0], "token_request")).encode() == h(
        T2[0], "token_response"
    )


@pytest.mark.parametrize("v", T1, ids=lambda v: f"v{v['vector']}")
def test_type1_is_unsupported_not_a_crash(v: dict) -> None:
    with pytest.raises(UnsupportedError):
        TokenRequest.decode(h(v, "token_request"))
    with pytest.raises(UnsupportedError):
        Token.decode(h(v, "token"))
    with pytest.raises(UnsupportedError):
        begin_token_request(h(T2[0], "pkS"), h(v, "token_challenge"))
    # the type-1 challenge itself is a valid TokenChallenge
    assert TokenChallenge.decode(h(v, "token_challenge")).token_type == 1


def test_wire_lengths_and_types() -> None:
    req = TokenRequest(7, b"\x01" * 256)
    assert req.encode()[:3] == b"\x00\x02\x07"
    with pytest.raises(TruncatedError):
        TokenRequest.decode(req.encode()[:-1])
    with pytest.raises(TruncatedError):
        TokenRequest.decode(b"\x00")
    with pytest.raises(DecodeError):
        TokenRequest.decode(req.encode() + b"\x00")
    with pytest.raises(UnsupportedError):
        TokenRequest.decode(b"\x00\x03" + req.encode()[2:])
    with pytest.raises(EncodeError):
        TokenRequest(256, b"\x01" * 256)
    with pytest.raises(EncodeError):
        TokenRequest(1, b"\x01" * 255)
    with pytest.raises(EncodeError):
        TokenResponse(b"\x00" * 257)
    with pytest.raises(DecodeError):
        TokenResponse.decode(b"\x00" * 257)


# --------------------------------------------------------------------- token key (SPKI)


def test_token_key_rejections(rfc_key: IssuerKey) -> None:
    good = rfc_key.token_key
    with pytest.raises(DecodeError):
        decode_token_key(good + b"\x00")
    with pytest.raises(TruncatedError):
        decode_token_key(good[:-1])
    # standard rsaEncryption SPKI is not a type-2 token key
    from cryptography.hazmat.primitives import serialization

    plain = rfc_key.public_key.key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UnsupportedError):
        decode_token_key(plain)
    # salt length 32 instead of 48
    i = good.index(bytes.fromhex("a203020130"))
    with pytest.raises(UnsupportedError):
        decode_token_key(good[:i] + bytes.fromhex("a203020120") + good[i + 5 :])
    # a 3072-bit key with the right algorithm identifier
    big = blindrsa.PrivateKey.generate(3072)
    with pytest.raises(UnsupportedError):
        decode_token_key(encode_token_key(big.public_key))
    with pytest.raises(UnsupportedError):
        token_key_id(big.public_key)
    # long-form length where short form fits: non-minimal DER
    with pytest.raises(DecodeError):
        decode_token_key(b"\x30\x81\x05" + b"\x00" * 5)


def test_complete_token_key_example_from_rfc9578_section4() -> None:
    raw = b64url_decode(DIR["complete_token_key_example"])
    assert len(raw) == 342
    pub = decode_token_key(raw)
    assert pub.modulus_bits == 2048 and pub.e == 65537
    assert encode_token_key(pub) == raw


# --------------------------------------------------------------------- RFC 9577 A.1


@pytest.mark.parametrize("v", A1[:5], ids=lambda v: f"v{v['vector']}")
def test_rfc9577_a1_challenge_to_authenticator_input(v: dict) -> None:
    origins = h(v, "origin_info").decode()
    chal = TokenChallenge(
        int(v["token_type"], 16),
        h(v, "issuer_name").decode(),
        h(v, "redemption_context"),
        tuple(origins.split(",")) if origins else (),
    )
    raw = chal.encode()
    assert raw.hex() == v["derived"]["token_challenge"]
    assert b64url_encode(raw) == v["derived"]["token_challenge_b64url"]
    assert TokenChallenge.decode(raw) == chal
    assert auth.challenge_digest(chal).hex() == v["derived"]["challenge_digest"]
    assert chal.digest() == auth.challenge_digest(raw)
    ti = auth.authenticator_input(
        chal.token_type, h(v, "nonce"), auth.challenge_digest(chal), h(v, "token_key_id")
    )
    assert ti == h(v, "token_authenticator_input")
    # token_key_id there is SHA-256 of the RFC 9578 type-2 test key
    assert token_key_id(h(T2[0], "pkS")) == h(v, "token_key_id")


def test_rfc9577_a1_grease_vector_rejected_cleanly() -> None:
    v = A1[5]
    raw = h(v, "token_authenticator_input")
    assert raw[:2] == b"\x00\x00"
    with pytest.raises(UnsupportedError):
        Token.decode(raw)
    with contextlib.suppress(OpenPCCError):
        TokenChallenge.decode(raw)


# --------------------------------------------------------------------- RFC 9577 A.2


@pytest.mark.parametrize("v", A2, ids=lambda v: f"v{v['vector']}")
def test_rfc9577_a2_www_authenticate(v: dict) -> None:
    got = parse_www_authenticate(v["www_authenticate"])
    assert [(c.token_type, c.token_key.hex(), c.max_age, c.token_challenge.hex()) for c in got] == [
        (c["token_type"], c["token_key"], c["max_age"], c["token_challenge"])
        for c in v["challenges"]
    ]
    # re-serialize and parse again: same challenges
    assert parse_www_authenticate(format_www_authenticate(got)) == got


def test_rfc9577_a2_selection() -> None:
    v1, v2, v3 = (parse_www_authenticate(v["www_authenticate"]) for v in A2)
    sel = select_challenge(v1)
    assert sel is not None and sel[1].token_type == 2
    sel = select_challenge(v2, supported_types=(1,))
    assert sel is not None and sel[1].token_type == 1
    assert select_challenge(v3) is None  # grease + type 1 only: nothing for a type-2 client
    sel = select_challenge(v3, supported_types=(0, 1))  # grease 0x0000 fails to decode: skipped
    assert sel is not None and sel[1].token_type == 1


@pytest.mark.parametrize(
    "variant",
    [
        lambda s: s.replace(", ", ","),
        lambda s: s.replace(",", " ,  "),
        lambda s: s.replace("challenge=", "CHALLENGE = ").replace("token-key=", "Token-Key="),
        lambda s: s.replace("PrivateToken", "privatetoken"),
        lambda s: s.replace('"', ""),  # unquoted token values (RFC 9110 token form)
        lambda s: s.replace("==", ""),  # padding omitted
        lambda s: 'Basic realm="x", Negotiate abc==, , ' + s + " ,",
    ],
)
def test_header_parse_tolerance(variant) -> None:
    v = A2[1]
    expected = parse_www_authenticate(v["www_authenticate"])
    assert parse_www_authenticate(variant(v["www_authenticate"])) == expected


@pytest.mark.parametrize(
    "bad",
    [
        'PrivateToken challenge="AAIA"',  # no token-key
        'PrivateToken token-key="AAAA"',
        'PrivateToken challenge="A", token-key="AAAA"',  # impossible base64 length
        'PrivateToken challenge="AA+A", token-key="AAAA"',  # not url alphabet
        'PrivateToken challenge="AAIA=", token-key="AAAA"',  # wrong padding
        'PrivateToken challenge="AAIA", token-key="AAAA", max-age="-1"',
        'PrivateToken challenge="AAIA", token-key="AAAA", max-age="1e3"',
        'PrivateToken challenge="AAIA", challenge="AAIA", token-key="AAAA"',
        'PrivateToken challenge="AAIA" token-key="AAAA"',  # missing comma
        'PrivateToken challenge="AAIA, token-key="AAAA"',  # unterminated quote
        "PrivateToken abc==",  # token68
        "=x",
        'PrivateToken challenge=, token-key="AAAA"',
        "Basic foo bar",
    ],
)
def test_header_parse_rejects(bad: str) -> None:
    with pytest.raises(DecodeError):
        parse_www_authenticate(bad)


def test_auth_header_grammar_details() -> None:
    parsed = parse_auth_header('Basic realm="a\\"b", Negotiate abc==, Bearer, X a=b')
    assert [(c.scheme, c.params, c.token68) for c in parsed] == [
        ("Basic", (("realm", 'a"b'),), None),
        ("Negotiate", (), "abc=="),
        ("Bearer", (), None),
        ("X", (("a", "b"),), None),
    ]
    assert parse_auth_header("") == []
    with pytest.raises(OpenPCCError):
        parse_auth_header("PrivateToken token=" + "A" * 20000)


def test_derived_www_authenticate_example_not_official() -> None:
    ex = DERIVED["www_authenticate_for_rfc9578_a2_vector1"]
    ch = PrivateTokenChallenge(bytes.fromhex(ex["token_challenge_hex"]), h(T2[0], "pkS"))
    assert format_www_authenticate(ch) == ex["header"]
    assert parse_www_authenticate(ex["header"]) == [ch]


def test_www_authenticate_max_age_format() -> None:
    ch = PrivateTokenChallenge(b"\x00\x02abc", b"key", 10)
    s = format_www_authenticate([ch, ch])
    assert s.count('max-age="10"') == 2
    assert parse_www_authenticate(s) == [ch, ch]
    with pytest.raises(EncodeError):
        format_www_authenticate([])
    with pytest.raises(EncodeError):
        format_www_authenticate(PrivateTokenChallenge(b"\x00\x02", b"k", -1))


@pytest.mark.parametrize("ex", DERIVED["authorization_headers"], ids=["type2", "type1"])
def test_derived_authorization_headers_not_official(ex: dict) -> None:
    raw = bytes.fromhex(ex["token_hex"])
    assert parse_authorization(ex["authorization"]) == [raw]
    assert format_authorization(raw) == ex["authorization"]
    if raw[:2] == b"\x00\x02":
        tok = parse_authorization_token(ex["authorization"])
        assert tok.encode() == raw
        assert format_authorization(tok) == ex["authorization"]
        verify_token(h(T2[0], "pkS"), tok)
    else:
        with pytest.raises(UnsupportedError):
            parse_authorization_token(ex["authorization"])


def test_authorization_edge_cases() -> None:
    tok = h(T2[0], "token")
    hdr = format_authorization(tok)
    assert parse_authorization("Basic abc=, " + hdr) == [tok]
    with pytest.raises(DecodeError):
        parse_authorization_token(hdr + ", " + hdr)
    with pytest.raises(DecodeError):
        parse_authorization_token("Basic abc=")
    with pytest.raises(DecodeError):
        parse_authorization("PrivateToken foo=bar")
    # unpadded and unquoted token accepted
    assert parse_authorization("PrivateToken token=" + b64url_encode(tok).rstrip("=")) == [tok]


# --------------------------------------------------------------------- structures


def test_token_challenge_validation() -> None:
    with pytest.raises(EncodeError):
        TokenChallenge(2, "")
    with pytest.raises(EncodeError):
        TokenChallenge(2, "i", b"\x00" * 31)
    with pytest.raises(EncodeError):
        TokenChallenge(2, "i", b"", ("a,b",))
    with pytest.raises(EncodeError):
        TokenChallenge(0x10000, "i")
    with pytest.raises(DecodeError):  # redemption_context of 16 bytes
        TokenChallenge.decode(b"\x00\x02\x00\x01i\x10" + b"\x00" * 16 + b"\x00\x00")
    with pytest.raises(DecodeError):  # empty issuer
        TokenChallenge.decode(b"\x00\x02\x00\x00\x00\x00\x00")
    with pytest.raises(DecodeError):  # empty origin between commas
        TokenChallenge.decode(b"\x00\x02\x00\x01i\x00\x00\x03a,,"[:-1] + b"")
    with pytest.raises(DecodeError):  # not UTF-8
        TokenChallenge.decode(b"\x00\x02\x00\x01\xff\x00\x00\x00")
    ch = TokenChallenge(2, "i", origin_info=["a", "b"])  # type: ignore[arg-type]
    assert ch.origin_info == ("a", "b")


def test_token_validation() -> None:
    with pytest.raises(EncodeError):
        Token(1, b"\x00" * 32, b"\x00" * 32, b"\x00" * 32, b"\x00" * 48)
    with pytest.raises(EncodeError):
        Token(2, b"\x00" * 31, b"\x00" * 32, b"\x00" * 32, b"\x00" * 256)
    with pytest.raises(TruncatedError):
        Token.decode(b"\x00")


# --------------------------------------------------------------------- directory


def test_directory_rfc_example_as_printed_is_not_json() -> None:
    with pytest.raises(DecodeError):
        IssuerDirectory.parse(DIR["directory_example_as_printed"])
    # the valid-JSON form still has abbreviated ("MI...AB") keys: not base64url
    with pytest.raises(DecodeError):
        IssuerDirectory.parse(json.dumps(DIR["directory_example_json"]))


def test_directory_rfc_example_with_complete_key_and_selection_rule() -> None:
    obj = copy.deepcopy(DIR["directory_example_json"])
    for k in obj["token-keys"]:
        k["token-key"] = DIR["complete_token_key_example"]
    d = IssuerDirectory.parse(json.dumps(obj))
    assert d.issuer_request_uri == "https://issuer.example.net/request"
    assert [k.not_before for k in d.token_keys] == [1686913811, None]
    assert d.select_key(2, now=1686913811 - 1) is d.token_keys[1]
    assert d.select_key(2, now=1686913811) is d.token_keys[0]
    assert d.select_key(2) is d.token_keys[0]
    with pytest.raises(UnsupportedError):
        d.select_key(1, now=0)


def test_directory_derived_example_not_official() -> None:
    obj = DERIVED["issuer_directory_with_rfc9578_test_keys"]["json"]
    d = IssuerDirectory.parse(json.dumps(obj).encode())
    assert d.token_keys[0].token_key == h(T2[0], "pkS")
    assert d.token_keys[1].token_type == 1 and len(d.token_keys[1].token_key) == 49
    assert d.to_json_obj() == obj
    assert IssuerDirectory.parse(d.serialize()) == d
    assert d.select_key(now=0).token_key == h(T2[0], "pkS")


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"token-keys": []},
        {"issuer-request-uri": "", "token-keys": []},
        {"issuer-request-uri": "/r"},
        {"issuer-request-uri": "/r", "token-keys": {}},
        {"issuer-request-uri": "/r", "token-keys": [1]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": 2}]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": True, "token-key": "AA=="}]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": "2", "token-key": "AA=="}]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": 70000, "token-key": "AA=="}]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": 1, "token-key": 5}]},
        {"issuer-request-uri": "/r", "token-keys": [{"token-type": 2, "token-key": "AAAA"}]},
        {
            "issuer-request-uri": "/r",
            "token-keys": [{"token-type": 1, "token-key": "AAAA", "not-before": -1}],
        },
        {
            "issuer-request-uri": "/r",
            "token-keys": [{"token-type": 1, "token-key": "AAAA", "not-before": 1.5}],
        },
    ],
)
def test_directory_rejects(obj) -> None:
    with pytest.raises(DecodeError):
        IssuerDirectory.parse(json.dumps(obj))


def test_directory_build_and_unknown_members(issuer_key: IssuerKey) -> None:
    d = IssuerDirectory("/request", [TokenKeyEntry(2, issuer_key.token_key, 100)])
    obj = json.loads(d.serialize())
    obj["extra"] = {"ignored": True}
    obj["token-keys"][0]["also-ignored"] = 1
    obj["token-keys"].append({"token-type": 0x5A5A, "token-key": "AAEC"})  # unknown type, opaque
    back = IssuerDirectory.parse(json.dumps(obj))
    assert back.token_keys[0] == d.token_keys[0]
    assert back.token_keys[1].token_key == b"\x00\x01\x02"
    with pytest.raises(EncodeError):
        IssuerDirectory("", ())
    with pytest.raises(EncodeError):
        TokenKeyEntry(2, b"", -5)


# --------------------------------------------------------------------- hypothesis

FUZZ = settings(max_examples=300, deadline=None)

PARSERS = [
    TokenChallenge.decode,
    Token.decode,
    TokenRequest.decode,
    TokenResponse.decode,
    decode_token_key,
    IssuerDirectory.parse,
]


def _mutate(data: bytes, draw) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if op == "flip" and b:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            b = b[: draw(st.integers(0, len(b)))]
        elif op == "insert":
            i = draw(st.integers(0, len(b)))
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            i = draw(st.integers(0, len(b) - 1))
            del b[i]
    return bytes(b)


SEEDS = [
    h(T2[0], "token_challenge"),
    h(T2[0], "token"),
    h(T2[0], "token_request"),
    h(T2[0], "token_response"),
    h(T2[0], "pkS"),
    json.dumps(DERIVED["issuer_directory_with_rfc9578_test_keys"]["json"]).encode(),
]


@FUZZ
@given(which=st.integers(0, len(PARSERS) - 1), data=st.binary(max_size=600))
def test_fuzz_parsers_random(which: int, data: bytes) -> None:
    with contextlib.suppress(OpenPCCError):
        PARSERS[which](data)


@FUZZ
@given(which=st.integers(0, len(PARSERS) - 1), data=st.data())
def test_fuzz_parsers_mutated(which: int, data) -> None:
    mutated = _mutate(SEEDS[which], data.draw)
    try:
        out = PARSERS[which](mutated)
    except OpenPCCError:
        return
    if hasattr(out, "encode") and not isinstance(out, bytes):
        assert type(out).decode(out.encode()) == out


HEADER_SEEDS = [v["www_authenticate"] for v in A2] + [
    ex["authorization"] for ex in DERIVED["authorization_headers"]
]


@FUZZ
@given(data=st.data())
def test_fuzz_headers(data) -> None:
    seed = data.draw(st.sampled_from(HEADER_SEEDS))
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        text = data.draw(st.text(max_size=300))
    elif choice == 1:
        text = _mutate(seed.encode(), data.draw).decode("latin-1")
    else:
        alphabet = st.sampled_from(list(' \t,="\\=AaPrivateTokenchallengetoken-keymax-age'))
        text = data.draw(st.text(alphabet=alphabet, max_size=200))
    for fn in (parse_www_authenticate, parse_authorization, parse_authorization_token):
        with contextlib.suppress(OpenPCCError):
            fn(text)


@FUZZ
@given(data=st.data())
def test_fuzz_directory_json(data) -> None:
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10)
    )
    tree = st.recursive(
        leaf,
        lambda c: st.one_of(
            st.lists(c, max_size=4), st.dictionaries(st.text(max_size=20), c, max_size=4)
        ),
        max_leaves=20,
    )
    keys = st.sampled_from(
        ["issuer-request-uri", "token-keys", "token-type", "token-key", "not-before"]
    )
    obj = data.draw(st.dictionaries(keys, tree, max_size=3))
    if data.draw(st.booleans()):
        obj["token-keys"] = data.draw(st.lists(st.dictionaries(keys, tree, max_size=3), max_size=3))
    with contextlib.suppress(OpenPCCError):
        IssuerDirectory.parse(json.dumps(obj))


names = st.text(
    alphabet=st.characters(blacklist_characters=",", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
)


@FUZZ
@given(
    token_type=st.integers(0, 0xFFFF),
    issuer=names,
    ctx=st.sampled_from([b"", b"\x5a" * 32]),
    origins=st.lists(names, max_size=4),
)
def test_round_trip_token_challenge(token_type, issuer, ctx, origins) -> None:
    ch = TokenChallenge(token_type, issuer, ctx, tuple(origins))
    raw = ch.encode()
    assert TokenChallenge.decode(raw) == ch
    assert TokenChallenge.decode(raw).encode() == raw


@FUZZ
@given(st.binary(min_size=98, max_size=98), st.binary(min_size=256, max_size=256))
def test_round_trip_token(ti: bytes, authn: bytes) -> None:
    raw = b"\x00\x02" + ti[2:] + authn
    tok = Token.decode(raw)
    assert tok.encode() == raw
    assert format_authorization(tok) and parse_authorization_token(format_authorization(tok)) == tok


@FUZZ
@given(st.integers(0, 255), st.binary(min_size=256, max_size=256))
def test_round_trip_request_response(kid: int, blob: bytes) -> None:
    req = TokenRequest(kid, blob)
    assert TokenRequest.decode(req.encode()) == req
    resp = TokenResponse(blob)
    assert TokenResponse.decode(resp.encode()) == resp


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=2, max_size=80),
            st.binary(max_size=80),
            st.none() | st.integers(0, 10**9),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_round_trip_www_authenticate(items) -> None:
    chs = [PrivateTokenChallenge(c, k, m) for c, k, m in items]
    assert parse_www_authenticate(format_www_authenticate(chs)) == chs


@FUZZ
@given(st.binary(max_size=100))
def test_round_trip_b64url(data: bytes) -> None:
    enc = b64url_encode(data)
    assert b64url_decode(enc) == data
    assert b64url_decode(enc.rstrip("=")) == data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from([1, 2, 7]), st.none() | st.integers(0, 2**40)),
        min_size=1,
        max_size=4,
    ),
    st.text(min_size=1, max_size=30),
)
def test_round_trip_directory(issuer_key: IssuerKey, entries, uri: str) -> None:
    keys = [
        TokenKeyEntry(t, issuer_key.token_key if t == 2 else bytes([t]) * 49, nb)
        for t, nb in entries
    ]
    d = IssuerDirectory(uri, keys)
    assert IssuerDirectory.parse(d.serialize()) == d


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(issuer=names, nonce=st.binary(min_size=32, max_size=32))
def test_property_issuance_flow(issuer_key: IssuerKey, issuer: str, nonce: bytes) -> None:
    assume(issuer)
    chal = TokenChallenge(2, issuer)
    req, state = begin_token_request(issuer_key.token_key, chal.encode(), nonce=nonce)
    tok = finalize_token(state, issue(issuer_key, req.encode()).encode())
    assert tok.nonce == nonce
    verify_token(issuer_key, tok.encode(), expected_challenge=chal)


# --------------------------------------------------------------------- generic batch


def test_batch_round_trip_and_mixed_types(rfc_key: IssuerKey) -> None:
    import functools

    from openpcc.privacypass import batched

    t1 = batched.OpaqueTokenRequest(1, h(T1[0], "token_request"))
    t2 = TokenRequest.decode(h(T2[0], "token_request"))
    wire = batched.encode_batch_request([t2, t1, t2])
    reqs = batched.decode_batch_request(wire)
    assert reqs == [t2, t1, t2]
    resp = batched.issue_batch(reqs, functools.partial(issue, rfc_key))
    items = batched.decode_batch_response(resp)
    assert items[1] is None
    assert items[0] == items[2] == TokenResponse(h(T2[0], "token_response"))
    t1resp = batched.OpaqueTokenResponse(1, h(T1[0], "token_response"))
    both = batched.encode_batch_response([(1, t1resp), None])
    assert batched.decode_batch_response(both) == [t1resp, None]
    # an issuer failure (wrong key id) becomes absent, not a failed batch
    fresh = IssuerKey.generate()
    assert batched.decode_batch_response(
        batched.issue_batch([t2], functools.partial(issue, fresh))
    ) == [None]
    assert batched.decode_batch_request(b"\x00") == []


def test_batch_rejections() -> None:
    from openpcc.privacypass import batched

    t2 = h(T2[0], "token_request")
    good = batched.encode_batch_request([TokenRequest.decode(t2)])
    with pytest.raises(TruncatedError):
        batched.decode_batch_request(good[:-1])
    with pytest.raises(DecodeError):
        batched.decode_batch_request(good + b"\x00")
    with pytest.raises(UnsupportedError):
        batched.decode_batch_request(b"\x03\x00\x05\x00")
    with pytest.raises(DecodeError):
        batched.decode_batch_request(b"\x01\x00")
    with pytest.raises(DecodeError):
        batched.decode_batch_response(b"\x01\x02")
    with pytest.raises(DecodeError):
        batched.decode_batch_response(b"\x02\x01\x00")
    with pytest.raises(DecodeError):
        batched.decode_batch_response(b"\x04\x01\x00\x02\x00")
    with pytest.raises(EncodeError):
        batched.encode_batch_response([(1, TokenResponse(b"\x00" * 256))])
    many = batched.encode_batch_request([TokenRequest.decode(t2)] * 3)
    with pytest.raises(OpenPCCError):
        batched.decode_batch_request(many, max_items=2)


@FUZZ
@given(data=st.data())
def test_fuzz_batch(data) -> None:
    from openpcc.privacypass import batched

    t2 = TokenRequest.decode(h(T2[0], "token_request"))
    seeds = [
        batched.encode_batch_request(
            [t2, batched.OpaqueTokenRequest(1, h(T1[0], "token_request"))]
        ),
        batched.encode_batch_response([None, (2, TokenResponse(h(T2[0], "token_response")))]),
    ]
    which = data.draw(st.integers(0, 1))
    blob = data.draw(
        st.one_of(
            st.binary(max_size=400), st.just(seeds[which]).map(lambda s: _mutate(s, data.draw))
        )
    )
    fn = (batched.decode_batch_request, batched.decode_batch_response)[which]
    with contextlib.suppress(OpenPCCError):
        fn(blob)

"""The gateway's Authorization shortcut (openpcc/privacypass/auth.py) equals the full parse.

``parse_authorization_token`` takes a regular-expression shortcut for the one form clients
send (``PrivateToken token="<base64url>"``, quoted or bare) and the RFC 9110 parser for
everything else; ``Token.decode`` slices a whole token of a known type at once and reads
field by field otherwise. Both must give the same token, or the same error type, on the
RFC and derived vectors and on fuzzed input built around the plain form.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openpcc.errors import OpenPCCError
from openpcc.privacypass import auth
from openpcc.privacypass.auth import (
    Token,
    b64url_encode,
    format_authorization,
    parse_authorization_token,
)
from tests.conftest import load_vector
from tests.fuzz_profiles import PARSER

T2 = load_vector("privacypass/rfc9578_type2_blindrsa_issuance.json")["vectors"]
DERIVED = load_vector("privacypass/derived_examples.json")["authorization_headers"]


def _outcome(fn: object, value: object) -> tuple[str, object]:
    try:
        return "ok", fn(value)  # type: ignore[operator]
    except OpenPCCError as exc:
        return "error", type(exc)


def _same(header: str) -> None:
    assert _outcome(parse_authorization_token, header) == _outcome(
        auth._parse_authorization_token_full, header
    ), header


def _variants(raw: bytes) -> list[str]:
    """The spellings of one credential: the shortcut's (quoted/bare, padded or not) and
    ones only the full parser reads (case, spaces, other schemes, two credentials)."""
    b64 = b64url_encode(raw)
    bare = b64.rstrip("=")
    plain = [f'PrivateToken token="{b64}"', f"PrivateToken token={b64}",
             f'PrivateToken token="{bare}"', f"PrivateToken token={bare}"]  # fmt: skip
    other = [
        f'privatetoken token="{b64}"', f'PrivateToken Token="{b64}"',
        f'PrivateToken  token="{b64}"', f'PrivateToken token = "{b64}"',
        f'PrivateToken token="{b64}" ', f' PrivateToken token="{b64}"',
        f'PrivateToken token="{b64}",', f'Basic abc=, PrivateToken token="{b64}"',
        f'PrivateToken token="{b64}", PrivateToken token="{b64}"',
        f'PrivateToken token="{b64}", x=y', f'PrivateToken token="{b64}", token="{b64}"',
        f'PrivateToken token="{b64[:-4]}\\{b64[-4:]}"', f"PrivateToken token={b64}=",
        f'PrivateToken token="{b64}=="', f'PrivateToken token="{bare}A"',
        f'PrivateToken token="{b64}\\"', f"PrivateToken token={b64[1:]}",
    ]  # fmt: skip
    return plain + other


@pytest.mark.parametrize("v", T2, ids=[f"rfc9578-{i}" for i in range(len(T2))])
def test_rfc9578_tokens_every_spelling(v: dict) -> None:
    raw = bytes.fromhex(v["token"])
    assert parse_authorization_token(format_authorization(raw)).encode() == raw
    for header in _variants(raw):
        _same(header)


@pytest.mark.parametrize("ex", DERIVED, ids=["type2", "type1"])
def test_derived_headers(ex: dict) -> None:
    _same(ex["authorization"])
    for header in _variants(bytes.fromhex(ex["token_hex"])):
        _same(header)


def test_shortcut_keeps_the_length_limit() -> None:
    # Over MAX_HEADER_LEN the full parser's LimitExceededError, not a decode error.
    _same("PrivateToken token=" + "A" * auth.MAX_HEADER_LEN)
    _same('PrivateToken token=""')
    _same("PrivateToken token=")


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NEAR = st.text(alphabet=_B64 + '=" \t,\\+/.', max_size=12)


@st.composite
def _near_plain(draw: st.DrawFn) -> str:
    """The plain form around a real or mangled token, with noise at either end."""
    raw = draw(
        st.one_of(
            st.sampled_from([bytes.fromhex(v["token"]) for v in T2]),
            st.binary(max_size=420),
            st.binary(min_size=354, max_size=354).map(lambda b: b"\x00\x02" + b[2:]),
        )
    )
    value = b64url_encode(raw)
    if draw(st.booleans()):
        value = value.rstrip("=")
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(value)))
        value = value[:cut] + draw(_NEAR) + value[cut:]
    quoted = draw(st.booleans())
    scheme = draw(st.sampled_from(["PrivateToken"] * 4 + ["privatetoken", "PRIVATETOKEN"]))
    head = draw(
        st.sampled_from([f"{scheme} token="] * 4 + [f"{scheme} token =", f"{scheme}  token="])
    )
    noise = st.one_of(st.just(""), st.just(""), _NEAR)  # the plain form itself, mostly
    return draw(noise) + head + (f'"{value}"' if quoted else value) + draw(noise)


@pytest.mark.fuzz
@PARSER
@given(st.one_of(_near_plain(), st.text(max_size=600)))
def test_fuzz_shortcut_equals_full_parse(header: str) -> None:
    _same(header)


def _decode_by_fields(data: bytes) -> Token:
    """Token.decode as it was before the slicing shortcut: field by field."""
    r = auth._Reader(data)
    token_type = r.u16("token_type")
    nk = auth.AUTHENTICATOR_LEN.get(token_type)
    if nk is None:
        raise auth.UnsupportedError("type")
    fields = (r.take(32, "nonce"), r.take(32, "digest"), r.take(32, "key id"), r.take(nk, "auth"))
    r.done("Token")
    return Token(token_type, *fields)


_TYPED = st.tuples(
    st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x00\x03"]), st.binary(min_size=348, max_size=356)
).map(b"".join)  # around the one valid length, 354 bytes


@pytest.mark.fuzz
@PARSER
@given(st.one_of(st.binary(max_size=400), _TYPED))
def test_fuzz_token_decode_equals_field_reader(data: bytes) -> None:
    assert _outcome(Token.decode, data) == _outcome(_decode_by_fields, data)
    assert _outcome(Token.decode, bytearray(data)) == _outcome(_decode_by_fields, data)

"""Binary HTTP (RFC 9292): official examples, hand-made edge cases, limits and fuzzing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from openpcc.errors import (
    DecodeError,
    EncodeError,
    LimitExceededError,
    OpenPCCError,
    TruncatedError,
    UnsupportedError,
)
from openpcc.wire.bhttp import (
    DEFAULT_LIMITS,
    MEDIA_TYPE,
    InformationalResponse,
    Limits,
    Request,
    Response,
    decode_message,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_message,
)
from openpcc.wire.varint import encode_varint
from tests.conftest import load_vector

VECTORS = load_vector("bhttp/rfc9292_examples.json")["examples"]
BY_NAME = {e["name"]: e for e in VECTORS}


def _raw(name: str) -> bytes:
    return bytes.fromhex(BY_NAME[name]["bhttp"])


def _fields(pairs: list[list[str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in pairs]


def _encode(msg: Request | Response, **kw: object) -> bytes:
    if isinstance(msg, Request):
        return encode_request(msg, **kw)  # type: ignore[arg-type]
    return encode_response(msg, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- official vectors


def test_vector_file_covers_all_framings():
    assert len(VECTORS) >= 7
    assert {e["decoded"]["framing_indicator"] for e in VECTORS} == {0, 1, 2, 3}


@pytest.mark.parametrize("ex", VECTORS, ids=lambda e: e["name"])
def test_vector_decodes_to_expected(ex):
    raw = bytes.fromhex(ex["bhttp"])
    assert len(raw) == ex["bhttp_length_bytes"]
    want = ex["decoded"]
    parsed = parse_message(raw)
    msg = parsed.message
    assert parsed.framing_indicator == want["framing_indicator"]
    assert parsed.padding_length == want["padding_length"]
    if want["framing_indicator"] % 2 == 0:
        assert isinstance(msg, Request)
        assert msg.method == want["method"].encode()
        assert msg.scheme == want["scheme"].encode()
        assert msg.authority == want["authority"].encode()
        assert msg.path == want["path"].encode()
    else:
        assert isinstance(msg, Response)
        assert msg.status == want["status"]
        assert msg.informational == [
            InformationalResponse(i["status"], _fields(i["header_fields"]))
            for i in want["informational"]
        ]
    assert msg.headers == _fields(want["header_fields"])
    assert msg.trailers == _fields(want["trailer_fields"])
    assert msg.content == bytes.fromhex(want["content_hex"])
    assert msg.content == want["content_ascii"].encode()
    # The one-shot helpers agree with parse_message.
    assert decode_message(raw) == msg
    if isinstance(msg, Request):
        assert decode_request(raw) == msg
    else:
        assert decode_response(raw) == msg


@pytest.mark.parametrize(
    ("name", "length"),
    [("request_known_length", 135), ("response_known_length_from_chunked", 48)],
)
def test_known_length_encoding_is_byte_exact(name, length):
    raw = _raw(name)
    msg = decode_message(raw)
    out = _encode(msg)
    assert len(out) == length
    assert out == raw


def test_request_known_length_built_from_scratch():
    """Build the RFC request by hand (not from our own decoder) and match all 135 bytes."""
    req = Request(
        method=b"GET",
        scheme=b"https",
        authority=b"",
        path=b"/hello.txt",
        headers=[
            (b"User-Agent", b"curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
            (b"Host", b"www.example.com"),
            (b"Accept-Language", b"en, mi"),
        ],
    )
    raw = _raw("request_known_length")
    assert encode_request(req) == raw
    # Truncating the empty content and trailers drops exactly the final two bytes.
    assert encode_request(req, truncate=True) == raw[:-2]


def test_response_known_length_built_from_scratch():
    resp = Response(
        200, content=b"This content contains CRLF.\r\n", trailers=[(b"Trailer", b"text")]
    )
    assert encode_response(resp) == _raw("response_known_length_from_chunked")
    assert encode_response(resp, indeterminate=True) == _raw(
        "response_indeterminate_length_from_chunked"
    )


@pytest.mark.parametrize(
    "name",
    [
        "request_indeterminate_length_padded",
        "response_indeterminate_length_with_informational",
        "response_indeterminate_length_from_chunked",
    ],
)
def test_indeterminate_examples_round_trip(name):
    raw = _raw(name)
    parsed = parse_message(raw)
    out = _encode(parsed.message, indeterminate=True, padding=parsed.padding_length)
    assert parse_message(out) == parsed
    # Our encoder puts all content in one chunk, which is how these examples were made.
    assert out == raw


@pytest.mark.parametrize("name", ["minimal_request_truncated", "minimal_response_truncated"])
def test_minimal_truncated_examples(name):
    raw = _raw(name)
    parsed = parse_message(raw)
    assert parsed.truncated
    assert _encode(parsed.message, truncate=True) == raw
    # Untruncated known-length form adds exactly three zero lengths.
    assert _encode(parsed.message) == raw + b"\x00\x00\x00"
    assert decode_message(raw + b"\x00\x00\x00") == parsed.message


@pytest.mark.parametrize("cut", [1, 2])
def test_request_known_length_truncations_keep_meaning(cut):
    raw = _raw("request_known_length")
    assert decode_message(raw[:-cut]) == decode_message(raw)
    assert parse_message(raw[:-cut]).truncated


def test_request_indeterminate_up_to_12_bytes_removable():
    raw = _raw("request_indeterminate_length_padded")
    full = decode_message(raw)
    for cut in range(1, 13):
        assert decode_message(raw[:-cut]) == full, cut
    # The 13th byte is the header section's terminator: without it the message is cut.
    with pytest.raises(TruncatedError):
        decode_message(raw[:-13])


def test_informational_example_final_byte_removable():
    raw = _raw("response_indeterminate_length_with_informational")
    assert decode_message(raw[:-1]) == decode_message(raw)
    # Removing the content terminator too cuts the content mid-sequence.
    with pytest.raises(TruncatedError):
        decode_message(raw[:-2])


def test_every_prefix_of_examples_is_valid_prefix_or_error():
    for ex in VECTORS:
        raw = bytes.fromhex(ex["bhttp"])
        full = decode_message(raw)
        for n in range(len(raw)):
            try:
                got = decode_message(raw[:n])
            except OpenPCCError:
                continue
            _assert_section_prefix(got, full)


# --------------------------------------------------------------------------- hand-made cases


def _req(**kw: object) -> Request:
    base: dict[str, object] = {
        "method": b"POST",
        "scheme": b"https",
        "authority": b"api.example",
        "path": b"/v1/chat/completions",
    }
    base.update(kw)
    return Request(**base)  # type: ignore[arg-type]


def test_media_type():
    assert MEDIA_TYPE == "message/bhttp"


def test_status_200_is_two_byte_varint():
    assert encode_response(Response(200), truncate=True) == bytes.fromhex("0140c8")


def test_names_lowercased_on_encode():
    out = encode_request(_req(headers=[(b"Content-Type", b"application/json")]))
    assert decode_request(out).headers == [(b"content-type", b"application/json")]


def test_duplicate_fields_and_order_preserved():
    headers = [(b"b", b"1"), (b"a", b"2"), (b"b", b"3"), (b"cookie", b"x=1"), (b"cookie", b"y=2")]
    for ind in (False, True):
        assert decode_request(encode_request(_req(headers=headers), indeterminate=ind)).headers == (
            headers
        )


def test_chunked_content_joined():
    req = _req(content=b"abcdefghij")
    out = encode_request(req, indeterminate=True, chunk_size=3)
    assert out.count(b"\x03") >= 3  # several chunks on the wire
    assert decode_request(out) == req


def test_non_zero_padding_rejected():
    raw = _raw("request_known_length") + b"\x00\x00\x01"
    with pytest.raises(DecodeError) as exc:
        decode_message(raw)
    assert not isinstance(exc.value, TruncatedError)


def test_padding_reported():
    raw = encode_response(Response(200, content=b"x"), padding=17)
    parsed = parse_message(raw)
    assert parsed.padding_length == 17
    assert not parsed.truncated


@pytest.mark.parametrize("framing", [4, 5, 63, 1000])
def test_unknown_framing_unsupported(framing):
    with pytest.raises(UnsupportedError):
        decode_message(encode_varint(framing) + b"\x00" * 8)


def test_empty_input_truncated():
    with pytest.raises(TruncatedError):
        decode_message(b"")


def test_non_minimal_varint_lengths_accepted():
    # QUIC varints need not be minimal; method length 3 as a 2-byte varint.
    raw = b"\x00" + b"\x40\x03GET" + b"\x05https" + b"\x00" + b"\x01/"
    assert decode_request(raw) == Request(b"GET", b"https", b"", b"/")


@pytest.mark.parametrize("status", [0, 99, 600, 1000, 2**20])
def test_bad_final_status(status):
    with pytest.raises(DecodeError):
        decode_response(b"\x01" + encode_varint(status))


def test_informational_then_end_is_truncated():
    with pytest.raises(TruncatedError):
        decode_response(b"\x01" + encode_varint(103) + b"\x00")
    with pytest.raises(TruncatedError):
        decode_response(b"\x01" + encode_varint(103))


def test_informational_round_trip_both_framings():
    resp = Response(
        200,
        headers=[(b"content-type", b"text/plain")],
        content=b"hello",
        trailers=[(b"x-t", b"1")],
        informational=[
            InformationalResponse(100, []),
            InformationalResponse(103, [(b"link", b"</a.css>; rel=preload")]),
        ],
    )
    for ind in (False, True):
        assert decode_response(encode_response(resp, indeterminate=ind)) == resp


def test_wrong_kind():
    req_raw = _raw("request_known_length")
    resp_raw = _raw("response_known_length_from_chunked")
    with pytest.raises(DecodeError):
        decode_response(req_raw)
    with pytest.raises(DecodeError):
        decode_request(resp_raw)


def _known_request_with_header_section(section: bytes) -> bytes:
    control = b"\x00\x03GET\x05https\x00\x01/"
    return control + encode_varint(len(section)) + section


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Content-Type", b"x"),  # uppercase: malformed per RFC 9113 §8.2.1
        (b"bad name", b"x"),
        (b":path", b"/"),  # pseudo-fields are control data, never fields
        (b"a\x00", b"x"),
        (b"\xff", b"x"),
        (b"ok", b"a\r\nb"),
        (b"ok", b"a\x00b"),
        (b"ok", b"a\x7fb"),
        (b"ok", b" lead"),
        (b"ok", b"trail\t"),
    ],
)
def test_invalid_fields_rejected_on_decode(name, value):
    section = encode_varint(len(name)) + name + encode_varint(len(value)) + value
    with pytest.raises(DecodeError) as exc:
        decode_request(_known_request_with_header_section(section))
    assert not isinstance(exc.value, TruncatedError)


def test_field_value_obs_text_and_inner_whitespace_accepted():
    value = b"caf\xc3\xa9 \t x"
    section = b"\x01a" + encode_varint(len(value)) + value
    assert decode_request(_known_request_with_header_section(section)).headers == [(b"a", value)]


def test_empty_field_name_rejected_known_length():
    with pytest.raises(DecodeError):
        decode_request(_known_request_with_header_section(b"\x00\x01x"))


def test_field_line_overrunning_known_section_is_malformed():
    # Section says 4 bytes, but the field line inside needs 5.
    raw = b"\x00\x03GET\x05https\x00\x01/" + b"\x04" + b"\x01a\x02bc"
    with pytest.raises(DecodeError) as exc:
        decode_request(raw)
    assert not isinstance(exc.value, TruncatedError)


@pytest.mark.parametrize(
    ("method", "scheme", "authority", "path"),
    [
        (b"", b"https", b"", b"/"),
        (b"G T", b"https", b"", b"/"),
        (b"GET", b"1http", b"", b"/"),
        (b"GET", b"ht tp", b"", b"/"),
        (b"GET", b"https", b"a b", b"/"),
        (b"GET", b"https", b"", b"/a b"),
        (b"GET", b"https", b"", b"/\xc3\xa9"),
    ],
)
def test_invalid_control_data(method, scheme, authority, path):
    raw = b"\x00" + b"".join(encode_varint(len(x)) + x for x in (method, scheme, authority, path))
    with pytest.raises(DecodeError):
        decode_request(raw)
    with pytest.raises(EncodeError):
        encode_request(Request(method, scheme, authority, path))


def test_connect_style_empty_scheme_and_path_allowed():
    req = Request(b"CONNECT", b"", b"example.com:443", b"")
    assert decode_request(encode_request(req)) == req


def test_truncated_inside_sections():
    full = encode_request(_req(headers=[(b"a", b"b")], content=b"hello"), indeterminate=True)
    # Cut after the complete field line but before the section terminator.
    control_len = len(encode_request(_req(), indeterminate=True, truncate=True))
    with pytest.raises(TruncatedError):
        decode_request(full[: control_len + 4])
    # Cut after a complete content chunk but before the content terminator.
    with pytest.raises(TruncatedError):
        decode_request(full[:-2])
    known = encode_request(_req(content=b"hello"))
    with pytest.raises(TruncatedError):
        decode_request(known[:-3])


def test_truncate_flag_only_drops_empty_trailing_sections():
    req = _req(headers=[(b"a", b"b")], content=b"x")
    assert encode_request(req, truncate=True) == encode_request(req)[:-1]
    req_t = _req(trailers=[(b"t", b"v")])
    assert encode_request(req_t, truncate=True) == encode_request(req_t)
    for ind in (False, True):
        empty = _req()
        assert len(encode_request(empty, indeterminate=ind, truncate=True)) == (
            len(encode_request(empty, indeterminate=ind)) - 3
        )


# --------------------------------------------------------------------------- encoder errors


@pytest.mark.parametrize(
    "resp",
    [
        Response(199),
        Response(600),
        Response(True),  # type: ignore[arg-type]
        Response(200, informational=[InformationalResponse(200, [])]),
        Response(200, informational=[InformationalResponse(99, [])]),
    ],
)
def test_encode_bad_status(resp):
    with pytest.raises(EncodeError):
        encode_response(resp)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"", b"x")],
        [(b"a b", b"x")],
        [(b"a", b"x\ny")],
        [(b"a", b" x")],
        [("a", b"x")],
        [(b"a", "x")],
        [(b"a",)],
    ],
)
def test_encode_bad_fields(headers):
    with pytest.raises(EncodeError):
        encode_request(_req(headers=headers))
    with pytest.raises(EncodeError):
        encode_response(Response(200, trailers=headers), indeterminate=True)


@pytest.mark.parametrize("kw", [{"padding": -1}, {"padding": 1.5}, {"chunk_size": 0}])
def test_encode_bad_options(kw):
    with pytest.raises(EncodeError):
        encode_request(_req(content=b"abc"), indeterminate=True, **kw)


@pytest.mark.parametrize("bad", [None, 5, b"ab"])
def test_encode_bad_sections(bad):
    with pytest.raises(EncodeError):
        encode_request(_req(headers=bad))
    with pytest.raises(EncodeError):
        encode_response(Response(200, informational=[InformationalResponse(100, bad)]))


def test_encode_accepts_bytearray():
    req = _req(headers=[(bytearray(b"a"), memoryview(b"b"))], content=bytearray(b"c"))
    assert decode_request(encode_request(req)) == _req(headers=[(b"a", b"b")], content=b"c")


# --------------------------------------------------------------------------- limits


def _limits(**kw: int) -> Limits:
    return dataclasses.replace(DEFAULT_LIMITS, **kw)


def test_default_limits_are_strict():
    assert DEFAULT_LIMITS.max_field_lines == 256
    assert DEFAULT_LIMITS.max_field_section_size == 64 * 1024
    assert DEFAULT_LIMITS.max_content_size == 16 * 1024 * 1024


@pytest.mark.parametrize("ind", [False, True])
def test_limit_field_lines(ind):
    at_limit = _req(headers=[(b"h", b"v")] * 256)
    assert decode_request(encode_request(at_limit, indeterminate=ind)) == at_limit
    over = _req(headers=[(b"h", b"v")] * 257)
    with pytest.raises(LimitExceededError):
        decode_request(encode_request(over, indeterminate=ind))
    # Trailer sections count too.
    with pytest.raises(LimitExceededError):
        decode_request(encode_request(_req(trailers=[(b"t", b"v")] * 257), indeterminate=ind))


@pytest.mark.parametrize("ind", [False, True])
def test_limit_field_section_size(ind):
    req = _req(headers=[(b"h", b"v" * 1000)] * 10)
    raw = encode_request(req, indeterminate=ind)
    assert decode_request(raw, _limits(max_field_section_size=20_000)) == req
    with pytest.raises(LimitExceededError):
        decode_request(raw, _limits(max_field_section_size=5_000))


@pytest.mark.parametrize("ind", [False, True])
def test_limit_content(ind):
    req = _req(content=b"x" * 1000)
    raw = encode_request(req, indeterminate=ind, chunk_size=100)
    assert decode_request(raw, _limits(max_content_size=1000)) == req
    with pytest.raises(LimitExceededError):
        decode_request(raw, _limits(max_content_size=999))


def test_limit_chunks():
    req = _req(content=b"x" * 100)
    raw = encode_request(req, indeterminate=True, chunk_size=1)
    assert decode_request(raw, _limits(max_content_chunks=100)) == req
    with pytest.raises(LimitExceededError):
        decode_request(raw, _limits(max_content_chunks=99))


def test_limit_informational():
    resp = Response(200, informational=[InformationalResponse(103, [])] * 9)
    with pytest.raises(LimitExceededError):
        decode_response(encode_response(resp))
    resp.informational = resp.informational[:8]
    assert decode_response(encode_response(resp)) == resp


def test_limit_control_field():
    req = _req(path=b"/" + b"a" * 9000)
    with pytest.raises(LimitExceededError):
        decode_request(encode_request(req))
    assert decode_request(encode_request(req), _limits(max_control_field_size=9001)) == req


@pytest.mark.parametrize("declared", [2**30, 2**62 - 1])
def test_huge_declared_lengths_fail_fast(declared):
    control = b"\x00\x03GET\x05https\x00\x01/"
    huge = encode_varint(declared)
    # Header section, content, and a field value declared enormous, with nothing behind them.
    for raw in (
        control + huge,
        control + b"\x00" + huge,
        b"\x02\x03GET\x05https\x00\x01/" + b"\x01a" + huge,
        b"\x02\x03GET\x05https\x00\x01/" + b"\x00" + huge,
        b"\x00" + huge,
    ):
        with pytest.raises(LimitExceededError):
            decode_request(raw)
    # Within limits but beyond the data: truncated, not a limit problem.
    with pytest.raises(TruncatedError):
        decode_request(control + b"\x00" + encode_varint(1000) + b"x")


# --------------------------------------------------------------------------- property tests

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
names = st.text(alphabet=_TCHAR, min_size=1, max_size=12).map(str.encode)
_value_bytes = [0x09, *range(0x20, 0x7F), *range(0x80, 0x100)]
values = (
    st.lists(st.sampled_from(_value_bytes), max_size=24).map(bytes).map(lambda v: v.strip(b" \t"))
)
field_lists = st.lists(st.tuples(names, values), max_size=6)
tokens = st.text(alphabet=_TCHAR.upper() + _TCHAR, min_size=1, max_size=8).map(str.encode)
visible = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], max_size=20).map(str.encode)
schemes = st.from_regex(r"\A[a-z][a-z0-9+.\-]{0,6}\Z", fullmatch=True).map(str.encode)

requests = st.builds(
    Request,
    method=tokens,
    scheme=st.one_of(st.just(b"https"), schemes),
    authority=visible,
    path=visible,
    headers=field_lists,
    content=st.binary(max_size=200),
    trailers=field_lists,
)
responses = st.builds(
    Response,
    status=st.integers(200, 599),
    headers=field_lists,
    content=st.binary(max_size=200),
    trailers=field_lists,
    informational=st.lists(
        st.builds(InformationalResponse, st.integers(100, 199), field_lists), max_size=3
    ),
)
messages = st.one_of(requests, responses)
options = st.fixed_dictionaries(
    {
        "indeterminate": st.booleans(),
        "padding": st.integers(0, 40),
        "truncate": st.booleans(),
        "chunk_size": st.one_of(st.none(), st.integers(1, 50)),
    }
)


@given(messages, options)
def test_round_trip(msg, opts):
    raw = _encode(msg, **opts)
    parsed = parse_message(raw)
    assert parsed.message == msg
    indicator = (0 if isinstance(msg, Request) else 1) + (2 if opts["indeterminate"] else 0)
    assert parsed.framing_indicator == indicator
    if not opts["truncate"]:
        assert parsed.padding_length == opts["padding"]
        assert not parsed.truncated
    assert parse_message(bytearray(raw)).message == msg
    assert parse_message(memoryview(raw)).message == msg


@given(messages, st.booleans())
def test_known_and_indeterminate_agree(msg, truncate):
    a = decode_message(_encode(msg, truncate=truncate))
    b = decode_message(_encode(msg, indeterminate=True, truncate=truncate))
    assert a == b == msg


def _decode_or_error(raw: bytes) -> Request | Response | None:
    """Decode, allowing only our own exception types to escape."""
    try:
        return decode_message(raw)
    except OpenPCCError:
        return None


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_openpcc_errors(raw):
    _decode_or_error(raw)


@settings(max_examples=500)
@given(st.integers(0, 3), st.binary(max_size=300))
def test_random_bodies_after_valid_framing(framing, body):
    _decode_or_error(bytes([framing]) + body)


_mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
)


def _mutate(raw: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(raw)
    for kind, pos, arg in mutations:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "flip":
            buf[i] ^= 1 << int(arg)  # type: ignore[call-overload]
        elif kind == "insert":
            buf[i:i] = arg  # type: ignore[assignment]
        elif kind == "delete":
            del buf[i : i + int(arg)]  # type: ignore[call-overload]
        elif kind == "cut":
            del buf[i:]
        else:
            buf[i] = int(arg)  # type: ignore[call-overload]
    return bytes(buf)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages, options, st.lists(_mutations, min_size=1, max_size=4))
def test_mutated_messages_only_raise_openpcc_errors(msg, opts, mutations):
    raw = _encode(msg, **opts)
    mutated = _mutate(raw, mutations)
    assume(mutated != raw)
    _decode_or_error(mutated)


@settings(max_examples=400)
@given(st.sampled_from(VECTORS), st.lists(_mutations, min_size=1, max_size=3))
def test_mutated_vectors_only_raise_openpcc_errors(ex, mutations):
    _decode_or_error(_mutate(bytes.fromhex(ex["bhttp"]), mutations))


def _assert_section_prefix(got: Request | Response, full: Request | Response) -> None:
    """A truncated message equals the original with some trailing sections emptied."""
    assert type(got) is type(full)
    if isinstance(full, Request):
        assert isinstance(got, Request)
        assert (got.method, got.scheme, got.authority, got.path) == (
            full.method,
            full.scheme,
            full.authority,
            full.path,
        )
    else:
        assert isinstance(got, Response)
        assert (got.status, got.informational) == (full.status, full.informational)
    parts = [
        (got.headers, full.headers),
        (got.content, full.content),
        (got.trailers, full.trailers),
    ]
    emptied = False
    for mine, theirs in parts:
        if emptied:
            assert not mine
        elif mine != theirs:
            assert not mine
            emptied = True


@settings(max_examples=200)
@given(messages, st.booleans(), st.data())
def test_prefixes_decode_to_section_prefix_or_fail(msg, ind, data):
    raw = _encode(msg, indeterminate=ind)
    n = data.draw(st.integers(0, len(raw)))
    got = _decode_or_error(raw[:n])
    if got is not None:
        _assert_section_prefix(got, msg)

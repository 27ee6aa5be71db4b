"""Every parser a hostile peer can reach, under one fuzz contract (issue 9).

Each case feeds a parser random bytes or a valid message mutated a few times (bit
flips, cuts, insertions, deletions, splices of the valid bytes) and requires that it
either succeeds or raises a typed ``OpenPCCError`` (``RegistrationError`` for the
gateway's registration body): never ``IndexError``, ``struct.error``, ``KeyError``,
``RecursionError`` or a hang. The module-level tests next to each parser keep their
specific properties (round trips, truncation detection); this file is the volume run.

Examples per parser: 300 by default, 10 000 (``ci``) or 100 000 (``OPENPCC_FUZZ=long`` or
``explore``), see tests/fuzz_profiles.py; ``dev`` and ``ci`` draw the same cases every run.
One command: ``OPENPCC_FUZZ=long python -m pytest -m fuzz``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import random
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from gateway.registry import RegistrationError, parse_registration
from openpcc.attestation import amd, tdx
from openpcc.attestation.amd import pinned_chain
from openpcc.attestation.bundle import AttestationBundle, make_simulated_bundle
from openpcc.attestation.certs import load_certificates
from openpcc.attestation.claims import Claims
from openpcc.attestation.nvidia import SpdmEvidence, parse_nvtrust_dump, parse_rim, verify_gpu
from openpcc.attestation.sigstore_manifest import OfflineTrustRoot, SignerIdentity, verify_blob
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.attestation.snp import AttestationReport
from openpcc.attestation.tdx import TdxQuote
from openpcc.errors import OpenPCCError
from openpcc.privacypass import batched, issuance
from openpcc.privacypass.auth import (
    TOKEN_TYPE_BLIND_RSA,
    PrivateTokenChallenge,
    Token,
    TokenChallenge,
    format_authorization,
    format_www_authenticate,
    parse_authorization_token,
    parse_www_authenticate,
)
from openpcc.privacypass.directory import IssuerDirectory, TokenKeyEntry
from openpcc.wire import bhttp, hpke, ohttp, sealed
from openpcc.wire.bhttp_stream import ResponseStreamDecoder, ResponseStreamEncoder
from openpcc.wire.chunked import ChunkedRequestReceiver, ChunkedRequestSender
from tests.conftest import SAMPLES, VECTORS
from tests.fuzz_profiles import PARSER

pytestmark = pytest.mark.fuzz

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
SIGSTORE = VECTORS / "sigstore"
GPU_EVIDENCE = SAMPLES / "nvidia-gpu/h100-nvtrust-sample/attestation_report.bin"
SIGSTORE_SIGNER = SignerIdentity("aryadeeptade@gmail.com", "https://github.com/login/oauth")


# -- valid seeds, built once -------------------------------------------------------------------


@functools.cache
def world() -> dict[str, object]:
    """Keys and valid messages of every kind (fresh keys; vectors live in their own tests)."""
    kp = hpke.generate_key_pair()
    cfg = ohttp.KeyConfig(
        7,
        hpke.KEM_DHKEM_X25519_HKDF_SHA256,
        kp.public_key,
        (ohttp.SymmetricSuite(hpke.KDF_HKDF_SHA256, hpke.AEAD_AES_128_GCM),),
    )
    keys = {7: kp.private_key}
    req = bhttp.Request(
        b"POST", b"https", b"gateway", b"/v1/infer",
        [(b"content-type", b"application/json"), (b"authorization", b"x")], b'{"a":1}',
    )  # fmt: skip
    resp = bhttp.Response(200, [(b"content-type", b"text/plain")], b"hello world")
    inner = bhttp.encode_request(req)
    plain_req, client_ctx = ohttp.encapsulate_request(cfg, inner)
    _, server_ctx = ohttp.decapsulate_request(keys, plain_req)
    sender = ChunkedRequestSender(cfg)
    chunked_req = sender.seal_chunk(inner[:20]) + sender.seal_chunk(inner[20:], final=True)
    gateway_side = ChunkedRequestReceiver(keys)
    _feed(gateway_side, chunked_req)
    rs = gateway_side.response_sender()
    chunked_resp = rs.header() + rs.seal_chunk(b"a" * 30) + rs.seal_chunk(b"b" * 9, final=True)
    enc = ResponseStreamEncoder()
    stream = enc.head(200, [(b"content-type", b"text/event-stream")]) + enc.data(b"x" * 40)
    stream += enc.end()

    node_pairs = [hpke.generate_key_pair() for _ in range(2)]
    node_keys = [sealed.NodeKey(bytes([i]) * 16, p.public_key) for i, p in enumerate(node_pairs)]
    sr = sealed.seal_request(node_keys, "tiny", inner)
    opened = sealed.open_request(sr.envelope, node_keys[0].node_id,
                                 node_pairs[0].private_key, node_pairs[0].public_key)  # fmt: skip
    sealed_resp = opened.sealer.head(200, [(b"content-type", b"text/event-stream")])
    sealed_resp += opened.sealer.data(b"data: hi\n\n" * 20) + opened.sealer.end()

    issuer_key = issuance.IssuerKey.generate()
    challenge = TokenChallenge(TOKEN_TYPE_BLIND_RSA, "issuer.example", b"", ("a.example",))
    treq, state = issuance.begin_token_request(issuer_key.token_key, challenge)
    tresp = issuance.issue(issuer_key, treq)
    token = issuance.finalize_token(state, tresp)
    directory = IssuerDirectory(
        "https://issuer.example/token-request",
        (TokenKeyEntry(TOKEN_TYPE_BLIND_RSA, issuer_key.token_key, 1),),
    )

    tee = SimulatedTEE.create(tempfile.mkdtemp(prefix="openpcc-fuzz-tee-"), now=NOW)
    claims = Claims(
        node_id="node-1", hpke_public_key=b"\x11" * 32, tee="simulated-snp",
        gpu_evidence_digest=None, model_digest=b"\x4d" * 32, release_id="dev",
        issued_at=int(NOW.timestamp()) - 60, expires_at=int(NOW.timestamp()) + 3600,
        signing_key=b"\x55" * 32,
    )  # fmt: skip
    bundle = make_simulated_bundle(tee, claims, bytes(range(48)))
    registration = {
        "node_id": "ab" * 16,
        "url": "http://127.0.0.1:9",
        "public_key": "cd" * 32,
        "models": ["tiny"],
        "bundle": bundle.to_json_obj(),
    }
    return {
        "keys": keys,
        "client_ctx": client_ctx,
        "chunk_sender": sender,
        "node": (node_keys[0].node_id, node_pairs[0].private_key, node_pairs[0].public_key),
        "response_opener": sr.response_opener,
        "seeds": {
            "bhttp": [inner, bhttp.encode_response(resp, indeterminate=True)],
            "bhttp_stream": [stream],
            "ohttp_key_configs": [ohttp.encode_key_configs([cfg])],
            "ohttp_key_config": [cfg.encode()],
            "ohttp_request": [plain_req],
            "ohttp_response": [server_ctx.encapsulate_response(bhttp.encode_response(resp))],
            "chunked_request": [chunked_req],
            "chunked_response": [chunked_resp],
            "sealed_envelope": [sr.envelope],
            "sealed_response": [sealed_resp],
            "token_challenge": [challenge.encode()],
            "token_request": [treq.encode()],
            "token_response": [tresp.encode()],
            "token": [token.encode()],
            "token_key": [issuer_key.token_key],
            "batch_request": [batched.encode_batch_request([treq, treq])],
            "batch_response": [batched.encode_batch_response([(2, tresp), None])],
            "www_authenticate": [
                format_www_authenticate(
                    PrivateTokenChallenge(challenge.encode(), issuer_key.token_key, 60)
                ).encode()
            ],
            "authorization": [format_authorization(token).encode()],
            "issuer_directory": [directory.serialize()],
            "snp_report": [
                (SAMPLES / "sev-snp/milan-vcek-virtee/report_milan.bin").read_bytes(),
                tee.issue_report(b"\x00" * 64, measurement=bytes(range(48))),
            ],
            "tdx_quote": [
                (SAMPLES / "tdx/emr-v5-uptodate-gotdxguest/quote_v5_sample.dat").read_bytes()
            ],
            "spdm_evidence": [
                (SAMPLES / "nvidia-gpu/h100-nvtrust-sample/attestation_report.bin").read_bytes()
            ],
            "rim_xml": [
                next((SAMPLES / "nvidia-gpu/h100-nvtrust-sample/rims").glob("*.xml")).read_bytes()
            ],
            "nvtrust_dump": [
                json.dumps(
                    {
                        "gpus": [
                            {
                                "UUID": "GPU-1",
                                "AttestationReport": {"py/b64": "AAEC"},
                                "CertificateChains": {
                                    "GpuAttestationCertificateChain": [{"pem": "QQ=="}]
                                },
                            }
                        ]
                    }
                ).encode()
            ],
            **_certificate_seeds(),
            "claims": [claims.encode()],
            "bundle_json": [bundle.encode()],
            "registration_json": [json.dumps(registration).encode()],
        },
    }


def _certificate_seeds() -> dict[str, list[bytes]]:
    """Real certificate-bearing evidence from tests/attestation-samples and the Sigstore
    vectors: what a node, a client or `openpcc verify` reads from outside. The chain
    targets mutate the leaf's DER (where a parser meets the bytes) and keep the rest."""
    snp = SAMPLES / "sev-snp"
    return {
        "snp_vcek_chain": [
            (snp / "milan-vcek-virtee/vcek_milan.der").read_bytes(),
            (snp / "milan-vlek-aws-trustee/test-vlek.der").read_bytes(),
        ],
        "tdx_pck_chain": [_der(_pck_chain()[0])],
        "gpu_cert_chain": [_der(_gpu_chain()[0])],
        "sigstore_bundle": [(SIGSTORE / "new_bundle.txt.sigstore.json").read_bytes()],
    }


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(der: bytes) -> bytes:
    """Any bytes as one PEM block, so the DER inside reaches the certificate parser."""
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


@functools.cache
def _pck_chain() -> tuple[x509.Certificate, ...]:
    quote = (SAMPLES / "tdx/emr-v5-uptodate-gotdxguest/quote_v5_sample.dat").read_bytes()
    return tuple(TdxQuote.parse(quote).pck_chain())


@functools.cache
def _gpu_chain() -> tuple[x509.Certificate, ...]:
    pem = (SAMPLES / "nvidia-gpu/h100-nvtrust-sample/gpu_cert_chain.pem").read_bytes()
    return tuple(load_certificates(pem))


# -- the parsers, each fed one input -------------------------------------------------------------


def _feed(receiver: object, data: bytes) -> None:
    step = 1 + data[0] % 64 if data else 1  # arbitrary piece sizes, derived from the input
    for i in range(0, len(data), step):
        receiver.receive_data(data[i : i + step])  # type: ignore[attr-defined]
    receiver.end_of_input()  # type: ignore[attr-defined]


def _bhttp(data: bytes) -> None:
    bhttp.parse_message(data)


def _sealed_response(data: bytes) -> None:
    _feed(world()["response_opener"](), data)  # type: ignore[operator]


def _directory(data: bytes) -> None:
    IssuerDirectory.parse(data)


def _snp_vcek_chain(data: bytes) -> None:
    """A VCEK/VLEK as a bundle's endorsements carry it: decoded, its AMD extensions
    read, checked up to the pinned roots."""
    leaf = amd.load_certificate(data)
    info = amd.endorsement_info(leaf)
    product = info.product or "Milan"
    amd.verify_chain(
        leaf, pinned_chain(product, info.kind == "VLEK"), now=NOW, product=product,
        vlek=info.kind == "VLEK",
    )  # fmt: skip


def _tdx_pck_chain(data: bytes) -> None:
    """The PEM chain of a quote's certification data, its leaf replaced by ``data``."""
    chain = load_certificates(_pem(data) + _rest_pem(_pck_chain()))
    tdx.verify_chain(chain, tdx.intel_sgx_root_ca(), NOW)


def _gpu_cert_chain(data: bytes) -> None:
    """verify_gpu with the device chain's leaf replaced by ``data``."""
    verify_gpu(_sample(GPU_EVIDENCE), _pem(data) + _rest_pem(_gpu_chain()), now=NOW,
               expected_nonce=None)  # fmt: skip


def _sigstore_bundle(data: bytes) -> None:
    verify_blob(_sample(SIGSTORE / "new_bundle.txt"), data, SIGSTORE_SIGNER, _sigstore_root(),
                now=NOW)  # fmt: skip


@functools.cache
def _sample(path: Path) -> bytes:
    """A sample file, read once for all cases (not once per case)."""
    return path.read_bytes()


@functools.cache
def _rest_pem(chain: tuple[x509.Certificate, ...]) -> bytes:
    """The chain above the leaf, as the PEM the target appends to the mutated leaf."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:])


@functools.cache
def _sigstore_root() -> OfflineTrustRoot:
    return OfflineTrustRoot.from_file(SIGSTORE / "trusted_root.production.json")


def _snp(data: bytes) -> None:
    AttestationReport.parse(data)


PARSERS: dict[str, Callable[[bytes], object]] = {
    "bhttp": _bhttp,
    "bhttp_stream": lambda d: _feed(ResponseStreamDecoder(), d),
    "ohttp_key_configs": ohttp.parse_key_configs,
    "ohttp_key_config": ohttp.KeyConfig.parse,
    "ohttp_request": lambda d: ohttp.decapsulate_request(world()["keys"], d),  # type: ignore[arg-type]
    "ohttp_response": lambda d: world()["client_ctx"].decapsulate_response(d),  # type: ignore[attr-defined]
    "chunked_request": lambda d: _feed(ChunkedRequestReceiver(world()["keys"]), d),  # type: ignore[arg-type]
    "chunked_response": lambda d: _feed(world()["chunk_sender"].response_receiver(), d),  # type: ignore[attr-defined]
    "sealed_envelope": lambda d: sealed.open_request(d, *world()["node"]),  # type: ignore[misc]
    "sealed_response": _sealed_response,
    "token_challenge": TokenChallenge.decode,
    "token_request": issuance.TokenRequest.decode,
    "token_response": issuance.TokenResponse.decode,
    "token": Token.decode,
    "token_key": issuance.decode_token_key,
    "batch_request": batched.decode_batch_request,
    "batch_response": batched.decode_batch_response,
    "www_authenticate": lambda d: parse_www_authenticate(d.decode("latin-1")),
    "authorization": lambda d: parse_authorization_token(d.decode("latin-1")),
    "issuer_directory": _directory,
    "snp_report": _snp,
    "tdx_quote": TdxQuote.parse,
    "spdm_evidence": SpdmEvidence.parse,
    "rim_xml": parse_rim,
    "snp_vcek_chain": _snp_vcek_chain,
    "tdx_pck_chain": _tdx_pck_chain,
    "gpu_cert_chain": _gpu_cert_chain,
    "sigstore_bundle": _sigstore_bundle,
    "nvtrust_dump": parse_nvtrust_dump,
    "claims": Claims.decode,
    "bundle_json": AttestationBundle.decode,
    "registration_json": parse_registration,
}


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    """Random bytes (1 in 4), or a valid seed after 1-6 random edits."""
    if rng.randrange(4) == 0:
        return rng.randbytes(rng.randrange(rng.choice((16, 300, 3000)) + 1))
    b = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        if op == 0 and b:  # flip
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
        elif op == 1:  # cut
            b = b[: rng.randint(0, len(b))]
        elif op == 2:  # insert
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:  # delete a run
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        elif op == 4 and b:  # duplicate a slice elsewhere (framing confusion)
            i = rng.randrange(len(b))
            j = rng.randint(i, min(len(b), i + 64))
            k = rng.randint(0, len(b))
            b[k:k] = b[i:j]
    return bytes(b)


def hostile(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Hostile inputs, driven by one 64-bit draw per case.

    Why not draw every edit through hypothesis: its per-draw bookkeeping made a case cost
    about 1 ms, too slow for 10 000 cases x 28 parsers in CI. A seeded PRNG keeps each
    case reproducible (hypothesis prints the seed of a failing case); shrinking is lost.
    """
    return st.integers(0, 2**64 - 1).map(lambda n: mutate(random.Random(n), seeds))


# Inputs that once escaped as untyped errors, as (target, the 64-bit draw hostile() maps
# through mutate()): replayed in every profile. A long or explore run that fails prints
# its draw ("Falsifying example: run(data=...)" comes from that integer): add it here.
FOUND = [
    ("rim_xml", 2285779),  # KeyError: 156 from Certificate.issuer of a KeyInfo certificate
    # Found by the certificate targets added with it (issue 21), before certs.py:
    ("snp_vcek_chain", 34),  # UnsupportedAlgorithm: signature algorithm OID not recognized
    ("snp_vcek_chain", 1551),  # KeyError: 110 (a name's ASN.1 string tag)
    ("gpu_cert_chain", 93),  # ValueError: Invalid key (the leaf's public key)
    ("gpu_cert_chain", 179),  # ValueError: error parsing the subjectAltName extension
]


@pytest.mark.parametrize(("name", "draw"), FOUND)
def test_found_inputs_raise_only_typed_errors(name: str, draw: int) -> None:
    data = mutate(random.Random(draw), world()["seeds"][name])  # type: ignore[index]
    with contextlib.suppress(_typed(name)):
        PARSERS[name](data)


def _typed(name: str) -> tuple[type[Exception], ...]:
    return (OpenPCCError, RegistrationError) if name == "registration_json" else (OpenPCCError,)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_typed_errors(name: str) -> None:
    seeds: list[bytes] = world()["seeds"][name]  # type: ignore[index]
    parse = PARSERS[name]
    for seed in seeds:  # the seeds themselves are valid (or the test would prove little)
        parse(seed)
    typed = _typed(name)

    @PARSER
    @given(hostile(seeds))
    def run(data: bytes) -> None:
        with contextlib.suppress(typed):
            parse(data)

    run()


@pytest.mark.parametrize("profile", ["dev", "ci"])
def test_reproducible_profiles_draw_the_same_examples_every_run(profile: str) -> None:
    """A CI result depends only on the commit: the same hostile inputs, run after run."""
    from hypothesis import settings

    seeds: list[bytes] = world()["seeds"]["bhttp"]  # type: ignore[index]
    drawn: list[bytes] = []

    @settings(settings.get_profile(f"openpcc-parser-{profile}"), max_examples=50)
    @given(hostile(seeds))
    def run(data: bytes) -> None:
        drawn.append(data)

    run()
    first, drawn[:] = list(drawn), []
    run()
    assert len(first) >= 40 and drawn == first

"""Release manifest: strict parsing, Ed25519 signature, validity, per-platform policies, pins."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from openpcc.attestation.policy import (
    MANIFEST_FORMAT,
    Manifest,
    SignedManifest,
    TrustPolicy,
    release_key_id,
)
from openpcc.errors import DecodeError, VerificationError
from openpcc.wire import hpke, ohttp

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
T0 = int(NOW.timestamp())
MEAS = "ab" * 48
MODEL = "cd" * 32
TOKEN_KEY = bytes(range(32))


def manifest_obj(**over) -> dict:
    obj = {
        "format": MANIFEST_FORMAT,
        "serial": 3,
        "issued_at": T0 - 3600,
        "expires_at": T0 + 30 * 86400,
        "releases": {
            "openpcc-2026.11.0": {
                "model_digests": [MODEL],
                "snp": {"measurements": [MEAS]},
                "tdx": {
                    "mrtd": ["11" * 48],
                    "rtmr0": None,
                    "rtmr1": ["22" * 48],
                    "rtmr2": None,
                    "rtmr3": None,
                },
                "gpu": {"driver_versions": ["550.90.07"], "vbios_versions": ["96.00.9f.00.01"]},
            }
        },
        "snp": {"min_tcb": {"Genoa": {"bl": 10, "snp": 23, "ucode": 84}}, "allow_smt": False},
        "tdx": {"accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"]},
        "gpu": {"require": True},
        "ohttp_key_configs": [],
        "token_key_ids": [TOKEN_KEY.hex()],
    }
    obj.update(over)
    return obj


def raw(obj: dict) -> bytes:
    return json.dumps(obj, indent=2).encode()


@pytest.fixture(scope="module")
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def signed(key, obj=None) -> bytes:
    return SignedManifest.sign(raw(obj or manifest_obj()), key).encode()


def test_round_trip_builds_platform_policies(key):
    policy = TrustPolicy.from_signed(signed(key), [key.public_key()], NOW)
    assert policy.key_id == release_key_id(key.public_key()) and not policy.development
    rel = "openpcc-2026.11.0"
    snp = policy.snp_policy(rel, "Genoa")
    assert snp.measurements == frozenset({bytes.fromhex(MEAS)})
    assert snp.min_tcb == {"bl": 10, "snp": 23, "ucode": 84} and snp.allow_smt is False
    assert not snp.allow_debug and snp.vmpl == 0 and snp.trusted_roots == frozenset()
    tdx = policy.tdx_policy(rel)
    assert tdx.mrtd == frozenset({bytes.fromhex("11" * 48)}) and tdx.rtmr0 is None
    assert tdx.accepted_tcb_statuses == {"UpToDate", "SWHardeningNeeded"}
    gpu = policy.gpu_policy(rel)
    assert gpu.allowed_driver_versions == {"550.90.07"}
    assert gpu.allowed_vbios_versions == {"96.00.9F.00.01"}
    assert policy.accepts_model(rel, bytes.fromhex(MODEL))
    assert not policy.accepts_model(rel, bytes(32))
    assert policy.summary()["releases"] == [rel]


def test_unknown_release_and_product_accept_nothing(key):
    policy = TrustPolicy.from_signed(signed(key), [key.public_key()], NOW)
    assert policy.release("other") is None
    assert policy.snp_policy("other").measurements == frozenset()
    assert policy.tdx_policy("other").mrtd == frozenset()
    assert policy.gpu_policy("other").allowed_driver_versions == frozenset()
    assert policy.snp_min_tcb("Milan") == (None, "no minimum TCB for product Milan in the manifest")
    # A release without an snp section accepts no SNP evidence.
    obj = manifest_obj()
    del obj["releases"]["openpcc-2026.11.0"]["snp"]
    p2 = TrustPolicy.from_signed(signed(key, obj), [key.public_key()], NOW)
    assert p2.snp_policy("openpcc-2026.11.0").measurements == frozenset()


def test_signature_key_and_tamper(key):
    data = signed(key)
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(VerificationError, match="not pinned"):
        TrustPolicy.from_signed(data, [other.public_key()], NOW)
    # A manifest signed by another key but claiming the pinned key's id.
    forged = SignedManifest(raw(manifest_obj()), other.sign(b"x"), release_key_id(key.public_key()))
    with pytest.raises(VerificationError, match="does not verify"):
        TrustPolicy.from_signed(forged.encode(), [key.public_key()], NOW)
    # Flip one byte of the manifest: signature fails.
    sm = SignedManifest.decode(data)
    tampered = SignedManifest(
        sm.manifest.replace(b'"serial": 3', b'"serial": 4'), sm.signature, sm.key_id
    )
    with pytest.raises(VerificationError):
        TrustPolicy.from_signed(tampered, [key.public_key()], NOW)
    # Raw 32-byte and PEM pinned keys work too.
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key()
    raw_pub = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem_pub = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert TrustPolicy.from_signed(data, [raw_pub], NOW).manifest.serial == 3
    assert TrustPolicy.from_signed(data, [pem_pub], NOW).manifest.serial == 3


def test_validity_window_and_rollback(key):
    data = signed(key)
    pins = [key.public_key()]
    with pytest.raises(VerificationError, match="expired"):
        TrustPolicy.from_signed(data, pins, NOW + timedelta(days=31))
    with pytest.raises(VerificationError, match="future"):
        TrustPolicy.from_signed(data, pins, NOW - timedelta(hours=2))
    with pytest.raises(VerificationError, match="rollback"):
        TrustPolicy.from_signed(data, pins, NOW, min_serial=4)
    with pytest.raises(ValueError):
        TrustPolicy.from_signed(data, pins, NOW.replace(tzinfo=None))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(format="other"),
        lambda o: o.update(extra=1),
        lambda o: o.pop("token_key_ids"),
        lambda o: o.update(serial=1.5),
        lambda o: o.update(serial=True),
        lambda o: o.update(expires_at=o["issued_at"]),
        lambda o: o["releases"].update({"bad id!": {"model_digests": []}}),
        lambda o: o["releases"]["openpcc-2026.11.0"].update(model_digests=["cd" * 31]),
        lambda o: o["releases"]["openpcc-2026.11.0"]["snp"].update(measurements=["ab" * 32]),
        lambda o: o["releases"]["openpcc-2026.11.0"]["tdx"].pop("rtmr3"),
        lambda o: o["snp"].update(min_tcb={"Genoa": {"bogus": 1}}),
        lambda o: o["snp"].update(min_tcb={"Rome": {"bl": 1}}),
        lambda o: o["tdx"].update(accepted_tcb_statuses=["OutOfDate"]),
        lambda o: o.update(development_roots=["zz"]),
        lambda o: o.update(ohttp_key_configs=["sha256:00"]),
        lambda o: o.update(token_key_ids=["00" * 31]),
        lambda o: o.update(post_quantum={"require": 1}),
        lambda o: o.update(post_quantum={"require": "true"}),
        lambda o: o.update(post_quantum={"require": True, "prefer": True}),
        lambda o: o.update(post_quantum=None),
        lambda o: o.update(post_quantum=True),
        lambda o: o.update(post_quantum=[]),
    ],
)
def test_malformed_manifests_are_rejected(key, mutate):
    obj = manifest_obj()
    mutate(obj)
    with pytest.raises(DecodeError):
        Manifest.parse(raw(obj))
    with pytest.raises(DecodeError):  # and never signed
        SignedManifest.sign(raw(obj), key)


def test_duplicate_keys_and_garbage_rejected():
    text = raw(manifest_obj()).decode()
    dup = text.replace('"serial": 3', '"serial": 3, "serial": 4')
    with pytest.raises(DecodeError, match="duplicate"):
        Manifest.parse(dup.encode())
    for bad in (b"", b"[]", b"\xff\xfe", b"{"):
        with pytest.raises(DecodeError):
            Manifest.parse(bad)
    with pytest.raises(DecodeError):
        SignedManifest.decode(b'{"format": "openpcc-signed-manifest/1"}')


def test_signed_manifest_base64_is_strict(key):
    obj = json.loads(signed(key))
    obj["signature"] = obj["signature"].rstrip("=")
    with pytest.raises(DecodeError):
        SignedManifest.decode(json.dumps(obj).encode())


def test_key_consistency_pins(key):
    cfg_a = ohttp.KeyConfig(1, 0x0020, bytes(32), (ohttp.SymmetricSuite(1, 1),))
    cfg_b = ohttp.KeyConfig(2, 0x0020, b"\x01" * 32, (ohttp.SymmetricSuite(1, 1),))
    cfg_user = ohttp.KeyConfig(3, 0x0020, b"\x02" * 32, (ohttp.SymmetricSuite(1, 1),))
    pins = [cfg_a.encode().hex(), "sha256:" + hashlib.sha256(cfg_b.encode()).hexdigest()]
    policy = TrustPolicy.from_signed(
        signed(key, manifest_obj(ohttp_key_configs=pins)), [key.public_key()], NOW
    )
    assert policy.accepts_ohttp_key(cfg_a.encode())
    assert policy.accepts_ohttp_key(cfg_b.encode())
    assert not policy.accepts_ohttp_key(cfg_user.encode())
    assert policy.accepts_ohttp_keys_body(ohttp.encode_key_configs([cfg_a, cfg_b]))
    # One per-user key next to the published ones is enough to refuse the whole body.
    assert not policy.accepts_ohttp_keys_body(ohttp.encode_key_configs([cfg_a, cfg_user]))
    assert not policy.accepts_ohttp_keys_body(b"")
    assert not policy.accepts_ohttp_keys_body(ohttp.encode_key_configs([cfg_a])[:-1])
    assert policy.accepts_token_key(TOKEN_KEY)
    assert not policy.accepts_token_key(bytes(32))


def test_development_roots_flag(key):
    fp = "aa" * 32
    policy = TrustPolicy.from_signed(
        signed(key, manifest_obj(development_roots=[fp.upper()])), [key.public_key()], NOW
    )
    assert policy.development
    assert policy.snp_policy("openpcc-2026.11.0").trusted_roots == frozenset({fp})


# -- post-quantum outer layer (issue 20) ---------------------------------------------------

XW_PK = hpke.generate_key_pair(kem_id=hpke.KEM_XWING).public_key
SUITES = (ohttp.SymmetricSuite(1, 1), ohttp.SymmetricSuite(1, 3))
CFG_X = ohttp.KeyConfig(1, hpke.KEM_DHKEM_X25519_HKDF_SHA256, bytes(32), SUITES)
CFG_XW = ohttp.KeyConfig(2, hpke.KEM_XWING, XW_PK, SUITES)
CFG_USER_XW = ohttp.KeyConfig(3, hpke.KEM_XWING, XW_PK[::-1], SUITES)  # another X-Wing key


def _policy(pins: list[ohttp.KeyConfig | str], **over) -> TrustPolicy:
    return TrustPolicy.unsigned_for_tests(
        raw(
            manifest_obj(
                ohttp_key_configs=[p if isinstance(p, str) else p.encode().hex() for p in pins],
                **over,
            )
        )
    )


def test_post_quantum_is_parsed_strictly_and_defaults_to_false(key):
    assert Manifest.parse(raw(manifest_obj())).require_post_quantum is False
    assert Manifest.parse(raw(manifest_obj(post_quantum={}))).require_post_quantum is False
    m = Manifest.parse(raw(manifest_obj(post_quantum={"require": True})))
    assert m.require_post_quantum is True
    policy = TrustPolicy.from_signed(
        signed(key, manifest_obj(post_quantum={"require": True})), [key.public_key()], NOW
    )
    assert policy.post_quantum_required and policy.summary()["post_quantum_required"]
    assert not _policy([CFG_X]).post_quantum_required
    # What a manifest pins by value is known; a digest could be either KEM.
    assert _policy([CFG_X, CFG_XW]).pins_post_quantum_key() is True
    assert _policy([CFG_X]).pins_post_quantum_key() is False
    digest = "sha256:" + hashlib.sha256(CFG_XW.encode()).hexdigest()
    assert _policy([CFG_X, digest]).pins_post_quantum_key() is None


def test_the_client_prefers_a_pinned_x_wing_config_and_never_downgrades_under_require(caplog):
    from openpcc.client.client import choose_key_config

    offered = [CFG_X, CFG_XW]  # the gateway's list, X25519 first
    # Both pinned: X-Wing. Only X25519 pinned (an older manifest): X25519.
    assert choose_key_config(offered, _policy([CFG_X, CFG_XW])) == CFG_XW
    assert choose_key_config(offered, _policy([CFG_X])) == CFG_X
    digest = "sha256:" + hashlib.sha256(CFG_XW.encode()).hexdigest()
    assert choose_key_config(offered, _policy([CFG_X, digest])) == CFG_XW
    # An X-Wing config the manifest does not pin is never used (a per-user key); falling
    # back to X25519 while the manifest pins an X-Wing config is allowed without
    # post_quantum.require, but said.
    with caplog.at_level("WARNING", logger="openpcc.client"):
        assert choose_key_config([CFG_X, CFG_USER_XW], _policy([CFG_X, CFG_XW])) == CFG_X
    assert "does not offer" in caplog.text
    # post_quantum.require: a manifest pinning no X-Wing config...
    required = {"post_quantum": {"require": True}}
    with pytest.raises(VerificationError, match="pins none"):
        choose_key_config(offered, _policy([CFG_X], **required))
    # ... or a gateway offering none the manifest pins (dropped, or swapped for its own).
    for gateway in ([CFG_X], [CFG_X, CFG_USER_XW]):
        with pytest.raises(VerificationError, match="offers no X-Wing"):
            choose_key_config(gateway, _policy([CFG_X, CFG_XW], **required))
    with pytest.raises(VerificationError, match="offers no X-Wing"):
        choose_key_config([CFG_X], _policy([CFG_X, digest], **required))
    assert choose_key_config(offered, _policy([CFG_X, CFG_XW], **required)) == CFG_XW
    # Nothing pinned at all is refused as before; no manifest (tools): X-Wing if offered.
    with pytest.raises(VerificationError, match="not the ones"):
        choose_key_config([CFG_USER_XW], _policy([CFG_X, CFG_XW], **required))
    assert choose_key_config(offered, None) == CFG_XW

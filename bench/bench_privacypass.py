"""Privacy Pass type 0x0002 costs: issuer BlindSign, redemption check, client side.

Baseline: ``cryptography``'s (OpenSSL's) RSA-2048 PSS-SHA384 sign on the same key,
same core, same run. BlindSign is one RSA private operation too, so the ratio
shows what our gmpy2 CRT path (constant-time ``powmod_sec``, base blinding and
the s^e == m fault check) costs against OpenSSL. A row without those
protections (plain ``powmod``, no blinding, no check) shows their price; it is
measured only, never used.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import gmpy2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from bench._harness import per_call_seconds
from openpcc.privacypass import blindrsa
from openpcc.privacypass.auth import Token, TokenChallenge
from openpcc.privacypass.issuance import (
    IssuerKey,
    TokenRequest,
    begin_token_request,
    finalize_token,
    issue,
    verify_token,
)


def _unprotected_sign(sk: blindrsa.PrivateKey, blinded: bytes) -> bytes:
    m = gmpy2.mpz(int.from_bytes(blinded, "big"))
    s1 = gmpy2.powmod(m % sk._p, sk._dp, sk._p)
    s2 = gmpy2.powmod(m % sk._q, sk._dq, sk._q)
    s = s2 + ((sk._qinv * (s1 - s2)) % sk._p) * sk._q
    return int(s).to_bytes(256, "big")


def run() -> dict[str, Any]:
    ik = IssuerKey.generate()
    sk = ik.private_key
    chal = TokenChallenge(2, "issuer.example", secrets.token_bytes(32), ("origin.example",))
    chal_raw = chal.encode()
    req, state = begin_token_request(ik.token_key, chal_raw)
    req_raw = req.encode()
    resp = issue(ik, req_raw)
    token_raw = finalize_token(state, resp).encode()
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    msg = Token.decode(token_raw).token_input
    assert _unprotected_sign(sk, req.blinded_msg) == blindrsa.blind_sign(sk, req.blinded_msg)

    rows = {
        "cryptography_rsa2048_pss_sign_us": per_call_seconds(
            lambda: sk.key.sign(msg, pss, hashes.SHA384())
        ),
        "blind_sign_gmpy2_crt_us": per_call_seconds(
            lambda: blindrsa.blind_sign(sk, req.blinded_msg)
        ),
        "blind_sign_unprotected_crt_us": per_call_seconds(
            lambda: _unprotected_sign(sk, req.blinded_msg)
        ),
        "issuer_issue_request_us": per_call_seconds(
            lambda: issue(ik, TokenRequest.decode(req_raw))
        ),
        "verify_token_us": per_call_seconds(
            lambda: verify_token(ik, token_raw, expected_challenge=chal_raw)
        ),
        "verify_token_from_spki_us": per_call_seconds(
            lambda: verify_token(ik.token_key, token_raw)
        ),
        "client_begin_token_request_us": per_call_seconds(
            lambda: begin_token_request(ik.token_key, chal_raw)
        ),
        "client_finalize_token_us": per_call_seconds(lambda: finalize_token(state, resp)),
    }
    us = {k: round(v * 1e6, 1) for k, v in rows.items()}
    base = rows["cryptography_rsa2048_pss_sign_us"]
    return {
        "summary": {
            **us,
            "blind_sign_over_cryptography_sign": round(rows["blind_sign_gmpy2_crt_us"] / base, 2),
            "protections_overhead": round(
                rows["blind_sign_gmpy2_crt_us"] / rows["blind_sign_unprotected_crt_us"], 2
            ),
            "gmpy2": gmpy2.version(),
            "gmp": gmpy2.mp_version(),
        },
        "ratio_to_cryptography_sign": {k: round(v / base, 2) for k, v in rows.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))

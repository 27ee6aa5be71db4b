"""The issuer, gateways and fake nodes of the gateway tests, on tests/harness.py."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from openpcc.wire import hpke
from tests.admission_support import (
    gateway_admission_args,
    issue_credential,
    publish_policy,
    simulated_tee,
)
from tests.harness import Proc, cli, fake, openpcc, start_redis, wait_http

__all__ = ["Proc", "cli", "control", "credential", "start_gateway", "start_issuer",
           "start_node", "start_redis", "wait_http"]  # fmt: skip


def credential(workdir: Path, name: str = "test", max_nodes: int = 64) -> str:
    """The admission credential ``name``, issued once per workdir: every gateway of a
    workdir reads one credentials file (replicas share their credentials)."""
    path = workdir / f"credential-{name}"
    if not path.exists():
        path.write_text(issue_credential(workdir, name, max_nodes))
    return path.read_text()


def admission(workdir: Path) -> list[str]:
    """Gateway flags: the workdir's credentials, and a manifest trusting its simulated TEE."""
    tee = simulated_tee(workdir / "simulated-tee")
    policy = workdir / "release" / "trust-policy.json"
    pub = workdir / "release" / "release-key.pub.pem"
    if not policy.exists():
        policy, pub = publish_policy(workdir / "release", tee)
    credential(workdir)
    return [*gateway_admission_args(policy, pub),
            "--node-credentials", str(workdir / "node-credentials.json")]  # fmt: skip


def start_issuer(workdir: Path) -> Proc:
    state = workdir / "issuer-state"
    proc = openpcc("issuer", workdir, "issuer", "serve", "--state", str(state))
    out = cli("issuer", "account", "add", "gwtest", "--quota", "1000", "--state", str(state))
    assert out.returncode == 0, out.stdout + out.stderr
    proc.extra.update(api_key=out.stdout.strip().splitlines()[-1], state=state)
    return proc


def start_gateway(
    workdir: Path,
    issuer_url: str,
    *,
    name: str = "gw",
    state: Path | None = None,
    extra: list[str] | None = None,
) -> Proc:
    state = state or workdir / f"{name}-state"
    audit = workdir / f"{name}-audit.jsonl"
    proc = openpcc(
        name, workdir,
        "gateway", "serve", "--host", "127.0.0.1", "--internal-host", "127.0.0.1",
        "--issuer", issuer_url, "--state", str(state), "--audit-log", str(audit),
        *admission(workdir), *(extra or []),
        internal=True,
    )  # fmt: skip
    wait_http(proc.internal + "/healthz", proc)
    proc.extra.update(internal=proc.internal, state=state, audit=audit)
    return proc


def start_node(
    workdir: Path,
    gateway_internal: str,
    node_id: bytes,
    *,
    model: str = "tiny",
    hold: float = 10,
    cred: str | None = None,
    pq: bool = True,
) -> Proc:
    """A fake node with a real attested identity (tests/admission_support.py), admitted
    with the workdir's credential unless ``cred`` names another; with an X-Wing key
    beside its X25519 one (as real nodes) unless ``pq`` is false."""
    pair = hpke.generate_key_pair()
    pq_pair = hpke.generate_key_pair(kem_id=hpke.KEM_XWING) if pq else None
    cred = cred or credential(workdir)
    proc = fake(
        f"node-{node_id.hex()[:8]}", workdir, "gateway_support.fake_node",
        "--node-id", node_id.hex(), "--private-key", pair.private_key.hex(), "--model", model,
        "--gateway", gateway_internal, "--credential", cred, "--interval", "0.5",
        "--hold", str(hold), "--tee-dir", str(workdir / "simulated-tee"),
        "--pq-seed", pq_pair.private_key.hex() if pq_pair else "",
        wait="/readyz",
    )  # fmt: skip
    proc.extra.update(
        node_id=node_id,
        public_key=pair.public_key,
        pq_public_key=pq_pair.public_key if pq_pair else None,
        credential=cred,
    )
    return proc


def control(node: Proc, what: str, doc: dict | None = None) -> dict:
    req = urllib.request.Request(
        node.url + "/_control/" + what,
        data=json.dumps(doc or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())

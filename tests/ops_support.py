"""Process stacks for the operations and multi-replica tests: every party a separate
``python -m openpcc.cli ... serve`` process on loopback, as an operator runs them, on
tests/harness.py."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import Proc, cli, fake, get, openpcc, wait_http

__all__ = ["MODEL", "Stack", "chat", "get"]

MODEL = "fake-model"


@dataclass
class Stack:
    dir: Path
    services: dict[str, Proc] = field(default_factory=dict)

    def add(self, proc: Proc) -> Proc:
        self.services[proc.name] = proc
        return proc

    def party(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        wait: str | None = "/healthz",
        internal: bool = False,
    ) -> Proc:
        return self.add(openpcc(name, self.dir, *args, env=env, wait=wait, internal=internal))

    def wait(self, name: str, path: str, status: int = 200, timeout: float = 30.0) -> None:
        svc = self.services[name]
        wait_http(svc.url + path, svc, status=status, timeout=timeout)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        out: subprocess.CompletedProcess[str] = cli(*args, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()

    # ---------------------------------------------------------------- parties

    def engine(self, name: str = "engine", port: int = 0) -> Proc:
        return self.add(
            fake(name, self.dir, "node_support.fake_engine", MODEL, port=port, wait="/health")
        )

    def issuer(self, name: str, state: Path, redis: str | None = None, *extra: str) -> Proc:
        args = ["issuer", "serve", "--state", str(state), *extra]
        return self.party(name, *args, *(["--redis", redis] if redis else []))

    def gateway(
        self, name: str, state: Path, issuer: str, redis: str | None = None, *extra: str
    ) -> Proc:
        args = [
            "gateway", "serve", "--issuer", issuer, "--state", str(state),
            "--health-interval", "0.5", *self._admission(), *extra,
            *(["--redis", redis] if redis else []),
        ]  # fmt: skip
        return self.party(name, *args, internal=True)

    def _admission(self) -> list[str]:
        """Every gateway of the stack admits the stack's nodes: one credentials file, and a
        manifest trusting the stack's simulated TEE and model (tests/admission_support)."""
        import hashlib

        from tests.admission_support import (
            gateway_admission_args,
            issue_credential,
            publish_policy,
            simulated_tee,
        )

        policy, pub = self.dir / "admission" / "trust-policy.json", None
        if not policy.exists():
            digest = hashlib.sha256(MODEL.encode()).digest()  # the --engine-url node's digest
            tee = simulated_tee(self.dir / "tee")
            policy, pub = publish_policy(self.dir / "admission", tee, model_digests=(digest,))
            (self.dir / "credential").write_text(issue_credential(self.dir, "ops"))
        pub = self.dir / "admission" / "release-key.pub.pem"
        return [*gateway_admission_args(policy, pub),
                "--node-credentials", str(self.dir / "node-credentials.json")]  # fmt: skip

    @property
    def credential(self) -> str:
        if not (self.dir / "credential").exists():
            self._admission()
        return (self.dir / "credential").read_text()

    def relay(self, name: str, gateway: str, *extra: str) -> Proc:
        args = ["relay", "serve", "--gateway", gateway + "/gateway", "--rate-limit", "0"]
        return self.party(name, *args, *extra)

    def node(
        self, name: str, engine: str, gateways: list[str], *extra: str, wait: str = "/readyz"
    ) -> Proc:
        args = [
            "node", "serve", "--engine-url", engine,
            "--model-name", MODEL, "--tee", "simulated", "--tee-dir", str(self.dir / "tee"),
            "--release-id", "dev", "--heartbeat", "1", "--state", str(self.dir / name), *extra,
        ]  # fmt: skip
        for g in gateways:
            args += ["--gateway-internal", g]
        env = {"OPENPCC_NODE_ADMISSION_CREDENTIAL": self.credential} if gateways else None
        node = self.party(name, *args, env=env, wait=wait)
        node.extra["gateways"] = list(gateways)
        if wait == "/readyz":
            self._wait_listed(gateways)
        return node

    def _wait_listed(self, gateways: list[str]) -> None:
        """Ready is not yet routable: each gateway lists a node only after it registered
        and passed that gateway's own health check."""
        from openpcc.devstack.local import wait_nodes_listed

        for gw in self.services.values():
            if gw.ports.get("internal") and gw.internal in gateways:
                count = sum(
                    gw.internal in p.extra.get("gateways", ()) and p.alive()
                    for p in self.services.values()
                )
                wait_nodes_listed(gw.url, count)

    def account(self, state: Path, name: str, quota: int, redis: str | None = None) -> Path:
        """Create an account; returns the file holding its API key."""
        args = ["issuer", "account", "add", name, "--quota", str(quota), "--per", "3600"]
        args += ["--state", str(state)] + (["--redis", redis] if redis else [])
        key_file = self.dir / f"{name}.key"
        key_file.write_text(self.cli(*args).strip().splitlines()[-1])
        return key_file

    def release(self, gateway: str, issuer: str) -> tuple[Path, Path]:
        """Sign a release manifest trusting the simulated TEE and these parties' keys."""
        from openpcc.attestation.simulated import SimulatedTEE
        from openpcc.devstack.local import _publish_release

        tee_dir = self.dir / "tee"
        tee = SimulatedTEE.load(tee_dir)
        if not (self.dir / "release" / "release-key.pem").exists():
            self.cli("release", "keygen", "--out", str(self.dir / "release"))
        return _publish_release(self.dir, {"gateway": gateway, "issuer": issuer}, tee, None, MODEL)

    def simulated_tee(self) -> None:
        from tests.admission_support import simulated_tee

        simulated_tee(self.dir / "tee")

    def client_config(
        self, name: str, relay: str, issuer: str, key_file: Path, policy: tuple[Path, Path]
    ) -> Path:
        cfg = {
            "relay_url": relay,
            "issuer_url": issuer,
            "api_key_file": str(key_file),
            "policy": str(policy[0]),
            "release_pubkey": str(policy[1]),
            "wallet": str(self.dir / f"wallet-{name}.json"),
            "model": MODEL,
        }
        path = self.dir / f"client-{name}.json"
        path.write_text(json.dumps(cfg))
        return path


async def chat(config: Path, prompt: str, **params: Any) -> str:
    """One streamed private chat through the relay named in ``config``; the answer text."""
    from openpcc.client.profile import client_from_config

    client, wallet, model, _ = client_from_config(config)
    try:
        text = []
        async for chunk in client.chat_completions_stream(
            model, [{"role": "user", "content": prompt}], max_tokens=16, **params
        ):
            for choice in chunk.get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
        return "".join(text)
    finally:
        await client.aclose()
        await wallet.aclose()

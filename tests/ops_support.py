"""Process stacks for the operations and multi-replica tests: every party a separate
``python -m openpcc.cli ... serve`` process on loopback, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE_ENGINE = ROOT / "tests" / "node_support" / "fake_engine.py"
SECRET = "ops-test-registration-secret-0123456789"
MODEL = "fake-model"


@dataclass
class Svc:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    internal: str = ""  # the gateway's node-registration listener

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class Stack:
    dir: Path
    services: dict[str, Svc] = field(default_factory=dict)

    def spawn(
        self,
        name: str,
        args: list[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        wait: str | None = "/healthz",
        python: list[str] | None = None,
    ) -> Svc:
        log = self.dir / f"{name}.log"
        cmd = python or [sys.executable, "-m", "openpcc.cli", *args]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        svc = Svc(name, proc, f"http://127.0.0.1:{port}", log)
        self.services[name] = svc
        if wait is not None:
            self.wait(name, wait)
        return svc

    def wait(self, name: str, path: str, status: int = 200, timeout: float = 30.0) -> None:
        svc = self.services[name]
        deadline = time.monotonic() + timeout
        while get(svc.url + path, timeout=1)[0] != status:
            if svc.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: {path} never gave {status}:\n{svc.output()}")
            time.sleep(0.05)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "openpcc.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            if svc.proc.poll() is None:
                os.killpg(svc.proc.pid, signal.SIGTERM)
        for svc in self.services.values():
            try:
                svc.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()

    # ---------------------------------------------------------------- parties

    def engine(self, name: str = "engine") -> Svc:
        port = free_port()
        cmd = [sys.executable, str(FAKE_ENGINE), str(port), MODEL]
        return self.spawn(name, [], port, wait="/health", python=cmd)

    def issuer(self, name: str, state: Path, redis: str | None = None, *extra: str) -> Svc:
        port = free_port()
        args = ["issuer", "serve", "--port", str(port), "--state", str(state), *extra]
        return self.spawn(name, args + (["--redis", redis] if redis else []), port)

    def gateway(
        self, name: str, state: Path, issuer: str, redis: str | None = None, *extra: str
    ) -> Svc:
        port, internal = free_port(), free_port()
        args = [
            "gateway", "serve", "--port", str(port), "--internal-port", str(internal),
            "--issuer", issuer, "--state", str(state), "--health-interval", "0.5", *extra,
        ]  # fmt: skip
        env = {"OPENPCC_GATEWAY_REGISTRATION_SECRET": SECRET}
        svc = self.spawn(name, args + (["--redis", redis] if redis else []), port, env=env)
        svc.internal = f"http://127.0.0.1:{internal}"
        return svc

    def relay(self, name: str, gateway: str, *extra: str) -> Svc:
        port = free_port()
        args = ["relay", "serve", "--port", str(port), "--gateway", gateway + "/gateway"]
        return self.spawn(name, [*args, "--rate-limit", "0", *extra], port)

    def node(self, name: str, engine: str, gateways: list[str], *extra: str) -> Svc:
        port = free_port()
        args = [
            "node", "serve", "--port", str(port), "--engine-url", engine,
            "--model-name", MODEL, "--tee", "simulated", "--tee-dir", str(self.dir / "tee"),
            "--release-id", "dev", "--heartbeat", "1", "--state", str(self.dir / name), *extra,
        ]  # fmt: skip
        for g in gateways:
            args += ["--gateway-internal", g]
        env = {"OPENPCC_NODE_REGISTRATION_SECRET": SECRET}
        return self.spawn(name, args, port, env=env, wait="/readyz")

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
        return _publish_release(self.dir, {"gateway": gateway, "issuer": issuer}, tee, None, MODEL)

    def simulated_tee(self) -> None:
        from openpcc.attestation.simulated import SimulatedTEE

        SimulatedTEE.create(self.dir / "tee")

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

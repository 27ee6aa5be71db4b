"""Start the issuer, gateways and fake nodes as separate processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from openpcc.wire import hpke
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_NODE = Path(__file__).resolve().parent / "fake_node.py"
SECRET = "test-registration-secret-0123456789"


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{url} did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


@dataclass
class Proc:
    proc: subprocess.Popen
    log: Path
    url: str
    extra: dict = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(workdir: Path, port: int | None = None) -> Proc:
    """A redis-server of one test's own, so it can be stopped and started again on ``port``."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    port = port or free_port()
    log = workdir / f"redis-{port}.log"
    proc = _spawn(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        log,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"redis-server did not start:\n{log.read_text()}") from None
            time.sleep(0.05)
    return Proc(proc, log, f"redis://127.0.0.1:{port}/0", {"port": port})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def start_issuer(workdir: Path) -> Proc:
    state = workdir / "issuer-state"
    port = free_port()
    log = workdir / "issuer.log"
    proc = _spawn(
        [sys.executable, "-m", "openpcc.cli", "issuer", "serve",
         "--port", str(port), "--state", str(state)],
        log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, log)
    out = cli("issuer", "account", "add", "gwtest", "--quota", "1000", "--state", str(state))
    assert out.returncode == 0, out.stdout + out.stderr
    return Proc(proc, log, url, {"api_key": out.stdout.strip().splitlines()[-1], "state": state})


def start_gateway(
    workdir: Path,
    issuer_url: str,
    *,
    name: str = "gw",
    state: Path | None = None,
    extra: list[str] | None = None,
) -> Proc:
    port, internal = free_port(), free_port()
    state = state or workdir / f"{name}-state"
    log = workdir / f"{name}.log"
    audit = workdir / f"{name}-audit.jsonl"
    cmd = [
        sys.executable, "-m", "openpcc.cli", "gateway", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--internal-host", "127.0.0.1", "--internal-port", str(internal),
        "--issuer", issuer_url, "--state", str(state),
        "--audit-log", str(audit),
        *(extra or []),
    ]  # fmt: skip
    proc = _spawn(cmd, log, {"OPENPCC_GATEWAY_REGISTRATION_SECRET": SECRET})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, log)
    wait_http(f"http://127.0.0.1:{internal}/healthz", proc, log)
    return Proc(
        proc,
        log,
        url,
        {"internal": f"http://127.0.0.1:{internal}", "state": state, "audit": audit},
    )


def start_node(
    workdir: Path, gateway_internal: str, node_id: bytes, *, model: str = "tiny", hold: float = 10
) -> Proc:
    port = free_port()
    pair = hpke.generate_key_pair()
    log = workdir / f"node-{node_id.hex()[:8]}.log"
    proc = _spawn(
        [sys.executable, str(FAKE_NODE), "--port", str(port), "--node-id", node_id.hex(),
         "--private-key", pair.private_key.hex(), "--model", model,
         "--gateway", gateway_internal, "--secret", SECRET, "--interval", "0.5",
         "--hold", str(hold)],
        log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, log)
    return Proc(proc, log, url, {"node_id": node_id, "public_key": pair.public_key})


def control(node: Proc, what: str, doc: dict | None = None) -> dict:
    req = urllib.request.Request(
        node.url + "/_control/" + what,
        data=json.dumps(doc or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())

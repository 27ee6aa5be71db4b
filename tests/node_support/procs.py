"""Start the fake engine, the fake gateway and `openpcc node serve` as separate processes."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpcc.devstack.processes import free_port as stack_free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """Shared with the stack launcher, so no two services here get the same port."""
    return stack_free_port()


def http_json(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else None
    finally:
        conn.close()


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited early ({proc.returncode}) waiting for {what}")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class Proc:
    port: int
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn(cmd: list[str], log: Path, port: int) -> Proc:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return Proc(port, proc, log)


def start_engine(workdir: Path, model: str, port: int | None = None) -> Proc:
    port = port or free_port()
    p = spawn(
        [sys.executable, str(HERE / "fake_engine.py"), str(port), model],
        workdir / f"engine-{port}.log",
        port,
    )
    wait_until(lambda: http_json(port, "GET", "/health")[0] == 200, 15, "fake engine", p.proc)
    return p


def start_gateway(workdir: Path, secret: str, port: int | None = None, wait: bool = True) -> Proc:
    port = port or free_port()
    p = spawn(
        [sys.executable, str(HERE / "fake_gateway.py"), str(port), secret],
        workdir / f"gateway-{port}.log",
        port,
    )
    if wait:
        wait_until(
            lambda: http_json(port, "GET", "/_control/registrations")[0] == 200,
            15,
            "fake gateway",
            p.proc,
        )
    return p


def start_node(
    workdir: Path,
    *,
    engine_url: str,
    model: str | None,
    gateway_port: int | None,
    secret: str = "test-secret",
    extra: list[str] | None = None,
    wait_ready: bool = True,
) -> Proc:
    port = free_port()
    cmd = [
        sys.executable, "-m", "openpcc.cli", "node", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--engine-url", engine_url, *(["--model-name", model] if model else []),
        "--state", str(workdir / "state"),
        "--release-id", "test-release",
        "--heartbeat", "0.5",
        *(extra or []),
    ]  # fmt: skip
    if gateway_port is not None:
        cmd += ["--gateway-internal", f"http://127.0.0.1:{gateway_port}"]
        cmd += ["--registration-secret", secret]
    p = spawn(cmd, workdir / f"node-{port}.log", port)
    if wait_ready:
        wait_until(lambda: http_json(port, "GET", "/healthz")[0] == 200, 30, "node", p.proc)
    else:
        wait_until(lambda: http_json(port, "GET", "/healthz")[0] in (200, 503), 30, "node")
    return p

"""The fake engine, the fake gateway and `openpcc node serve` of the node tests, on
tests/harness.py."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.harness import Proc, fake, free_port, openpcc, spawn

__all__ = ["CREDENTIAL", "Proc", "free_port", "http_json", "spawn", "start_engine",
           "start_gateway", "start_node", "wait_until"]  # fmt: skip

# An admission credential as `gateway credentials add` prints one (the fake gateway
# checks only that the node sends it).
CREDENTIAL = "opnc1.test." + "B" * 42 + "A"


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


def start_engine(workdir: Path, model: str, port: int = 0) -> Proc:
    name = f"engine-{model.split(',')[0]}-{len(list(workdir.glob('engine-*.log')))}"
    return fake(name, workdir, "node_support.fake_engine", model, port=port, wait="/health")


def start_gateway(workdir: Path, secret: str, port: int = 0) -> Proc:
    name = f"fake-gateway-{len(list(workdir.glob('fake-gateway-*.log')))}"
    return fake(
        name, workdir, "node_support.fake_gateway", secret, port=port,
        wait="/_control/registrations",
    )  # fmt: skip


def start_node(
    workdir: Path,
    *,
    engine_url: str,
    model: str | None,
    gateway_port: int | None,
    secret: str = CREDENTIAL,
    extra: list[str] | None = None,
    wait_ready: bool = True,
) -> Proc:
    """``openpcc node serve``; with ``wait_ready`` until ``/readyz`` (its engine answers),
    else until it listens."""
    args = [
        "node", "serve", "--host", "127.0.0.1",
        "--engine-url", engine_url, *(["--model-name", model] if model else []),
        "--state", str(workdir / "state"),
        "--release-id", "test-release",
        "--heartbeat", "0.5",
        *(extra or []),
    ]  # fmt: skip
    if gateway_port is not None:
        args += ["--gateway-internal", f"http://127.0.0.1:{gateway_port}"]
        args += ["--admission-credential", secret]
    name = f"node-{len(list(workdir.glob('node-*.log')))}"
    return openpcc(name, workdir, *args, wait="/readyz" if wait_ready else "/healthz")

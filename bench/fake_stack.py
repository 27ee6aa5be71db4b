"""The whole local stack on the fast fake engine: for soak, fuzz and log-audit runs.

Why not vLLM: these runs measure the parties (issuer, relay, gateway, node), not the
model; the fake engine (tests/node_support/fake_engine.py) speaks the same OpenAI
streaming protocol in a few milliseconds, so the parties get all the load.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openpcc.devstack.local import DEMO_ACCOUNT, LocalStack, start_local_stack
from openpcc.devstack.processes import run_cli
from tests.harness import Proc, fake

MODEL = "fake-model"
PARTIES = ("issuer", "gateway", "relay", "node")


@dataclass
class FakeStack:
    stack: LocalStack
    engine_url: str
    engine: Proc
    api_key: str
    account: str

    def pid(self, name: str) -> int:
        return next(s.proc.pid for s in self.stack.procs.services if s.name == name)

    def url(self, name: str) -> str:
        return self.stack.urls[name]

    def env_of(self, name: str, var: str) -> str:
        """A variable from a party's environment."""
        for item in Path(f"/proc/{self.pid(name)}/environ").read_bytes().split(b"\0"):
            if item.startswith(var.encode() + b"="):
                return item.split(b"=", 1)[1].decode()
        raise KeyError(var)


def start_engine(workdir: Path, model: str = MODEL) -> Proc:
    return fake("engine", workdir, "node_support.fake_engine", model, wait="/health")


@contextlib.contextmanager
def fake_stack(
    state: Path, *, nodes: int = 1, audit: bool = False, quota: int | None = None
) -> Iterator[FakeStack]:
    """Start engine + stack; with ``quota``, a fresh account with that many tokens/hour.

    The demo account's 1000 tokens/hour would cap a soak, so a soak asks for its own
    account and points ``client.json`` at that account's key.
    """
    state.mkdir(parents=True, exist_ok=True)
    engine = start_engine(state)
    url = engine.url
    try:
        stack = start_local_stack(
            state, engine_url=url, model_name=MODEL, audit=audit, nodes=nodes,
            log=lambda *_: None,
        )  # fmt: skip
        try:
            account, key = DEMO_ACCOUNT, (state / "demo-api-key").read_text().strip()
            if quota is not None:
                account = f"bench-{os.urandom(4).hex()}"
                out = run_cli("issuer", "account", "add", account, "--quota", str(quota),
                              "--per", "3600", "--state", str(state / "issuer"))  # fmt: skip
                key = out.strip().splitlines()[-1]
                key_file = state / "bench-api-key"
                key_file.write_text(key)
                key_file.chmod(0o600)
                cfg = json.loads(stack.config_path.read_text())
                cfg["api_key_file"] = str(key_file.resolve())
                cfg["wallet"] = str((state / "bench-wallet.json").resolve())
                stack.config_path.write_text(json.dumps(cfg, indent=1) + "\n")
            yield FakeStack(stack, url, engine, key, account)
        finally:
            stack.procs.stop()
    finally:
        engine.stop()


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), open fds and threads of one process, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kib": rss, "fds": fds, "threads": threads}

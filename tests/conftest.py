"""Shared fixtures: the official vectors, the npm interop peers, and the slow-test switch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openpcc.stack import free_port as stack_free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("OPENPCC_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors"
INTEROP = ROOT / "tests" / "interop"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--skip-slow",
        action="store_true",
        default=False,
        help="skip tests marked slow (vLLM start etc.); CI runs them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--skip-slow"):
        return
    skip = pytest.mark.skip(reason="--skip-slow given")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_module(name: str) -> Any:
    """Import an optional heavy dependency (vllm, torch) for a test.

    Skips when it is missing in a developer's partial install, but fails under
    ``scripts/dev test`` (OPENPCC_REQUIRE_ALL=1, as in CI), which installs everything:
    a suite that silently skipped vLLM there would prove nothing.
    """
    if os.environ.get("OPENPCC_REQUIRE_ALL") == "1":
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"{name} is required under scripts/dev test: {exc}")
    return pytest.importorskip(name)


def load_vector(relpath: str) -> Any:
    """Read a JSON vector file from ../shared/vectors (never copied into the repo)."""
    path = VECTORS / relpath
    if not path.exists():
        pytest.fail(f"official vector file missing: {path} (set OPENPCC_SHARED?)")
    return json.loads(path.read_text())


def run_node(script: str, payload: Any, timeout: float = 60) -> Any:
    """Run tests/interop/<script> under node with JSON on stdin; return its JSON stdout.

    Fails (never skips) when node or the pinned npm packages are missing: the
    interop tests are part of the suite, and scripts/dev test installs them.
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed; run scripts/dev test to install interop peers")
    if not (INTEROP / "node_modules").is_dir():
        pytest.fail("tests/interop/node_modules missing; run `npm ci` in tests/interop")
    proc = subprocess.run(
        [node, str(INTEROP / script)],
        input=json.dumps(payload).encode(),
        capture_output=True,
        timeout=timeout,
        cwd=INTEROP,
    )
    if proc.returncode != 0:
        pytest.fail(f"node {script} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return json.loads(proc.stdout)


def free_port() -> int:
    """Shared with the stack launcher, so no two services here get the same port."""
    return stack_free_port()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A private redis-server on loopback for this test session (CI installs the package)."""
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; scripts/dev test installs it")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


FAKE_MODEL = "fake-model"


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A recording OpenAI-compatible fake engine (tests/node_support) for one test module."""
    from tests.node_support.procs import start_engine

    proc = start_engine(tmp_path_factory.mktemp("engine"), FAKE_MODEL)
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()

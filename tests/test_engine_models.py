"""Serving someone's own engine: the model comes from its /v1/models, failures say why.

Unit tests for openpcc.engine_models, then `openpcc node serve --engine-url` and
`openpcc up --engine-url` as processes against the fake engine listing one model, several,
or not the one named; and `openpcc proxy`/`chat` started before `up` has finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from openpcc.devstack.local import CLIENT_CONFIG, start_local_stack
from openpcc.devstack.processes import Processes, free_port, openpcc_cmd
from openpcc.engine_models import (
    AmbiguousModelError,
    EngineUnreachableError,
    ModelNotListedError,
    choose_model,
    discover_model,
    list_models,
    parse_model_list,
)
from openpcc.progress import REPORT_EVERY
from tests.node_support.procs import http_json, start_engine, start_node, wait_until

URL = "http://127.0.0.1:9"


# ------------------------------------------------------------------ unit


def test_parse_model_list() -> None:
    body = b'{"object":"list","data":[{"id":"a","object":"model"},{"id":"b"}]}'
    assert parse_model_list(body) == ["a", "b"]
    for bad in (b"", b"[]", b'{"data": 3}', b'{"data": [{"name": "a"}]}', b'{"data":[{"id":1}]}'):
        with pytest.raises(EngineUnreachableError):
            parse_model_list(bad)


def test_choose_model() -> None:
    assert choose_model(URL, ["my-model"], None) == "my-model"
    assert choose_model(URL, ["a", "b"], "b") == "b"
    with pytest.raises(AmbiguousModelError) as amb:
        choose_model(URL + "/v1", ["a", "b"], None)
    assert str(amb.value) == f"engine at {URL} lists ['a', 'b']: choose one with --model-name"
    with pytest.raises(ModelNotListedError) as missing:
        choose_model(URL, ["my-model"], "model")
    assert str(missing.value) == f"engine at {URL} lists ['my-model'], not 'model'"
    with pytest.raises(ModelNotListedError, match="lists no models yet"):
        choose_model(URL, [], None)


def test_discover_waits_reports_every_period_then_gives_up(monkeypatch) -> None:
    now = [0.0]
    answers = iter([["other"]] * 100)
    monkeypatch.setattr("openpcc.engine_models.list_models", lambda url: next(answers))
    reports: list[tuple[float, str]] = []

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(ModelNotListedError) as exc:
        discover_model(
            URL, "mine", timeout=25, report=lambda line: reports.append((now[0], line)),
            clock=lambda: now[0], sleep=sleep,
        )  # fmt: skip
    line = f"engine at {URL} lists ['other'], not 'mine'"
    assert str(exc.value) == line
    assert [t for t, _ in reports] == [0.0, REPORT_EVERY, 2 * REPORT_EVERY]
    assert {r for _, r in reports} == {line}


def test_discover_returns_once_listed_and_ambiguity_is_final(monkeypatch) -> None:
    answers = iter([EngineUnreachableError("down"), [], ["m"]])

    def fake(url: str) -> list[str]:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr("openpcc.engine_models.list_models", fake)
    assert discover_model(URL, sleep=lambda s: None) == "m"
    monkeypatch.setattr("openpcc.engine_models.list_models", lambda url: ["a", "b"])
    with pytest.raises(AmbiguousModelError):
        discover_model(URL, timeout=None, sleep=lambda s: pytest.fail("must not wait"))


def test_list_models_unreachable() -> None:
    port = free_port()  # nobody listens
    with pytest.raises(EngineUnreachableError, match=f"engine at http://127.0.0.1:{port} does"):
        list_models(f"http://127.0.0.1:{port}/v1/", timeout=2)


# ------------------------------------------------------------------ engines


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    work = tmp_path_factory.mktemp("engines")
    procs = {
        "one": start_engine(work, "my-model"),
        "two": start_engine(work, "llama-a,llama-b"),
    }
    yield {k: f"http://127.0.0.1:{p.port}" for k, p in procs.items()}
    for p in procs.values():
        p.stop()


def test_list_models_of_a_running_engine(engines: dict[str, str]) -> None:
    assert list_models(engines["one"]) == ["my-model"]
    assert list_models(engines["two"] + "/v1") == ["llama-a", "llama-b"]


# ------------------------------------------------------------------ node serve


def test_node_serves_the_one_listed_model(tmp_path: Path, engines: dict[str, str]) -> None:
    node = start_node(tmp_path, engine_url=engines["one"], model=None, gateway_port=None)
    try:
        assert http_json(node.port, "GET", "/readyz")[0] == 200
        out = node.output()
        assert "lists one model, 'my-model': serving it" in out
        assert "serving 'my-model'" in out
    finally:
        node.stop()


def test_node_refuses_to_guess_among_several(tmp_path: Path, engines: dict[str, str]) -> None:
    cmd = [
        *openpcc_cmd("node", "serve", "--port", str(free_port())),
        "--engine-url", engines["two"], "--state", str(tmp_path / "state"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"openpcc node serve: engine at {engines['two']} lists ['llama-a', 'llama-b']: "
        "choose one with --model-name"
    )


def test_node_says_why_a_named_model_is_not_ready(tmp_path: Path, engines: dict[str, str]) -> None:
    node = start_node(
        tmp_path, engine_url=engines["one"], model="model", gateway_port=None, wait_ready=False
    )
    line = f"engine at {engines['one']} lists ['my-model'], not 'model'"
    try:
        status, body = wait_until(
            lambda: (r := http_json(node.port, "GET", "/readyz"))[1].get("reason") and r,
            30,
            "a reason in /readyz",
        )
        assert status == 503
        assert body["reason"] == line
        wait_until(lambda: line in node.output(), 15, "the line in the node's log")
    finally:
        node.stop()


# ------------------------------------------------------------------ up


def _run_up(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        openpcc_cmd("up", "--state", str(state), *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_refuses_to_guess_among_several(tmp_path: Path, engines: dict[str, str]) -> None:
    proc = _run_up(tmp_path, "--engine-url", engines["two"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"openpcc up: engine at {engines['two']} lists ['llama-a', 'llama-b']: "
        "choose one with --model-name"
    )
    assert not (tmp_path / CLIENT_CONFIG).exists()


def test_up_gives_up_on_a_model_the_engine_does_not_list(
    tmp_path: Path, engines: dict[str, str]
) -> None:
    t0 = time.monotonic()
    proc = _run_up(
        tmp_path, "--engine-url", engines["one"], "--model-name", "model", "--start-timeout", "4"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"openpcc up: node not ready after 4 s: engine at {engines['one']} lists "
        "['my-model'], not 'model'"
    )
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / CLIENT_CONFIG).exists()
    assert "lists ['my-model'], not 'model'" in (tmp_path / "logs" / "node.log").read_text()


def test_up_serves_the_engines_only_model_and_a_waiting_proxy_uses_it(
    tmp_path: Path, engines: dict[str, str]
) -> None:
    """The proxy and `status` are started first; they wait for the profile `up` writes."""
    config = tmp_path / CLIENT_CONFIG
    procs = Processes()  # replaced by the stack's once it is up
    port = free_port()
    log = tmp_path / "proxy.log"
    fh = log.open("ab")
    proxy = subprocess.Popen(
        openpcc_cmd("proxy", "--port", str(port), "--config", str(config), "--wait", "120"),
        stdout=fh,
        stderr=subprocess.STDOUT,
    )
    fh.close()
    status = subprocess.Popen(
        openpcc_cmd("status", "--config", str(config), "--json", "--wait", "120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: "waiting for the client profile" in log.read_text(), 30, "proxy wait")
        assert proxy.poll() is None
        stack = start_local_stack(tmp_path, engine_url=engines["one"], log=lambda *_: None)
        procs = stack.procs
        assert stack.model == "my-model"
        assert json.loads(config.read_text())["model"] == "my-model"
        out, err = status.communicate(timeout=120)
        assert status.returncode == 0, err
        assert "waiting for the client profile" in err
        assert json.loads(out)["model"] == "my-model"
        code, models = wait_until(
            lambda: http_json(port, "GET", "/v1/models"), 60, "the proxy", proxy
        )
        assert code == 200
        assert [m["id"] for m in models["data"]] == ["my-model"]
    finally:
        proxy.terminate()
        proxy.wait(20)
        if status.poll() is None:
            status.kill()
        procs.stop()


def test_chat_without_a_profile_waits_then_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / CLIENT_CONFIG
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", "chat", "hi", "--config", str(missing),
         "--wait", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert time.monotonic() - t0 >= 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"openpcc chat: no client profile at {missing} after 1 s: start `openpcc up` first"
    )

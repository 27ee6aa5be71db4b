"""Processes that start processes: what they start goes down with them, however they end.

Three ways a parent ends, three mechanisms:

- a signal it can catch (SIGINT, SIGTERM, SIGHUP: Ctrl-C, systemd, Docker, ``timeout``,
  a closed terminal): ``stop_on_signals`` turns SIGTERM and SIGHUP into ``Stopped``, which
  unwinds the main thread as Ctrl-C's KeyboardInterrupt does, so the ``finally`` that
  stops the children runs;
- SIGKILL or a crash, on Linux: ``die_with_parent`` (a ``preexec_fn``) asks the kernel to
  send the child SIGTERM when its parent dies (``PR_SET_PDEATHSIG``);
- the same, anywhere: a ``Lifeline`` is a pipe whose write end only the parent holds; a
  child on the service kit watches the read end (``watch_parent``) and stops when it
  reads end of file, which happens exactly when the parent is gone.

Standard library only: the CLI, the dev stack, the node (for vLLM) and the test harness
all use it, and ``openpcc --help`` must stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "PARENT_FD_ENV",
    "Lifeline",
    "Stopped",
    "die_with_parent",
    "stop_on_signals",
    "watch_parent",
]

PARENT_FD_ENV = "OPENPCC_PARENT_FD"
_PR_SET_PDEATHSIG = 1


class Stopped(BaseException):  # a stop request, as KeyboardInterrupt is
    """SIGTERM or SIGHUP arrived (see ``stop_on_signals``); ``signal`` is its name."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal = signal.Signals(signum).name
        super().__init__(self.signal)


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Inside the block, ``signums`` raise ``Stopped`` in the main thread (once: a second
    signal while the first unwinds is ignored, so stopping the children is not cut
    short). Outside the main thread this does nothing: Python delivers signals there only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored for the block (the main thread only): a second
    Ctrl-C must not abandon children half stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets ``sig`` when its parent dies (Linux).

    The kernel sends it when the *thread* that forked exits, so fork from a thread that
    lives as long as the children (the main thread of ``up``, the node's event loop). The
    function is looked up here, before the fork: the child only calls it. None elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


class Lifeline:
    """A pipe from a parent to its children: the parent keeps the write end and never
    writes; each child inherits the read end (``popen_kwargs``) and sees end of file when
    the parent is gone, however it ended."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # neither is inherited unless passed

    def popen_kwargs(self, *, pdeathsig: bool = True) -> dict[str, Any]:
        """``pass_fds`` and ``preexec_fn`` for ``subprocess.Popen``; the child's
        environment must also carry ``env()``."""
        kwargs: dict[str, Any] = {"pass_fds": (self._read,)}
        if pdeathsig and (preexec := die_with_parent()) is not None:
            kwargs["preexec_fn"] = preexec
        return kwargs

    def env(self) -> dict[str, str]:
        return {PARENT_FD_ENV: str(self._read)}

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


def watch_parent(loop: asyncio.AbstractEventLoop, on_gone: Callable[[], None]) -> bool:
    """In a child started with a ``Lifeline``: call ``on_gone`` once the parent is gone.

    The variable is removed so the child's own children (vLLM) do not look for an fd
    they do not have. False when there is nothing to watch."""
    value = os.environ.pop(PARENT_FD_ENV, None)
    if value is None or not value.isdigit():
        return False
    fd = int(value)
    try:
        os.fstat(fd)
    except OSError:
        return False

    def readable() -> None:
        loop.remove_reader(fd)
        on_gone()

    loop.add_reader(fd, readable)
    return True

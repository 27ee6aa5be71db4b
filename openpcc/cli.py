"""The `openpcc` command: one entry point, one sub-command group per party.

Each party folder owns its sub-commands in ``<party>/cli.py`` (a ``register``
function); this module only wires them together, importing them lazily enough
that ``openpcc relay`` never pays for the node's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence

from openpcc import __version__
from openpcc.errors import OpenPCCError

# (module, group) pairs; a module missing its optional extras is reported, not fatal.
PARTY_COMMANDS: tuple[str, ...] = ("tokens.cli", "relay.cli", "gateway.cli", "node.cli")
CORE_COMMANDS: tuple[str, ...] = (
    "openpcc.devstack.local",
    "openpcc.attestation.cli",
    "openpcc.proxy_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openpcc",
        description="OpenPCC: confidential LLM inference that no single operator can link "
        "to who asked.",
    )
    parser.add_argument("--version", action="version", version=f"openpcc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for modname in CORE_COMMANDS + PARTY_COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name is not None and modname.startswith(exc.name):
                continue  # that party has no CLI yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. Output to a pipe whose reader left (``| head``)
    ends the command quietly with 0, as other Unix tools do (``_stdout_closed``)."""
    try:
        try:
            rc = _run(argv)
        except SystemExit:  # argparse's --help and usage errors print too
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, not at exit, where a closed pipe could not be caught
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a socket's, say: a real failure, never hidden
        _silence_stdout()
        return 0
    return rc


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except KeyboardInterrupt:
        return 130
    except OpenPCCError as exc:
        # What a command did not handle itself (a profile whose manifest expired or rolled
        # back, say) is still one line, never a traceback.
        print(f"openpcc {args.command}: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


def _stdout_closed() -> bool:
    """True when stdout is a pipe (or socket) nobody reads any more.

    Why not ``signal(SIGPIPE, SIG_DFL)``: that signal would also kill the services and
    the client on a peer's closed socket, and ends with 141, not 0. Python ignores
    SIGPIPE, so a write to the closed stdout raises BrokenPipeError instead; asking the
    kernel about fd 1 keeps that quiet ending to stdout's case alone."""
    fd = _stdout_fd()
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's final flush of what is still
    buffered cannot fail again (and print "Exception ignored ...") on the way out."""
    fd = _stdout_fd()
    if fd is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _stdout_fd() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an in-memory stream
        return None


if __name__ == "__main__":
    sys.exit(main())

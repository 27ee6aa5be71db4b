"""The `openpcc` command: one entry point, one sub-command group per party.

Each party folder owns its sub-commands in ``<party>/cli.py`` (a ``register``
function); this module only wires them together, importing them lazily enough
that ``openpcc relay`` never pays for the node's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
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


if __name__ == "__main__":
    sys.exit(main())

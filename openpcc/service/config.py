"""One way to turn a party's frozen config dataclass into flags and environment variables.

A field's metadata (``option(...)``) says what it means; from that this module derives the
flag (``--max-body``), the variable (``OPENPCC_<PARTY>_MAX_BODY``), the parser (sizes like
``8m``, booleans, durations, lists, origins) and the help line, and builds the dataclass
back from the parsed arguments, whose ``__post_init__`` validates. Flags win over the
environment; a bad value in either is argparse's usage error naming the flag, never a
traceback. Kept free of aiohttp, like ``values``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from openpcc.service.values import parse_bool, parse_origins, parse_size, split_list

T = TypeVar("T")

# How a value is read from its text (flag or variable).
KINDS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "path": Path,
    "int": int,
    "float": float,
    "size": parse_size,
    "bool": parse_bool,
}
LIST_KINDS = ("list", "origins")


def option(
    help_text: str,
    *,
    kind: str = "str",
    flag: str | None = None,
    metavar: str | None = None,
    env: bool = True,
) -> dict[str, Any]:
    """Metadata for a config field: ``field(default=..., metadata=option("..."))``.

    ``env=False``: a flag only, for settings that must never come in unseen from the
    environment (the tests-only audit logs)."""
    if kind not in KINDS and kind not in LIST_KINDS:
        raise ValueError(f"unknown option kind {kind!r}")
    meta = {"help": help_text, "kind": kind, "flag": flag, "metavar": metavar, "env": env}
    return {"openpcc": meta}


def _options(
    cls: type, only: tuple[str, ...] | None = None
) -> list[tuple[dataclasses.Field[Any], dict[str, Any]]]:
    return [
        (f, f.metadata["openpcc"])
        for f in dataclasses.fields(cls)
        if "openpcc" in f.metadata and (only is None or f.name in only)
    ]


def flag_of(f: dataclasses.Field[Any], meta: dict[str, Any]) -> str:
    return meta["flag"] or "--" + f.name.replace("_", "-")


def env_of(f: dataclasses.Field[Any], meta: dict[str, Any], prefix: str) -> str:
    return prefix + flag_of(f, meta).removeprefix("--").replace("-", "_").upper()


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_config_args(
    parser: argparse.ArgumentParser,
    cls: type,
    env_prefix: str,
    *,
    only: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one flag per ``option`` field of ``cls`` (or the ``only`` ones), each with its
    environment variable; ``defaults`` overrides field defaults for this party."""
    for f, meta in _options(cls, only):
        var = env_of(f, meta, env_prefix) if meta["env"] else None
        kind = meta["kind"]
        default = (defaults or {}).get(f.name, _default(f))
        shown = "" if default in (None, (), "", False) else f"default {_show(default)}"
        notes = "; ".join(n for n in (f"env {var}" if var else "", shown) if n)
        text = f"{meta['help']} ({notes})" if notes else meta["help"]
        raw = os.environ.get(var) if var else None
        if kind in LIST_KINDS:
            # Repeatable flag; the variable is one comma- or space-separated list.
            parser.add_argument(
                flag_of(f, meta),
                dest=f.name,
                action="append",
                default=None,
                metavar=meta["metavar"],
                help=text,
            )
            parser.set_defaults(**{f"_env_{f.name}": split_list(raw) if raw else None})
            continue
        if kind == "bool":
            parser.add_argument(
                flag_of(f, meta),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                # The variable is parsed when the config is built: a bad one is then a
                # clear ValueError, and `--help` still works.
                default=raw if raw is not None else bool(default),
                help=text,
            )
            continue
        # argparse applies ``type`` to a string default too: a bad variable becomes the
        # same usage error as a bad flag.
        parser.add_argument(
            flag_of(f, meta),
            dest=f.name,
            type=KINDS[kind],
            default=raw if raw is not None else default,
            metavar=meta["metavar"],
            help=text,
        )


def config_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """Build ``cls`` from parsed arguments (plus fields that are not options); its
    ``__post_init__`` validates and raises ValueError with a clear message."""
    values: dict[str, Any] = {}
    for f, meta in _options(cls):
        value = getattr(args, f.name)
        if meta["kind"] in LIST_KINDS:
            items = value if value is not None else getattr(args, f"_env_{f.name}", None)
            if items is None:
                value = _default(f)
            elif meta["kind"] == "origins":
                value = parse_origins(items)
            else:
                value = tuple(items)
        elif meta["kind"] == "bool" and isinstance(value, str):
            value = parse_bool(value)
        values[f.name] = value
    return cls(**values, **extra)


def workers_field() -> Any:
    """A party's ``--workers N`` (``OPENPCC_<PARTY>_WORKERS``): N processes serve its
    ports together (openpcc/service/workers.py); pass it to ``serve(workers=...)``."""
    return dataclasses.field(
        default=1,
        metadata=option(
            "processes serving the same port (SO_REUSEPORT; one core each); they share the "
            "state store and drain together on SIGTERM",
            kind="int",
            metavar="N",
        ),
    )


def _show(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)

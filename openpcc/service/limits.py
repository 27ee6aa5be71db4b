"""What a party's sockets may cost it, where its metrics are served and where it reports
the ports it bound: the serve loop's settings (openpcc/service/serve.py) as frozen
dataclasses with their flags.

Free of aiohttp, like ``config`` and ``values``: every party adds these flags while
``openpcc`` builds its parser, and ``--help`` must not import the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpcc.service.config import add_config_args, config_from_args, option


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout: float = field(
        default=30.0,
        metadata=option("seconds a request head may take to arrive", kind="float",
                        metavar="SECONDS"),
    )  # fmt: skip
    keepalive_timeout: float = field(
        default=75.0,
        metadata=option("seconds an idle connection is kept", kind="float", metavar="SECONDS"),
    )
    body_timeout: float = field(
        default=300.0,
        metadata=option("seconds a whole request body may take", kind="float",
                        metavar="SECONDS"),
    )  # fmt: skip
    body_min_rate: float = field(
        default=1024.0,
        metadata=option("bytes/s a request body must average", kind="float", metavar="BYTES"),
    )
    body_grace: float = field(
        default=10.0,
        metadata=option("seconds before the body rate is enforced", kind="float",
                        metavar="SECONDS"),
    )  # fmt: skip
    max_per_client: int = field(
        default=0,
        metadata=option("open connections per client address (0: no cap)", kind="int",
                        metavar="N"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("head_timeout", "keepalive_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.body_min_rate < 0 or self.body_grace < 0:
            raise ValueError("body-min-rate and body-grace must be >= 0")
        if self.max_per_client < 0:
            raise ValueError("max-per-client must be >= 0 (0: no cap)")


@dataclass(frozen=True)
class MetricsListener:
    """Where ``/metrics`` is served: on the public listener (port 0), or only on a listener
    of its own, so operators need not expose counters to clients."""

    metrics_host: str = field(
        default="127.0.0.1", metadata=option("address of the separate /metrics listener")
    )
    metrics_port: int = field(
        default=0,
        metadata=option("serve /metrics only on this port, not on the public listener (0: on "
                        "the public listener)", kind="int", metavar="PORT"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("--metrics-port must be 0..65535")


@dataclass(frozen=True)
class PortReport:
    """``--port 0`` lets the kernel pick a free port; the port file says which it picked.

    Why: a port chosen by the caller and bound later by the child races with everything
    else on the host (seen in CI: two services on one port, one health check answered by
    the other). Binding port 0 cannot collide; the file, written once every listener is
    bound, tells the caller the ports and that the party is listening."""

    port_file: Path | None = field(
        default=None,
        metadata=option("once listening, write the bound ports here as JSON "
                        '({"public": PORT, ...}; for --port 0)', kind="path", metavar="FILE"),
    )  # fmt: skip


@dataclass(frozen=True)
class ServeSettings:
    """Everything the serve loop takes from the command line besides the party's config."""

    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    metrics: MetricsListener = field(default_factory=MetricsListener)
    report: PortReport = field(default_factory=PortReport)


def add_connection_args(
    parser: argparse.ArgumentParser, env_prefix: str, *, max_per_client: int = 0
) -> None:
    """The hygiene and metrics-listener flags, each with its ``<env_prefix><FLAG>``
    variable (flags win)."""
    add_config_args(
        parser, ConnectionLimits, env_prefix, defaults={"max_per_client": max_per_client}
    )
    add_config_args(parser, MetricsListener, env_prefix)
    add_config_args(parser, PortReport, env_prefix)


def add_serve_command(
    sub: Any,
    config: type,
    env_prefix: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str = "",
    max_per_client: int = 0,
) -> argparse.ArgumentParser:
    """``<party> serve``, the same way for every party: the flags and variables of the
    party's config dataclass, then the serve loop's (connection limits, metrics listener,
    port file). Returns the parser for flags a party adds by hand."""
    serve = sub.add_parser(
        "serve",
        help=help,
        description=(description + " " if description else "")
        + f"Every flag can also be set as {env_prefix}<FLAG> (flags win).",
    )  # each option's help names its default and variable (config.option)
    add_config_args(serve, config, env_prefix)
    add_connection_args(serve, env_prefix, max_per_client=max_per_client)
    serve.set_defaults(func=func)
    return serve


def serve_settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Raises ValueError (a bad limit) for the caller to print as one line."""
    return ServeSettings(
        config_from_args(ConnectionLimits, args),
        config_from_args(MetricsListener, args),
        config_from_args(PortReport, args),
    )

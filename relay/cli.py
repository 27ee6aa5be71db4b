"""``openpcc relay serve``: run the OHTTP relay.

Every flag has an ``OPENPCC_RELAY_<FLAG>`` environment variable (flags win).
aiohttp is imported only by the ``--http-server aiohttp`` fallback; the default lean
server (relay/server.py) needs the standard library and, where installed, uvloop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from openpcc.service.values import split_list
from relay.config import RelayConfig, parse_gateways

if TYPE_CHECKING:
    from aiohttp import web

ENV = "OPENPCC_RELAY_"
MAX_PER_CLIENT = 64  # open connections per client address: nginx's limit_conn, in spirit


def _env(name: str, default: Any) -> Any:
    return os.environ.get(ENV + name, default)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``relay serve`` to the ``openpcc`` command."""
    group = sub.add_parser(
        "relay",
        help="run the OHTTP relay (third party: sees client IPs, never content)",
        description="OHTTP relay: forwards encrypted requests to a gateway, strips the "
        "client's identity. See docs/relay.md.",
    )
    relay_sub = group.add_subparsers(dest="relay_command", metavar="COMMAND", required=True)
    from openpcc.service.limits import add_serve_command

    serve = add_serve_command(
        relay_sub, RelayConfig, ENV, serve_command,
        help="serve the relay",
        description="Relay POST / (message/ohttp-req, message/ohttp-chunked-req) and "
        "GET /.well-known/ohttp-gateway to the configured gateway(s); lists in the "
        "environment are comma- or space-separated.",
        max_per_client=MAX_PER_CLIENT,
    )  # fmt: skip
    add = serve.add_argument
    add(
        "--gateway",
        action="append",
        metavar="[NAME=]URL",
        help=f"gateway resource; bare URL is POST /, NAME=URL is POST /NAME (repeatable; env "
        f"{ENV}GATEWAY)",
    )
    add(
        "--keys-url",
        action="append",
        metavar="[NAME=]URL",
        help="where that gateway's key configuration is fetched (default: the gateway "
        f"origin's /.well-known/ohttp-gateway; env {ENV}KEYS_URL)",
    )


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    from openpcc.service.config import config_from_args as build

    gateways = args.gateway or split_list(_env("GATEWAY", ""))
    keys = args.keys_url or split_list(_env("KEYS_URL", ""))
    return build(RelayConfig, args, gateways=parse_gateways(gateways, keys))


def _access_logger_class() -> type:
    from aiohttp.abc import AbstractAccessLogger

    methods = {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"}

    class PrivateAccessLogger(AbstractAccessLogger):
        """Method, matched route, status, bytes and duration: no address, no header."""

        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            info = getattr(request, "match_info", None)
            route = getattr(getattr(info, "route", None), "resource", None)
            path = route.canonical if route is not None else "-"
            method = request.method if request.method in methods else "OTHER"
            self.logger.info(
                "%s %s %d %d %.3f", method, path, response.status, response.body_length, time
            )

    return PrivateAccessLogger


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGTERM: the lean server (relay/server.py) unless ``--http-server
    aiohttp``; on uvloop unless ``--no-uvloop`` or where it is not installed."""
    try:
        config = config_from_args(args)
        from openpcc.service.limits import serve_settings_from_args

        settings = serve_settings_from_args(args)
    except ValueError as exc:
        print(f"openpcc relay: {exc}", file=sys.stderr)
        return 2
    from openpcc.service.logs import setup_logging

    setup_logging()
    from relay.server import event_loop_is_uvloop

    use_uvloop = event_loop_is_uvloop(config.uvloop)
    relay_log = logging.getLogger("openpcc.relay")
    routes = ", ".join(f"{g.post_path} -> {g.url}" for g in config.gateways)

    def bound(ports: dict[str, int]) -> None:
        relay_log.info("relay on %s:%d; %s", config.host, ports["public"], routes)

    loop_name = "uvloop" if use_uvloop else "asyncio"
    relay_log.info("%s server on the %s event loop", config.http_server, loop_name)
    access_log = logging.getLogger("openpcc.relay.access") if config.access_log else None
    if config.http_server == "lean":
        from relay.server import serve

        return serve(config, settings, use_uvloop=use_uvloop, access_log=access_log, on_bound=bound)

    from openpcc.service.serve import Listener
    from openpcc.service.serve import serve as serve_aiohttp
    from relay.app import build_app

    return serve_aiohttp(
        [Listener(build_app(config), config.host, config.port)],
        settings=settings,
        on_bound=bound,
        shutdown_timeout=config.shutdown_timeout,
        use_uvloop=use_uvloop,
        access_log=access_log,
        access_log_class=_access_logger_class(),
        handler_cancellation=True,  # a client that leaves cancels the upstream request
    )

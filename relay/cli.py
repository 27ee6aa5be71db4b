"""``openpcc relay serve``: run the OHTTP relay.

Every flag has an ``OPENPCC_RELAY_<FLAG>`` environment variable (flags win).
aiohttp is imported only when the server actually starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from openpcc.service.values import parse_bool, parse_origins, parse_size, split_list
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
    serve = relay_sub.add_parser(
        "serve",
        help="serve the relay",
        description="Relay POST / (message/ohttp-req, message/ohttp-chunked-req) and "
        "GET /.well-known/ohttp-gateway to the configured gateway(s). Every flag can be set "
        f"as {ENV}<FLAG> (e.g. {ENV}MAX_BODY=8m); lists in the environment are "
        "comma- or space-separated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = serve.add_argument
    add("--host", default=_env("HOST", "127.0.0.1"), help="address to listen on")
    add("--port", type=int, default=int(_env("PORT", 8081)), help="port to listen on")
    add(
        "--gateway",
        action="append",
        metavar="[NAME=]URL",
        help="gateway resource; bare URL is POST /, NAME=URL is POST /NAME (repeatable)",
    )
    add(
        "--keys-url",
        action="append",
        metavar="[NAME=]URL",
        help="where that gateway's key configuration is fetched "
        "(default: the gateway origin's /.well-known/ohttp-gateway)",
    )
    add("--max-body", default=_env("MAX_BODY", "8m"), help="largest request body (413 above)")
    add(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="CORS: let web pages from ORIGIN (scheme://host[:port], or * for any) call the "
        "gateway routes (repeatable; default: no CORS headers)",
    )
    add(
        "--shutdown-timeout",
        type=float,
        default=float(_env("SHUTDOWN_TIMEOUT", 30.0)),
        help="on SIGTERM, stop accepting and let in-flight streams finish this many seconds",
    )
    add(
        "--rate-limit",
        type=float,
        default=float(_env("RATE_LIMIT", 10.0)),
        help="requests per second per client address (0 disables); 429 above",
    )
    add(
        "--rate-burst",
        type=int,
        default=int(_env("RATE_BURST", 40)),
        help="requests a client may send back to back",
    )
    add(
        "--rate-limit-clients",
        type=int,
        default=int(_env("RATE_LIMIT_CLIENTS", 65536)),
        help="client buckets kept in memory (least recently seen evicted)",
    )
    add(
        "--max-concurrency",
        type=int,
        default=int(_env("MAX_CONCURRENCY", 1024)),
        help="requests relayed at once (503 above)",
    )
    add(
        "--connect-timeout",
        type=float,
        default=float(_env("CONNECT_TIMEOUT", 5.0)),
        help="seconds to connect to the gateway (502/504 after)",
    )
    add(
        "--read-timeout",
        type=float,
        default=float(_env("READ_TIMEOUT", 120.0)),
        help="seconds the gateway may stay silent (504, or a cut stream, after)",
    )
    add(
        "--client-timeout",
        type=float,
        default=float(_env("CLIENT_TIMEOUT", 60.0)),
        help="seconds a client may stay silent while sending its body (408 after)",
    )
    add(
        "--keys-max-age",
        type=float,
        default=float(_env("KEYS_MAX_AGE", 3600.0)),
        help="cap, in seconds, on caching a key configuration (the gateway's max-age rules)",
    )
    add(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=parse_bool(_env("ACCESS_LOG", "")),
        help="log one line per request (method, route, status, bytes, seconds; never addresses)",
    )
    add(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=parse_bool(_env("UVLOOP", "")),
        help="run on uvloop's event loop (optional extra: pip install 'openpcc[uvloop]'): "
        "less CPU per request",
    )
    add(
        "--audit-log",
        default=None,
        metavar="FILE",
        help="TESTS AND DEMO ONLY: record every request received, client address included",
    )
    from openpcc.service.serve import add_connection_args

    add_connection_args(serve, ENV, max_per_client=MAX_PER_CLIENT)
    serve.set_defaults(func=serve_command)


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    gateways = args.gateway or split_list(_env("GATEWAY", ""))
    keys = args.keys_url or split_list(_env("KEYS_URL", ""))
    return RelayConfig(
        gateways=parse_gateways(gateways, keys),
        host=args.host,
        port=args.port,
        max_body=parse_size(args.max_body),
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        rate_limit_clients=args.rate_limit_clients,
        max_concurrency=args.max_concurrency,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        client_timeout=args.client_timeout,
        keys_max_age=args.keys_max_age,
        access_log=args.access_log,
        audit_log=args.audit_log,
        allow_origins=parse_origins(args.allow_origin or split_list(_env("ALLOW_ORIGIN", ""))),
    )


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
    from openpcc.service.serve import connection_limits

    try:
        config = config_from_args(args)
        limits = connection_limits(args)
    except ValueError as exc:
        print(f"openpcc relay: {exc}", file=sys.stderr)
        return 2
    if args.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("openpcc relay: --uvloop needs the uvloop package", file=sys.stderr)
            return 2
    from openpcc.service.logs import setup_logging

    setup_logging()

    from openpcc.service.serve import Listener, serve
    from relay.app import build_app

    routes = ", ".join(f"{g.post_path} -> {g.url}" for g in config.gateways)
    logging.getLogger("openpcc.relay").info("relay on %s:%d; %s", config.host, config.port, routes)
    return serve(
        [Listener(build_app(config), config.host, config.port)],
        limits=limits,
        shutdown_timeout=args.shutdown_timeout,
        use_uvloop=args.uvloop,
        access_log=logging.getLogger("openpcc.relay.access") if config.access_log else None,
        access_log_class=_access_logger_class(),
        handler_cancellation=True,  # a client that leaves cancels the upstream request
    )

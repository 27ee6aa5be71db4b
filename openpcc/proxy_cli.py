"""`openpcc proxy`: a local OpenAI-compatible endpoint that forwards every request privately.

Configuration comes from flags, then ``OPENPCC_PROXY_*`` environment variables, then
the client profile (``client.json``, written by ``openpcc up``) for the relay, issuer,
trust policy and default model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from openpcc.client.profile import default_profile, wait_arg, wait_for_config

DEFAULT_PORT = 8080


def register(sub: Any) -> None:
    p = sub.add_parser(
        "proxy",
        help="local OpenAI-compatible endpoint that forwards privately",
        description="Serve POST /v1/chat/completions, POST /v1/completions and GET /v1/models "
        "on loopback; every request is sealed to an attested node and sent through the relay, "
        "spending one of your tokens. Point any OpenAI client at http://HOST:PORT/v1.",
    )
    env = os.environ.get
    p.add_argument(
        "--config",
        type=Path,
        default=default_profile(),
        help="client profile written by `openpcc up` (env OPENPCC_CLIENT_CONFIG)",
    )
    p.add_argument(
        "--host",
        default=env("OPENPCC_PROXY_HOST", "127.0.0.1"),
        help="address to listen on (env OPENPCC_PROXY_HOST; default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(env("OPENPCC_PROXY_PORT", str(DEFAULT_PORT))),
        help=f"port (env OPENPCC_PROXY_PORT; default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--model", default=env("OPENPCC_PROXY_MODEL"), help="model for requests that name none"
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        default=env("OPENPCC_PROXY_ALLOW_REMOTE", "") == "1",
        help="allow a non-loopback --host (anyone who reaches it spends your tokens; "
        "requires OPENPCC_PROXY_API_KEY)",
    )
    wait_arg(p)
    p.set_defaults(func=_proxy)


def _proxy(args: argparse.Namespace) -> int:
    from aiohttp import web

    from openpcc.client.proxy import build_proxy_app, is_loopback

    api_key = os.environ.get("OPENPCC_PROXY_API_KEY") or None
    loopback = is_loopback(args.host)
    if not loopback:
        if not args.allow_remote:
            print(
                f"refusing to listen on {args.host}: the proxy spends your tokens for whoever "
                "reaches it. Use --allow-remote with OPENPCC_PROXY_API_KEY set.",
                file=sys.stderr,
            )
            return 2
        if api_key is None:
            print("--allow-remote requires OPENPCC_PROXY_API_KEY (clients send it as their "
                  "OpenAI api_key)", file=sys.stderr)  # fmt: skip
            return 2
    if not wait_for_config(args.config, args.wait, "proxy"):
        return 2

    async def make_app() -> web.Application:
        from openpcc.client.openai_transport import frontend_from_config

        frontend = frontend_from_config(args.config, default_model=args.model)
        return build_proxy_app(frontend, api_key=api_key, loopback_only=loopback)

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"OpenAI-compatible endpoint: http://{host}:{args.port}/v1", flush=True)
    print("each request is sent privately and spends one token; Ctrl-C stops", flush=True)
    # No access log: it would record callers' addresses and request paths.
    web.run_app(
        make_app(), host=args.host, port=args.port, access_log=None, print=None,
        handle_signals=True,
    )  # fmt: skip
    return 0

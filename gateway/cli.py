"""`openpcc gateway ...`: run the gateway, rotate its OHTTP keys."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"OPENPCC_GATEWAY_{name}", default)


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        type=Path,
        default=Path(_env("STATE", ".state/gateway") or ".state/gateway"),
        help="state folder: OHTTP keys (ohttp-keys/) and the SQLite spent-token store "
        "(env OPENPCC_GATEWAY_STATE)",
    )


def register(sub: Any) -> None:
    gw = sub.add_parser("gateway", help="OHTTP gateway: tokens, node directory, routing (gateway/)")
    gsub = gw.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)

    serve = gsub.add_parser("serve", help="run the gateway (public and internal listeners)")
    _state(serve)
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="public listener")
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8403") or 8403))
    serve.add_argument(
        "--internal-host",
        default=_env("INTERNAL_HOST", "127.0.0.1"),
        help="node registration listener; bind it where only nodes reach it",
    )
    serve.add_argument(
        "--internal-port", type=int, default=int(_env("INTERNAL_PORT", "8404") or 8404)
    )
    serve.add_argument(
        "--issuer",
        default=_env("ISSUER"),
        metavar="URL",
        help="issuer base URL; its directory lists the token keys we redeem "
        "(env OPENPCC_GATEWAY_ISSUER)",
    )
    serve.add_argument(
        "--issuer-name",
        default=_env("ISSUER_NAME"),
        help="issuer_name of the TokenChallenge tokens must be for (default: host of --issuer)",
    )
    serve.add_argument(
        "--redis",
        default=_env("REDIS"),
        metavar="URL",
        help="spent tokens and the node registry in Redis, shared by replicas "
        "(env OPENPCC_GATEWAY_REDIS)",
    )
    serve.add_argument(
        "--redis-prefix",
        default=_env("REDIS_PREFIX", "openpcc:gateway:"),
        metavar="PREFIX",
        help="prefix of this deployment's Redis keys (two deployments sharing a Redis "
        "need different ones)",
    )
    serve.add_argument(
        "--registry-sync",
        type=float,
        default=float(_env("REGISTRY_SYNC", "1") or 1),
        metavar="SECONDS",
        help="with --redis: how often to copy the shared node registry from Redis",
    )
    serve.add_argument(
        "--registration-secret",
        default=_env("REGISTRATION_SECRET"),
        help="bearer secret nodes register with (env OPENPCC_GATEWAY_REGISTRATION_SECRET; "
        "prefer the env var: flags show up in ps)",
    )
    serve.add_argument(
        "--node-ttl",
        type=float,
        default=float(_env("NODE_TTL", "30") or 30),
        metavar="SECONDS",
        help="drop a node after this long without a heartbeat (3 x its interval)",
    )
    serve.add_argument(
        "--health-interval",
        type=float,
        default=float(_env("HEALTH_INTERVAL", "5") or 5),
        metavar="SECONDS",
        help="how often to GET each node's /healthz",
    )
    serve.add_argument(
        "--spent-ttl",
        type=int,
        default=int(_env("SPENT_TTL", str(32 * 86400)) or 32 * 86400),
        metavar="SECONDS",
        help="how long a spent token is remembered; at least the issuer key lifetime",
    )
    serve.add_argument(
        "--keys-max-age",
        type=int,
        default=int(_env("KEYS_MAX_AGE", "3600") or 3600),
        metavar="SECONDS",
        help="Cache-Control max-age of the key configs (keep below the rotation grace)",
    )
    serve.add_argument(
        "--node-timeout",
        type=float,
        default=float(_env("NODE_TIMEOUT", "60") or 60),
        metavar="SECONDS",
        help="time a node has to start answering before the next candidate is tried",
    )
    serve.add_argument(
        "--max-body",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest encapsulated request (default fits the largest sealed envelope)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=float(_env("SHUTDOWN_TIMEOUT", "30") or 30),
        metavar="SECONDS",
        help="on SIGTERM, stop accepting and let in-flight streams finish this long",
    )
    serve.add_argument(
        "--audit-log",
        type=Path,
        default=_env("AUDIT_LOG"),
        metavar="FILE",
        help="record what the gateway received (tests and demo only; never in production)",
    )
    from openpcc.service.serve import add_connection_args

    add_connection_args(serve, "OPENPCC_GATEWAY_")
    serve.set_defaults(func=_serve)

    keys = gsub.add_parser("keys", help="manage OHTTP key configs")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    rot = ksub.add_parser(
        "rotate", help="add a key under a new key id; current keys stay for --grace seconds"
    )
    _state(rot)
    rot.add_argument("--grace", type=int, default=24 * 3600, metavar="SECONDS")
    rot.set_defaults(func=_keys_rotate)
    lst = ksub.add_parser("list", help="list OHTTP keys (key id, public key, expiry)")
    _state(lst)
    lst.set_defaults(func=_keys_list)


def _keys_rotate(args: argparse.Namespace) -> int:
    from gateway.keys import OhttpKeyRing

    ring = OhttpKeyRing.load(args.state)
    new, pruned = ring.rotate(now=time.time(), grace=args.grace)
    for kid in pruned:
        print(f"removed expired key {kid}")
    print(f"new OHTTP key id {new.key_id}: public key {new.public_key.hex()}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import json

    from gateway.keys import OhttpKeyRing

    now = time.time()
    for k in OhttpKeyRing.load(args.state).keys:
        print(
            json.dumps(
                {
                    "key_id": k.key_id,
                    "public_key": k.public_key.hex(),
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                    "state": "published" if k.live(now) else "expired",
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from openpcc.service.logs import setup_logging
    from openpcc.service.serve import connection_limits

    setup_logging()
    try:
        limits = connection_limits(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.issuer:
        print("error: --issuer URL is required (or OPENPCC_GATEWAY_ISSUER)", file=sys.stderr)
        return 2
    if not args.registration_secret or len(args.registration_secret) < 16:
        print(
            "error: --registration-secret (or OPENPCC_GATEWAY_REGISTRATION_SECRET) of at "
            "least 16 characters is required",
            file=sys.stderr,
        )
        return 2
    issuer_name = args.issuer_name or urlsplit(args.issuer).hostname
    if not issuer_name:
        print("error: cannot derive --issuer-name from --issuer", file=sys.stderr)
        return 2
    return _run(args, issuer_name, limits)


def _run(args: argparse.Namespace, issuer_name: str, limits: Any) -> int:
    from gateway.app import (
        DEFAULT_MAX_BODY,
        GatewayConfig,
        build_gateway,
        create_internal_app,
        create_public_app,
    )
    from openpcc.service.serve import Listener, serve

    args.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = GatewayConfig(
        state_dir=args.state,
        registration_secret=args.registration_secret,
        keys_max_age=args.keys_max_age,
        max_body=args.max_body or DEFAULT_MAX_BODY,
        spent_ttl=args.spent_ttl,
        node_first_byte_timeout=args.node_timeout,
        registry_sync_interval=args.registry_sync,
    )
    gw = build_gateway(
        config,
        issuer_url=args.issuer,
        issuer_name=issuer_name,
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        node_ttl=args.node_ttl,
        health_interval=args.health_interval,
        audit_path=args.audit_log,
    )
    log = logging.getLogger("openpcc.gateway")

    def ready() -> None:
        # Garbage collector tuning, for throughput only. Everything loaded so far
        # (modules, the app, keys) lives as long as the process: freeze it, so full
        # passes skip it (~25 ms each before). Requests allocate many short-lived
        # objects that refcounting frees anyway; a young-generation pass every 700
        # allocations (the default) cost ~5 % of the CPU under load, every 10,000
        # about 0.5 %.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        log.info(
            "gateway listening on %s:%d (internal %s:%d), issuer_name %r",
            args.host,
            args.port,
            args.internal_host,
            args.internal_port,
            issuer_name,
        )

    # No access log: the gateway must not keep a per-request record (peer = relay, but
    # timing plus path is still more than an aggregate). handler_cancellation: a client
    # that leaves cancels the node request too. The internal listener gets the same.
    return serve(
        [
            Listener(create_public_app(gw), args.host, args.port),
            Listener(create_internal_app(gw), args.internal_host, args.internal_port, "internal"),
        ],
        limits=limits,
        shutdown_timeout=args.shutdown_timeout,
        on_start=gw.start,
        on_stop=gw.stop,
        ready=ready,
        handler_cancellation=True,
    )

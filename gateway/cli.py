"""`openpcc gateway ...`: run the gateway, rotate its OHTTP keys, issue node credentials."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"OPENPCC_GATEWAY_{name}", default)


def _state(p: argparse.ArgumentParser) -> None:
    """--state for the key commands: the same field as `gateway serve`'s."""
    from gateway.config import ENV_PREFIX, GatewayConfig
    from openpcc.service.config import add_config_args

    add_config_args(p, GatewayConfig, ENV_PREFIX, only=("state_dir",))


def _credentials_file(p: argparse.ArgumentParser) -> None:
    """--state and --node-credentials, as `gateway serve` reads them."""
    from gateway.config import ENV_PREFIX, GatewayConfig
    from openpcc.service.config import add_config_args

    add_config_args(p, GatewayConfig, ENV_PREFIX, only=("state_dir", "node_credentials"))


def register(sub: Any) -> None:
    gw = sub.add_parser("gateway", help="OHTTP gateway: tokens, node directory, routing (gateway/)")
    gsub = gw.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)

    from gateway.config import ENV_PREFIX, GatewayConfig
    from openpcc.service.limits import add_serve_command

    add_serve_command(
        gsub, GatewayConfig, ENV_PREFIX, _serve,
        help="run the gateway (public and internal listeners)",
    )  # fmt: skip

    keys = gsub.add_parser("keys", help="manage OHTTP key configs")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    rot = ksub.add_parser(
        "rotate",
        help="add a key per KEM under new key ids; the keys they replace stay for --grace seconds",
    )
    _state(rot)
    rot.add_argument("--grace", type=int, default=24 * 3600, metavar="SECONDS")
    rot.add_argument(
        "--kem",
        action="append",
        choices=("x25519", "x-wing"),
        help="rotate only this KEM's key (repeatable; default: x25519 and x-wing)",
    )
    rot.set_defaults(func=_keys_rotate)
    lst = ksub.add_parser("list", help="list OHTTP keys (key id, KEM, public key, expiry)")
    _state(lst)
    lst.set_defaults(func=_keys_list)

    creds = gsub.add_parser(
        "credentials",
        help="issue and revoke node admission credentials (one per node or pool)",
        description="A node registers with a credential (opnc1.NAME.SECRET) and lists at "
        "most --max-nodes nodes under it. The running gateway notices changes to the file. "
        "See docs/gateway.md, Node admission.",
    )
    csub = creds.add_subparsers(dest="credentials_command", metavar="COMMAND", required=True)
    add = csub.add_parser("add", help="issue a credential; print it once (give it to the node)")
    _credentials_file(add)
    add.add_argument("name", metavar="NAME", help="a name for logs and metrics, e.g. pool-a")
    add.add_argument("--max-nodes", type=int, default=1, metavar="N",
                     help="how many nodes may be listed under it at once (default 1)")  # fmt: skip
    add.set_defaults(func=_credentials_add)
    ls = csub.add_parser("list", help="list credentials (names and caps, never secrets)")
    _credentials_file(ls)
    ls.set_defaults(func=_credentials_list)
    rev = csub.add_parser(
        "revoke", help="revoke a credential: its nodes drop out at their next heartbeat"
    )
    _credentials_file(rev)
    rev.add_argument("name", metavar="NAME")
    rev.set_defaults(func=_credentials_revoke)


def _credential_store(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from openpcc.admission import CredentialStore

    return CredentialStore(args.node_credentials or Path(args.state_dir) / "node-credentials.json")


def _credentials_add(args: argparse.Namespace) -> int:
    try:
        cred = _credential_store(args).add(args.name, args.max_nodes)
    except ValueError as exc:
        print(f"openpcc gateway credentials add: {exc}", file=sys.stderr)
        return 2
    print(f"credential {cred.name!r} for up to {cred.max_nodes} node(s); give the node:")
    print(cred.token)
    return 0


def _credentials_list(args: argparse.Namespace) -> int:
    import json

    for cred in _credential_store(args).current().values():
        print(json.dumps({"name": cred.name, "max_nodes": cred.max_nodes}))
    return 0


def _credentials_revoke(args: argparse.Namespace) -> int:
    try:
        _credential_store(args).revoke(args.name)
    except ValueError as exc:
        print(f"openpcc gateway credentials revoke: {exc}", file=sys.stderr)
        return 2
    print(f"revoked {args.name!r}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    import hashlib

    from gateway.keys import DEFAULT_KEMS, OhttpKeyRing, kem_ids
    from openpcc.wire import hpke

    ring = OhttpKeyRing.load(args.state_dir)
    kems = kem_ids(args.kem) if args.kem else DEFAULT_KEMS
    new, pruned = ring.rotate(now=time.time(), grace=args.grace, kems=kems)
    for kid in pruned:
        print(f"removed expired key {kid}")
    for key in new:
        # An X-Wing public key is 1216 bytes: its config's digest is what a manifest pins.
        pk = (
            key.public_key.hex()
            if len(key.public_key) <= 32
            else f"{len(key.public_key)} bytes, config sha256:"
            + hashlib.sha256(key.config.encode()).hexdigest()
        )
        print(f"new OHTTP key id {key.key_id} ({hpke.kem_name(key.kem_id)}): public key {pk}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    import hashlib
    import json

    from gateway.keys import OhttpKeyRing
    from openpcc.wire import hpke

    now = time.time()
    for k in OhttpKeyRing.load(args.state_dir).keys:
        print(
            json.dumps(
                {
                    "key_id": k.key_id,
                    "kem": hpke.kem_name(k.kem_id),
                    "kem_id": k.kem_id,
                    "public_key": k.public_key.hex(),
                    # What a release manifest can pin ("sha256:..." in ohttp_key_configs).
                    "config_sha256": hashlib.sha256(k.config.encode()).hexdigest(),
                    "created_at": k.created_at,
                    "expires_at": k.expires_at,
                    "state": "published" if k.live(now) else "expired",
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.app import Gateway, build_gateway, create_internal_app, create_public_app
    from gateway.config import GatewayConfig
    from gateway.keys import ensure_keys, kem_ids
    from openpcc.service.config import config_from_args
    from openpcc.service.serve import Listener, serve, serve_settings

    config, settings = serve_settings(
        lambda: config_from_args(GatewayConfig, args), args, "gateway"
    )
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # In this process, before any worker starts: the OHTTP keys (else each worker would
    # make its own). Everything else, connections included, each worker builds for itself.
    ensure_keys(config.state_dir, kem_ids(config.ohttp_kems))
    built: list[Gateway] = []

    def gateway() -> Gateway:
        if not built:
            built.append(build_gateway(config))
        return built[0]

    log = logging.getLogger("openpcc.gateway")

    def bound(ports: dict[str, int]) -> None:
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
            "gateway listening on %s:%d (internal %s:%d), issuer_name %r, pid %d",
            config.host,
            ports["public"],
            config.internal_host,
            ports["internal"],
            config.token_issuer_name,
            os.getpid(),
        )

    async def start() -> None:
        await gateway().start()

    async def stop() -> None:
        await gateway().stop()

    # No access log: the gateway must not keep a per-request record (peer = relay, but
    # timing plus path is still more than an aggregate). handler_cancellation: a client
    # that leaves cancels the node request too. The internal listener gets the same.
    # The apps are factories: with --workers each worker builds its own gateway.
    return serve(
        [
            Listener(lambda: create_public_app(gateway()), config.host, config.port),
            Listener(
                lambda: create_internal_app(gateway()),
                config.internal_host,
                config.internal_port,
                "internal",
            ),
        ],
        settings=settings,
        shutdown_timeout=config.shutdown_timeout,
        workers=config.workers,
        on_start=start,
        on_stop=stop,
        on_bound=bound,
        handler_cancellation=True,
    )

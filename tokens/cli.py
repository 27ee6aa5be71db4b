"""`openpcc issuer ...`: run the issuer, manage accounts and token keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"OPENPCC_ISSUER_{name}", default)


def _common(p: argparse.ArgumentParser) -> None:
    """--state and --redis for the admin commands: the same fields as `issuer serve`'s."""
    from openpcc.service.config import add_config_args
    from tokens.config import ENV_PREFIX, IssuerConfig

    add_config_args(p, IssuerConfig, ENV_PREFIX, only=("state_dir", "redis"))


def register(sub: Any) -> None:
    issuer = sub.add_parser("issuer", help="Privacy Pass token issuer (tokens/)")
    isub = issuer.add_subparsers(dest="issuer_command", metavar="COMMAND", required=True)

    from openpcc.service.limits import add_serve_command
    from tokens.config import ENV_PREFIX, IssuerConfig

    add_serve_command(isub, IssuerConfig, ENV_PREFIX, _serve, help="run the issuer HTTP service")

    account = isub.add_parser("account", help="manage accounts and quotas")
    asub = account.add_subparsers(dest="account_command", metavar="COMMAND", required=True)
    add = asub.add_parser("add", help="create an account; prints its API key last")
    add.add_argument("name")
    add.add_argument("--quota", type=int, required=True, help="tokens per window")
    add.add_argument("--per", type=int, default=86400, metavar="SECONDS", help="window length")
    _common(add)
    add.set_defaults(func=_account_add)
    lst = asub.add_parser("list", help="list accounts (JSON lines)")
    _common(lst)
    lst.set_defaults(func=_account_list)
    rev = asub.add_parser("revoke", help="revoke an account's API key")
    rev.add_argument("name")
    _common(rev)
    rev.set_defaults(func=_account_revoke)
    setq = asub.add_parser("set-quota", help="change an account's quota")
    setq.add_argument("name")
    setq.add_argument("--quota", type=int, required=True)
    setq.add_argument("--per", type=int, default=86400, metavar="SECONDS")
    _common(setq)
    setq.set_defaults(func=_account_set_quota)

    keys = isub.add_parser("keys", help="manage token keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    rot = ksub.add_parser(
        "rotate", help="publish a new key with a future not-before; old keys stay until expiry"
    )
    from openpcc.service.config import add_config_args
    from tokens.config import ENV_PREFIX, KeyRotation

    add_config_args(rot, KeyRotation, ENV_PREFIX)
    _common(rot)
    rot.set_defaults(func=_keys_rotate)
    kl = ksub.add_parser("list", help="list token keys (JSON lines)")
    _common(kl)
    kl.set_defaults(func=_keys_list)


def _store(args: argparse.Namespace) -> Any:
    from tokens.store import open_store

    return open_store(args.state_dir, args.redis)


def _run_store(args: argparse.Namespace, fn: Any) -> int:
    from tokens.store import StoreError

    async def go() -> int:
        store = _store(args)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except StoreError as exc:
        print(f"error: {exc}")
        return 1


def _account_add(args: argparse.Namespace) -> int:
    from tokens.store import hash_api_key, new_api_key

    async def go(store: Any) -> int:
        key = new_api_key()
        await store.add_account(args.name, hash_api_key(key), args.quota, args.per, time.time())
        print(f"account {args.name!r}: {args.quota} tokens per {args.per} s")
        print("API key (shown once, store it now):")
        print(key)
        return 0

    return _run_store(args, go)


def _account_list(args: argparse.Namespace) -> int:
    async def go(store: Any) -> int:
        for a in await store.list_accounts():
            print(
                json.dumps(
                    {
                        "name": a.name,
                        "quota": a.quota,
                        "per_seconds": a.per_seconds,
                        "revoked": a.revoked,
                        "created_at": int(a.created_at),
                    }
                )
            )
        return 0

    return _run_store(args, go)


def _account_revoke(args: argparse.Namespace) -> int:
    async def go(store: Any) -> int:
        await store.revoke(args.name)
        print(f"account {args.name!r} revoked")
        return 0

    return _run_store(args, go)


def _account_set_quota(args: argparse.Namespace) -> int:
    async def go(store: Any) -> int:
        await store.set_quota(args.name, args.quota, args.per)
        print(f"account {args.name!r}: {args.quota} tokens per {args.per} s")
        return 0

    return _run_store(args, go)


def _keys_rotate(args: argparse.Namespace) -> int:
    from openpcc.service.config import config_from_args
    from tokens.config import KeyRotation
    from tokens.keys import KeyRing

    try:
        rotation = config_from_args(KeyRotation, args)
    except ValueError as exc:
        print(f"openpcc issuer keys rotate: {exc}", file=sys.stderr)
        return 2
    now = time.time()
    ring = KeyRing.load(args.state_dir)
    pruned = ring.prune(now)
    new = ring.generate(
        now=now, not_before=now + rotation.not_before_in, lifetime=rotation.lifetime
    )
    for kid in pruned:
        print(f"removed expired key {kid}")
    print(f"new key {new.key_id_hex}: not-before {new.not_before}, expires {new.expires_at}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from tokens.keys import KeyRing

    now = time.time()
    for k in KeyRing.load(args.state_dir).keys:
        state = "issuing" if k.issuable(now) else ("upcoming" if k.published(now) else "expired")
        print(
            json.dumps(
                {
                    "token_key_id": k.key_id_hex,
                    "truncated_id": k.key.truncated_key_id,
                    "not_before": k.not_before,
                    "expires_at": k.expires_at,
                    "state": state,
                }
            )
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from openpcc.errors import OpenPCCError
    from openpcc.privacypass import rsa_openssl
    from openpcc.privacypass.blindrsa import RSA_BACKEND_ENV, rsa_backend
    from openpcc.service.config import config_from_args
    from openpcc.service.serve import Listener, serve, serve_settings
    from tokens.app import create_app
    from tokens.config import IssuerConfig
    from tokens.keys import ensure_key
    from tokens.store import open_store

    config, settings = serve_settings(lambda: config_from_args(IssuerConfig, args), args, "issuer")
    try:
        backend = rsa_backend()  # OPENPCC_RSA_BACKEND=openssl without libcrypto: do not start
    except OpenPCCError as exc:
        print(f"openpcc issuer: {exc}", file=sys.stderr)
        return 2
    if backend == "gmpy2" and not os.environ.get(RSA_BACKEND_ENV):
        logging.getLogger("openpcc.issuer").warning(
            "%s: blind signing falls back to gmpy2 (0.3-0.55 of OpenSSL's speed)",
            rsa_openssl.unavailable_reason(),
        )
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # In this process, before any worker starts: the first key (else each worker would
    # make one), and the SQLite schema and WAL mode (switching to WAL needs the database
    # to itself).
    ring = ensure_key(config.state_dir)
    if config.workers > 1 and not config.redis:
        asyncio.run(open_store(config.state_dir).close())

    def app() -> Any:  # in each worker: its own store connection
        return create_app(_store(args), ring, config, audit_log=config.audit_log)

    def bound(ports: dict[str, int]) -> None:
        logging.getLogger("openpcc.issuer").info(
            "issuer listening on %s:%d (RSA private operation on %s, pid %d)",
            config.host, ports["public"], backend, os.getpid(),
        )  # fmt: skip

    # No access log: it would record client addresses next to accounts.
    return serve(
        [Listener(app, config.host, config.port)],
        settings=settings,
        on_bound=bound,
        shutdown_timeout=config.shutdown_timeout,
        workers=config.workers,
    )

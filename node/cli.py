"""The node's sub-commands of ``openpcc``.

``register`` adds one top-level group per concern; each ``_register_*`` function owns
its group. torch, transformers and vLLM are imported only inside the command functions,
so ``openpcc --help`` and the other parties never pay for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from node.config import ENV_PREFIX as NODE_ENV
from node.config import GPU_CHOICES, TEE_CHOICES, NodeServeConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the node's command groups to the ``openpcc`` command."""
    _register_model(sub)
    _register_node(sub)


# --------------------------------------------------------------------------------------
# `openpcc model ...`: model preparation (the random-weights test model for now).
# --------------------------------------------------------------------------------------


def _register_model(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "model",
        help="prepare models for a node (e.g. the random-weights test model)",
        description="Model preparation for nodes.",
    )
    model_sub = group.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    tiny = model_sub.add_parser(
        "make-tiny",
        help="generate the tiny random-weights test model (output is meaningless)",
        description="Generate a tiny Llama model with random weights and a toy tokenizer "
        "into DIR, deterministically from --seed, and print its directory and weights "
        "digest. It exists so that vLLM can be tested without downloading a model: "
        "its output is meaningless text. See docs/node-engine.md.",
    )
    tiny.add_argument("dir", type=Path, metavar="DIR", help="directory to write the model to")
    tiny.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    tiny.add_argument("--json", action="store_true", help="print the full result as JSON")
    tiny.set_defaults(func=_cmd_make_tiny)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from node.tinymodel import make_tiny_model

    hf_logging.disable_progress_bar()
    info = make_tiny_model(args.dir, seed=args.seed)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"dir:    {info['dir']}")
        print(f"digest: {info['digest']}")
        print(f"served: {info['served_name']} (random-weights test model, output is meaningless)")
    return 0


# --------------------------------------------------------------------------------------
# `openpcc node ...`: running a node (sealed-request server + engine). Added separately.
# --------------------------------------------------------------------------------------


__all__ = ["GPU_CHOICES", "NODE_ENV", "TEE_CHOICES", "register"]


def _register_node(sub: argparse._SubParsersAction) -> None:
    """Add ``node serve``: the sealed-request server in front of its engine."""
    group = sub.add_parser(
        "node",
        help="run an inference node (sees prompts, inside a TEE; never sees who asked)",
        description="Inference node: opens sealed requests, forwards allowed ones to vLLM, "
        "streams sealed answers, registers with the gateway. See docs/node.md.",
    )
    node_sub = group.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    from openpcc.service.limits import add_serve_command

    add_serve_command(
        node_sub, NodeServeConfig, NODE_ENV, _cmd_node_serve,
        help="serve POST /v1/sealed and register with the gateway",
        description="Serve sealed requests for one model. The engine is either an "
        "OpenAI-compatible server already running on loopback (--engine-url) or vLLM "
        "started and supervised by the node (--vllm-model).",
    )  # fmt: skip


def _node_id(args: NodeServeConfig) -> bytes:
    """--node-id, else the one kept in --state, else a fresh random one (kept if --state)."""
    if args.node_id:
        nid = bytes.fromhex(args.node_id)
        if len(nid) != 16:
            raise ValueError("--node-id must be 32 hex characters")
        return nid
    path = args.state / "node_id" if args.state else None
    if path is not None and path.exists():
        nid = bytes.fromhex(path.read_text().strip())
        if len(nid) != 16:
            raise ValueError(f"{path} does not hold a 16-byte hex node id")
        return nid
    nid = os.urandom(16)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(nid.hex() + "\n")
    return nid


def _cmd_node_serve(args: argparse.Namespace) -> int:
    from openpcc.attestation.providers import ProviderError

    try:
        return _node_serve(args)
    except ValueError as exc:
        print(f"openpcc node serve: {exc}", file=sys.stderr)
        return 2
    except ProviderError as exc:  # no TEE/GPU, or evidence the node cannot collect
        reason = " ".join(str(exc).split())
        print(f"openpcc node serve: evidence: {reason}", file=sys.stderr)
        return 1


def _engine_model(engine_url: str) -> str:
    """The one model the engine lists (waits while it does not answer or lists none).

    Several models and no --model-name ends the start with one line naming them.
    """
    from openpcc.engine_models import AmbiguousModelError, discover_model

    node_log = logging.getLogger("openpcc.node")
    try:
        name = discover_model(engine_url, report=lambda line: node_log.warning("%s", line))
    except AmbiguousModelError as exc:
        raise ValueError(str(exc)) from None
    node_log.info("engine at %s lists one model, %r: serving it", engine_url, name)
    return name


def _node_serve(ns: argparse.Namespace) -> int:
    import hashlib

    from node.app import NodeConfig, NodeService, run
    from node.engine import ExternalEngine, VLLMEngine, default_served_name
    from node.evidence import check_source, open_source
    from node.policy import RequestLimits
    from node.register import RegistrationConfig
    from openpcc.service.config import config_from_args
    from openpcc.service.limits import serve_settings_from_args
    from openpcc.service.logs import setup_logging

    args = config_from_args(NodeServeConfig, ns)
    if not args.engine_url and not args.vllm_model:
        raise ValueError("give --engine-url URL or --vllm-model DIR")
    settings = serve_settings_from_args(ns)
    if args.gateway_internal:
        from openpcc.admission import parse_credential
        from openpcc.errors import DecodeError

        try:
            parse_credential(args.admission_credential or "")
        except DecodeError as exc:
            raise ValueError(
                f"--gateway-internal needs --admission-credential "
                f"({NODE_ENV}ADMISSION_CREDENTIAL): {exc}"
            ) from None
    if args.heartbeat <= 0:
        raise ValueError("--heartbeat must be positive")
    tee_dir = None
    if args.tee == "simulated":
        tee_dir = args.tee_dir or (args.state / "simulated-tee" if args.state else None)
        if tee_dir is None:
            raise ValueError("give --tee-dir or --state for the simulated TEE")
    elif args.tee_dir or args.tee_measurement:
        raise ValueError(
            f"--tee-dir and --tee-measurement ({NODE_ENV}TEE_DIR, {NODE_ENV}TEE_MEASUREMENT) "
            f"apply only to --tee simulated, not --tee {args.tee}"
        )
    measurement = bytes.fromhex(args.tee_measurement) if args.tee_measurement else None
    evidence = open_source(
        args.tee,
        tee_dir,
        release_id=args.release_id,
        measurement=measurement,
        gpu=args.gpu,
        gpu_rims=[Path(p) for p in args.gpu_rim],
        gpu_ocsp=[Path(p) for p in args.gpu_ocsp],
        endorsements=args.endorsements,
    )
    setup_logging()
    node_id = _node_id(args)

    engine: VLLMEngine | ExternalEngine
    if args.vllm_model:
        from node.tinymodel import model_digest

        if args.model_digest:
            raise ValueError("--model-digest is computed from --vllm-model; do not give both")
        model_name = args.model_name or default_served_name(args.vllm_model)
        digest = bytes.fromhex(model_digest(args.vllm_model))
        engine = VLLMEngine(
            args.vllm_model,
            served_model_name=model_name,
            max_model_len=args.vllm_max_model_len,
            extra_args=list(args.vllm_arg),
            log_path=args.vllm_log,
        )
    else:
        model_name = args.model_name or _engine_model(args.engine_url)
        if args.model_digest:
            digest = bytes.fromhex(args.model_digest)
        else:
            # Weak: pins the name, not the weights. Real deployments use --vllm-model.
            digest = hashlib.sha256(model_name.encode()).digest()
        engine = ExternalEngine(args.engine_url, served_model_name=model_name)
    if len(digest) != 32:
        raise ValueError("the model digest must be 32 bytes (64 hex characters)")

    # With --port 0 and no --public-url, NodeService.on_bound fills in the bound port.
    public_url = args.public_url or f"http://{args.host}:{args.port}"
    config = NodeConfig(
        node_id=node_id,
        model_name=model_name,
        model_digest=digest,
        release_id=args.release_id,
        public_url=public_url,
        limits=RequestLimits(
            max_body=args.max_body, max_tokens=args.max_tokens, max_messages=args.max_messages
        ),
        max_envelope=args.max_envelope,
        max_concurrency=args.max_concurrency,
        engine_read_timeout=args.engine_timeout,
        claims_lifetime=args.claims_lifetime,
        accept_sealed_v1=args.accept_sealed_v1,
        forward_secret=args.admission_credential if args.gateway_internal else None,
    )
    registration = [
        RegistrationConfig(
            gateway_internal=gateway.strip(),
            credential=str(args.admission_credential),
            heartbeat=args.heartbeat,
        )
        for gateway in args.gateway_internal
    ]
    # One throwaway bundle now: no TEE, GPU CC off or missing endorsements end the start
    # here, in one line, before vLLM is launched.
    check_source(evidence, node_id=node_id.hex(), model_digest=digest, release_id=args.release_id)
    service = NodeService(
        config,
        engine,
        evidence,
        registration=registration,
        external_engine=isinstance(engine, ExternalEngine),
    )
    logging.getLogger("openpcc.node").info(
        "node %s serving %r (engine %s, tee %s, key id %s)",
        node_id.hex(),
        model_name,
        engine.url,
        evidence.tee,
        service.key_id.hex(),
    )
    return run(
        service,
        host=args.host,
        port=args.port,
        settings=settings,
        derive_url=not args.public_url,
        audit_log=args.audit_log,
        shutdown_timeout=args.shutdown_timeout,
    )

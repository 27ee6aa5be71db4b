"""`node serve`'s configuration: one frozen dataclass; its flags and ``OPENPCC_NODE_*``
variables are derived from it (openpcc/service/config.py). Free of aiohttp and of the
evidence providers, so `openpcc --help` imports neither."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from openpcc.service.config import option

ENV_PREFIX = "OPENPCC_NODE_"
# node.evidence's TEE_CHOICES / GPU_CHOICES (tests/test_node_evidence.py keeps them equal).
TEE_CHOICES = ("simulated", "auto", "configfs-tsm", "sev-guest")
GPU_CHOICES = ("none", "nvml")


@dataclass(frozen=True)
class NodeServeConfig:
    host: str = field(default="127.0.0.1", metadata=option("address to listen on"))
    port: int = field(default=8090, metadata=option("port to listen on", kind="int"))
    public_url: str | None = field(
        default=None,
        metadata=option("how the gateway reaches this node (default: http://HOST:PORT)"),
    )
    gateway_internal: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "a gateway's internal base URL (POST URL/internal/nodes); repeat it once per "
            "gateway replica; none: do not register",
            kind="list",
            metavar="URL",
        ),
    )
    admission_credential: str | None = field(
        default=None,
        metadata=option(
            "the opnc1.NAME.SECRET credential the gateway operator issued this node "
            "(gateway credentials add; prefer the environment variable: flags show in ps)",
            metavar="CREDENTIAL",
        ),
    )
    heartbeat: float = field(
        default=10.0,
        metadata=option(
            "seconds between registrations (the gateway drops a node after 3 missed)",
            kind="float",
        ),
    )
    node_id: str | None = field(
        default=None,
        metadata=option(
            "16-byte node id in hex (default: random, kept in --state across restarts)",
            metavar="HEX32",
        ),
    )
    state: Path | None = field(
        default=None,
        metadata=option(
            "directory for the node id and the simulated TEE (never the HPKE key)",
            kind="path",
            metavar="DIR",
        ),
    )
    model_name: str | None = field(
        default=None,
        metadata=option(
            "the served model name (with --engine-url: default the one model the engine "
            "lists; an engine listing several needs this)"
        ),
    )
    engine_url: str | None = field(
        default=None,
        metadata=option("an OpenAI-compatible engine already running on loopback",
                        metavar="URL"),
    )  # fmt: skip
    vllm_model: Path | None = field(
        default=None,
        metadata=option("start and supervise vLLM serving this model directory", kind="path",
                        metavar="DIR"),
    )  # fmt: skip
    model_digest: str | None = field(
        default=None,
        metadata=option(
            "SHA-256 of the served weights for the claims, with --engine-url (default: "
            "SHA-256 of the model name, which pins nothing; see docs/node.md)",
            metavar="HEX",
        ),
    )
    vllm_arg: tuple[str, ...] = field(
        default=(),
        metadata=option("extra argument for vLLM (repeatable, e.g. --vllm-arg=--enforce-eager)",
                        kind="list", metavar="ARG", env=False),
    )  # fmt: skip
    vllm_max_model_len: int = field(
        default=512, metadata=option("vLLM --max-model-len", kind="int")
    )
    vllm_log: Path | None = field(
        default=None, metadata=option("file for vLLM's own output", kind="path")
    )
    tee: str = field(
        default="simulated",
        metadata=option(
            "where TEE evidence comes from: auto (configfs-tsm, else /dev/sev-guest; fails "
            "without TEE hardware), configfs-tsm, sev-guest, or simulated (development only)"
        ),
    )
    tee_dir: Path | None = field(
        default=None,
        metadata=option("simulated TEE keys (created if missing; default: STATE/simulated-tee)"
                        "; --tee simulated only", kind="path", metavar="DIR"),
    )  # fmt: skip
    tee_measurement: str | None = field(
        default=None,
        metadata=option(
            "launch measurement the simulated TEE reports (default: SHA-384 over a label and "
            "the release id; see docs/node.md); --tee simulated only",
            metavar="HEX96",
        ),
    )
    gpu: str = field(
        default="none",
        metadata=option("GPU evidence: nvml (every GPU via nvidia-ml-py, CC mode required) "
                        "or none"),
    )  # fmt: skip
    gpu_rim: tuple[str, ...] = field(
        default=(),
        metadata=option("a cached NVIDIA RIM attached to every GPU's evidence (repeatable); "
                        "re-read for each bundle", kind="list", metavar="FILE"),
    )  # fmt: skip
    gpu_ocsp: tuple[str, ...] = field(
        default=(),
        metadata=option("a cached OCSP response (DER) attached to every GPU's evidence "
                        "(repeatable); re-read for each bundle", kind="list", metavar="FILE"),
    )  # fmt: skip
    endorsements: Path | None = field(
        default=None,
        metadata=option(
            'JSON object merged into the bundle\'s endorsements: SNP {"vcek"|"vlek": PEM, '
            '"ask_ark": PEM}, TDX {"collateral": {...}}; re-read for each bundle',
            kind="path",
            metavar="FILE",
        ),
    )
    release_id: str = field(default="dev", metadata=option("release id in the claims"))
    claims_lifetime: int = field(
        default=3600,
        metadata=option("seconds each bundle's claims are valid (re-issued at half-life)",
                        kind="int"),
    )  # fmt: skip
    accept_sealed_v1: bool = field(
        default=True,
        metadata=option(
            "also open sealed requests v1 (X25519 only) from clients older than v2 "
            "(X-Wing); off once the deprecation period in docs/PROTOCOL.md ends",
            kind="bool",
        ),
    )
    max_tokens: int = field(
        default=4096,
        metadata=option("largest max_tokens / max_completion_tokens a request may ask for",
                        kind="int"),
    )  # fmt: skip
    max_body: int = field(
        default=256 * 1024,
        metadata=option("largest inner JSON body, e.g. 256k", kind="size"),
    )
    max_messages: int = field(
        default=256, metadata=option("most chat messages per request", kind="int")
    )
    max_envelope: int = field(
        default=2 * 1024 * 1024,
        metadata=option("largest sealed envelope, e.g. 2m (413 above)", kind="size"),
    )
    max_concurrency: int = field(
        default=64,
        metadata=option("sealed requests served at once (503 above, so the gateway tries "
                        "another node)", kind="int"),
    )  # fmt: skip
    engine_timeout: float = field(
        default=300.0,
        metadata=option("seconds the engine may stay silent during a response", kind="float"),
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata=option("on SIGTERM, stop accepting and let in-flight streams finish this "
                        "many seconds", kind="float"),
    )  # fmt: skip
    audit_log: Path | None = field(
        default=None,
        metadata=option("record what the node received, incl. decrypted requests (tests/demo "
                        "only)", kind="path", metavar="FILE", env=False),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.tee not in TEE_CHOICES:
            raise ValueError(f"--tee must be one of {', '.join(TEE_CHOICES)}, not {self.tee!r}")
        if self.gpu not in GPU_CHOICES:
            raise ValueError(f"--gpu must be one of {', '.join(GPU_CHOICES)}, not {self.gpu!r}")
        if self.engine_url and self.vllm_model:
            raise ValueError("give --engine-url or --vllm-model, not both")

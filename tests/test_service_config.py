"""openpcc/service/config.py: flags and OPENPCC_<PARTY>_* variables derived from one
frozen dataclass, parsed one way for every party."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from openpcc.service.config import add_config_args, config_from_args, option

PREFIX = "OPENPCC_TEST_"


@dataclass(frozen=True)
class Sample:
    port: int = field(default=8000, metadata=option("port", kind="int"))
    max_body: int = field(default=1024, metadata=option("largest body", kind="size"))
    verbose: bool = field(default=False, metadata=option("say more", kind="bool"))
    state_dir: Path = field(default=Path("s"), metadata=option("state", kind="path",
                                                               flag="--state"))  # fmt: skip
    gateways: tuple[str, ...] = field(
        default=(), metadata=option("a gateway", kind="list", flag="--gateway")
    )
    origins: tuple[str, ...] = field(
        default=(), metadata=option("an origin", kind="origins", flag="--allow-origin")
    )
    audit_log: Path | None = field(
        default=None, metadata=option("tests only", kind="path", env=False)
    )
    secret: str = "not an option"

    def __post_init__(self) -> None:
        if self.port < 1:
            raise ValueError("--port must be positive")


def parse(argv: list[str]) -> Sample:
    p = argparse.ArgumentParser(prog="t")
    add_config_args(p, Sample, PREFIX)
    return config_from_args(Sample, p.parse_args(argv))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PORT", "MAX_BODY", "VERBOSE", "STATE", "GATEWAY", "ALLOW_ORIGIN", "AUDIT_LOG"):
        monkeypatch.delenv(PREFIX + var, raising=False)
    assert parse([]) == Sample()


def test_environment_then_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFIX + "PORT", "9000")
    monkeypatch.setenv(PREFIX + "MAX_BODY", "8m")
    monkeypatch.setenv(PREFIX + "VERBOSE", "yes")
    monkeypatch.setenv(PREFIX + "STATE", "/tmp/x")
    monkeypatch.setenv(PREFIX + "GATEWAY", "a=http://a, http://b")
    monkeypatch.setenv(PREFIX + "ALLOW_ORIGIN", "https://App.Example/")
    got = parse([])
    assert got.port == 9000 and got.max_body == 8 << 20 and got.verbose is True
    assert got.state_dir == Path("/tmp/x")
    assert got.gateways == ("a=http://a", "http://b")
    assert got.origins == ("https://app.example",)
    flags = parse(["--port", "1", "--max-body", "64k", "--no-verbose", "--gateway", "g"])
    assert (flags.port, flags.max_body, flags.verbose, flags.gateways) == (1, 65536, False, ("g",))


def test_bad_values_are_usage_errors_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PREFIX + "MAX_BODY", "lots")
    with pytest.raises(SystemExit) as exc:
        parse([])
    assert exc.value.code == 2
    assert "--max-body" in capsys.readouterr().err
    monkeypatch.delenv(PREFIX + "MAX_BODY")
    monkeypatch.setenv(PREFIX + "VERBOSE", "maybe")
    with pytest.raises(ValueError, match="bad boolean"):
        parse([])


def test_validation_and_flag_only_options(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="--port must be positive"):
        parse(["--port", "0"])
    monkeypatch.setenv(PREFIX + "AUDIT_LOG", "/tmp/everything")
    assert parse([]).audit_log is None  # never from the environment
    assert parse(["--audit-log", "a.jsonl"]).audit_log == Path("a.jsonl")


def test_issuer_flags_all_have_variables() -> None:
    """The issuer once had 8 flags without an environment variable."""
    from tokens.config import ENV_PREFIX, IssuerConfig

    p = argparse.ArgumentParser()
    add_config_args(p, IssuerConfig, ENV_PREFIX)
    text = p.format_help().replace("\n", " ")
    for var in ("STATE", "REDIS", "HOST", "PORT", "PUBLIC_URL", "ALLOW_ORIGIN",
                "DIRECTORY_MAX_AGE", "MAX_BATCH", "SHUTDOWN_TIMEOUT"):  # fmt: skip
        assert ENV_PREFIX + var in " ".join(text.split()), var
    assert ENV_PREFIX + "AUDIT_LOG" not in text


def test_gateway_config_one_meaning_of_max_body_and_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--max-body` is a size everywhere (it was bytes in the gateway, "8m" in the relay)."""
    from gateway.config import ENV_PREFIX, GatewayConfig

    for var in ("ISSUER", "TRUST_POLICY", "RELEASE_PUBKEY", "MAX_BODY", "NODE_NETWORK"):
        monkeypatch.delenv(ENV_PREFIX + var, raising=False)
    p = argparse.ArgumentParser()
    add_config_args(p, GatewayConfig, ENV_PREFIX)
    with pytest.raises(ValueError, match="--issuer URL is required"):
        config_from_args(GatewayConfig, p.parse_args([]))
    args = p.parse_args(["--issuer", "http://issuer.example:8401", "--max-body", "9m"])
    with pytest.raises(ValueError, match="--trust-policy FILE and --release-pubkey PEM"):
        config_from_args(GatewayConfig, args)
    monkeypatch.setenv(ENV_PREFIX + "TRUST_POLICY", "/etc/openpcc/trust-policy.json")
    monkeypatch.setenv(ENV_PREFIX + "RELEASE_PUBKEY", "/etc/openpcc/release.pub.pem")
    p = argparse.ArgumentParser()
    add_config_args(p, GatewayConfig, ENV_PREFIX)
    bad = p.parse_args(["--issuer", "http://i.example", "--node-network", "10.0.0.0/33"])
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        config_from_args(GatewayConfig, bad)
    config = config_from_args(
        GatewayConfig, p.parse_args(["--issuer", "http://issuer.example:8401", "--max-body", "9m",
                                     "--node-network", "10.8.0.0/16"])
    )  # fmt: skip
    assert config.node_network == ("10.8.0.0/16",)
    assert config.max_body == 9 << 20
    assert config.token_issuer_name == "issuer.example"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["gateway", "serve"], "openpcc gateway: --issuer URL is required"),
        (["issuer", "serve", "--port", "70000"], "openpcc issuer: --port must be 0..65535"),
        (["relay", "serve"], "openpcc relay: at least one --gateway is required"),
        (
            ["relay", "serve", "--gateway", "http://g/", "--head-timeout", "0"],
            "openpcc relay: head-timeout must be positive",
        ),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(argv: list[str], line: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPCC_")}
    out = subprocess.run(
        [sys.executable, "-m", "openpcc.cli", *argv, *(["--state", str(tmp_path)] if
         argv[0] != "relay" else [])],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr

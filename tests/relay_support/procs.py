"""The fake gateway, the Python relay and the nginx relay of the relay tests, on
tests/harness.py (nginx, which cannot report a port it chose, gets one from free_port)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import ROOT, Proc, fake, free_port, spawn, wait_http

__all__ = ["ROOT", "NginxMissing", "Proc", "RelaySettings", "free_port", "nginx_binary",
           "render_nginx_conf", "start_gateway", "start_nginx_relay", "start_python_relay",
           "start_relay", "wait_http"]  # fmt: skip

NGINX_TEMPLATE = ROOT / "infra" / "relay" / "nginx.conf"


class NginxMissing(RuntimeError):
    pass


def start_gateway(workdir: Path) -> Proc:
    return fake("gateway", workdir, "relay_support.fake_gateway", wait="/_control/state")


@dataclass
class RelaySettings:
    """One set of limits, translated to each implementation's own knobs."""

    gateway_port: int
    gateway_path: str = "/gateway"
    max_body: str = "64k"
    max_concurrency: int = 2
    rate: float = 1000.0  # requests per second per client
    burst: int = 1000  # requests back to back
    connect_timeout: int = 1
    read_timeout: int = 2
    client_timeout: int = 10
    workers: int = 1
    extra_args: list[str] = field(default_factory=list)
    allow_origins: list[str] = field(default_factory=list)  # CORS; "*" for any origin


def start_python_relay(s: RelaySettings, workdir: Path, access_log: bool = True) -> Proc:
    cmd = [
        sys.executable, "-m", "openpcc.cli", "relay", "serve",
        "--host", "127.0.0.1", "--port", "0",
        "--gateway", f"http://127.0.0.1:{s.gateway_port}{s.gateway_path}",
        "--max-body", s.max_body,
        "--max-concurrency", str(s.max_concurrency),
        "--rate-limit", repr(s.rate), "--rate-burst", str(s.burst),
        "--connect-timeout", str(s.connect_timeout),
        "--read-timeout", str(s.read_timeout),
        "--client-timeout", str(s.client_timeout),
        *(["--access-log"] if access_log else []),
        *(a for origin in s.allow_origins for a in ("--allow-origin", origin)),
        *s.extra_args,
    ]  # fmt: skip
    proc = spawn("python", cmd, Path(tempfile.mkdtemp(prefix="relay-python-", dir=workdir)))
    wait_http(proc.url + "/healthz", proc)
    return proc


def render_nginx_conf(s: RelaySettings, listen: str) -> str:
    """Fill infra/relay/nginx.conf's {{NAME}} placeholders (as an operator's sed would)."""
    rate = f"{round(s.rate)}r/s" if s.rate >= 1 else f"{round(s.rate * 60)}r/m"
    values = {
        "WORKERS": str(s.workers),
        "LISTEN": listen,
        "GATEWAY_SCHEME": "http",
        "GATEWAY_ADDR": f"127.0.0.1:{s.gateway_port}",
        "GATEWAY_HOST": f"127.0.0.1:{s.gateway_port}",
        "GATEWAY_HOSTNAME": "127.0.0.1",
        "GATEWAY_PATH": s.gateway_path,
        "KEYS_PATH": "/.well-known/ohttp-gateway",
        "MAX_BODY": s.max_body,
        "RATE": rate,
        "BURST": str(s.burst - 1),  # nginx counts the excess over the first request
        "MAX_CONCURRENCY": str(s.max_concurrency),
        "CONNECT_TIMEOUT": f"{s.connect_timeout}s",
        "READ_TIMEOUT": f"{s.read_timeout}s",
        "CLIENT_TIMEOUT": f"{s.client_timeout}s",
    }
    text = NGINX_TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if s.allow_origins:  # as the template's comment tells an operator to edit the map
        entries = "".join(
            '        default "*";\n' if o == "*" else f'        "{o}" $http_origin;\n'
            for o in s.allow_origins
        )
        head = "    map $http_origin $relay_cors_origin {\n"
        if head not in text:
            raise ValueError("nginx.conf has no CORS origin map to fill")
        text = text.replace(head, head + entries)
    left = re.findall(r"^[^#]*?(\{\{[A-Z_]+\}\})", text, flags=re.MULTILINE)
    if left:
        raise ValueError(f"unfilled placeholders in nginx.conf: {left}")
    return text


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NginxMissing(
            "nginx is not installed: the relay contract suite also runs against "
            "infra/relay/nginx.conf. Install Debian's package: apt-get install -y nginx "
            "(scripts/dev does this)."
        )
    return found


def start_nginx_relay(s: RelaySettings, workdir: Path) -> Proc:
    binary = nginx_binary()
    port = free_port()
    prefix = Path(tempfile.mkdtemp(prefix="relay-nginx-", dir=workdir))
    for sub in ("run", "tmp", "cache", "logs"):
        (prefix / sub).mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(s, f"127.0.0.1:{port}"))
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    cmd = [binary, "-p", str(prefix), "-c", str(conf), "-g", directives]
    proc = spawn("nginx", cmd, prefix, report=False, ports={"public": port})
    proc.workdir = prefix
    try:
        wait_http(proc.url + "/healthz", proc, timeout=15)
    except AssertionError as exc:
        raise RuntimeError(f"nginx failed to start: {exc}") from None
    return proc


def start_relay(kind: str, s: RelaySettings, workdir: Path) -> Proc:
    if kind == "python":
        return start_python_relay(s, workdir)
    return start_nginx_relay(s, workdir)

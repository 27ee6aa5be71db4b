"""The node image's boot gates (infra/node/mkosi.extra/usr/libexec/openpcc/): the GPU
CC-mode decision and the model-digest check, run without a GPU or an image."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from openpcc.models import model_digest

LIBEXEC = Path(__file__).resolve().parent.parent / "infra/node/mkosi.extra/usr/libexec/openpcc"
NODE = LIBEXEC.parent.parent.parent.parent


def _load(name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(LIBEXEC / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look their module up
    loader.exec_module(mod)
    return mod


cc = _load("gpu-cc-check")


def test_cc_on_production_no_devtools_passes() -> None:
    state = cc.CCState(feature=1, environment=2, devtools=0, gpus_ready=0, gpu_count=8)
    assert cc.judge(state) == []
    assert cc.judge(state, require_ready=True) == ["GPUs are not in the CC ready state"]


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"feature": 0}, "OFF"),
        ({"environment": 1}, "not PRODUCTION"),
        ({"devtools": 1}, "developer-tools"),
        ({"gpu_count": 0}, "no NVIDIA GPU"),
    ],
)
def test_anything_less_is_refused(change: dict[str, int], reason: str) -> None:
    fields = {"feature": 1, "environment": 2, "devtools": 0, "gpus_ready": 1, "gpu_count": 1}
    problems = cc.judge(cc.CCState(**{**fields, **change}))
    assert len(problems) == 1 and reason in problems[0]


def test_no_gpu_tooling_fails_closed() -> None:
    # Neither pynvml's CC calls nor nvidia-smi on this machine: the check must fail.
    env = {**os.environ, "PATH": "/nonexistent"}
    out = subprocess.run(
        [sys.executable, str(LIBEXEC / "gpu-cc-check")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1 and "cannot read the CC state" in out.stderr


def _verify(model: Path, digest: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OPENPCC_NODE_VLLM_MODEL": str(model),
        "OPENPCC_EXPECTED_MODEL_DIGEST": digest,
    }
    return subprocess.run(
        [sys.executable, str(LIBEXEC / "verify-model")], capture_output=True, text=True, env=env
    )


def test_verify_model(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x00" * 1000)
    good = model_digest(model)
    assert _verify(model, good).returncode == 0
    (model / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 999)  # one flipped byte
    out = _verify(model, good)
    assert out.returncode == 1 and "release pins" in out.stderr
    assert _verify(model, "").returncode == 1
    assert _verify(tmp_path / "missing", good).returncode == 1


def test_release_image_has_no_way_in() -> None:
    finalize = (NODE / "mkosi.finalize").read_text()
    for path in ("bin/sh", "usr/bin/bash", "usr/sbin/sshd", "usr/sbin/agetty", "usr/bin/su"):
        assert path in finalize
    cmdline = (NODE / "cmdline.txt").read_text()
    for unit in ("debug-shell", "emergency", "rescue", "serial-getty@ttyS0"):
        assert f"systemd.mask={unit}" in cmdline
    assert "openssh-server" in (NODE / "mkosi.conf").read_text()
    # The gates are Python: a release image has no /bin/sh to run a shell script.
    for script in LIBEXEC.iterdir():
        assert script.read_text().startswith("#!/usr/bin/python3"), script

"""The random-weights test model: deterministic, pinned by its digest, servable shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import require_module

require_module("torch")
require_module("transformers")

from node import tinymodel  # noqa: E402
from node.tinymodel import LABEL_FILE, make_tiny_model, model_digest  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_same_seed_same_digest(tiny: dict, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert again["digest"] == tiny["digest"]
    assert model_digest(tiny["dir"]) == tiny["digest"]
    weights = Path(tiny["dir"], "model.safetensors").read_bytes()
    assert Path(again["dir"], "model.safetensors").read_bytes() == weights


def test_other_seed_other_digest(tiny: dict, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert other["digest"] != tiny["digest"]


def test_digest_format_and_coverage(tiny: dict, tmp_path: Path) -> None:
    digest = tiny["digest"]
    assert len(digest) == 64 and int(digest, 16) >= 0  # SHA-256 hex, as claims expect
    copy = tmp_path / "copy"
    shutil.copytree(tiny["dir"], copy)
    assert model_digest(copy) == digest  # independent of where the model lives
    (copy / ".cache").mkdir()
    (copy / ".cache" / "x").write_text("bookkeeping")
    assert model_digest(copy) == digest  # hidden files are not part of the model
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert model_digest(copy) != digest  # config changes behaviour, so it is covered
    with pytest.raises(FileNotFoundError):
        model_digest(tmp_path / "missing")


def test_small_and_labelled(tiny: dict) -> None:
    d = Path(tiny["dir"])
    assert tiny["size_bytes"] < 20 * 1024 * 1024
    assert "random weights" in (d / LABEL_FILE).read_text()
    assert "meaningless" in tiny["label"]
    assert (d / "model.safetensors").exists()
    assert not list(d.glob("*.bin"))  # safetensors only


def test_config_shape(tiny: dict) -> None:
    cfg = json.loads(Path(tiny["dir"], "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg.get("head_dim", 64) == 64  # the CPU attention kernel rejects head_dim 16
    assert cfg["vocab_size"] == tinymodel.VOCAB
    assert tinymodel.read_config(tiny["dir"]) == cfg


def test_tokenizer_round_trip(tiny: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["dir"])
    assert len(tok) <= tinymodel.VOCAB
    for text in ("Hello, how are you today?", "ünïcødé ✓ 🔒 tabs\tand\nnewlines", ""):
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids, default=0) < tinymodel.VOCAB
        assert tok.decode(ids) == text


def test_chat_template_renders(tiny: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["dir"])
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>be brief<|eos|><|user|>hi there<|eos|><|assistant|>"
    ids = tok.encode(text, add_special_tokens=False)  # what vLLM does with the rendering
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") == ids[-1]

"""A Llama-3-8B-shaped model directory for `--load-format dummy` (random weights).

No weights can be fetched on the GPU host, so vLLM generates them; what it needs from us
is the architecture (`llama3-8b-config.json`, Llama-3-8B's published shape) and a
tokenizer with the same 128256-entry vocabulary size, here a WordLevel vocabulary.
The output is meaningless text; the compute per token is that of the real model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((HERE / "llama3-8b-config.json").read_text())
    (out / "config.json").write_text(json.dumps(config, indent=1))
    size = int(config["vocab_size"])
    specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "[UNK]": 128002}
    vocab = {"lighthouse": 0}
    for i in range(1, size):
        if i not in specials.values():
            vocab[f"w{i}"] = i
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        unk_token="[UNK]",
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)
    (out / "DUMMY_WEIGHTS.txt").write_text(
        "Llama-3-8B shape with vLLM dummy (random) weights: output is meaningless.\n"
    )
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if target.exists():
        shutil.rmtree(target)
    print(make(target))

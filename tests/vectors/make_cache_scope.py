"""Writes cache_scope_v1.json: our own vectors (no outside source: the derivation is
OpenPCC's, docs/PROTOCOL.md "Prefix cache scope and affinity"). Both clients test against
it, so the Python and JS derivations agree byte for byte."""

import json
from pathlib import Path

from openpcc.client.cachescope import canonical_json, conversation_prefix, derive_salt

SECRET = bytes(range(32))
CASES = [
    {"scope": "conversation", "model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {
        "scope": "conversation",
        "model": "llama-3-8b",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": 'Grüße, 東京 "quoted" \\ back\nline\ttab \u2028 \U0001f600',
            },
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And then?"},
        ],
    },
    {
        "scope": "conversation",
        "model": "m",
        "messages": [{"content": "no user yet", "role": "system", "name": "x"}],
    },
    {"scope": "my-agent", "model": "m", "messages": [{"role": "user", "content": "hi"}]},
    {"scope": None, "model": "m", "messages": [{"role": "user", "content": "hi"}]},
]

out = {"secret": SECRET.hex(), "cases": []}
for c in CASES:
    salt = derive_salt(SECRET, c["scope"], model=c["model"], messages=c["messages"])
    canon = canonical_json({"messages": conversation_prefix(c["messages"]), "model": c["model"]})
    out["cases"].append({**c, "canonical_hex": canon.hex(), "salt": salt.hex() if salt else None})
Path(__file__).with_name("cache_scope_v1.json").write_text(json.dumps(out, indent=1) + "\n")

"""Model identity shared by the node (attestation claims) and release tooling (manifests).

Both sides must compute the same digest of a model directory, so it lives in the core.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_DIGEST_CHUNK = 1 << 20


def model_digest(model_dir: Path | str) -> str:
    """SHA-256 (hex) over every non-hidden file of a model directory, recursively.

    Covers weights *and* config, tokenizer and chat template: all of them change what
    the node computes, so the attestation claim must pin all of them. Each file enters
    as ``len(name) || name || len(data) || data`` (8-byte big-endian lengths, names as
    sorted POSIX paths relative to the directory), so no two layouts collide.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    h = hashlib.sha256()
    for name, path in files:
        raw = name.encode()
        h.update(len(raw).to_bytes(8, "big") + raw)
        h.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as f:
            while chunk := f.read(_DIGEST_CHUNK):
                h.update(chunk)
    return h.hexdigest()

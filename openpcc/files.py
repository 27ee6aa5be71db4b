"""Small file helpers the parties share for secrets on disk."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Atomic write with mode 0600: a reader never sees half a key, and the folder's
    mtime changes, which is how running services notice a rotation."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def mtime_ns(folder: Path) -> int:
    """The folder's modification time, or 0 if it does not exist (yet)."""
    try:
        return folder.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of ``path``, (0, 0) if it is missing: a service rereads a file it
    was given (credentials, a manifest) when this changes, without a restart."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)

"""A profile's memory of release manifests: the highest serial seen per signer, and the
newest signed manifest a refresh brought. Apart from the refresher (which needs aiohttp)
so that loading a profile stays cheap for the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from openpcc.errors import DecodeError

if TYPE_CHECKING:
    from openpcc.attestation.policy import TrustPolicy

# Beside client.json: the highest release-manifest serial this profile has verified, per
# signer (TrustPolicy.key_id). A lower one is a rollback: an older manifest, validly signed,
# that may still trust a measurement a newer one retired.
SERIALS_FILE = "release-serials.json"
# Beside client.json: the newest signed manifest a refresh brought (openpcc/client/manifest.py),
# 0600, so a restarted client starts from it rather than from the older configured file.
MANIFEST_FILE = "release-manifest.json"


def remember_serial(policy: TrustPolicy, path: Path, *, manifest: bytes | None = None) -> None:
    """Refuse ``policy`` if its manifest is older than one this profile verified before;
    else record its serial, and write ``manifest`` (its signed bytes) to ``MANIFEST_FILE``
    beside ``path``. The read-modify-write holds a lock, so a proxy and a `chat` using the
    same profile at once cannot lose the higher serial, nor keep an older manifest file
    than the serial record (which would refuse it at the next start)."""
    import fcntl

    from openpcc.errors import VerificationError
    from openpcc.files import write_private

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            seen = json.loads(path.read_text())
        except FileNotFoundError:
            seen = {}
        except ValueError as exc:
            raise DecodeError(f"{path} is not a serial record: {exc}") from exc
        highest = seen.get(policy.key_id, 0) if isinstance(seen, dict) else None
        if not isinstance(highest, int):
            raise DecodeError(f"{path} is not a serial record (signer -> serial)")
        serial = policy.manifest.serial
        if serial < highest:
            raise VerificationError(
                f"release manifest serial {serial} is older than {highest}, which this "
                f"profile verified before (rollback; {path})"
            )
        if serial > highest:
            seen[policy.key_id] = serial
            write_private(path, (json.dumps(seen, indent=1, sort_keys=True) + "\n").encode())
        if manifest is not None:
            write_private(path.with_name(MANIFEST_FILE), manifest)

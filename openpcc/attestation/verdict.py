"""The common result type of every evidence verifier.

Verifiers never raise on evidence that is readable but wrong: they record a failed
:class:`Check` so the caller sees every reason at once. Unreadable input raises
:class:`openpcc.errors.DecodeError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One named check (e.g. ``"signature"``, ``"chain"``, ``"tcb"``, ``"debug"``)."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Verdict:
    """Outcome of verifying one piece of evidence.

    ``judged`` is False when no policy was given: measurements are then reported in
    ``fields`` but not compared against anything, and ``ok`` covers only the
    policy-free checks (signatures, chains, TCB, debug, binding).
    """

    platform: str  # "sev-snp", "tdx", "nvidia-gpu", "simulated-snp", "bundle"
    checks: list[Check] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    judged: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "platform": self.platform,
            "judged": self.judged,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "fields": self.fields,
            "failed": [f"{c.name}: {c.detail}" for c in self.failures()],
        }

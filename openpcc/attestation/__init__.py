"""Attestation: parse and verify SEV-SNP, TDX and NVIDIA GPU evidence, offline.

Every verifier takes an explicit ``now`` (injectable clock) and returns a
:class:`~openpcc.attestation.verdict.Verdict` listing each check, so callers and
``openpcc verify`` can say exactly which check failed and why.
"""

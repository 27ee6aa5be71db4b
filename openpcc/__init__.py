"""OpenPCC shared core: wire formats, Privacy Pass, attestation, client SDK and CLI."""

__version__ = "0.1.0"

"""OpenPCC shared core: wire formats, Privacy Pass, attestation, client SDK and CLI."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``openpcc.http_client(...)`` for ``openai.OpenAI(http_client=...)``, imported on first
    use so that the core (relay-free parties, parsers) never loads httpx or the SDK."""
    if name in ("http_client", "async_http_client"):
        from openpcc.client import openai_transport

        return getattr(openai_transport, name)
    raise AttributeError(f"module 'openpcc' has no attribute {name!r}")

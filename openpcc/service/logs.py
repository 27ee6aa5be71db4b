"""Logging for every party: one format, and aiohttp's own records redacted.

aiohttp's messages interpolate the peer address ("... from %s") and its tracebacks can
hold request data, so every aiohttp record loses its arguments and traceback before it is
written. The parties' own messages never contain prompts, tokens, keys or addresses.
"""

from __future__ import annotations

import logging
import sys


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp"):
            if record.args:
                record.msg = f"{record.msg} (details redacted)".replace("%s", "-")
                record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

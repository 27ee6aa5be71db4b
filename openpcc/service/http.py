"""Small pieces every aiohttp service shares: problem+json errors, metrics, health.

Kept free of per-user data by construction: metrics take only fixed label values
chosen by the service, and errors carry a generic title plus a caller-safe detail.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from http import HTTPStatus

from aiohttp import web

from openpcc.errors import OpenPCCError

PROBLEM_JSON = "application/problem+json"


def problem_for(exc: OpenPCCError, detail: str | None = None, **extra: object) -> web.Response:
    """The answer for an error that ends a request: its type's one ``status_hint``, the
    standard reason phrase as title. ``detail`` is the caller's choice, never the
    exception's text by default (it may name input)."""
    status = exc.status_hint
    return problem(
        status, _RFC9110_TITLES.get(status) or HTTPStatus(status).phrase, detail, **extra
    )


# RFC 9110 renamed two reason phrases that Python before 3.13 still spells the old way.
_RFC9110_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def problem(status: int, title: str, detail: str | None = None, **extra: object) -> web.Response:
    """An RFC 9457 problem document; ``detail`` must never echo secrets or user content."""
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(extra["retry_after"])
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


class Metrics:
    """Prometheus text-format counters and gauges with fixed, non-identifying labels."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._help: dict[str, str] = {}
        self._collectors: list[Callable[[], None]] = []

    def collect(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` before each render: gauges read from state when scraped (and when
        a worker writes its share for the merged /metrics), not kept current per event."""
        self._collectors.append(fn)

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = value

    def render(self) -> str:
        for fn in self._collectors:
            fn()
        lines: list[str] = []
        with self._lock:
            for kind, table in (("counter", self._counters), ("gauge", self._gauges)):
                for name, series in sorted(table.items()):
                    full = f"{self._ns}_{name}"
                    if name in self._help:
                        lines.append(f"# HELP {full} {self._help[name]}")
                    lines.append(f"# TYPE {full} {kind}")
                    for labels, value in sorted(series.items()):
                        lines.append(f"{full}{_labels(labels)} {number(value)}")
        return "\n".join(lines) + "\n"

    async def handler(self, _request: web.Request) -> web.Response:
        return web.Response(text=self.render(), content_type="text/plain", charset="utf-8")


def number(value: float) -> str:
    """Exact in the exposition: integers as such (``:g`` would round past 999,999)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    items = [f'{k}="{_escape(v)}"' for k, v in labels]
    return "{" + ",".join(items) + "}" if items else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})

"""Which model an OpenAI-compatible engine serves, asked from its ``GET /v1/models``.

Shared by ``openpcc node serve --engine-url`` and ``openpcc up --engine-url``: an
operator's engine serves whatever name it was started with, and guessing a name (or
waiting silently for one that never appears) is the failure this module replaces with
one clear line. The lines are the same wherever they are printed or logged.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from openpcc.errors import OpenPCCError
from openpcc.progress import Every


class EngineModelError(OpenPCCError):
    """The engine's model list does not let us pick the model to serve."""


class EngineUnreachableError(EngineModelError):
    """The engine did not answer ``GET /v1/models`` with a model list."""


class AmbiguousModelError(EngineModelError):
    """The engine lists several models and none was named."""


class ModelNotListedError(EngineModelError):
    """The named model is not (yet) among those the engine lists."""


def base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all name the same engine."""
    return url.rstrip("/").removesuffix("/v1")


def parse_model_list(body: bytes) -> list[str]:
    """The ids of an OpenAI ``/v1/models`` answer (``{"data": [{"id": ...}, ...]}``)."""
    try:
        doc = json.loads(body)
        data = doc["data"]
        ids = [m["id"] for m in data]
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineUnreachableError("its /v1/models answer is not an OpenAI model list") from exc
    if not all(isinstance(i, str) for i in ids):
        raise EngineUnreachableError("its /v1/models answer has a model id that is not a string")
    return ids


def list_models(url: str, timeout: float = 5.0) -> list[str]:
    """The model ids the engine at ``url`` lists now (blocking; raises EngineUnreachableError)."""
    target = base_url(url) + "/v1/models"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            return parse_model_list(r.read())
    except urllib.error.HTTPError as exc:
        raise EngineUnreachableError(
            f"engine at {base_url(url)} answered /v1/models with HTTP {exc.code}"
        ) from exc
    except EngineUnreachableError as exc:
        raise EngineUnreachableError(f"engine at {base_url(url)}: {exc}") from exc
    except (OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise EngineUnreachableError(f"engine at {base_url(url)} does not answer: {why}") from exc


def not_listed_line(url: str, models: list[str], name: str) -> str:
    return f"engine at {base_url(url)} lists {models!r}, not {name!r}"


def choose_model(url: str, models: list[str], requested: str | None) -> str:
    """The one model to serve, or the error whose message says what to do instead."""
    if requested is not None:
        if requested not in models:
            raise ModelNotListedError(not_listed_line(url, models, requested))
        return requested
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelNotListedError(f"engine at {base_url(url)} lists no models yet")
    raise AmbiguousModelError(
        f"engine at {base_url(url)} lists {models!r}: choose one with --model-name"
    )


def discover_model(
    url: str,
    requested: str | None = None,
    *,
    timeout: float | None = None,
    report: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Wait until the engine lists a model we can serve; return its name.

    Several models and no name is final (AmbiguousModelError at once). An engine that
    does not answer yet, or does not list the name yet, is waited for: ``report`` gets
    the reason every REPORT_EVERY seconds, and after ``timeout`` seconds (None: never)
    the last reason is raised.
    """
    start = clock()
    every = Every(clock=clock)
    while True:
        try:
            return choose_model(url, list_models(url), requested)
        except AmbiguousModelError:
            raise
        except EngineModelError as exc:
            now = clock()
            if timeout is not None and now - start >= timeout:
                raise
            if report is not None and every.due():
                report(str(exc))
        sleep(0.5)

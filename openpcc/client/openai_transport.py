"""httpx transports that send the official ``openai`` SDK's requests privately.

No local server: the SDK builds its HTTP request as usual and the transport hands it to
:class:`~openpcc.client.proxy.OpenAIFrontend` in-process, which forwards it through the
relay sealed to an attested node and returns the answer as an httpx response (SSE
streamed chunk by chunk)::

    client, wallet, model, _ = client_from_config(Path(".state/local/client.json"))
    oai = openai.AsyncOpenAI(
        base_url="http://openpcc.local/v1", api_key="unused",
        http_client=httpx.AsyncClient(transport=OpenPCCTransport(client)),
    )

``openai`` 1.x/2.x is built on ``httpx`` and 3.x on ``httpx2`` (the same API); both
accept either kind of client, and the transports here work with both: each response is
built from the package its request came from. :func:`async_http_client` and
:func:`http_client` pick the package the installed ``openai`` uses.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from openpcc.client.client import Client
from openpcc.client.proxy import OpenAIFrontend, Reply

T = TypeVar("T")


def _installed(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_MODULES = [m for m in (_installed("httpx2"), _installed("httpx")) if m is not None]
if not _MODULES:
    raise ImportError("openpcc.client.openai_transport needs httpx or httpx2 (pip install openai)")


def openai_httpx() -> ModuleType:
    """The httpx package the installed ``openai`` is built on (httpx2 from openai 3)."""
    try:
        requires = importlib.metadata.requires("openai") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    wanted = "httpx2" if any(r.startswith("httpx2") for r in requires) else "httpx"
    return next((m for m in _MODULES if m.__name__ == wanted), _MODULES[0])


def _module_of(request: Any) -> ModuleType:
    for mod in _MODULES:
        if isinstance(request, mod.Request):
            return mod
    raise TypeError(f"not an httpx request: {type(request)!r}")


def _response(mod: ModuleType, request: Any, reply: Reply, stream: Any = None) -> Any:
    if stream is None:
        return mod.Response(
            reply.status, headers=reply.headers, content=reply.body, request=request
        )
    return mod.Response(reply.status, headers=reply.headers, stream=stream, request=request)


_ASYNC_STREAMS: dict[str, type] = {}
_SYNC_STREAMS: dict[str, type] = {}


def _async_stream(mod: ModuleType, events: AsyncIterator[bytes]) -> Any:
    """An ``AsyncByteStream`` of ``mod`` over the SSE events; closing it ends the request."""
    cls = _ASYNC_STREAMS.get(mod.__name__)
    if cls is None:

        class _Stream(mod.AsyncByteStream):  # type: ignore[name-defined,misc]
            def __init__(self, events: AsyncIterator[bytes]) -> None:
                self._events = events

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for piece in self._events:
                    yield piece

            async def aclose(self) -> None:
                await self._events.aclose()  # type: ignore[attr-defined]

        cls = _ASYNC_STREAMS[mod.__name__] = _Stream
    return cls(events)


_TRANSPORT_BASES = tuple(m.AsyncBaseTransport for m in _MODULES)
_SYNC_TRANSPORT_BASES = tuple(m.BaseTransport for m in _MODULES)


class OpenPCCTransport(*_TRANSPORT_BASES):  # type: ignore[misc]
    """Async httpx/httpx2 transport: each request goes privately through ``client``.

    Accepts a :class:`Client` or an :class:`OpenAIFrontend`. The caller keeps
    ownership of the client (and its wallet): closing the transport closes nothing.
    Only the request's path and JSON body are used; its headers are dropped.
    """

    def __init__(
        self, client: Client | OpenAIFrontend, *, default_model: str | None = None
    ) -> None:
        if isinstance(client, OpenAIFrontend):
            self.frontend = client
        else:
            self.frontend = OpenAIFrontend(client, default_model=default_model)

    async def handle_async_request(self, request: Any) -> Any:
        mod = _module_of(request)
        body = await request.aread()
        reply = await self.frontend.handle(request.method, request.url.path, body)
        if reply.stream is None:
            return _response(mod, request, reply)
        return _response(mod, request, reply, _async_stream(mod, reply.stream))

    async def aclose(self) -> None:
        pass


def async_http_client(
    client: Client | OpenAIFrontend, *, default_model: str | None = None, **kwargs: Any
) -> Any:
    """An ``AsyncClient`` (of the package ``openai`` uses) for ``openai.AsyncOpenAI``."""
    transport = OpenPCCTransport(client, default_model=default_model)
    return openai_httpx().AsyncClient(transport=transport, **kwargs)


# ------------------------------------------------------------------------ sync


class OpenPCCSyncTransport(*_SYNC_TRANSPORT_BASES):  # type: ignore[misc]
    """Blocking transport for ``openai.OpenAI``: runs the async client on its own loop.

    ``factory`` builds the :class:`OpenAIFrontend` on that loop's thread (the client's
    aiohttp session belongs to the loop). :meth:`close` closes the frontend, hence the
    client and whatever the frontend was told to close with it.
    """

    def __init__(self, factory: Callable[[], OpenAIFrontend]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> OpenAIFrontend:
            return factory()

        self.frontend = self._call(make())
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def handle_request(self, request: Any) -> Any:
        mod = _module_of(request)
        body = request.read()
        reply = self._call(self.frontend.handle(request.method, request.url.path, body))
        if reply.stream is None:
            return _response(mod, request, reply)
        return _response(mod, request, reply, self._sync_stream(mod, reply.stream))

    def _sync_stream(self, mod: ModuleType, events: AsyncIterator[bytes]) -> Any:
        cls = _SYNC_STREAMS.get(mod.__name__)
        if cls is None:

            class _Stream(mod.SyncByteStream):  # type: ignore[name-defined,misc]
                def __init__(
                    self, call: Callable[[Any], Any], events: AsyncIterator[bytes]
                ) -> None:
                    self._call = call
                    self._events = events

                def __iter__(self) -> Iterator[bytes]:
                    while True:
                        try:
                            yield self._call(anext(self._events))
                        except StopAsyncIteration:
                            return

                def close(self) -> None:
                    self._call(self._events.aclose())  # type: ignore[attr-defined]

            cls = _SYNC_STREAMS[mod.__name__] = _Stream
        return cls(self._call, events)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call(self.frontend.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def frontend_from_config(config_path: Path, *, default_model: str | None = None) -> OpenAIFrontend:
    """An :class:`OpenAIFrontend` over the profile ``openpcc up`` wrote; it closes all.

    Call inside a running event loop.
    """
    from openpcc.client.profile import client_from_config

    client, wallet, model, session = client_from_config(config_path)
    closers = [wallet.aclose] + ([session.close] if session is not None else [])
    return OpenAIFrontend(client, default_model=default_model or model, on_close=closers)


def http_client(config_path: Path | str | None = None, **kwargs: Any) -> Any:
    """A blocking ``Client`` for ``openai.OpenAI(http_client=...)`` from a client profile.

    ``config_path`` defaults to ``$OPENPCC_CLIENT_CONFIG`` or ``.state/local/client.json``
    (what ``openpcc up`` writes). Requests without ``model`` get the profile's model.
    """
    path = _config_path(config_path)
    transport = OpenPCCSyncTransport(lambda: frontend_from_config(path))
    return openai_httpx().Client(transport=transport, **kwargs)


def _config_path(config_path: Path | str | None) -> Path:
    from openpcc.client.profile import default_profile

    return default_profile() if config_path is None else Path(config_path)

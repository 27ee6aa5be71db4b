"""The service kit every party runs on (aiohttp only, so the relay can use it).

- ``values``: parsing of flag and environment values (sizes, lists, origins); no aiohttp,
  so a party's ``--help`` and config errors never import the server;
- ``http``: one RFC 9457 ``problem()``, ``Metrics``, ``/healthz``;
- ``logs``: logging with the redaction filter, the same for every party;
- ``config``: flags and variables derived from a party's frozen config dataclass;
- ``limits``: the serve loop's own settings (connection hygiene, metrics listener), no
  aiohttp either;
- ``serve``: one serve loop (listeners, signals, graceful drain, uvloop) with connection
  hygiene (request-head timeout, idle keep-alive, request-body deadline and minimum rate,
  connections per client address).

Nothing is imported here, so importing one module costs only what it needs.
"""

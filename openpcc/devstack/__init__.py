"""The development stack: every party as its own process on loopback, for `openpcc up`,
`openpcc demo`, the tests and the benchmarks.

- ``processes``: start, wait for and stop party processes; ``free_port``;
- ``local``: the local stack (issuer, gateway, relay, node, signed release manifest) and
  the ``up``/``demo``/``chat``/``status`` commands;
- ``views``: what each party received, from its own audit log (the demo's table).

Nothing here is used by a deployed party; a client's own profile lives in
``openpcc.client.profile``.
"""

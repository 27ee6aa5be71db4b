"""Helpers for tests/test_relay.py and bench/bench_relay.py: a recording fake gateway,
process runners for both relays (Python and nginx), and a raw HTTP/1.1 client."""

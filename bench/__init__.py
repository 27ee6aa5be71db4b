"""Benchmarks: each bench_*.py exposes run() -> dict and writes bench/results/<name>.json."""

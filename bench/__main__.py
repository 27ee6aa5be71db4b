"""Run every benchmark module (or those named on the command line) and print a summary."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

from bench._harness import write_result


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    names = argv or sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        result = mod.run()
        path = write_result(result.pop("result_name", name.removeprefix("bench_")), result)
        print(f"== {name} -> {path}")
        print(json.dumps(result.get("summary", result), indent=2))
    from bench import report

    return report.main()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

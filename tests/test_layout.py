"""The package layout DESIGN.md §2 draws, checked on the source (imports read with ast,
lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PARTIES = ("tokens", "relay", "gateway", "node")


def _modules(top: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / top).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_cycle_inside_openpcc() -> None:
    """E.g. attestation.policy <-> attestation.sigstore_manifest, once, through a lazy
    import: the Sigstore entry point now lives in sigstore_manifest alone."""
    mods = _modules("openpcc")
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str], seen: set[str]) -> None:
        for nxt in graph[m]:
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)

    for m in graph:
        visit(m, [m], {m})
    assert cycles == []


def test_no_party_imports_another_and_the_core_imports_no_party() -> None:
    bad = []
    for top in (*PARTIES, "openpcc"):
        for name, path in _modules(top).items():
            for imp in _imports(path):
                head = imp.split(".")[0]
                if head in PARTIES and head != top:
                    bad.append(f"{name} imports {imp}")
    assert bad == []


def test_dev_stack_and_profile_live_where_the_design_says() -> None:
    assert (ROOT / "openpcc" / "devstack" / "local.py").is_file()
    assert (ROOT / "openpcc" / "devstack" / "processes.py").is_file()
    assert (ROOT / "openpcc" / "client" / "profile.py").is_file()
    for gone in ("local.py", "stack.py", "demo_views.py", "service.py"):
        assert not (ROOT / "openpcc" / gone).exists(), gone


def test_building_the_command_line_loads_no_server() -> None:
    """`openpcc --help` (and every config error) must not pay for aiohttp or the sealed
    layer: the parties' config and limits modules are kept free of both."""
    import subprocess
    import sys

    code = (
        "import sys; from openpcc.cli import build_parser; build_parser();"
        "bad = [m for m in ('aiohttp', 'openpcc.wire.sealed', 'openpcc.client.wallet') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr

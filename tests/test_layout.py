"""Imports point one way: proper_fed <- server, client, simulations <- proper_fed_cli."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages of ours it must not import
FORBIDDEN = {
    "proper_fed": {"server", "client", "simulations", "proper_fed_cli", "flwr", "typer"},
    "server": {"client", "simulations", "proper_fed_cli"},
    "client": {"server", "simulations", "proper_fed_cli"},
    "simulations": {"proper_fed_cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = {
        str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package])
        for f in (ROOT / package).rglob("*.py")
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"imports against the layout: {bad}"


def test_library_never_exits_or_prints():
    offenders = []
    for f in (ROOT / "proper_fed").rglob("*.py"):
        text = f.read_text()
        if "sys.exit(" in text or "SystemExit" in text or "\nprint(" in text or " print(" in text:
            offenders.append(str(f.relative_to(ROOT)))
    assert not offenders, offenders

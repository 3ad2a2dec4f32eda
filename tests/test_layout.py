"""Imports point one way: proper_fed <- server, client, simulations <- proper_fed_cli; inside the library, the
top-level modules import no sub-package and the sub-packages import each other only along LIBRARY (no cycles)."""

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


# Inside proper_fed: sub-package -> the sibling sub-packages it may import. The top-level modules (errors, config,
# methods, atomic) are the foundation every sub-package may use; they import no sub-package themselves.
LIBRARY = {
    "data": set(),
    "model": set(),
    "train": {"model", "data"},
    "federation": {"data"},
    "artifacts": {"model", "federation"},
    "tools": {"model", "train", "data"},
}
FOUNDATION = {"errors", "config", "methods", "atomic"}
LIB = ROOT / "proper_fed"


def _library_imports(path: Path) -> set[str]:
    """The proper_fed sub-packages and top-level modules a file imports, anywhere in it (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            names.add(f"relative import in {path.name}")  # the library uses absolute imports only
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
            if node.module == "proper_fed":  # `from proper_fed import train`
                modules = [f"proper_fed.{a.name}" for a in node.names]
        names |= {m.split(".")[1] for m in modules if m.startswith("proper_fed.")}
    return names


def test_library_tree_is_the_documented_one():
    """A new sub-package or top-level module must be placed in LIBRARY or FOUNDATION (and the README's layout)."""
    subpackages = {d.name for d in LIB.iterdir() if (d / "__init__.py").exists()}
    modules = {f.stem for f in LIB.glob("*.py")} - {"__init__"}
    assert subpackages == set(LIBRARY)
    assert modules == FOUNDATION


def test_library_layers_have_no_cycles():
    done: set[str] = set()
    pending = dict(LIBRARY)
    while pending:
        ready = [p for p, deps in pending.items() if deps <= done]
        assert ready, f"cycle among {sorted(pending)}"
        done |= set(ready)
        for p in ready:
            del pending[p]


@pytest.mark.parametrize("unit", sorted(LIBRARY) + sorted(FOUNDATION))
def test_library_import_direction(unit):
    files = sorted((LIB / unit).rglob("*.py")) if unit in LIBRARY else [LIB / f"{unit}.py"]
    allowed = FOUNDATION | LIBRARY.get(unit, set()) | {unit}
    if unit in FOUNDATION:
        allowed = FOUNDATION
    bad = {str(f.relative_to(ROOT)): sorted(_library_imports(f) - allowed) for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"library imports against the layers: {bad}"


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

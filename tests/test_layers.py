"""The package is layered: every module imports only from its own layer or the ones below, with
no circle inside a layer, and methods never import each other (README, "Architecture").

Every ``import`` statement counts, those inside functions too (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks, which never run, are left out. The registry
finds methods, backbones and modalities by package name (``registry.PROVIDERS``), as plugins."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "selfsup"

LAYERS: list[set[str]] = [
    {"errors", "__version__"},
    {"dist", "registry", "checkpoint"},
    {"pretext", "losses", "heads", "nn"},
    {"config"},
    {"backbones"},
    {"core"},  # the Method contract, the runtime, build_method
    {"data"},
    {"modalities"},
    {"methods"},
    {"eval", "evaluate"},
    {"train"},
    {"export", "report", "api", "cli", "__init__", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(path: Path) -> str:
    """The top-level module or package a file belongs to."""
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0]


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in ast.walk(node):
                if hasattr(child, "lineno"):
                    lines.add(child.lineno)
    return lines


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported selfsup module, line) for every import statement that can run."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "selfsup":
            if node.module == "selfsup":
                found += [(f"selfsup.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "selfsup"]
    return found


def _edges() -> list[tuple[str, str, str]]:
    """(from unit, to unit, where) for every import between two different units."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        src = _unit(path)
        for module, line in _imports(path):
            parts = module.split(".")
            if len(parts) < 2:
                continue
            if parts[1] != src:
                edges.append((src, parts[1], f"{path.relative_to(SRC)}:{line}"))
    return edges


def test_every_module_has_a_layer():
    units = {_unit(path) for path in SRC.rglob("*.py")} | {dst for _, dst, _ in _edges()}
    assert units <= set(LAYER), f"units without a layer: {sorted(units - set(LAYER))}"


def test_imports_only_go_down_or_sideways():
    upward = [f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
              for src, dst, where in _edges() if LAYER[dst] > LAYER[src]]
    assert not upward, "\n".join(upward)


def test_no_circle_between_units_of_a_layer():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    circles = sorted({f"{a} <-> {b}" for a, targets in graph.items() for b in targets if reaches(b, a, set())})
    assert not circles, circles


@pytest.mark.parametrize("path", sorted((SRC / "methods").glob("*.py")), ids=lambda p: p.name)
def test_methods_do_not_import_each_other(path):
    others = [f"line {line}: {module}" for module, line in _imports(path)
              if module.startswith("selfsup.methods.") or module == "selfsup.methods"]
    assert not others, f"{path.name} imports another method's module: {others}; shared code belongs in " \
                       "selfsup.nn, selfsup.heads, selfsup.losses or the modality's base class"

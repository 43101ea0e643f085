"""The package layout stays as docs/ARCHITECTURE.md draws it: layers import only downward, no circles.

Every import counts, including the ones inside functions that keep start-up light: a lazy import
still makes the two modules depend on each other.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lego_viz"

# Bottom to top. A module may import its own package and any package of a lower layer; packages that
# share a layer are peers and may not import each other.
LAYERS: list[set[str]] = [
    {"lazy"},
    {"adapters"},
    {"units"},
    {"checks"},
    {"merge"},
    {"export"},
    {"models"},
    {"zoo"},
    {"smora", "llm"},
    {"cli"},
    {"ui"},
    {"__init__", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_TOP_LEVEL_MODULES = 8
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The lego_viz modules that ``name`` imports (a ``from package import submodule`` names the submodule)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {m for m in found if m == "lego_viz" or m.startswith("lego_viz.")} - {name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: lego_viz.merge.lego -> merge."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    missing = sorted({_unit(m) for m in MODULES} - set(LAYER_OF))
    assert not missing, f"add {missing} to LAYERS here and to the layer table in docs/ARCHITECTURE.md"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        own = _unit(module)
        for target in targets:
            other = _unit(target)
            if other != own and target != "lego_viz" and LAYER_OF[other] >= LAYER_OF[own]:
                found.append(f"{module} imports {target} ({other} is not below {own})")
    return sorted(found)


def _mutual(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} <-> {b}" for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Circles of any length between modules; a submodule importing its own package's __init__ is fine."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                found.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_imports_only_go_down():
    assert not _upward(GRAPH), "\n".join(_upward(GRAPH))


def test_no_two_modules_import_each_other():
    assert not _mutual(GRAPH), "\n".join(_mutual(GRAPH))


def test_no_import_cycles():
    assert not _cycles(GRAPH), "\n".join(_cycles(GRAPH))


def test_few_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of lego_viz/: {top}; put them in a package"


def test_the_guard_can_fail():
    """Each check finds its violation in a small synthetic graph (and the real graph is read at all)."""
    assert len(GRAPH) > 50 and GRAPH["lego_viz.merge.api"]
    graph = {
        "lego_viz.adapters.types": {"lego_viz.merge.api"},  # upward
        "lego_viz.merge.api": {"lego_viz.adapters.types"},  # ... and so a mutual pair
        "lego_viz.smora.a": {"lego_viz.llm.b"},  # peers
        "lego_viz.llm.b": {"lego_viz.units.c"},
        "lego_viz.units.c": {"lego_viz.units.d"},
        "lego_viz.units.d": {"lego_viz.units.c2"},
        "lego_viz.units.c2": {"lego_viz.units.c"},  # a circle of three
    }
    assert _upward(graph) == [
        "lego_viz.adapters.types imports lego_viz.merge.api (merge is not below adapters)",
        "lego_viz.smora.a imports lego_viz.llm.b (llm is not below smora)",
    ]
    assert _mutual(graph) == ["lego_viz.adapters.types <-> lego_viz.merge.api"]
    assert "lego_viz.units.c -> lego_viz.units.d -> lego_viz.units.c2 -> lego_viz.units.c" in _cycles(graph)


def _functions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{name}.{node.name}", node.end_lineno - node.lineno + 1


def test_functions_read_in_one_screen():
    long = sorted((f"{fn}: {n} lines" for fn, n in _functions() if n > MAX_FUNCTION_LINES))
    assert not long, f"split these into named steps (≤ {MAX_FUNCTION_LINES} lines):\n" + "\n".join(long)


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _sections() -> set[str]:
    """The section numbers ARCHITECTURE.md has: a heading '## 3. …' or '### 3.2 …' defines §3 and §3.2."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", text, re.M)}


@pytest.mark.parametrize("where", ["lego_viz", "app.py", "benchmarks", "scripts"])
def test_cited_sections_exist(where):
    root = ROOT / where
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    sections = _sections()
    cited = []
    for path in files:
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"(ARCHITECTURE|DESIGN)?\s*§\s*(\d+(?:\.\d+)*[a-z]?)", line):
                doc, number = match.groups()
                if doc == "DESIGN" or number not in sections:
                    cited.append(f"{path.relative_to(ROOT)}:{line_no}: {match.group(0).strip()}")
    assert not cited, "cite a section docs/ARCHITECTURE.md has:\n" + "\n".join(cited)

"""The house of ARCHITECTURE.md, held against the code: imports run down the layers, never up,
and no module imports itself back through others (no circle).

Layers, bottom to top (a module may import its own layer and the ones below):

    errors < inputs, batching, jsonl < models < score < engine < jobs < serve < finetune < cli

Read from the source with ``ast`` (every import, also those inside functions and under
TYPE_CHECKING), so a lazy import that runs up a layer is caught like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

NLGEN = ROOT / "nlgen"
LAYERS = [
    {"errors"},
    {"inputs", "batching", "jsonl"},
    {"models"},
    {"score"},
    {"engine"},
    {"jobs"},
    {"serve"},
    {"finetune"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The nlgen modules (or packages) ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "nlgen":
            for alias in node.names:  # `from nlgen.score import kernel`: a module, or a name
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _exists(candidate) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nlgen"}
    return found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in RANK, f"{module}: not in a layer of ARCHITECTURE.md (add it there and here)"
    return RANK[top]


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in NLGEN.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)


def test_imports_run_down_the_layers_never_up():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph().items() for d in deps
              if d != "nlgen" and layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back():
    imports = graph()
    edges = {m: {d for d in deps if d in imports} for m, deps in imports.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("circle: " + " -> ".join(path[path.index(d):] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_the_house_stays_small():
    """Rooms are the top-level modules and packages of nlgen/ (a package counts once, whatever
    it holds): at most 10 floors of rooms on top of each other, at most 80 arrows between them."""
    def room(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    edges: dict[str, set[str]] = {}
    for m, deps in graph().items():
        edges.setdefault(room(m), set()).update(room(d) for d in deps if d != "nlgen")
    for r, deps in edges.items():
        deps.discard(r)
    depth: dict[str, int] = {}

    def floor(r: str) -> int:
        if r not in depth:
            depth[r] = 1 + max((floor(d) for d in edges.get(r, ())), default=0)
        return depth[r]

    floors = max(floor(r) for r in edges)
    arrows = sum(len(d) for d in edges.values())
    assert floors <= 10, floors
    assert arrows <= 80, arrows

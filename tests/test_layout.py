"""The module graph of opd/ has no import cycle.

Rule: an edge a -> b for every module-level `import` / `from ... import` in a that names an opd module b
(a `from opd.x import name` names opd.x, or opd.x.name when that is a module). Imports inside functions
are not edges: they run when called, after every module has loaded, so they cannot form a cycle at import
time (they are how optional backends load). Module-level imports under `if TYPE_CHECKING:` count too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "opd"


def _module(path: Path) -> str:
    parts = ("opd", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycle_among_opd_modules():
    graph, state, path = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert len(graph) > 20  # the walk saw the package

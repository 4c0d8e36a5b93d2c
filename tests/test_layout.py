"""The layout of docs/design.md §2: no import cycle among opd/ modules, the bundled-model builders stay
out of the runtime, every design section a docstring cites exists, and modules stay small.

Import cycles: an edge a -> b for every module-level `import` / `from ... import` in a that names an opd module b
(a `from opd.x import name` names opd.x, or opd.x.name when that is a module). Imports inside functions
are not edges: they run when called, after every module has loaded, so they cannot form a cycle at import
time (they are how optional backends load). Module-level imports under `if TYPE_CHECKING:` count too.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPD = ROOT / "opd"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_nothing_but_the_build_commands_imports_the_bundled_builders():
    importers = sorted(str(path.relative_to(ROOT)) for path in OPD.rglob("*.py")
                       if "bundled" not in path.parts and any(m == "opd.bundled" or m.startswith("opd.bundled.")
                                                              for m in imported_modules(path)))
    assert importers == ["opd/cli.py"], importers


def test_every_cited_design_section_exists():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    named = set(re.findall(r"^\*\*([^*]+?)\.?\*\*", design, flags=re.M))
    for path in [*OPD.rglob("*.py"), *(p for p in (ROOT / "tests").glob("*.py") if p.name != "test_layout.py")]:
        text = path.read_text()
        assert "../shared" not in text and "STYLE.md" not in text and "DESIGN.md" not in text, path
        for first, last, name in re.findall(r"design\.md §(\d+)(?:-(\d+))?(?: \"([^\"]+)\")?", text):
            assert {first, last or first} <= sections, f"{path}: §{first}"
            assert not name or any(n.startswith(name) for n in named), f"{path}: §{first} {name!r}"





def _module(path: Path) -> str:
    parts = ("opd", *path.relative_to(OPD).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in OPD.rglob("*.py")}
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


def test_no_module_of_opd_is_over_about_300_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in OPD.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 330} == {}

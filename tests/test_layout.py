"""The layout of docs/design.md §2: the bundled-model builders stay out of the runtime, and every
design section a docstring cites exists."""

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

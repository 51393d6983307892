"""The house rules that import-linter's contracts do not cover: no import cycle between modules
(contracts forbid directions between packages, not loops inside one), and no module of the three
packages over 400 lines."""

from __future__ import annotations

from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_tools", "model_zoo")


def test_no_module_imports_one_that_imports_it_back():
    """Every import, function-level ones included: a lazy import that closes a loop is a cycle too."""
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    cycles = sorted({tuple(sorted((module, imported)))
                     for module in graph.modules for imported in graph.find_modules_directly_imported_by(module)
                     if imported in graph.modules and graph.find_shortest_chain(importer=imported, imported=module)})
    assert cycles == []


def test_no_module_is_over_400_lines():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    assert len(sizes) > 100
    assert {name: n for name, n in sizes.items() if n > 400} == {}

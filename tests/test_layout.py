"""The package's shape: the size budget the README states, and no module reaching into another's
private names (the import-linter contract in pyproject.toml checks the layering itself)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "alignkit"
BUDGET = 8_000  # lines of Python under src/alignkit, every .py below it (README, Project)


def test_the_package_keeps_its_size_budget():
    lines = sum(len(p.read_text().splitlines()) for p in SRC.rglob("*.py"))
    assert lines <= BUDGET, f"src/alignkit has {lines} lines of Python, over the budget of {BUDGET}"


def test_no_module_imports_a_private_name_from_another():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                offenders += [
                    f"{path.relative_to(SRC)}: {a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert not offenders, offenders

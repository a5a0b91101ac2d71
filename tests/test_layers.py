"""The code's layers point one way: stages → pipeline → cofi. Checked on the source's
imports (module level and inside functions alike)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cofi", "pipeline", "stages")


def imports() -> dict[str, set[str]]:
    """Each module of the three packages → the modules it imports (``from pkg import mod`` as ``pkg.mod``)."""
    graph = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).glob("*.py")):
            found = set()
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module in PACKAGES:
                        found |= {f"{node.module}.{alias.name}" for alias in node.names}
                    else:
                        found.add(node.module)
            graph[f"{package}.{file.stem}"] = found
    return graph


def test_imports_point_one_way():
    allowed = {"cofi": ("cofi",), "pipeline": ("cofi", "pipeline"), "stages": ("cofi", "pipeline")}
    wrong = []
    for module, imported in imports().items():
        layer = module.split(".")[0]
        for name in imported:
            top = name.split(".")[0]
            if top in PACKAGES and top not in allowed[layer] and name != module:
                wrong.append(f"{module} imports {name}")
            if layer == "cofi" and top in ("mlflow", "dvc"):
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in imports_of} for imports_of in [imports()] for m, deps in imports_of.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            assert state.get(dep) != 1, f"import cycle: {' → '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])

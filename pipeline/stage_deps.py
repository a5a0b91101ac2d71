"""The code dependencies of each dvc.yaml stage: the project modules it imports.

A stage ``python -m pipeline.launch <command>`` runs ``pipeline/launch.py`` and the
stage module ``stages/<command>.py`` (``pipeline.stage_cli`` imports it by name). Its code
dependencies are those two files and every project file they import, directly or
not, at module level or inside a function (imports under ``if TYPE_CHECKING:`` do
not run and are left out), with each package's ``__init__.py`` on the way. So an
edit of ``stages/report.py`` reruns only ``report``.

``python -m pipeline.stage_deps`` rewrites the code lines of every stage's ``deps``
in dvc.yaml (its last entries, under ``cofi/``, ``pipeline/`` and ``stages/``) and
leaves everything else as it is; ``--check`` only says which stage lists what wrongly.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cofi", "pipeline", "stages")
LAUNCHER = "pipeline/launch.py"
CMD = re.compile(r"python -m pipeline\.launch ([\w-]+)")


def _module_file(root: Path, module: str) -> str | None:
    """The project file of a dotted module name (a package's ``__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(root).as_posix()
    return None


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """The dotted names a module's import statements load (``from a import b``: ``a`` and ``a.b``)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(roots: list[str], root: Path = ROOT) -> list[str]:
    """Every project file (relative posix paths, sorted) that importing ``roots`` runs."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(str(parent / "__init__.py") for parent in Path(path).parents  # its packages run first
                    if parent.parts and (root / parent / "__init__.py").is_file())
        module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for name in _imported_modules(ast.parse((root / path).read_text()), package):
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                found = _module_file(root, ".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return sorted(seen)


def is_code(dep: str) -> bool:
    return dep.split("/", 1)[0] in PACKAGES


def stage_code(stage: dict, root: Path = ROOT) -> list[str]:
    """The code dependencies of one dvc.yaml stage (its ``do`` block for a foreach)."""
    command = CMD.match(stage["cmd"])
    if command is None:
        raise ValueError(f"stage cmd {stage['cmd']!r} does not run python -m pipeline.launch <command>")
    return import_closure([LAUNCHER, f"stages/{command.group(1)}.py"], root)


def stages(dvc_yaml: Path) -> dict[str, dict]:
    return {name: s.get("do", s) for name, s in yaml.safe_load(dvc_yaml.read_text())["stages"].items()}


def check(dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """One line per stage whose code deps are not its import closure (none: dvc.yaml is right)."""
    problems = []
    for name, stage in stages(dvc_yaml).items():
        listed = {d for d in stage.get("deps", []) if is_code(d)}
        needed = set(stage_code(stage, dvc_yaml.parent))
        if listed != needed:
            problems.append(f"stage {name}: deps lack {sorted(needed - listed)}, list unimported {sorted(listed - needed)}")
    return problems


def write(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite the code lines of every stage's deps with its import closure (the rest unchanged)."""
    code = {name: stage_code(stage, dvc_yaml.parent) for name, stage in stages(dvc_yaml).items()}
    out: list[str] = []
    stage = None
    lines = iter(dvc_yaml.read_text().splitlines())
    for line in lines:
        top = re.match(r"  ([\w-]+):\s*$", line)
        stage = top.group(1) if top else stage
        out.append(line)
        if stage in code and re.match(r"\s+deps:\s*$", line):
            item, line = None, None
            for line in lines:
                entry = re.match(r"(\s+)- (\S+)", line)
                if entry is None and not line.lstrip().startswith("#"):
                    break
                if entry is not None:
                    item = entry.group(1)
                    if is_code(entry.group(2)):
                        continue
                out.append(line)
            else:
                line = None  # the file ends in this list
            out.extend(f"{item}- {path}" for path in code[stage])
            if line is not None:
                out.append(line)
    dvc_yaml.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        problems = check()
        print("\n".join(problems) or "dvc.yaml lists every stage's code dependencies")
        sys.exit(1 if problems else 0)
    write()

"""The design, checked: imports point one way (core <- glue <- training <- experiments and CLI).

Every module of ``rollback_rl`` is read with ``ast`` (not imported), so that an import hidden inside a
function counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rollback_rl

PACKAGE_DIR = Path(rollback_rl.__file__).resolve().parent
ENTRY_POINT = "rollback_rl.cli"  # pyproject.toml: rollback-rl = "rollback_rl.cli:main"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_names(module: str) -> list[tuple[str, int, bool]]:
    """Every ``rollback_rl`` module that ``module`` imports: (name, line, inside a function or class?)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nested = {id(node) for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.ClassDef))
              for node in ast.walk(outer) if node is not outer}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .sub import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from package import submodule" imports the submodule; "from module import name" the module.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # import a.b.c where c is a name, not a module
                name = name.rpartition(".")[0]
            if name.startswith("rollback_rl"):
                found.append((name, node.lineno, id(node) in nested))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, importing a package's ``__init__`` included (a module inside
    that package needs no edge to it: Python has already started running it)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module in MODULES:
        ancestors = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)}
        for name, _, _ in imported_names(module):
            parts = name.split(".")
            targets = {".".join(parts[:end]) for end in range(1, len(parts) + 1)} - ancestors - {module}
            graph[module] |= {target for target in targets if target in MODULES}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules, the first repeated at the end), or ``None``."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_import_graph_walk_sees_every_kind_of_import():
    graph = import_graph()
    assert len(MODULES) > 30 and "rollback_rl.core.snapshots" in MODULES
    assert "rollback_rl.training" in graph[ENTRY_POINT]  # from rollback_rl.training import (...)
    assert "rollback_rl.core.snapshots" in graph["rollback_rl.core.undo"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_rollback_rl_module_inside_a_function():
    # A function-level import of our own code hides a cycle or a dependency pointing the wrong way:
    # move the code instead. (Optional third-party packages, such as ray, may still be imported late.)
    late = [f"{module}:{line} imports {name}" for module in MODULES
            for name, line, inside in imported_names(module) if inside]
    assert late == []


def test_only_the_entry_point_is_the_command_line():
    importers = sorted(module for module, targets in import_graph().items() if ENTRY_POINT in targets)
    assert importers == []


def test_importing_the_core_loads_no_stable_baselines3():
    core = sorted(module for module in MODULES if module.split(".")[:2] == ["rollback_rl", "core"])
    assert "rollback_rl.core.detectors" in core
    code = f"import sys\nfor name in {core!r}:\n    __import__(name)\n" \
           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'stable_baselines3'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]"

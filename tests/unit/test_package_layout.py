"""The package's shape: one import name, no import cycles, lower layers never import upward.

The import graph is read from the source (every `import` statement, including
those inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

import triton_disagg

PACKAGE_DIR = Path(triton_disagg.__file__).parent
TEMPLATES_DIR = PACKAGE_DIR / "model_repository"

#: Rooms that serve a request or decide; they never import what starts processes, the CLI or the tools.
LOWER_LAYERS = ("engine", "router", "planner", "kv_transfer", "serving", "frontend", "checkpoint", "model_control", "deploy")
UPPER_LAYERS = ("launch", "cli", "tools")
#: What every room may import: the package root and the shared error classes.
BASE = ("triton_disagg", "errors")
#: What each room may import besides itself and BASE (None: anything in the package).
ALLOWED = {
    "errors": (),
    "router": (),
    "kv_transfer": (),
    "engine": ("router", "kv_transfer"),
    "model_control": (),
    "planner": ("model_control",),  # the Triton connector; the decision core imports nothing (below)
    "frontend": (),
    "checkpoint": (),
    "serving": ("engine", "kv_transfer", "router"),
    "deploy": (),  # the deployment spec and what it renders to: pure, no I/O beyond reading and writing files
    "launch": ("model_control", "serving", "frontend", "planner", "checkpoint", "deploy"),
    "tools": None,
    "cli": None,
}
#: The planner's pure decision core: no I/O, no Triton, nothing outside the planner.
PLANNER_CORE = ("config", "core", "load_policy", "observations", "predictors", "profile", "sizing")
FORMER_TOP_LEVEL_NAMES = {"tools", "router", "planner", "frontend", "python_backends"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for path in PACKAGE_DIR.rglob("*.py")
        if TEMPLATES_DIR not in path.parents
    }


def _imported_names(path: Path) -> set[str]:
    """Every absolute module name an import statement in `path` names (targets of `from X import a` as X.a too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; import through the package name"
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {name: {n for n in _imported_names(path) if n in modules and n != name} for name, path in modules.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    assert _find_cycle(_import_graph()) is None


def test_every_room_imports_only_the_rooms_below_it():
    rooms = {_room(module) for module in _package_modules()} - {"triton_disagg"}
    assert rooms <= set(ALLOWED), f"rooms without a layering rule: {rooms - set(ALLOWED)}"
    violations = []
    for module, imported in _import_graph().items():
        room = _room(module)
        allowed = ALLOWED.get(room)
        if allowed is None:
            continue
        for target in imported:
            target_room = _room(target)
            if target_room not in (room, *BASE) and target_room not in allowed:
                violations.append(f"{module} imports {target}")
    assert not violations


@pytest.mark.parametrize("module", PLANNER_CORE)
def test_the_planner_core_imports_only_the_planner(module):
    imported = _import_graph()[f"triton_disagg.planner.{module}"]
    assert {_room(t) for t in imported} <= {"planner"}


@pytest.mark.parametrize("room", LOWER_LAYERS)
def test_lower_layers_never_import_the_launcher_cli_or_tools(room):
    for module, imported in _import_graph().items():
        if _room(module) == room:
            assert not [t for t in imported if _room(t) in UPPER_LAYERS], module


def test_nothing_imports_a_former_top_level_name():
    paths = [*_package_modules().values(), *TEMPLATES_DIR.glob("*/1/model.py")]
    paths += [p for p in (PACKAGE_DIR.parents[1] / "tests").rglob("*.py")] if (PACKAGE_DIR.parents[1] / "tests").is_dir() else []
    offenders = [
        f"{path}: {name}"
        for path in paths
        for name in _imported_names(path)
        if name.split(".")[0] in FORMER_TOP_LEVEL_NAMES
    ]
    assert not offenders


def test_model_templates_import_only_the_package_and_the_backend_utils():
    templates = sorted(TEMPLATES_DIR.glob("*/1/model.py"))
    assert {p.parents[1].name for p in templates} == {"llm", "router", "prefill", "decode", "kv_transfer"}
    for path in templates:
        third_party = {n.split(".")[0] for n in _imported_names(path)} - {"triton_disagg", "triton_python_backend_utils"}
        assert third_party <= {"faulthandler", "json", "threading", "numpy", "os", "time", "__future__"}, (path, third_party)


def test_the_distribution_installs_one_top_level_name():
    distribution = importlib.metadata.distribution("triton-disagg")
    top_level = (distribution.read_text("top_level.txt") or "").split()
    assert top_level == ["triton_disagg"]
    (script,) = distribution.entry_points.select(group="console_scripts", name="triton-disagg")
    assert script.value == "triton_disagg.cli.main:main"

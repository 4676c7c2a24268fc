"""The house's layering, read from the source: every import of the library points down a floor or
stays inside its own room, and no modules import each other in a circle.

The floors are declared once, here, from the ground up; a room is a package (``algorithm/``) or a
top-level module (``config.py``). Imports inside functions count; ``if TYPE_CHECKING:`` imports do
not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dapo_rl"

FLOORS: list[tuple[str, ...]] = [
    ("config", "algorithm", "errors", "cache_dir", "reproducibility"),  # import nothing of the library
    ("data", "telemetry", "config_reference"),
    ("rewards",),
    ("models", "tools"),
    ("rollout",),
    ("evaluation",),
    ("training",),
    ("experiments", "api"),
    ("cli",),
]
# The package's own __init__ names the version and, on first use, the API room's two names.
PACKAGE = "dapo_rl"
PACKAGE_MAY_IMPORT = {"dapo_rl.api", "dapo_rl.api.DAPOConfig", "dapo_rl.api.DAPOTrainer"}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_imports(path: Path, src: Path = SRC) -> dict[str, int]:
    """Every ``dapo_rl`` module ``path`` imports (absolute or relative, at any depth, outside
    ``if TYPE_CHECKING:``), with the line of the import."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for stmt in block.body for node in ast.walk(stmt)}
    me = module_name(path, src)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found[module] = node.lineno
            found.update((f"{module}.{alias.name}", node.lineno) for alias in node.names)  # `from pkg import module`
    return {name: line for name, line in found.items() if name == PACKAGE or name.startswith(PACKAGE + ".")}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def floor_of(room: str) -> int | None:
    return next((i for i, rooms in enumerate(FLOORS) if room in rooms), None)


def layering_problems(src: Path = SRC) -> list[str]:
    """Every import that points up or sideways into another room, and every module in no room."""
    modules = {module_name(p, src): p for p in src.rglob("*.py")}
    problems = []
    for module, path in sorted(modules.items()):
        room = room_of(module)
        if room == PACKAGE:
            problems += [f"{module} imports {target}" for target in library_imports(path, src) if target not in PACKAGE_MAY_IMPORT]
            continue
        floor = floor_of(room)
        if floor is None:
            problems.append(f"{module} is in no room of FLOORS")
            continue
        for target, line in library_imports(path, src).items():
            target_room = room_of(target)
            if target_room == room or target not in modules and not any(m.startswith(target + ".") for m in modules):
                continue
            target_floor = floor_of(target_room)
            if target_floor is None or target_floor >= floor:
                problems.append(f"{path.relative_to(src.parent)}:{line}: {room} (floor {floor}) imports {target} "
                                f"({target_room}, floor {target_floor})")
    return problems


def import_circles(src: Path = SRC) -> list[list[str]]:
    """Groups of modules that import each other in a circle (strongly connected components)."""
    modules = {module_name(p, src): p for p in src.rglob("*.py")}
    graph = {m: {t for t in library_imports(p, src) if t in modules and t != m} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_every_declared_room_exists():
    for rooms in FLOORS:
        for room in rooms:
            assert (SRC / room).is_dir() or (SRC / f"{room}.py").is_file(), f"FLOORS names {room}, which is not in {SRC}"


def test_every_import_points_down_or_stays_in_its_room():
    problems = layering_problems()
    assert not problems, "imports against the floors:\n" + "\n".join(problems)


def test_no_import_circles():
    circles = import_circles()
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_the_ground_floor_imports_only_outside_libraries():
    """``algorithm/`` is pure tensor math and ``config.py`` is read before anything is built."""
    for room in FLOORS[0]:
        for path in ([SRC / f"{room}.py"] if (SRC / f"{room}.py").is_file() else sorted((SRC / room).rglob("*.py"))):
            outside = {t for t in library_imports(path) if room_of(t) != room}
            assert not outside, f"{path.relative_to(SRC)} imports {sorted(outside)}"


@pytest.mark.parametrize("where, plant, expected", [
    ("data/stream.py", "from dapo_rl.training.trainer import Trainer\n", "data (floor 1) imports dapo_rl.training.trainer"),
    ("models/spec.py", "def f():\n    from ..rollout import base\n", "models (floor 3) imports dapo_rl.rollout"),  # relative, in a function
    ("telemetry/sinks.py", "from dapo_rl.data import DatasetError\n", "telemetry (floor 1) imports dapo_rl.data"),  # sideways
    ("config.py", "from dapo_rl.algorithm import ClipRange\n", "config (floor 0) imports dapo_rl.algorithm"),
])
def test_a_planted_back_import_is_found(tmp_path, where, plant, expected):
    import shutil

    src = tmp_path / "dapo_rl"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    assert not layering_problems(src)
    target = src / where
    target.write_text(target.read_text() + "\n" + plant)
    assert any(expected in p for p in layering_problems(src)), layering_problems(src)


def test_a_module_in_no_room_and_a_circle_are_found(tmp_path):
    import shutil

    src = tmp_path / "dapo_rl"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    (src / "newroom.py").write_text("")
    assert "dapo_rl.newroom is in no room of FLOORS" in layering_problems(src)
    (src / "models" / "a_mod.py").write_text("from dapo_rl.models import b_mod\n")
    (src / "models" / "b_mod.py").write_text("def f():\n    from dapo_rl.models.a_mod import x\n")
    assert ["dapo_rl.models.a_mod", "dapo_rl.models.b_mod"] in import_circles(src)

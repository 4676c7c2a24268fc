"""The house's layering, read from the source: lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dapo_rl"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _files(*parts: str) -> list[Path]:
    target = SRC.joinpath(*parts)
    return [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))


@pytest.mark.parametrize("layer", ["config.py", "algorithm", "data", "rewards", "models", "rollout", "evaluation", "telemetry"])
def test_lower_layers_never_import_training_or_experiments(layer):
    for path in _files(layer):
        bad = {m for m in _imports(path) if m.startswith(("dapo_rl.training", "dapo_rl.experiments", "dapo_rl.cli"))}
        assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_algorithm_is_pure_tensor_math():
    for path in _files("algorithm"):
        outside = {m for m in _imports(path) if m.startswith("dapo_rl") and not m.startswith("dapo_rl.algorithm")}
        assert not outside, f"{path.relative_to(SRC)} imports {sorted(outside)}"


def test_training_never_imports_experiments():
    for path in _files("training"):
        assert not {m for m in _imports(path) if m.startswith("dapo_rl.experiments")}, path

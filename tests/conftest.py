"""Shared fixtures: one quickstart model per test session, built into a temporary cache."""

from __future__ import annotations

import pytest

from dapo_rl.config import QuickstartConfig
from dapo_rl.training.quickstart import prepare_quickstart_model


@pytest.fixture(scope="session")
def quickstart_cache(tmp_path_factory) -> str:
    """A cache folder holding the default quickstart model (warm-up run once per session, ~20 s)."""
    cache = tmp_path_factory.mktemp("dapo-cache")
    prepare_quickstart_model(QuickstartConfig(cache_dir=str(cache)), seed=0, progress=False)
    return str(cache)


@pytest.fixture(scope="session")
def quickstart_model(quickstart_cache) -> str:
    """Path of the default quickstart model folder."""
    return str(prepare_quickstart_model(QuickstartConfig(cache_dir=quickstart_cache), seed=0, progress=False))

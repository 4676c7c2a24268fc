"""The one folder where dapo-rl keeps what it builds on this machine (the quickstart policy,
compiled decode kernels): ``$DAPO_RL_CACHE``, default ``~/.cache/dapo-rl``."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("DAPO_RL_CACHE", Path.home() / ".cache" / "dapo-rl"))

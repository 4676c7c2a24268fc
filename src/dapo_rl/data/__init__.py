"""Datasets (JSONL, Parquet, HF datasets), prompt templates, and the built-in synthetic task."""

from dapo_rl.data.datasets import (
    FORMATS,
    PRESETS,
    DatasetError,
    DatasetSpec,
    Example,
    LoadResult,
    RowProblem,
    load_examples,
)
from dapo_rl.data.templates import DAPO_INSTRUCTION, TEMPLATES, TemplateError, render_prompt

__all__ = [
    "DAPO_INSTRUCTION",
    "FORMATS",
    "PRESETS",
    "TEMPLATES",
    "DatasetError",
    "DatasetSpec",
    "Example",
    "LoadResult",
    "RowProblem",
    "TemplateError",
    "load_examples",
    "render_prompt",
]

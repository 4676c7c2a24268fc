"""The documentation tells the truth about what it names: the README stays a front page, and every
config key, every ``dapo`` command and every relative link in README.md and docs/*.md exists.

Read from the source: the config sections and keys from :mod:`dapo_rl.config` (through
:func:`dapo_rl.config_reference.config_keys`), the commands from the ``dapo`` parser in
:mod:`dapo_rl.cli`, the links from the files on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from dapo_rl.cli import build_parser
from dapo_rl.config import REPLACED_KEYS, Config
from dapo_rl.config_reference import config_keys

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 260

# Endings that make a dotted name a file, not a key (`model.safetensors`, `config.yaml`).
FILE_ENDINGS = {"safetensors", "yaml", "yml", "json", "jsonl", "py", "md", "png", "jinja", "txt",
                "parquet", "gguf", "bin", "pt", "csv", "toml", "sh", "log"}
# Table columns that name other projects' keys (verl's `data.train_batch_size`, ...), not ours.
FOREIGN_COLUMNS = {"verl", "trl", "trl `grpoconfig`"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A dotted name standing on its own: not the tail of a path, a module (`dapo_rl.tools.python`) or a word.
DOTTED = re.compile(r"(?<![\w./:\-])([a-z_][a-z0-9_]*(?:\.(?:[a-z_][a-z0-9_]*|\*))+)")
DAPO_COMMAND = re.compile(r"(?<![\w.\-])dapo ([a-z][a-z0-9-]*)")
# Prose inside code, not a command: the layout's "cli.py  the dapo command".
NOT_COMMANDS = {"command"}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _split_code(text: str) -> tuple[str, list[str]]:
    """The text without its fenced blocks, and the blocks."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def _drop_foreign_columns(prose: str) -> str:
    """Blank the cells of table columns headed verl or TRL: they hold other projects' key names."""
    out: list[str] = []
    drop: set[int] = set()
    for line in prose.split("\n"):
        if not line.startswith("|"):
            drop = set()
            out.append(line)
            continue
        cells = line.split("|")
        if not drop and not re.fullmatch(r"\|[\s|:-]+\|?", line.strip()):
            header = [c.strip().lower() for c in cells]
            if any(h in FOREIGN_COLUMNS for h in header):
                drop = {i for i, h in enumerate(header) if h in FOREIGN_COLUMNS}
                out.append(line)
                continue
        out.append("|".join("" if i in drop else c for i, c in enumerate(cells)))
    return "\n".join(out)


def _code_spans(page: Path) -> list[str]:
    """Inline code spans (may run over a line break) and fenced blocks of a page."""
    prose, blocks = _split_code(page.read_text())
    return INLINE_CODE.findall(_drop_foreign_columns(prose)) + blocks


def _sections() -> set[str]:
    config = Config()
    return {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(config, f.name))}


def _keys() -> set[str]:
    return {row.key for row in config_keys()}


def _key_exists(name: str, keys: set[str], sections: set[str]) -> bool:
    if name in keys or name in REPLACED_KEYS:
        return True
    if name.endswith(".*"):  # `quickstart.*`, `loss.*`: a section's keys
        return name[:-2] in keys and any(k.startswith(name[:-1]) for k in keys)
    return False


def _dotted_names(span: str, sections: set[str]) -> list[str]:
    found = []
    for name in DOTTED.findall(span):
        parts = name.split(".")
        if parts[0] not in sections or parts[-1] in FILE_ENDINGS:
            continue
        found.append(name)
    return found


def test_readme_is_a_front_page():
    lines = README.read_text().count("\n")
    assert lines < README_MAX_LINES, (
        f"README.md has {lines} lines; keep it a front page (< {README_MAX_LINES}) and move reference text to docs/")


def test_the_key_finder_ignores_files_modules_and_foreign_columns():
    sections = _sections()
    span = "dapo train model.lora.r=16 rollout.tools=[dapo_rl.tools.python:python] runs/x/model.safetensors"
    assert _dotted_names(span, sections) == ["model.lora.r", "rollout.tools"]
    assert _dotted_names("config.yaml data.train=my.jsonl quickstart.*", sections) == ["data.train", "quickstart.*"]
    table = "| key | meaning | verl | TRL |\n|---|---|---|---|\n| `data.seed` | x | `data.train_batch_size` | `seed` |"
    assert INLINE_CODE.findall(_drop_foreign_columns(table)) == ["data.seed"]
    assert not _key_exists("data.train_batch_size", _keys(), sections)
    assert _key_exists("advantage.norm_by_std", _keys(), sections)  # a replaced key, named as such


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_config_key_named_exists(page):
    keys, sections = _keys(), _sections()
    wrong = sorted({name for span in _code_spans(page) for name in _dotted_names(span, sections)
                    if not _key_exists(name, keys, sections)})
    assert not wrong, f"{_name(page)} names config keys that do not exist: {wrong}"


def _commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_command_finder_sees_the_commands():
    assert {"train", "config", "eval", "plot", "ablate", "convert-gguf", "rollout-server", "export-merged"} <= _commands()
    assert DAPO_COMMAND.findall("`dapo train` and ~/vllm-venv/bin/dapo eval, not dapo-rl or dapo_rl.cli train") == [
        "train", "eval"]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_dapo_command_named_exists(page):
    commands = _commands()
    named = {c for span in _code_spans(page) for c in DAPO_COMMAND.findall(span)}
    wrong = sorted(named - commands - NOT_COMMANDS)
    assert not wrong, f"{_name(page)} names dapo commands that do not exist: {wrong} (commands: {sorted(commands)})"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _split_code(page.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        slug = _slug(match.group(1))
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_slug_is_githubs():
    assert _slug("The earlier ladder (on `builtin:chain`)") == "the-earlier-ladder-on-builtinchain"
    assert _slug("Plug points") == "plug-points"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_points_to_a_file(page):
    prose, _ = _split_code(page.read_text())
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {path.relative_to(ROOT)})")
    assert not broken, f"{_name(page)} has broken relative links: {broken}"

"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A checkpoint folder ``checkpoints/step_000042/`` holds the policy as a Hugging Face folder with
its tokenizer (``policy/``, loadable by ``dapo eval``; a LoRA run's adapters alone, in PEFT's format, the base being ``model.path``) and ``trainer.pt`` with the optimiser, scheduler, every RNG state, the prompt
stream (position, current pass order, difficulty memory: retired and never-solved prompts), the
dynamic sampler (surplus groups with the policy version that sampled each, the p̂ estimate, the
exhausted-step count), each rank's round sent ahead under ``rollout.async_steps=1`` and the step. A folder is valid only when its
``COMPLETE`` marker exists; the marker is written last, inside the temporary folder, before the
rename, so a kill at any moment leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dapo_rl.training.trainer import Trainer

MARKER = "COMPLETE"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a power cut after it must not undo it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform/file system; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill midway never leaves a "valid" half of it."""
    (folder / MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(trainer: Trainer, run_dir: Path, keep_last: int = 2) -> Path | None:
    """Write ``run_dir/checkpoints/step_N`` atomically and prune older ones beyond ``keep_last``.

    ``keep_last=0`` keeps every checkpoint. Re-saving a step that already has a checkpoint (an
    interrupted or exhausted step saves its progress) moves the old folder aside first and
    deletes it only once the new one is in place.

    Under ``torchrun`` every rank must call it (the full model and optimiser state are gathered
    from the shards, and every rank's RNG state is kept); only the main rank writes, and only it
    gets the folder back. Model and optimiser state are full and keyed by parameter name, so a
    checkpoint resumes on any number of processes and either distributed strategy.
    """
    state = trainer.state_dict()  # every rank takes part in gathering it
    if not trainer.dist.is_main:
        return None
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{trainer.state.step:06d}"
    staging = root / f".tmp-step_{trainer.state.step:06d}"
    staging.mkdir()
    trainer.model.save_pretrained(staging / "policy", state_dict=state.pop("model"))
    trainer.tokenizer.save_pretrained(staging / "policy")  # so `dapo eval` can load a checkpoint's policy as it is
    torch.save(state, staging / "trainer.pt")
    (staging / MARKER).write_text(str(trainer.state.step))
    _fsync_tree(staging)
    aside = root / f".old-step_{trainer.state.step:06d}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)  # until the next rename, valid_checkpoints() recovers it from here
    staging.rename(final)
    _fsync_dir(root)
    if aside.exists():
        _remove(aside)
    if keep_last > 0:
        for old in valid_checkpoints(run_dir)[:-keep_last]:
            _remove(old)
    return final


def valid_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    for aside in root.glob(".old-step_*"):
        # A kill between the two renames of a re-save: the old copy is still complete.
        final = root / aside.name.removeprefix(".old-")
        if (aside / MARKER).is_file() and not final.exists():
            aside.rename(final)
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = valid_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Restore everything :func:`save_checkpoint` wrote into an already-built trainer.

    Under ``torchrun`` every rank calls it and reads ``folder`` (several nodes need the output
    folder on shared storage). A rank the checkpoint has no RNG state for (the run grew) gets a
    fresh stream derived from the seed, the step and its rank.
    """
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted((folder / "policy").glob("*.safetensors")):
        weights.update(load_file(str(shard), device=str(trainer.device)))
    state = torch.load(folder / "trainer.pt", weights_only=False, map_location=trainer.device)
    trainer.load_state_dict({**state, "model": weights})

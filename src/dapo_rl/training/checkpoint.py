"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A checkpoint folder ``checkpoints/step_000042/`` holds the policy as a Hugging Face folder
(``policy/``) and ``trainer.pt`` with the optimiser, scheduler, every RNG state, the data
position, the dynamic sampler's surplus groups and the step. A folder is valid only when its
``COMPLETE`` marker exists; the marker is written last, inside the temporary folder, before the
rename, so a kill at any moment leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dapo_rl.training.trainer import Trainer

MARKER = "COMPLETE"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(trainer: "Trainer", run_dir: Path, keep_last: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_N`` atomically and prune older ones beyond ``keep_last``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{trainer.state.step:06d}"
    staging = root / f".tmp-step_{trainer.state.step:06d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    trainer.model.save_pretrained(staging / "policy")
    torch.save(
        {
            "state": trainer.state,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "stream": trainer.stream.state_dict(),
            "sampler": trainer.sampler.state_dict(),
            "rng": _rng_state(),
        },
        staging / "trainer.pt",
    )
    (staging / MARKER).write_text(str(trainer.state.step))
    _fsync_tree(staging)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    staging.rename(final)
    for old in sorted(valid_checkpoints(run_dir))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def valid_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = valid_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(trainer: "Trainer", folder: Path) -> None:
    """Restore everything :func:`save_checkpoint` wrote into an already-built trainer."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted((folder / "policy").glob("*.safetensors")):
        weights.update(load_file(str(shard), device=str(trainer.device)))
    missing, unexpected = trainer.model.load_state_dict(weights, strict=False)
    # Tied weights (lm_head = embeddings) are stored once; anything else missing is corruption.
    missing = [m for m in missing if "lm_head" not in m]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    blob = torch.load(folder / "trainer.pt", weights_only=False, map_location=trainer.device)
    trainer.state = blob["state"]
    trainer.optimizer.load_state_dict(blob["optimizer"])
    trainer.scheduler.load_state_dict(blob["scheduler"])
    trainer.stream.load_state_dict(blob["stream"])
    trainer.sampler.load_state_dict(blob["sampler"])
    _set_rng_state(blob["rng"])
    trainer.engine.sync_weights(trainer.model)

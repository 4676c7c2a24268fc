"""The run folder: the rules for writing into it (a folder holding another run is never touched;
``resume=true`` only with the same settings), the config it records, the metrics trimmed back
to a checkpoint, and the final policy, each written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dapo_rl.config import Config, flatten_settings, migrate_saved_keys, to_dict, to_yaml
from dapo_rl.errors import one_line
from dapo_rl.telemetry import read_metrics
from dapo_rl.training.errors import RunError

RUN_MARKER = "config.yaml"

# Settings a resumed run may change: how long it runs, how it logs and checkpoints, and the knobs
# that get a stuck run going again. Anything else would silently continue a different experiment.
RESUMABLE_CHANGES = ("steps", "resume", "overwrite", "output_dir", "logging.", "checkpoint.", "eval.interval",
                     "reward.timeout_s", "dynamic_sampling.max_rounds", "dynamic_sampling.on_exhausted",
                     "dynamic_sampling.max_prompts_per_round",
                     "quickstart.cache_dir", "model.device", "rollout.engine", "rollout.server.", "distributed.")


def check_output_dir(config: Config) -> Path:
    """Refuse an output folder we must not write into; writes nothing.

    A folder that holds a run (it has ``config.yaml``) is used only with ``overwrite=true`` or with
    ``resume=true`` and the same settings, apart from :data:`RESUMABLE_CHANGES`.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir: {out} is a file; choose a folder path")
    marker = out / RUN_MARKER
    if not marker.is_file():
        return out
    if not (config.resume or config.overwrite):
        raise RunError(f"output_dir: {out} already holds a run; pass resume=true to continue it, overwrite=true to replace it, "
                       f"or choose another output_dir")
    if config.resume:
        import yaml

        try:
            saved = yaml.safe_load(marker.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"resume: cannot read {marker} ({one_line(exc, 240)}); use overwrite=true to start the run over") from None
        saved_flat = migrate_saved_keys(flatten_settings(saved if isinstance(saved, dict) else {}))
        now_flat = flatten_settings(to_dict(config))
        for key in sorted(set(saved_flat) | set(now_flat)):
            if key.startswith(RESUMABLE_CHANGES) or key not in saved_flat:
                continue  # a key added to the schema after the run started keeps its default
            if saved_flat.get(key) != now_flat.get(key):
                raise RunError(f"resume: {key} was {saved_flat.get(key)!r} in the run in {out} but is now {now_flat.get(key)!r}; "
                               f"resume with the run's settings (see {marker}), or use overwrite=true or another output_dir")
    return out


def prepare_output_dir(config: Config) -> Path:
    """Create the run folder (after :func:`check_output_dir`) and record the config in it."""
    out = check_output_dir(config)
    try:
        if (out / RUN_MARKER).is_file() and config.overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_MARKER}.tmp"
        tmp.write_text(to_yaml(config))
        os.replace(tmp, out / RUN_MARKER)
    except OSError as exc:
        raise RunError(f"output_dir: cannot write to {out} ({exc.strerror or exc}); choose a writable folder") from None
    return out


def trim_metrics(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again);
    returns the lines kept."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)
    return kept


def save_final_policy(model, tokenizer, run_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """``run_dir/final``: see :func:`save_policy`."""
    return save_policy(model, tokenizer, run_dir / "final", state_dict)


def save_policy(model, tokenizer, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """``folder`` (a run's ``final``, or ``DAPOTrainer.save_model``'s): safetensors + tokenizer that ``from_pretrained`` loads; replaced atomically.
    A LoRA policy saves its adapter alone, in PEFT's format (``adapter_config.json`` naming the
    base + ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, final)`` loads it,
    ``dapo export-merged`` writes the merged model).

    ``state_dict``: the full weights when ``model`` is sharded (see ``DistContext.full_model_state``).
    """
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, replaced atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)

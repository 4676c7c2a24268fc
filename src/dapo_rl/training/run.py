"""Compose a training run from a :class:`~dapo_rl.config.Config`: model, data, reward, engine,
sinks, the trainer loop, checkpoints, evaluation before and after, and the final policy folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dapo_rl.config import BUILTIN_DATA, BUILTIN_MODEL, Config, ConfigError, to_dict, to_yaml
from dapo_rl.data import DatasetError, DatasetSpec, load_examples
from dapo_rl.data.encoding import EncodedPrompt, encode_prompts
from dapo_rl.data.synthetic import builtin_splits
from dapo_rl.rewards import resolve_reward_fn
from dapo_rl.rollout import HFGenerateEngine
from dapo_rl.telemetry import build_sinks, read_metrics
from dapo_rl.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dapo_rl.training.quickstart import prepare_quickstart_model
from dapo_rl.training.trainer import Trainer

RUN_MARKER = "config.yaml"


class RunError(RuntimeError):
    """A problem with the run's inputs or output folder; the message says what to do."""


def resolve_device(config: Config) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None = plain fp32)."""
    name = config.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} requested but CUDA is not available; use model.device=cpu")
    dtype = config.model.dtype
    if dtype == "auto":
        dtype = "bf16-autocast" if device.type == "cuda" else "float32"
    return device, (torch.bfloat16 if dtype == "bf16-autocast" else None)


def load_policy(config: Config, progress: bool = True):
    """The policy model and tokenizer named by ``model.path`` (built locally for the built-in one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = config.model.path
    if path == BUILTIN_MODEL:
        path = str(prepare_quickstart_model(config.quickstart, seed=config.seed, progress=progress))
    elif path.startswith("builtin:"):
        raise ConfigError(f"model.path: unknown built-in model {path!r}; use {BUILTIN_MODEL} or a local model folder")
    elif not Path(path).is_dir():
        raise ConfigError(f"model.path: {path} is not a folder; give a local Hugging Face model folder (see `dapo convert-gguf` for SmolLM2)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def _load_split(config: Config, path: str, tokenizer, which: str) -> list[EncodedPrompt]:
    dc = config.data
    if path == BUILTIN_DATA:
        train, held_out = builtin_splits(dc.builtin_train_size, dc.builtin_eval_size, seed=0)
        examples = train if which == "train" else held_out
        skipped = []
    else:
        spec = DatasetSpec(path=path, format=dc.format, preset=dc.preset, prompt_field=dc.prompt_field,
                           answer_field=dc.answer_field, max_rows=dc.max_rows if which == "train" else None)
        try:
            loaded = load_examples(spec)
        except DatasetError as exc:
            raise RunError(f"data.{which}: {exc}") from None
        examples, skipped = loaded.examples, list(loaded.skipped)
    prompts, too_long = encode_prompts(examples, tokenizer, template=dc.template, use_chat_template=dc.use_chat_template,
                                       max_prompt_length=dc.max_prompt_length)
    skipped += too_long
    if skipped:
        shown = "; ".join(str(p) for p in skipped[:3])
        tqdm.write(f"data.{which}: skipped {len(skipped)} unusable rows ({shown}{'; ...' if len(skipped) > 3 else ''})")
    if not prompts:
        raise RunError(f"data.{which}: {path} has no usable rows; fix the rows above or the field mapping (data.preset, data.prompt_field, data.answer_field)")
    return prompts


def resolve_reward(config: Config):
    name = config.reward.function
    if name == "auto":
        name = "chain" if config.data.train == BUILTIN_DATA else "math"
    try:
        return resolve_reward_fn(name, correct_reward=config.reward.correct, incorrect_reward=config.reward.incorrect)
    except ValueError as exc:
        raise ConfigError(f"reward.function: {exc}") from None


def build_engine(config: Config, model, tokenizer):
    if config.rollout.engine == "hf":
        return HFGenerateEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    from dapo_rl.rollout.vllm_engine import VLLMEngine  # optional extra

    return VLLMEngine.from_config(config, model, tokenizer)


def prepare_output_dir(config: Config) -> Path:
    """Create the run folder, or refuse to touch one that holds a different run."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"output_dir: {out} is a file; choose a folder path")
    holds_run = (out / RUN_MARKER).is_file()
    if holds_run and not (config.resume or config.overwrite):
        raise RunError(f"output_dir: {out} already holds a run; pass resume=true to continue it, overwrite=true to replace it, "
                       f"or choose another output_dir")
    if holds_run and config.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_MARKER}.tmp"
    tmp.write_text(to_yaml(config))
    os.replace(tmp, out / RUN_MARKER)
    return out


def _trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def save_final_policy(model, tokenizer, run_dir: Path) -> Path:
    """``run_dir/final``: safetensors + tokenizer that ``from_pretrained`` loads; replaced atomically."""
    final = run_dir / "final"
    staging = run_dir / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


@dataclass
class RunResult:
    run_dir: Path
    accuracy_before: float | None
    accuracy_after: float | None
    steps: int
    seconds: float
    history: list[dict[str, float]]


def _postfix(metrics: dict[str, float], eval_acc: float | None) -> dict[str, str]:
    out = {
        "acc": f"{metrics.get('train/accuracy', 0):.2f}",
        "H": f"{metrics.get('train/entropy', 0):.2f}",
        "len": f"{metrics.get('train/response_length_mean', 0):.1f}",
        "trunc": f"{metrics.get('train/truncated_frac', 0):.2f}",
        "rounds": f"{metrics.get('train/generation_rounds', 0):.0f}",
        "s/step": f"{metrics.get('time/step_s', 0):.2f}",
    }
    if eval_acc is not None:
        out["eval"] = f"{eval_acc:.3f}"
    return out


def run_training(config: Config) -> RunResult:
    """Train as configured; returns held-out accuracy before and after, and the per-step history."""
    started = time.perf_counter()
    progress = config.logging.progress
    torch.manual_seed(config.seed)
    device, autocast_dtype = resolve_device(config)
    model, tokenizer = load_policy(config, progress=progress)  # before touching output_dir: bad input loses nothing
    model.to(device)
    reward_fn = resolve_reward(config)
    train_prompts = _load_split(config, config.data.train, tokenizer, "train")
    eval_prompts = _load_split(config, config.data.eval, tokenizer, "eval") if config.data.eval else None
    run_dir = prepare_output_dir(config)
    engine = build_engine(config, model, tokenizer)
    sinks = build_sinks(run_dir, config.logging.sinks, config.logging.run_name or run_dir.name, to_dict(config),
                        wandb_project=config.logging.wandb_project, wandb_mode=config.logging.wandb_mode)
    trainer = Trainer(config, model, tokenizer, train_prompts, eval_prompts, reward_fn, engine, device=device,
                      autocast_dtype=autocast_dtype, log=sinks.log,
                      checkpoint_fn=lambda t: save_checkpoint(t, run_dir, config.checkpoint.keep_last))
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if checkpoint and summary_path.is_file() else {}
    if checkpoint is not None:
        load_checkpoint(trainer, checkpoint)
        _trim_metrics(run_dir, trainer.state.step)
        tqdm.write(f"resumed from {checkpoint} (step {trainer.state.step})")
    elif config.resume:
        _trim_metrics(run_dir, 0)

    before = summary.get("accuracy_before")
    if eval_prompts and before is None:
        result = trainer.evaluate()
        before = result.avg_at_k
        tqdm.write(f"held-out accuracy before training: {before:.3f} (avg@{config.eval.samples_per_prompt} over {len(eval_prompts)} prompts)")
        summary["accuracy_before"] = before
        summary["eval_before"] = result.metrics()
        sinks.log(result.metrics(), 0)
        _write_json(summary_path, summary)

    last_eval = before
    bar = tqdm(total=config.steps, initial=trainer.state.step, desc="dapo train", disable=not progress, dynamic_ncols=True)
    try:
        for metrics in trainer.steps():
            last_eval = metrics.get("eval/accuracy", last_eval)
            bar.set_postfix(_postfix(metrics, last_eval), refresh=False)
            bar.update(1)
    finally:
        bar.close()
        sinks.close()
    after = trainer.state.history[-1].get("eval/accuracy") if trainer.state.history and eval_prompts else None
    final = save_final_policy(model, tokenizer, run_dir)
    summary.update({"accuracy_after": after, "steps": trainer.state.step, "final_policy": str(final),
                    "seconds": summary.get("seconds", 0.0) + time.perf_counter() - started})
    _write_json(summary_path, summary)
    if after is not None:
        tqdm.write(f"held-out accuracy: {before:.3f} -> {after:.3f} ({(after - before) * 100:+.1f} points)")
    tqdm.write(f"final policy saved to {final}")
    return RunResult(run_dir=run_dir, accuracy_before=before, accuracy_after=after, steps=trainer.state.step,
                     seconds=time.perf_counter() - started, history=trainer.state.history)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)

"""Evaluate a model on a dataset (``dapo eval MODEL DATA [key=value ...]``): greedy accuracy, avg@k
and pass@k.

MODEL is a local Hugging Face folder or ``builtin:chain-tiny``; DATA is a dataset path (JSONL,
Parquet, HF folder) or ``builtin:chain`` (its held-out split). The options are the fields of
:class:`EvalOptions`; an unknown key or a bad value is a :class:`~dapo_rl.config.ConfigError`
whose one-line message names the key and the fix.

The result is written as JSON, atomically, and never over an existing file unless
``overwrite=true``; a table is printed to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dapo_rl.config import (Config, ConfigError, ModelConfig, MultiTurnFields, PromptFields, QuickstartConfig, RolloutConfig, require,
                            validate_multi_turn_fields, validate_prompt_fields)
from dapo_rl.data import DatasetError, TemplateError
from dapo_rl.data.templates import use_chat_template_file
from dapo_rl.data.encoding import EncodedPrompt, check_prompt_fields, load_prompts, prompt_source, skipped_rows_note
from dapo_rl.evaluation.evaluate import EvalResult, evaluate
from dapo_rl.models.loading import ModelLoadError, load_policy, resolve_device
from dapo_rl.models.lora import AdapterError, is_adapter_folder
from dapo_rl.rewards import resolve_reward_fn
from dapo_rl.rollout.base import SamplingParams
from dapo_rl.rollout.engines import ROLLOUT_ENGINES, build_engine
from dapo_rl.rollout.multi_turn import MultiTurnSampler, check_multi_turn_fields, tool_schemas

_DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".ndjson", ".parquet", ".pq")


@dataclass
class EvalOptions(PromptFields, MultiTurnFields):
    """Options of ``dapo eval`` (``key=value`` on the command line): how DATA's rows become
    prompts (:class:`~dapo_rl.config.PromptFields`, as ``dapo train``'s ``data.*``), tools or an
    environment (:class:`~dapo_rl.config.MultiTurnFields`, as ``dapo train``'s ``rollout.*``), then these."""

    k: int = 4  # samples per problem: avg@k and pass@j for j = 1, 2, 4, ..., k
    samples_per_prompt: int | None = None  # alias of k (the trainer's eval.samples_per_prompt)
    temperature: float = 1.0  # sampling temperature of the k samples
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_response_length: int = 64  # new tokens per response; longer ones are truncated
    greedy: bool = True  # also decode greedily once per problem and report greedy accuracy
    split: str = "train"  # split of a Hugging Face dataset folder
    reward: str = "auto"  # auto (chain for builtin:chain, else math) | math | dapo | gsm8k | boxed | exact | pkg.module:fn
    reward_timeout_s: float = 5.0
    batch_size: int = 64  # prompts per generate call (each with its k samples)
    engine: str = "fast"  # rollout engine, as rollout.engine: fast (the trainer's sampler) | hf (Hugging Face generate) | ... | pkg.module:Class
    dtype: str = "auto"  # sampling precision, as rollout.dtype: auto | float32 | bfloat16
    seed: int = 0  # torch seed of the sampler (and of the built-in model)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output: str | None = None  # JSON path; default <MODEL>/eval-<dataset>.json (./ for built-in models)
    overwrite: bool = False  # replace an existing output file
    progress: bool = True
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)  # how builtin:chain-tiny is built
    base: str | None = None  # MODEL is a LoRA adapter folder: its base model (default: the adapter's base_model_name_or_path)


def parse_options(overrides: list[str]) -> EvalOptions:
    """``key=value`` strings → validated :class:`EvalOptions`; raises ConfigError (one line)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"eval option {item!r} must look like key=value (e.g. k=8)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalOptions), OmegaConf.from_dotlist(list(overrides)))
        options: EvalOptions = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        first = str(exc).splitlines()[0]
        if "not in" in first:
            known = ", ".join(f.name for f in EvalOptions.__dataclass_fields__.values())
            raise ConfigError(f"unknown eval option '{key}'; known options: {known}") from None
        raise ConfigError(f"eval option '{key}': {first}") from None
    _validate(options)
    return options


def _validate(o: EvalOptions) -> None:
    if o.samples_per_prompt is not None:
        require(o.k in (EvalOptions.k, o.samples_per_prompt), "samples_per_prompt",
                 f"contradicts k={o.k}", "set only one of k and samples_per_prompt")
        o.k = o.samples_per_prompt
    require(o.k >= 1, "k", f"must be >= 1, got {o.k}", "e.g. k=4")
    require(o.temperature >= 0, "temperature", f"must be >= 0, got {o.temperature}", "0 samples greedily; paper evaluates at 1.0")
    require(0 < o.top_p <= 1, "top_p", f"must be in (0, 1], got {o.top_p}", "1.0 disables it")
    require(o.top_k >= 0, "top_k", f"must be >= 0, got {o.top_k}", "0 disables it")
    require(o.max_response_length >= 1, "max_response_length", f"must be >= 1, got {o.max_response_length}", "set a positive token count")
    validate_prompt_fields(o)
    check_prompt_fields(o)
    validate_multi_turn_fields(o)
    check_multi_turn_fields(o)
    require(o.batch_size >= 1, "batch_size", f"must be >= 1, got {o.batch_size}", "e.g. batch_size=16")
    require(o.dtype in ("auto", "float32", "bfloat16"), "dtype", f"{o.dtype!r} is not a sampling precision", "use auto, float32 or bfloat16")
    try:
        ROLLOUT_ENGINES.get(o.engine)
    except ValueError as exc:
        raise ConfigError(f"engine: {exc}") from None
    require(o.reward_timeout_s > 0, "reward_timeout_s", "must be > 0", "e.g. 5")


def dataset_name(data: str) -> str:
    """A short file-name-safe name: ``builtin:chain`` → ``chain``, ``dir/test.jsonl`` → ``test``."""
    if data.startswith("builtin:"):
        return data.split(":", 1)[1]
    name = Path(data.rstrip("/")).name
    for suffix in _DATA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.replace("/", "_") or "data"


def default_output(model: str, data: str) -> Path:
    """``<model folder>/eval-<dataset>.json``; built-in models have no folder of their own, so ``./``."""
    if model.startswith("builtin:"):
        return Path(f"eval-{model.split(':', 1)[1]}-{dataset_name(data)}.json")
    return Path(model) / f"eval-{dataset_name(data)}.json"


def _load_model(model: str, o: EvalOptions):
    if o.base and not is_adapter_folder(model):
        raise ConfigError(f"base: only an adapter folder (with adapter_config.json) takes a base model, and {model} is not one; drop base=")
    try:
        model_obj, tokenizer = load_policy(model, quickstart=o.quickstart, seed=o.seed, progress=o.progress, base=o.base)
    except ModelLoadError as exc:
        raise ConfigError(f"{'base' if o.base or is_adapter_folder(model) else 'MODEL'}: {exc}") from None
    except AdapterError as exc:
        raise ConfigError(f"MODEL: {exc}") from None
    try:
        use_chat_template_file(tokenizer, o.chat_template)
    except TemplateError as exc:
        raise ConfigError(str(exc).removeprefix("data.")) from None
    return model_obj.eval(), tokenizer


def load_eval_prompts(data: str, tokenizer, o: EvalOptions) -> list[EncodedPrompt]:
    """The problems of DATA as encoded prompts (``builtin:chain``: the held-out split)."""
    try:
        source = prompt_source(o, data, held_out=True, split=o.split, max_rows=o.max_rows, tools=tool_schemas(o))
        prompts, skipped = load_prompts(source, tokenizer)
    except DatasetError as exc:
        raise DatasetError(f"DATA: {str(exc).replace('data.path: ', '')}") from None
    except TemplateError as exc:
        raise ConfigError(f"template / use_chat_template: {exc}") from None
    if skipped:
        print(f"dapo eval: {skipped_rows_note(skipped)}")
    return prompts


def _resolve_reward(data: str, o: EvalOptions):
    try:
        return resolve_reward_fn(o.reward, data=data)
    except ValueError as exc:
        raise ConfigError(f"reward: {exc}") from None


def write_json_atomic(path: Path, payload: dict[str, Any], overwrite: bool) -> None:
    """Write ``path`` whole or not at all; refuse an existing file unless ``overwrite``.

    The JSON goes to a temporary file in the same folder first; it is then hard-linked into place,
    which fails if the name exists (no check-then-write race), or renamed over it when overwriting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(f"output: {path} already exists; pass overwrite=true or another output=PATH") from None
    finally:
        tmp.unlink(missing_ok=True)


def format_table(result: EvalResult, tokens_per_s: float, seconds: float) -> str:
    """The human-readable summary printed by ``dapo eval``."""
    rows = [("problems", str(result.num_problems)), ("samples / problem (k)", str(result.samples_per_problem))]
    if result.greedy_accuracy is not None:
        rows.append(("greedy accuracy", f"{result.greedy_accuracy:.4f}"))
    rows.append((f"avg@{result.samples_per_problem}", f"{result.avg_at_k:.4f}"))
    rows += [(f"pass@{j}", f"{v:.4f}") for j, v in result.pass_at_k.items()]
    rows += [("mean response length (tokens)", f"{result.response_length_mean:.1f}"),
             ("truncated fraction", f"{result.truncated_frac:.3f}")]
    t = result.trajectory
    if t:  # multi-turn: turns, calls and the failed calls by kind
        errors = ", ".join(f"{name.rpartition('/')[2]} {int(v)}" for name, v in t.items() if "/tool_errors/" in name and v)
        rows += [("turns per trajectory (mean / max)", f"{t['rollout/turns_mean']:.2f} / {int(t['rollout/turns_max'])}"),
                 ("tool calls per trajectory", f"{t['rollout/tool_calls_mean']:.3f}"),
                 ("tool errors", errors or "none")]
    rows += [("generation speed (tokens/s)", f"{tokens_per_s:.1f}"),
             ("wall time (s)", f"{seconds:.1f}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _engine_config(model: str, o: EvalOptions) -> Config:
    """The configuration the engine is built from: ``dapo train``'s keys that ``o`` sets."""
    return Config(seed=o.seed, model=ModelConfig(path=model, device=o.device),
                  rollout=RolloutConfig(engine=o.engine, dtype=o.dtype, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                                        max_response_length=o.max_response_length, max_batch_prompts=o.batch_size))


def run_eval(model: str, data: str, overrides: list[str]) -> int:
    """``dapo eval MODEL DATA [key=value ...]``: :func:`evaluate_model` with the options parsed."""
    return evaluate_model(model, data, parse_options(overrides))


def evaluate_model(model: str, data: str, options: EvalOptions, echo: bool = True) -> int:
    """Evaluate MODEL on DATA; write the JSON result and (``echo``) print a table; returns the exit
    code (0).

    Bad input raises ConfigError / DatasetError (the CLI prints one line and exits with 2).
    """
    output = Path(options.output) if options.output else default_output(model, data)
    if output.exists() and not options.overwrite:  # fail before minutes of generation, not after
        raise ConfigError(f"output: {output} already exists; pass overwrite=true or another output=PATH")
    if output.is_dir():
        raise ConfigError(f"output: {output} is a folder; give a file path ending in .json")
    try:
        device = resolve_device(options.device)
    except ModelLoadError as exc:
        raise ConfigError(f"device: {exc}") from None
    reward_fn = _resolve_reward(data, options)
    policy, tokenizer = _load_model(model, options)
    policy.to(device)
    prompts = load_eval_prompts(data, tokenizer, options)
    try:
        engine = build_engine(_engine_config(model, options), policy, tokenizer)
    except ConfigError:
        raise  # it already names its key
    except ValueError as exc:
        raise ConfigError(f"engine: {exc}") from None
    if engine.precision_reason and options.dtype == "auto" and options.progress:
        print(f"dtype={engine.precision_reason}", file=sys.stderr)
    params = SamplingParams(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                            max_new_tokens=options.max_response_length)
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    multi_turn = MultiTurnSampler.from_config(options, engine, tokenizer)
    result = evaluate(engine, prompts, tokenizer, reward_fn, params=params, samples_per_problem=options.k,
                      greedy=options.greedy, reward_timeout_s=options.reward_timeout_s, multi_turn=multi_turn)
    if multi_turn is not None:
        multi_turn.close()
    seconds = time.perf_counter() - started
    # greedy decoding is a second pass whose lengths evaluate() does not report; count sampled tokens only
    sampled_tokens = result.response_length_mean * result.num_problems * result.samples_per_problem
    tokens_per_s = sampled_tokens / seconds if seconds > 0 else 0.0
    payload = {
        "model": model,
        "data": data,
        "num_problems": result.num_problems,
        "k": result.samples_per_problem,
        "greedy_accuracy": result.greedy_accuracy,
        "avg_at_k": result.avg_at_k,
        "pass_at_k": {str(j): v for j, v in result.pass_at_k.items()},
        "response_length_mean": result.response_length_mean,
        "truncated_frac": result.truncated_frac,
        "correct_counts": result.correct_counts,
        "trajectory": result.trajectory,  # multi-turn: turns, tool calls, errors by kind
        "seconds": round(seconds, 2),
        "sampled_tokens_per_s": round(tokens_per_s, 1),
        "options": asdict(options),
    }
    engine.close()
    write_json_atomic(output, payload, options.overwrite)
    if echo:
        print(format_table(result, tokens_per_s, seconds))
        print(f"result written to {output}")
    return 0

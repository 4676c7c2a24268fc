"""A run's parts, built from its :class:`~dapo_rl.config.Config`: the checks of the names the
configuration looks up in the registries of the floors below, the device, the policy, the
prompts, the reward and the rollout engine.

Each builder calls the one function of its room that does the work (the same one ``dapo eval``
calls) and turns that room's error into a :class:`~dapo_rl.config.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dapo_rl.algorithm import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    ClipRange,
    DynamicSampler,
    LossSettings,
)
from dapo_rl.config import Config, ConfigError, require
from dapo_rl.data import DatasetError, TemplateError
from dapo_rl.data.templates import use_chat_template_file
from dapo_rl.data.encoding import EncodedPrompt, check_prompt_fields, load_prompts, prompt_source, skipped_rows_note
from dapo_rl.errors import one_line
from dapo_rl.models.loading import ModelLoadError, load_policy, resolve_device
from dapo_rl.models.precision import Precision, training_precision
from dapo_rl.models.lora import AdapterError
from dapo_rl.rewards import RewardFunctions, resolve_reward_fn
from dapo_rl.rollout.base import RolloutEngine
from dapo_rl.rollout.engines import ROLLOUT_ENGINES, build_engine
from dapo_rl.rollout.multi_turn import check_multi_turn_fields, tool_schemas
from dapo_rl.telemetry.sinks import SINK_NAMES, WANDB_MODES
from dapo_rl.training.distributed import DistContext
from dapo_rl.training.errors import RunError

__all__ = ["check_config", "correction_mode", "encoded_prompts", "loss_settings", "policy_and_tokenizer",
           "reward_function", "rollout_engine", "training_autocast", "training_device"]


def _in_section(section: str, build: Callable[[], Any]) -> None:
    """Build an algorithm object from its section; its ValueError (``"field: problem; fix"``)
    becomes the ConfigError of ``section.field``."""
    try:
        build()
    except ValueError as exc:
        raise ConfigError(f"{section}.{exc}") from None


def _registered(registry: Any, name: str, key: str) -> None:
    """``name`` is registered in ``registry`` or an import path that resolves."""
    try:
        registry.get(name)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _engine_class(config: Config) -> type[RolloutEngine]:
    try:
        return ROLLOUT_ENGINES.get(config.rollout.engine)
    except ValueError as exc:
        raise ConfigError(f"rollout.engine: {exc}") from None


def loss_settings(config: Config, generator: torch.Generator | None = None) -> LossSettings:
    """What the policy loss reads: the ``clip`` section, the loss hyper-parameters of the ``loss``
    section and ``generator`` (the trainer's, seeded per update).

    Raises:
        ValueError: ``"field: problem; fix"`` of a bad value.
    """
    return LossSettings(**dataclasses.asdict(config.clip), **{name: getattr(config.loss, name) for name in LossSettings.LOSS_FIELDS},
                        generator=generator)


def correction_mode(config: Config, engine: RolloutEngine | type[RolloutEngine] | None = None,
                    autocast_dtype: torch.dtype | None = None) -> str:
    """``rollout_correction.mode`` with ``auto`` resolved for ``engine`` (default: the class
    ``rollout.engine`` names) and the trainer's autocast dtype. Sampler and trainer agree to
    float rounding only when both compute in float32 from the same weights (an in-process engine
    in fp32, an fp32 trainer): then no correction, which would only cost a log-prob pass.
    Otherwise ``token_truncate`` (C = ``rollout_correction.cap``, verl's
    ``rollout_is=token, rollout_is_threshold=2``): an engine with its own weights (vLLM, the
    server), an engine sampling in bf16 (``rollout.dtype``), or a trainer in bf16 autocast."""
    if config.rollout_correction.mode != "auto":
        return config.rollout_correction.mode
    engine = engine or _engine_class(config)
    sampler_fp32 = not engine.own_weights and (isinstance(engine, type) or engine.precision in (None, "float32"))
    return "none" if sampler_fp32 and autocast_dtype is None else "token_truncate"


def check_config(config: Config) -> None:
    """Every name the configuration looks up (losses, estimators, aggregation, corrections, the
    dataset's format/preset/template, metric sinks, the rollout engine), the settings the
    algorithm's objects check themselves (``clip``, the loss hyper-parameters, ``dynamic_sampling``) and what the engine
    can honour. :func:`~dapo_rl.config.load_config` has checked the rest.

    Raises:
        ConfigError: one line naming the key and the fix.
    """
    c = config
    _registered(POLICY_LOSSES, c.loss.policy_loss, "loss.policy_loss")
    _registered(ADVANTAGE_ESTIMATORS, c.advantage.estimator, "advantage.estimator")
    _registered(LOSS_AGG_MODES, c.loss.agg_mode, "loss.agg_mode")
    _registered(KL_ESTIMATORS, c.loss.kl_estimator, "loss.kl_estimator")
    if c.rollout_correction.mode != "auto":
        _registered(ROLLOUT_CORRECTIONS, c.rollout_correction.mode, "rollout_correction.mode")
    _in_section("clip", lambda: ClipRange(**dataclasses.asdict(c.clip)))
    _in_section("loss", lambda: loss_settings(c))
    require(c.loss.entropy_coef >= 0, "loss.entropy_coef", f"must be >= 0, got {c.loss.entropy_coef}",
            "use 0 (off, as DAPO) or a small positive bonus")
    _in_section("dynamic_sampling", lambda: DynamicSampler(groups_per_step=c.prompts_per_step, **dataclasses.asdict(c.dynamic_sampling)))
    check_prompt_fields(c.data, "data.")
    for sink in c.logging.sinks:
        require(sink in SINK_NAMES, "logging.sinks", f"{sink!r} is not valid", f"use one of {', '.join(SINK_NAMES)}")
    require(c.logging.wandb_mode in WANDB_MODES, "logging.wandb_mode", f"{c.logging.wandb_mode!r} is not valid",
            f"use one of {', '.join(WANDB_MODES)}")
    check_multi_turn_fields(c.rollout, "rollout.")
    engine = _engine_class(c)
    require(c.rollout.async_steps == 0 or engine.samples_in_background, "rollout.async_steps",
            f"one-step-off overlap needs an engine that samples in the background, not rollout.engine={c.rollout.engine}",
            "set rollout.engine=vllm-server")
    mode = correction_mode(c)
    require(mode == "none" or engine.reports_logprobs, "rollout_correction.mode",
            f"{mode} needs the sampler's log-probs, which the {c.rollout.engine} engine does not return",
            "use rollout.engine=fast (or vllm), or rollout_correction.mode=none")
    engine.check_config(c)


def training_device(config: Config, local_rank: int = 0) -> torch.device:
    """``model.device`` resolved (see :func:`dapo_rl.models.loading.resolve_device`)."""
    try:
        return resolve_device(config.model.device, local_rank)
    except ModelLoadError as exc:
        raise ConfigError(f"model.device: {exc}") from None


def training_autocast(config: Config, model, device: torch.device, dist: DistContext | None = None) -> Precision:
    """``model.dtype`` resolved for ``model`` on ``device``
    (:func:`dapo_rl.models.precision.training_precision`). Under torchrun, rank 0 alone resolves
    it and its answer holds for every rank: the ranks must compute alike, and probes timed on
    every rank at once would time their contention with each other."""
    if dist is None or not dist.enabled:
        return training_precision(config.model.dtype, model.config, device)
    mine = training_precision(config.model.dtype, model.config, device) if dist.is_main else None
    return dist.all_gather_objects(mine)[0]


def policy_and_tokenizer(config: Config, progress: bool = False):
    """The policy and tokenizer ``model.*`` describes (adapters, gradient checkpointing included);
    a model that cannot be loaded is a :class:`ConfigError` naming the key."""
    try:
        model, tokenizer = load_policy(config.model.path, quickstart=config.quickstart, seed=config.seed, progress=progress,
                                       gradient_checkpointing=config.model.gradient_checkpointing, lora=config.model.lora)
        use_chat_template_file(tokenizer, config.data.chat_template)
    except ModelLoadError as exc:
        raise ConfigError(f"model.path: {exc}") from None
    except (AdapterError, TemplateError) as exc:  # the message names the model.lora or data.chat_template key
        raise ConfigError(str(exc)) from None
    return model, tokenizer


def encoded_prompts(config: Config, which: str, tokenizer) -> list[EncodedPrompt]:
    """The encoded prompts of ``data.train`` (``which="train"``) or ``data.eval``; skipped rows are reported."""
    dc = config.data
    try:
        tools = tool_schemas(config.rollout)
        source = prompt_source(dc, dc.train if which == "train" else dc.eval, held_out=which == "eval",
                               max_rows=dc.max_rows if which == "train" else None, builtin_train_size=dc.builtin_train_size,
                               tools=tools)
        prompts, skipped = load_prompts(source, tokenizer)
    except DatasetError as exc:
        # The loader names the path as data.path; the user set it as data.train or data.eval.
        raise RunError(f"data.{which}: {str(exc).replace('data.path: ', '').replace('data.path', f'data.{which}')}") from None
    except TemplateError as exc:
        if str(exc).startswith("data.chat_template"):
            raise ConfigError(one_line(exc)) from None
        raise RunError(f"data.template: {one_line(exc)} (while encoding data.{which}); choose another data.template "
                       f"or data.use_chat_template=false") from None
    if skipped:
        tqdm.write(f"data.{which}: {skipped_rows_note(skipped)}")
    return prompts


def reward_function(config: Config, functions: list[Callable[..., Any]] | None = None):
    """``reward.function`` resolved (``auto``: the chain reward on the built-in data, math otherwise),
    or, when ``reward.functions`` is set, those TRL-style functions summed with ``reward.weights``
    (:class:`~dapo_rl.rewards.RewardFunctions`). ``functions``: the callables themselves, in place
    of ``reward.functions``' import paths (``DAPOTrainer(reward_funcs=...)``)."""
    if functions is not None or config.reward.functions:
        try:
            return RewardFunctions(functions if functions is not None else list(config.reward.functions), list(config.reward.weights),
                                   answer_column=config.data.answer_field or "answer", incorrect_reward=config.reward.incorrect)
        except ValueError as exc:
            raise ConfigError(f"reward.functions: {one_line(exc)}") from None
    try:
        return resolve_reward_fn(config.reward.function, correct_reward=config.reward.correct,
                                 incorrect_reward=config.reward.incorrect, data=config.data.train)
    except ValueError as exc:
        raise ConfigError(f"reward.function: {exc}") from None


def rollout_engine(config: Config, model: torch.nn.Module, tokenizer: Any, dist: DistContext | None = None) -> RolloutEngine:
    """The rollout engine ``rollout.engine`` names. Under torchrun with ``rollout.dtype=auto`` and
    an engine that may probe for it (``probes_precision``), rank 0 builds its engine first
    (resolving ``auto``, probing where it must) and every other rank builds with rank 0's answer,
    as :func:`training_autocast` does for ``model.dtype``: the ranks must sample alike, and probes
    timed on every rank at once would time their contention."""
    if dist is None or not dist.enabled or config.rollout.dtype != "auto" or not _engine_class(config).probes_precision:
        return _built_engine(config, model, tokenizer)
    engine, answer = None, None
    if dist.is_main:
        try:
            engine = _built_engine(config, model, tokenizer)
            own = str(next(model.parameters()).dtype).removeprefix("torch.")  # an engine.precision of None
            answer = (engine.precision or own, engine.precision_reason)
        except Exception:
            dist.all_gather_objects(None)  # the other ranks stop too, instead of waiting for an answer
            raise
    answer = dist.all_gather_objects(answer)[0]
    if answer is None:
        raise RunError("rollout.engine: rank 0 could not build its engine (its own error says why)")
    if engine is None:
        chosen, reason = answer
        engine = _built_engine(dataclasses.replace(config, rollout=dataclasses.replace(config.rollout, dtype=chosen)), model, tokenizer)
        engine.precision_reason = reason
    return engine


def _built_engine(config: Config, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    try:
        return build_engine(config, model, tokenizer)
    except ConfigError:
        raise  # it already names its key
    except ValueError as exc:
        raise ConfigError(f"rollout.engine: {exc}") from None

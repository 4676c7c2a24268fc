"""``DAPOConfig``: our :class:`~dapo_rl.config.Config` under TRL ``GRPOConfig``'s names where the
concept is the same, and our own keys and sections for what TRL lacks.

It is a list of ``key=value`` settings over an optional YAML file, loaded by
:func:`~dapo_rl.config.load_config`, the loader ``dapo train`` uses: the same types, checks and
messages, and :meth:`DAPOConfig.to_yaml` writes what ``dapo train CONFIG.yaml`` reads back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, Callable

from dapo_rl.config import Config, ConfigError, flatten_settings, load_config, to_yaml

__all__ = ["DAPOConfig", "TRL_NAMES", "batch_sizes"]

# TRL GRPOConfig / TrainingArguments names that mean exactly one of our keys.
TRL_NAMES: dict[str, str] = {
    "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay", "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2", "adam_epsilon": "optim.eps", "max_grad_norm": "optim.grad_clip",
    "warmup_steps": "optim.warmup_updates", "num_generations": "group_size",
    "max_completion_length": "rollout.max_response_length", "max_prompt_length": "data.max_prompt_length",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
    "beta": "loss.kl_coef", "epsilon": "clip.eps_low", "epsilon_high": "clip.eps_high", "num_iterations": "ppo_epochs",
    "mask_truncated_completions": "overlong.filter", "save_steps": "checkpoint.interval",
    "save_total_limit": "checkpoint.keep_last", "run_name": "logging.run_name", "entropy_coef": "loss.entropy_coef",
    "sapo_temperature_pos": "loss.tau_pos", "sapo_temperature_neg": "loss.tau_neg",
    "gradient_checkpointing": "model.gradient_checkpointing", "vllm_gpu_memory_utilization": "rollout.vllm_gpu_memory_utilization",
    "vllm_enable_sleep_mode": "rollout.vllm_sleep", "vllm_max_model_length": "rollout.vllm_max_model_len",
    "vllm_server_base_url": "rollout.server.url", "vllm_importance_sampling_clip_max": "rollout_correction.cap",
}
# TRL loss_type → (loss.policy_loss, loss.agg_mode). bnpo normalises by the tokens of TRL's local
# batch; ours counts the whole mini-batch on every rank (= TRL's dapo), which bnpo approximates.
LOSS_TYPES = {"dapo": ("decoupled_clip", "token-mean"), "bnpo": ("decoupled_clip", "token-mean"),
              "grpo": ("decoupled_clip", "seq-mean-token-mean"), "dr_grpo": ("decoupled_clip", "seq-mean-token-sum-norm"),
              "cispo": ("cispo", "token-mean"), "sapo": ("sapo", "token-mean")}
# Options TRL's batch arithmetic is written in (see batch_sizes and docs/from-trl.md's table).
BATCH_NAMES = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size")
# Converted by a rule of their own (below), or kept by the API itself (logging_steps, reward_weights).
SPECIAL_NAMES = ("loss_type", "scale_rewards", "max_steps", "report_to", "bf16", "use_vllm", "vllm_mode", "lr_scheduler_type",
                 "importance_sampling_level", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "logging_steps", "reward_weights", "output_dir", "seed") + BATCH_NAMES
OUR_KEYS = tuple(f.name for f in dataclasses.fields(Config))


def _choice(name: str, value: Any, table: dict[Any, Any]) -> Any:
    if value not in table:
        raise ConfigError(f"DAPOConfig: {name}={value!r} is not supported; use one of {', '.join(map(repr, table))}")
    return table[value]


def batch_sizes(per_device: int = 8, accumulation: int = 1, steps_per_generation: int | None = None,
                generation_batch_size: int | None = None, num_generations: int = 8, processes: int = 1) -> dict[str, int]:
    """TRL's batch arithmetic in our keys. TRL: a generation samples ``per_device × processes ×
    steps_per_generation`` completions (``num_generations`` per prompt); an optimiser update takes
    ``per_device × processes × accumulation`` of them. Ours: ``prompts_per_step`` groups of
    ``group_size`` per step, ``mini_batch_size`` prompts per update, ``micro_batch_size``
    completions per forward/backward on a rank.

    Raises:
        ConfigError: sizes that do not make whole groups, or a generation that is not a whole
            number of updates.
    """
    per_update = per_device * processes * accumulation
    if generation_batch_size is not None:
        if steps_per_generation is not None:
            raise ConfigError("DAPOConfig: give steps_per_generation or generation_batch_size, not both (as TRL)")
        if generation_batch_size % (per_device * processes):
            raise ConfigError(f"DAPOConfig: generation_batch_size={generation_batch_size} is not a multiple of per_device_train_batch_size "
                              f"× processes = {per_device * processes}; choose a multiple")
        steps_per_generation = generation_batch_size // (per_device * processes)
    per_generation = per_device * processes * (steps_per_generation or accumulation)
    for what, count in (("per_device_train_batch_size × processes × gradient_accumulation_steps", per_update),
                        ("per_device_train_batch_size × processes × steps_per_generation", per_generation)):
        if count % num_generations:
            raise ConfigError(f"DAPOConfig: {what} = {count} completions is not a multiple of num_generations={num_generations}; "
                              f"each prompt's group must fit whole")
    if per_generation % per_update:
        raise ConfigError(f"DAPOConfig: steps_per_generation={steps_per_generation} is not a multiple of gradient_accumulation_steps="
                          f"{accumulation}; a generation must be whole optimiser updates")
    return {"prompts_per_step": per_generation // num_generations, "mini_batch_size": per_update // num_generations,
            "micro_batch_size": per_device, "group_size": num_generations}


def _flatten(key: str, value: Any) -> dict[str, Any]:
    """A section given as a dict or a dataclass (``dynamic_sampling={"max_rounds": 4}``) → dotted keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return flatten_settings({key: value})


class DAPOConfig:
    """Training settings in TRL ``GRPOConfig``'s names or ours (see the table in docs/from-trl.md).

    ``DAPOConfig(output_dir="runs/x", learning_rate=1e-6, num_generations=16, epsilon_high=0.28,
    dynamic_sampling={"max_rounds": 4})``. Defaults are ours (:class:`~dapo_rl.config.Config`,
    ``dapo train --help``), not TRL's; an unknown or unsupported option raises
    :class:`~dapo_rl.config.ConfigError` at once, in one line, with a did-you-mean.

    TRL meanings kept: ``epsilon`` alone sets both clip sides (TRL ``epsilon_high=None``);
    ``max_steps`` counts optimiser updates (ours: ``steps`` rollout steps × updates per step);
    ``logging_steps`` is how often callbacks' ``on_log`` runs (metrics.jsonl has every step).
    """

    def __init__(self, _path: str | Path | None = None, **options: Any):
        self.path = None if _path is None else str(_path)
        self.logging_steps = int(options.pop("logging_steps", 1))
        self.reward_weights = options.pop("reward_weights", None)
        self.options = dict(options)
        self.settings = self._settings(dict(options))
        self.config = self.resolve()

    @classmethod
    def from_yaml(cls, path: str | Path, **options: Any) -> "DAPOConfig":
        """The settings of a ``dapo train`` YAML file, with ``options`` over them."""
        return cls(path, **options)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The resolved configuration as YAML, the file ``dapo train`` reads; written to ``path`` when given."""
        text = to_yaml(self.config)
        if path is not None:
            Path(path).write_text(text)
        return text

    def resolve(self, extra: dict[str, Any] | None = None) -> Config:
        """The :class:`~dapo_rl.config.Config`: file ← these settings ← ``extra`` (what the trainer adds)."""
        settings = {**self.settings, **(extra or {})}
        max_steps = settings.pop("<max_steps>", None)
        config = load_config(self.path, [f"{k}={json.dumps(v)}" for k, v in settings.items()])
        if max_steps is not None:
            updates = config.prompts_per_step // config.mini_batch_size * config.ppo_epochs
            if max_steps % updates:
                raise ConfigError(f"DAPOConfig: max_steps={max_steps} optimiser updates is not a whole number of steps of {updates} "
                                  f"updates each (prompts_per_step / mini_batch_size × num_iterations); choose a multiple of {updates}")
            config = load_config(self.path, [f"{k}={json.dumps(v)}" for k, v in {**settings, "steps": max_steps // updates}.items()])
        return config

    def _settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` as our dotted keys; refuses what it cannot honour."""
        if options.get("epsilon_high", 0) is None:
            del options["epsilon_high"]  # TRL's None: the same as epsilon
        if "vllm_mode" in options and not options.get("use_vllm"):
            raise ConfigError("DAPOConfig: vllm_mode is set but use_vllm is not; set use_vllm=True or drop vllm_mode")
        out: dict[str, Any] = {}
        rules: dict[str, Callable[[Any], dict[str, Any]]] = {
            "loss_type": lambda v: dict(zip(("loss.policy_loss", "loss.agg_mode"), _choice("loss_type", v, LOSS_TYPES))),
            "scale_rewards": lambda v: {"advantage.estimator": _choice("scale_rewards", v, {True: "grpo", "group": "grpo", False: "drgrpo", "none": "drgrpo"})},
            "report_to": lambda v: {"logging.sinks": self._sinks(v)},
            "bf16": lambda v: {"model.dtype": "bf16-autocast" if v else "float32"},
            "use_vllm": lambda v: {} if v else {"rollout.engine": "fast"},
            "lr_scheduler_type": lambda v: {"optim.schedule": _choice("lr_scheduler_type", v, {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine"})},
            "importance_sampling_level": lambda v: {} if v == "token" else {"loss.policy_loss": _choice("importance_sampling_level", v, {"sequence": "gspo"})},
            "vllm_importance_sampling_correction": lambda v: {} if v else {"rollout_correction.mode": "none"},
            "vllm_importance_sampling_mode": lambda v: {"rollout_correction.mode": _choice("vllm_importance_sampling_mode", v, {m: m for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")})},
            "max_steps": lambda v: {"<max_steps>": int(v)},
        }
        for name, value in options.items():
            if name in rules:
                out.update(rules[name](value))
            elif name in TRL_NAMES:
                out[TRL_NAMES[name]] = value
            elif name in OUR_KEYS:
                out.update(_flatten(name, value))
            elif name not in BATCH_NAMES and name != "vllm_mode":
                raise ConfigError(self._unknown(name))
        if options.get("use_vllm"):
            out["rollout.engine"] = _choice("vllm_mode", options.get("vllm_mode", "colocate"), {"colocate": "vllm", "server": "vllm-server"})
        if "epsilon" in options and "epsilon_high" not in options:
            out["clip.eps_high"] = options["epsilon"]  # TRL: epsilon_high=None is epsilon
        if any(name in options for name in BATCH_NAMES):
            group = options.get("num_generations", out.get("group_size", Config.group_size))
            out.update(batch_sizes(int(options.get("per_device_train_batch_size", 8)), int(options.get("gradient_accumulation_steps", 1)),
                                   options.get("steps_per_generation"), options.get("generation_batch_size"), int(group),
                                   int(os.environ.get("WORLD_SIZE", "1"))))
        return out

    @staticmethod
    def _sinks(value: Any) -> list[str]:
        names = [value] if isinstance(value, str) else list(value or [])
        if names in (["none"], []):
            return ["jsonl"]
        if "all" in names:
            raise ConfigError("DAPOConfig: report_to='all' is not supported; name the backends, e.g. report_to=['tensorboard']")
        return ["jsonl", *(n for n in names if n != "jsonl")]

    @staticmethod
    def _unknown(name: str) -> str:
        known = [*TRL_NAMES, *SPECIAL_NAMES, *OUR_KEYS]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "; see the table in docs/from-trl.md, or `dapo train --help` for our keys"
        return f"DAPOConfig: '{name}' is not an option dapo-rl supports (refused, not ignored){hint}"

    def __getattr__(self, name: str) -> Any:
        """TRL's names read back (``args.learning_rate``), for callbacks written against TrainingArguments."""
        config = self.__dict__.get("config")
        if config is None:
            raise AttributeError(name)
        if name in OUR_KEYS:
            return getattr(config, name)
        if name in TRL_NAMES:
            value: Any = config
            for part in TRL_NAMES[name].split("."):
                value = getattr(value, part)
            return value
        if name == "max_steps":
            return config.steps * (config.prompts_per_step // config.mini_batch_size) * config.ppo_epochs
        raise AttributeError(f"DAPOConfig has no option {name!r}")

    def __repr__(self) -> str:
        return f"DAPOConfig({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

"""``DAPOTrainer``: TRL ``GRPOTrainer``'s constructor in front of the run ``dapo train`` runs.

It turns the Python objects into the config and the parts of
:func:`~dapo_rl.training.run.run_training` (the same function, the same
:class:`~dapo_rl.training.trainer.Trainer`, no second loop) and bridges transformers'
``TrainerCallback`` events to :class:`~dapo_rl.training.run.RunHooks`:

- a dataset (``datasets.Dataset`` or ``list[dict]``) is written once as JSONL under
  ``$DAPO_RL_CACHE/datasets/<sha256>.jsonl`` and named by ``data.train``, so the run folder's
  config.yaml trains the same run through ``dapo train``;
- a reward function importable by ``module:name`` is named in ``reward.functions`` (else the
  YAML holds ``<python>:name``, which ``dapo train`` refuses in one line);
- ``peft_config`` (a ``peft.LoraConfig``) becomes ``model.lora.*``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dapo_rl.api.config import DAPOConfig
from dapo_rl.cache_dir import default_cache_dir
from dapo_rl.config import ConfigError
from dapo_rl.algorithm.registry import import_path
from dapo_rl.training.checkpoint import latest_checkpoint
from dapo_rl.training.run import RunHooks, RunParts, RunResult, run_training
from dapo_rl.training.run_folder import save_policy

__all__ = ["DAPOTrainer"]


def _rows(dataset: Any, name: str) -> list[dict]:
    """A ``datasets.Dataset`` or a list of dicts as a list of dicts."""
    rows = [dict(row) for row in dataset] if not isinstance(dataset, list) else dataset
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{name}: give a datasets.Dataset or a non-empty list of dicts with a 'prompt' column")
    return rows


def dataset_file(dataset: Any, name: str, answer_column: str) -> tuple[Path, bool]:
    """Where ``dataset``'s rows are kept as JSONL (by content, so the same rows are one file), and
    whether its prompts are conversational (chat messages)."""
    rows = _rows(dataset, name)
    for i, row in enumerate(rows):
        missing = [c for c in ("prompt", answer_column) if c not in row]
        if missing:
            raise ConfigError(f"{name}: row {i} has no {missing[0]!r} column; dapo-rl needs 'prompt' and the ground truth "
                              f"'{answer_column}' (data.answer_field names another column)")
    try:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: a row cannot be written as JSON ({exc}); keep columns to text, numbers, lists and dicts") from None
    path = default_cache_dir() / "datasets" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path, isinstance(rows[0]["prompt"], list)


def reward_path(fn: Callable[..., Any]) -> str:
    """``module:qualname`` when that imports back to ``fn`` (so ``dapo train`` can run it), else ``<python>:name``."""
    module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
    if module == "__main__":
        # A script's function: `__main__` is another module under `dapo train`. A script run with
        # `python -m pkg.script` has an import name (not imported here: that would run it again).
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name != "__main__" and "<" not in qualname:
            return f"{spec.name}:{qualname}"
        return f"<python>:{getattr(fn, '__name__', type(fn).__name__)}"
    path = f"{module}:{qualname}"
    try:
        if import_path(path, "reward function") is fn:
            return path
    except ValueError:
        pass
    return f"<python>:{getattr(fn, '__name__', type(fn).__name__)}"


def _importable(obj: Any, field: str) -> str:
    """``module:qualname`` of a tool or environment class, which the rollout imports by that path."""
    path = reward_path(obj)
    if path.startswith("<python>:"):
        raise ConfigError(f"{field}: {getattr(obj, '__qualname__', obj)!r} does not import back by module:name; define it at "
                          f"module level (and run a script with python -m pkg.script)")
    return path


# LoraConfig fields model.lora.* carries, or that do not change the adapters trained.
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "base_model_name_or_path", "inference_mode",
                "revision", "peft_version", "runtime_config")


def lora_settings(peft_config: Any) -> dict[str, Any]:
    """A ``peft.LoraConfig`` as ``model.lora.*`` (r, lora_alpha, lora_dropout, target_modules).

    Raises:
        ConfigError: any other field set away from PEFT's default (DoRA, rsLoRA, bias,
            modules_to_save, ...): we would train different adapters, so it is refused, not ignored.
    """
    if str(getattr(peft_config, "peft_type", "")).rpartition(".")[2].upper() != "LORA":
        raise ConfigError(f"peft_config: {type(peft_config).__name__} is not supported; give a peft.LoraConfig")
    defaults = type(peft_config)()
    changed = [f for f in vars(peft_config) if f not in _LORA_FIELDS and not f.startswith("_")
               and getattr(peft_config, f) != getattr(defaults, f, None)]
    if changed:
        raise ConfigError(f"peft_config.{changed[0]}={getattr(peft_config, changed[0])!r} is not supported (refused, not ignored); "
                          f"dapo-rl's adapters take r, lora_alpha, lora_dropout and target_modules only")
    targets = peft_config.target_modules
    targets = ["all-linear"] if targets in (None, "all-linear") else [targets] if isinstance(targets, str) else sorted(targets)
    return {"model.lora.r": int(peft_config.r), "model.lora.alpha": float(peft_config.lora_alpha),
            "model.lora.dropout": float(peft_config.lora_dropout), "model.lora.target_modules": targets}


class _Callbacks(RunHooks):
    """transformers ``TrainerCallback`` events from the run's hooks. ``state.global_step`` counts
    optimiser updates, as in transformers; one ``on_step_end`` per rollout step."""

    def __init__(self, owner: "DAPOTrainer", callbacks: Sequence[Any]):
        from transformers import TrainerControl, TrainerState

        self.owner, self.callbacks = owner, list(callbacks)
        self.state, self.control = TrainerState(), TrainerControl()

    def _event(self, name: str, trainer: Any, **kwargs: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(self.owner.args, self.state, self.control, model=trainer.model, processing_class=trainer.tokenizer,
                       optimizer=trainer.optimizer, lr_scheduler=trainer.scheduler, **kwargs)

    def _sync(self, trainer: Any) -> None:
        updates = trainer.updates_per_step
        self.state.global_step = trainer.state.step * updates
        self.state.max_steps = trainer.cfg.steps * updates

    def train_begin(self, trainer: Any) -> None:
        self.owner.trainer = trainer
        # As transformers' on_train_begin: a stop asked for in an earlier train() does not stop this one.
        self.control.should_training_stop = False
        self._sync(trainer)
        self._event("on_train_begin", trainer)

    def log(self, trainer: Any, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        self._sync(trainer)
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        if step % self.owner.args.logging_steps == 0 or step == trainer.cfg.steps:
            self._event("on_log", trainer, logs=dict(metrics))

    def step_end(self, trainer: Any, metrics: dict[str, float]) -> bool:
        self._sync(trainer)
        self._event("on_step_end", trainer)
        return bool(self.control.should_training_stop)

    def save(self, trainer: Any, folder: Path | None) -> None:
        self._event("on_save", trainer, checkpoint=folder)

    def train_end(self, trainer: Any, result: RunResult) -> None:
        self._event("on_train_end", trainer)


class DAPOTrainer:
    """Train with DAPO from Python, in TRL ``GRPOTrainer``'s shape.

    Args:
        model: a model folder or ``builtin:chain-tiny`` (``model.path``), or a loaded causal LM
            (``PreTrainedModel``; its ``name_or_path`` goes to the YAML).
        reward_funcs: one function or a list, TRL's signature ``(prompts, completions,
            completion_ids, **columns) -> list[float | None]`` (sync or async); summed with
            ``args.reward_weights``. ``None`` (and no ``args.reward``) keeps ``reward.function``.
        args: a :class:`DAPOConfig` (default: ours, output_dir runs/quickstart).
        train_dataset, eval_dataset: ``datasets.Dataset`` or ``list[dict]``: a ``prompt`` column
            (text or chat messages) and a ground-truth column (``answer``, or ``data.answer_field``);
            every other column reaches the reward functions by name. No ``eval_dataset``: no evaluation.
        processing_class: the tokenizer (default: the model folder's).
        peft_config: a ``peft.LoraConfig`` → ``model.lora.*`` (r, lora_alpha, lora_dropout, target_modules).
        callbacks: ``transformers.TrainerCallback`` objects: ``on_train_begin``, ``on_log`` (with
            ``logs``), ``on_step_end``, ``on_save``, ``on_train_end``; ``control.should_training_stop``
            stops after the step (checkpointed).
        tools: typed, documented functions the model may call (TRL ``tools=``) → ``rollout.tools``.
        environment_factory: a class with ``reset(row)`` and ``step(text)``, one instance per
            trajectory (TRL ``environment_factory=``) → ``rollout.environment``. Both must import
            back by ``module:name`` (defined at module level; a script run with ``python -m``), as
            the run's config.yaml names them for ``dapo train``.
    """

    def __init__(self, model: Any, reward_funcs: Callable[..., Any] | Sequence[Callable[..., Any]] | None = None,
                 args: DAPOConfig | None = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, peft_config: Any = None, callbacks: Sequence[Any] | None = None,
                 tools: Sequence[Callable[..., Any]] | None = None, environment_factory: type | None = None):
        self.args = args if args is not None else DAPOConfig()
        self.trainer = None  # the run's training.trainer.Trainer, once train() has built it
        self.result: RunResult | None = None
        answer = self.args.config.data.answer_field or "answer"
        extra: dict[str, Any] = {}
        if isinstance(model, (str, Path)):
            extra["model.path"] = str(model)
            self.parts = RunParts(tokenizer=processing_class)
        else:
            self.parts = RunParts(model=model, tokenizer=processing_class)
            extra["model.path"] = str(getattr(model, "name_or_path", "") or "<python>:model")
        if train_dataset is not None:
            path, chat = dataset_file(train_dataset, "train_dataset", answer)
            extra["data.train"] = str(path)
            if chat:
                extra["data.use_chat_template"] = True  # TRL applies the chat template to conversational prompts
            extra["data.eval"] = None
        if eval_dataset is not None:
            extra["data.eval"] = str(dataset_file(eval_dataset, "eval_dataset", answer)[0])
        if reward_funcs is not None:
            functions = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
            for fn in functions:
                if not callable(fn):
                    raise ConfigError(f"reward_funcs: {fn!r} is not a function; reward models are not supported, give "
                                      f"fn(prompts, completions, completion_ids, **columns) -> list[float | None]")
            self.parts.reward_functions = functions
            extra["reward.functions"] = [reward_path(fn) for fn in functions]
            extra["reward.weights"] = [float(w) for w in self.args.reward_weights] if self.args.reward_weights is not None else []
        elif self.args.reward_weights is not None:
            extra["reward.weights"] = [float(w) for w in self.args.reward_weights]
        if peft_config is not None:
            extra.update(lora_settings(peft_config))
        if tools:
            extra["rollout.tools"] = [_importable(fn, "tools") for fn in tools]
        if environment_factory is not None:
            extra["rollout.environment"] = _importable(environment_factory, "environment_factory")
        self.extra = extra
        self.config = self.args.resolve(extra)  # every check but the model's and the data's, now
        if self.parts.model is not None and (self.config.model.lora.r > 0 or self.parts.tokenizer is None):
            self._prepare_model_object()
        self.hooks = _Callbacks(self, callbacks or [])

    def _prepare_model_object(self) -> None:
        """A model passed as an object gets what ``load_policy`` gives a loaded folder: a
        tokenizer with a pad token, and LoRA adapters."""
        from dapo_rl.models.lora import add_adapters

        model = self.parts.model
        if self.parts.tokenizer is None:
            from transformers import AutoTokenizer

            self.parts.tokenizer = AutoTokenizer.from_pretrained(self.config.model.path)
        if self.parts.tokenizer.pad_token_id is None:
            self.parts.tokenizer.pad_token = self.parts.tokenizer.eos_token
        lora = self.config.model.lora
        if lora.r > 0:
            add_adapters(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules),
                         base_path=self.config.model.path, init_from=lora.init_from, seed=self.config.seed)

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> RunResult:
        """Run (``dapo train``'s run). ``resume_from_checkpoint``: ``True`` continues the latest
        checkpoint in ``output_dir`` (``resume=true``); a path must be that checkpoint."""
        extra = dict(self.extra)
        if resume_from_checkpoint:
            if not isinstance(resume_from_checkpoint, bool):
                latest = latest_checkpoint(Path(self.config.output_dir))
                if latest is None or Path(resume_from_checkpoint).resolve() != latest.resolve():
                    raise ConfigError(f"resume_from_checkpoint: {resume_from_checkpoint} is not the latest checkpoint of "
                                      f"output_dir ({latest}); dapo-rl resumes the latest exactly: pass True")
            extra["resume"] = True
        config = self.args.resolve(extra)
        if self.parts.tokenizer is not None:
            self._use_chat_template_file(config)
        if self.parts.model is None and self.parts.tokenizer is not None:
            from dapo_rl.training.compose import policy_and_tokenizer

            self.parts.model = policy_and_tokenizer(config, config.logging.progress)[0]
        self.result = run_training(config, self.parts, self.hooks)
        return self.result

    def _use_chat_template_file(self, config: Any) -> None:
        """``data.chat_template`` for a ``processing_class`` too, as ``load_policy``'s tokenizer gets it."""
        from dapo_rl.data.templates import TemplateError, use_chat_template_file

        try:
            use_chat_template_file(self.parts.tokenizer, config.data.chat_template)
        except TemplateError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def model(self) -> Any:
        return self.trainer.model if self.trainer is not None else self.parts.model

    @property
    def state(self) -> Any:
        """transformers' ``TrainerState`` (global_step in optimiser updates, log_history)."""
        return self.hooks.state

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """The policy (or its LoRA adapter) and tokenizer as a ``from_pretrained`` folder."""
        if self.trainer is None:
            raise ConfigError("save_model: nothing trained yet; call train() first")
        return save_policy(self.trainer.model, self.trainer.tokenizer, Path(output_dir or self.config.output_dir))

"""Typed configuration: one dataclass tree, YAML files, ``a.b=c`` overrides (OmegaConf).

Every key, its default and its verl / TRL equivalent is listed in docs/configuration.md. Loading validates types (OmegaConf structured configs) and unknown keys, then the
cross-field rules of :func:`validate`; every failure is a :class:`ConfigError` whose one-line
message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

# Built-in tasks (dapo_rl.data.builtin_tasks): builtin:<task> is the data,
# builtin:<task>-tiny its warmed-up model; these are the quickstart's.
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODEL = "builtin:chain-tiny"
BUILTIN_DATA = "builtin:chain"
# What data.train=builtin:<task> sets unless the config file or an override sets it: the task's
# own model, held-out set and tools, so that the task alone names a complete run.
BUILTIN_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "chain": {},
    "chain-long": {"model.path": "builtin:chain-long-tiny", "data.eval": "builtin:chain-long"},
    "calculator": {
        "model.path": "builtin:calculator-tiny",
        "data.eval": "builtin:calculator",
        "rollout.tools": ["dapo_rl.tools.calculator:calculator"],
        "rollout.max_turns": 3,  # call, answer, and one more try
        "rollout.max_response_length": 64,  # the whole trajectory: call, result and answer take ~25 tokens
        "rollout.max_tool_response_tokens": 32,
        "steps": 80,  # ≥ 90% held-out by step 60 on the seeds measured; 20 more for margin (~30 s)
    },
}
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp2")
LORA_ALL_LINEAR = "all-linear"

# Keys that were renamed or replaced: an old key gets a one-line "did you mean".
REPLACED_KEYS = {
    "advantage.norm_by_std": "advantage.estimator=drgrpo (for norm_by_std=false) or advantage.estimator=grpo (true)",
    "rollout.vllm_dtype": "rollout.dtype (it now sets every engine's sampling precision: auto, float32, bfloat16, float16 for vLLM)",
}


def migrate_saved_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings (``config.yaml`` flattened to dotted keys), written by an earlier
    version, under today's keys with the meaning the run had: ``rollout.vllm_dtype`` becomes
    ``rollout.dtype`` for the vLLM engines, and ``float32`` for the in-process ones (which then
    sampled in fp32 whatever it said)."""
    flat = dict(flat)
    if "rollout.vllm_dtype" in flat:
        old = flat.pop("rollout.vllm_dtype")
        engine = flat.get("rollout.engine", "fast")
        flat.setdefault("rollout.dtype", old if str(engine).startswith("vllm") else "float32")
    return flat


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the fix."""


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the policy: only they train; the base weights stay frozen."""

    r: int = 0  # adapter rank; 0 = off (full fine-tuning)
    alpha: float = 16.0  # the update is B·A·(alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input while training
    target_modules: List[str] = field(default_factory=lambda: [LORA_ALL_LINEAR])  # projection names (q_proj, ...) or all-linear (every linear projection of attention and MLP)
    init_from: Optional[str] = None  # continue from an adapter folder (adapter_config.json + adapter_model.safetensors)


@dataclass
class ModelConfig:
    """The policy: where it comes from, where it runs, and its adapters."""

    path: str = BUILTIN_MODEL  # local Hugging Face folder, or builtin:chain-tiny (built and warmed up locally)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # training products: auto (bf16 autocast where native, hidden >= 256 and measured faster, else float32) | float32 | bf16-autocast
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about a third more compute
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PromptFields:
    """How a dataset's rows become prompts: the keys ``dapo train`` (section ``data``) and ``dapo
    eval`` (top level) share."""

    format: str = "auto"  # auto | jsonl | parquet | hf
    preset: str = "plain"  # plain {prompt, answer} | gsm8k | dapo-math | custom
    prompt_field: Optional[str] = None  # overrides the preset's prompt field (dotted paths allowed)
    answer_field: Optional[str] = None  # overrides the preset's answer field (the ground truth the reward checks)
    template: str = "raw"  # raw | dapo | gsm8k | chat
    use_chat_template: bool = False  # wrap the prompt in the tokenizer's chat template
    chat_template: Optional[str] = None  # a Jinja file replacing the tokenizer's chat template (Hugging Face's convention); e.g. one that renders tools
    max_prompt_length: int = 512  # prompts longer than this (tokens) are skipped and reported
    max_rows: Optional[int] = None  # read at most this many usable rows (dapo train: of data.train); null = all
    builtin_eval_size: int = 256  # problems in a built-in task's held-out split


@dataclass
class DataConfig(PromptFields):
    """What ``dapo train`` trains and evaluates on, and how rows become prompts."""

    train: str = BUILTIN_DATA  # JSONL / Parquet / HF datasets path, or builtin:chain
    eval: Optional[str] = BUILTIN_DATA  # held-out set; null = no periodic evaluation
    builtin_train_size: int = 20000  # problems in a built-in task's training split
    retire_solved_after: int = 0  # retire a prompt all-correct on this many consecutive visits; 0 = never
    unsolved_weight: float = 1.0  # chance a visited, never-solved prompt enters each later pass; 1 = always


@dataclass
class RolloutServerConfig:
    """rollout.engine=vllm-server: a separate vLLM server (``dapo rollout-server``); TRL vllm_mode="server"."""

    url: str = "http://127.0.0.1:8765"  # where the server listens (TRL vllm_server_host/port)
    launch: bool = False  # start a local server on a copy of the policy (free loopback port, random secret)
    api_key: Optional[str] = None  # the server's shared secret; null = $DAPO_RL_SERVER_API_KEY (kept out of config.yaml)
    timeout_s: float = 300.0  # per request and per weight push; a timeout is retried twice, then the server counts as dead
    trainer_host: str = "127.0.0.1"  # this trainer's address as the server's workers reach it (weight push)
    python: Optional[str] = None  # launch=true: the Python with vLLM installed; null = this one
    launch_args: List[str] = field(default_factory=list)  # launch=true: extra vLLM server flags, e.g. [--tensor-parallel-size, "2"]
    start_timeout_s: float = 600.0  # launch=true: how long the server may take to become ready


@dataclass
class MultiTurnFields:
    """Multi-turn rollouts with tools or an environment (docs/tools.md): the keys
    ``dapo train`` (section ``rollout``) and ``dapo eval`` (top level) share. Off while neither
    ``tools`` nor ``environment`` is set."""

    tools: List[str] = field(default_factory=list)  # functions the model may call: [pkg.module:function, ...] (typed, documented)
    environment: Optional[str] = None  # pkg.module:Class with reset(row) and step(text) -> (observation, done); one per trajectory
    tool_parser: str = "hermes"  # how tool calls are written: hermes (<tool_call>{json}</tool_call>) | pkg.module:function
    max_turns: int = 4  # model turns per trajectory (max_response_length bounds the whole trajectory)
    max_tool_response_tokens: int = 256  # a longer tool result or observation is cut (visibly)
    tool_timeout_s: float = 10.0  # a tool call running longer is an error the model sees
    max_environment_failures: int = 20  # consecutive environment failures that stop the run
    tool_wait_steps: int = 0  # fast engine: a row's tools run while the others sample, its reply fed this many decode steps after its turn (0 = the loop waits for each reply)


@dataclass
class RolloutConfig(MultiTurnFields):
    """Sampling the G responses per prompt: the engine, its sampling settings and limits."""

    engine: str = "fast"  # hf (Hugging Face generate on the training model) | fast (same sampling; one prefill per prompt, finished rows dropped) | vllm | vllm-server
    temperature: float = 1.0  # sampling temperature; the trainer's log-probs use it too (TRL temperature)
    top_p: float = 1.0  # nucleus sampling; 1.0 = off (TRL top_p)
    top_k: int = 0  # 0 = off
    max_response_length: int = 16  # L_max: new tokens per response; longer ones are truncated
    stop_token_ids: List[int] = field(default_factory=list)  # besides EOS
    max_batch_prompts: int = 64  # in-process engines: prompts sampled together in one call (with their G samples each)
    verify_sync: bool = True  # after every weight push, check that the engine samples from the new weights
    dtype: str = "auto"  # sampling precision: auto (bfloat16 where native and measured faster, else float32; vLLM: bfloat16 on GPU) | float32 | bfloat16 | float16 (vLLM only). Logits, sampling, log-probs stay float32 (verl rollout.dtype)
    # rollout.engine=vllm only (optional extra; see docs/scaling-out.md "vLLM rollouts"):
    vllm_max_model_len: Optional[int] = None  # prompt + response tokens; null = the model's max_position_embeddings
    vllm_gpu_memory_utilization: float = 0.4  # fraction of GPU memory for vLLM (weights + KV cache); leave room for training
    vllm_kv_cache_gb: Optional[float] = None  # KV cache GiB; null = 1 on CPU, from vllm_gpu_memory_utilization on GPU
    vllm_enforce_eager: Optional[bool] = None  # no CUDA graphs / compilation; null = true on CPU, false on GPU
    vllm_sleep: bool = False  # GPU: free vLLM's memory (sleep level 1) while training; ignored on CPU
    server: RolloutServerConfig = field(default_factory=RolloutServerConfig)
    async_steps: int = 0  # 1 = one-step-off: the server samples step k+1's first round while step k trains (vllm-server only)


@dataclass
class RolloutCorrectionConfig:
    """π_rollout (the sampler's log-probs) against π_old (the trainer's): see algorithm/rollout_correction.py."""

    mode: str = "auto"  # auto (none when sampler and trainer are both fp32 on the same weights; token_truncate otherwise: vllm, bf16 sampling or training) | none | token_truncate | token_mask | sequence_truncate | sequence_mask
    cap: float = 2.0  # C: truncate at C; mask outside [1/C, C]


@dataclass
class RewardConfig:
    """How a response is scored (before the soft overlong penalty)."""

    function: str = "auto"  # auto (chain for builtin data, else math) | math | dapo | gsm8k | boxed | exact | pkg.module:fn
    correct: float = 1.0  # reward of a correct response (paper: +1)
    incorrect: float = -1.0  # reward of a wrong one (paper: -1)
    timeout_s: float = 5.0  # per verification; a hang counts as a failed verification
    functions: List[str] = field(default_factory=list)  # TRL-style fn(prompts, completions, completion_ids, **columns) -> list[float | None] as pkg.module:fn; summed with weights, replace function when set (TRL reward_funcs)
    weights: List[float] = field(default_factory=list)  # one per entry of functions; empty = all 1 (TRL reward_weights)


@dataclass
class ClipConfig:
    """The ratio's trust region (Clip-Higher: eps_high > eps_low)."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.28  # Clip-Higher: above at 1 + eps_high (= eps_low for symmetric PPO/GRPO)
    dual_clip_c: Optional[float] = None  # > 1 bounds the loss of negative-advantage tokens by c·|A|


@dataclass
class LossConfig:
    """The policy loss and what is added to it (see algorithm/policy_loss.py and docs/algorithms.md). The
    loss hyper-parameters below ``entropy_coef`` carry verl's names and
    defaults; each is read only by the loss it names, and checked by
    :class:`~dapo_rl.algorithm.policy_loss.LossSettings`."""

    policy_loss: str = "decoupled_clip"  # decoupled_clip (DAPO) | gspo | cispo | clip_cov | kl_cov | geo_mean | sapo | dppo_tv | dppo_kl | pkg.module:function
    agg_mode: str = "token-mean"  # token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum | seq-mean-token-sum-norm (Dr. GRPO)
    norm_constant: Optional[int] = None  # C of seq-mean-token-sum-norm; null = rollout.max_response_length
    kl_coef: float = 0.0  # KL to a frozen reference model; DAPO removes it (0)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0  # entropy bonus: loss − coef·H, H aggregated like the loss (agg_mode); verl actor.entropy_coeff; 0 = off
    clip_cov_ratio: float = 2e-4  # clip_cov: fraction of the batch's tokens whose gradient is dropped
    clip_cov_lb: float = 1.0  # clip_cov: a dropped token's covariance lies in (clip_cov_lb, clip_cov_ub)
    clip_cov_ub: float = 5.0  # clip_cov: upper bound of that covariance interval
    kl_cov_ratio: float = 2e-4  # kl_cov: fraction of the tokens, those of largest covariance, that get the KL term
    ppo_kl_coef: float = 0.1  # kl_cov: the KL term is ppo_kl_coef·|log π_θ − log π_old|
    tau_pos: float = 1.0  # sapo: gate temperature for positive advantages
    tau_neg: float = 1.05  # sapo: gate temperature for the others


@dataclass
class AdvantageConfig:
    """Group-relative advantages from the G rewards of a prompt."""

    estimator: str = "grpo"  # grpo (divide by the group std; DAPO) | drgrpo (no std) | pkg.module:function
    eps: float = 1e-6  # added to the group std before dividing


@dataclass
class OverlongConfig:
    """Overlong reward shaping for responses that reach rollout.max_response_length."""

    filter: bool = True  # overlong filtering: truncated responses leave the loss
    soft_punishment: bool = True  # add the soft overlong penalty to the reward
    cache_length: int = 4  # L_cache: the penalty ramps from 0 at L_max - L_cache to -1 at L_max


@dataclass
class DynamicSamplingConfig:
    """Which groups a step trains on, and how rounds are sized (see algorithm/dynamic_sampling.py)."""

    enabled: bool = True  # keep only informative groups (criterion below); off = every group
    criterion: str = "accuracy"  # accuracy (lo < #correct/G < hi) | reward_std (std of rewards > min_reward_std) | pkg.module:function
    accuracy_range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # [lo, hi] of criterion=accuracy; (0, 1) = DAPO
    min_reward_std: float = 0.0  # criterion=reward_std keeps groups whose reward std exceeds this
    max_rounds: int = 8  # generation rounds allowed per step
    on_exhausted: str = "train"  # train (on the groups found; none = skip the update) | error
    surplus: str = "keep"  # keep (carry to next step) | drop
    max_surplus_age: int = 1  # carried groups sampled more than this many optimiser updates ago are dropped
    max_prompts_per_round: Optional[int] = None  # largest generation round; null = 4 × prompts_per_step
    oversample_margin: float = 1.3  # a round asks ceil(margin · missing / p̂) prompts


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (one optimiser update per mini-batch)."""

    lr: float = 2e-4  # peak learning rate, reached after warm-up
    warmup_updates: int = 2  # linear warm-up, in optimiser updates
    schedule: str = "constant"  # constant | cosine (after warm-up)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.99  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class EvalConfig:
    """Periodic evaluation on data.eval (avg@k, pass@k)."""

    interval: int = 10  # steps between held-out evaluations (0 = only before and after)
    samples_per_prompt: int = 4  # k of avg@k / pass@k
    temperature: float = 1.0  # sampling temperature of the evaluation; 0 = greedy
    top_p: float = 1.0  # nucleus sampling of the evaluation; 1.0 = off
    greedy: bool = False  # also report greedy accuracy


@dataclass
class CheckpointConfig:
    """Checkpoints in output_dir/checkpoints (resume=true continues the latest exactly)."""

    interval: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept; older ones are removed (0 = keep all)


@dataclass
class LoggingConfig:
    """Where per-step metrics go (output_dir/metrics.jsonl always)."""

    sinks: List[str] = field(default_factory=lambda: ["jsonl"])  # jsonl (always) | tensorboard | wandb
    run_name: Optional[str] = None  # the run's name in TensorBoard / W&B; null = output_dir's folder name
    wandb_project: str = "dapo-rl"  # W&B project
    wandb_mode: str = "offline"  # W&B mode: offline | online | disabled
    progress: bool = True  # show the progress bar


@dataclass
class DistributedConfig:
    """How ranks share the model under ``torchrun`` (ignored in a single process)."""

    strategy: str = "ddp"  # ddp (every rank holds the whole model; DistributedDataParallel) | fsdp2 (parameters, gradients and optimiser state sharded with fully_shard)
    reshard_after_forward: bool = True  # fsdp2: free gathered parameters after each forward (less memory, one more all-gather in backward)


@dataclass
class QuickstartConfig:
    """The built-in model's supervised warm-up (cached by these settings)."""

    warmup_steps: Optional[int] = None  # None = the task's own (chain 300, chain-long 800: a wider prompt takes longer to learn)
    warmup_batch: int = 64  # sequences per warm-up step
    warmup_lr: float = 3e-3  # warm-up learning rate
    step_error: float = 0.3  # probability of a wrong running sum in the warm-up data
    recheck: float = 0.5  # probability of each extra "=S" re-check in the warm-up data
    hidden_size: int = 64  # width of the built-in model (4 heads)
    num_layers: int = 2  # decoder layers of the built-in model
    cache_dir: Optional[str] = None  # default ~/.cache/dapo-rl


@dataclass
class Config:
    """One training run (``dapo train``)."""

    output_dir: str = "runs/quickstart"  # the run folder: config.yaml, metrics.jsonl, checkpoints/, final/
    seed: int = 0  # seeds sampling, the prompt order and the built-in model
    reproducible: bool = True  # bit-identical reruns at a fixed thread count: deterministic torch kernels (see dapo_rl.reproducibility)
    steps: int = 60  # training steps (one rollout batch each)
    prompts_per_step: int = 16  # B: informative groups per step
    group_size: int = 8  # G: responses per prompt
    mini_batch_size: int = 16  # prompts per optimiser update (B / this = updates per step)
    micro_batch_size: Optional[int] = None  # samples per forward/backward (gradient accumulation); null = the largest divisor of mini_batch_size × group_size up to 128
    ppo_epochs: int = 1  # passes over each rollout batch
    resume: bool = False  # continue the latest checkpoint in output_dir
    overwrite: bool = False  # replace a different run in output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)


def _field(key: str) -> tuple[Any, Any] | None:
    """The declared type and default of a dotted key, or None if no such key exists."""
    cls: Any = Config
    hint: Any = None
    default: Any = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        found = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if found is None:
            return None
        hint = get_type_hints(cls)[part]
        if found.default is not dataclasses.MISSING:
            default = found.default
        elif found.default_factory is not dataclasses.MISSING:
            default = found.default_factory()
        else:
            default = None
        cls = hint
    return hint, default


def _is_section(key: str) -> bool:
    info = _field(key)
    return info is not None and dataclasses.is_dataclass(info[0])


def _describe_type(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Union and len(args) == 1:
        return f"{_describe_type(args[0])} or null"
    if get_origin(hint) in (list, List):
        return "a list such as [a,b]"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(hint, getattr(hint, "__name__", str(hint)))


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's (often multi-line) message as one line that names the key and the fix."""
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if "not in" in msg and ("Key '" in msg or isinstance(exc, ConfigKeyError)):
        if key in REPLACED_KEYS:
            return f"config key '{key}' was replaced; did you mean {REPLACED_KEYS[key]}? (see docs/configuration.md, or dapo train --help)"
        hint = re.search(r"Did you mean: '([^']+)'", str(exc))
        suggestion = ""
        if hint:
            parent = key.rpartition(".")[0] if key else ""
            suggestion = f"; did you mean '{parent + '.' if parent else ''}{hint.group(1)}'?"
        return f"unknown config key '{key}'{suggestion or '; check the spelling'} (see docs/configuration.md, or dapo train --help)"
    if key:
        info = _field(key)
        if info is not None and not dataclasses.is_dataclass(info[0]):
            hint_type, default = info
            return f"config key '{key}': {msg}; expected {_describe_type(hint_type)}, e.g. {key}={_format_default(default)} (the default)"
        return f"config key '{key}': {msg}"
    return msg


def _check_sections_in_overrides(overrides: list[str]) -> None:
    """``clip=3`` would otherwise surface as OmegaConf's "int is not a subclass of ClipConfig"."""
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("+~")
        if _is_section(key):
            first = dataclasses.fields(_field(key)[0])[0].name  # type: ignore[index]
            raise ConfigError(f"config key '{key}' is a section, not a value; set one of its keys, e.g. {key}.{first}=...")


def _check_sections_in_file(data: Any, path: Path, prefix: str = "") -> None:
    """A section given a plain value in YAML (``clip: 3``): name the key and the file."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        key = f"{prefix}{name}"
        if _is_section(key):
            if value is not None and not isinstance(value, dict):
                first = dataclasses.fields(_field(key)[0])[0].name  # type: ignore[index]
                raise ConfigError(f"config file {path}: '{key}' is a section and must hold keys, not {value!r}; "
                                  f"write e.g. '{key}: {{{first}: ...}}' or indent its keys under '{key}:'")
            _check_sections_in_file(value, path, key + ".")


def _read_yaml(path: Path) -> DictConfig:
    """The file's top-level mapping; a syntax error names the file, line and column."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file or none")
    try:
        # OmegaConf's loader, not plain PyYAML: it reads 1e-6 as a float (YAML 1.1 reads text).
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}: invalid YAML{where} ({problem}); fix the syntax (keys as 'name: value', nested by indentation)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc}); pass a readable UTF-8 YAML file") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file {path}: {str(exc).splitlines()[0]}; check the file's keys and values") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys (like 'steps: 100'), not a list")
    data = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys (like 'steps: 100'), not {type(data).__name__}")
    _check_sections_in_file(data, path)
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, saved_run: bool = False) -> Config:
    """Defaults ← YAML file ← ``a.b=c`` overrides, type-checked and validated. ``saved_run``: the
    file is a run folder's ``config.yaml``, perhaps written by an earlier version
    (:func:`migrate_saved_keys`).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type, or a rule of :func:`validate`.
    """
    schema = OmegaConf.structured(Config)
    overrides = list(overrides or [])
    layers: list[Any] = [schema]
    if path is not None:
        layer = _read_yaml(Path(path))
        if saved_run:
            flat = migrate_saved_keys(flatten_settings(OmegaConf.to_container(layer)))
            layer = OmegaConf.create({})
            for key, value in flat.items():
                OmegaConf.update(layer, key, value)
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100)")
    _check_sections_in_overrides(overrides)
    try:
        layers.append(OmegaConf.from_dotlist(overrides))
        layers[1:1] = [_task_defaults(OmegaConf.merge(*layers[1:]))]
        merged = OmegaConf.merge(*layers)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a YAML syntax error inside an override value
        raise ConfigError(f"cannot read the overrides: {' '.join(str(exc).split())}") from None
    if config.micro_batch_size is None and config.mini_batch_size >= 1 and config.group_size >= 1:
        config.micro_batch_size = default_micro_batch_size(config.mini_batch_size * config.group_size)
    validate(config)
    return config


def flatten_settings(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings (a config as plain dicts) as ``{"a.b.c": value}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten_settings(value, f"{prefix}{key}."))
    return out


def _task_defaults(given: DictConfig) -> DictConfig:
    """The settings of :data:`BUILTIN_TASK_DEFAULTS` for the task ``given``'s ``data.train`` names
    (empty for a dataset path), as a layer under what the user gave."""
    train = OmegaConf.select(given, "data.train", default=BUILTIN_DATA)
    layer = OmegaConf.create({})
    if isinstance(train, str) and train.startswith(BUILTIN_PREFIX):
        for key, value in BUILTIN_TASK_DEFAULTS.get(train.removeprefix(BUILTIN_PREFIX), {}).items():
            OmegaConf.update(layer, key, value)
    return layer


def default_micro_batch_size(samples_per_mini_batch: int, cap: int = 128) -> int:
    """``micro_batch_size: null``: the largest divisor of a mini-batch's samples that is at most
    ``cap`` (the whole mini-batch when it fits; e.g. 32 → 32, 256 → 128, 200 → 100)."""
    return max(d for d in range(1, min(samples_per_mini_batch, cap) + 1) if samples_per_mini_batch % d == 0)


def _redacted(config: Config) -> Config:
    """The config without secrets: what gets written to files and metric backends."""
    if config.rollout.server.api_key is None:
        return config
    return dataclasses.replace(config, rollout=dataclasses.replace(
        config.rollout, server=dataclasses.replace(config.rollout.server, api_key="<redacted>")))


def to_yaml(config: Config) -> str:
    """The config as YAML (secrets redacted)."""
    return OmegaConf.to_yaml(OmegaConf.structured(_redacted(config)))


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain dicts (secrets redacted)."""
    return OmegaConf.to_container(OmegaConf.structured(_redacted(config)))  # type: ignore[return-value]


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise the :class:`ConfigError` ``"{key}: {problem}; {fix}"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {problem}; {fix}")


def require_choice(value: str, key: str, choices: tuple[str, ...] | list[str]) -> None:
    """``value`` must be one of ``choices``; the error lists them."""
    require(value in choices, key, f"{value!r} is not valid", f"use one of {', '.join(choices)}")


def validate(c: Config) -> None:
    """The rules of the keys this file owns that types alone cannot express. Names looked up in a
    registry (losses, engines, rewards, datasets' formats, sinks) and the settings an algorithm
    object checks itself (``clip``, ``dynamic_sampling``) are checked by
    :func:`dapo_rl.training.compose.check_config`, on the floor that owns them."""
    require(c.steps >= 1, "steps", f"must be >= 1, got {c.steps}", "set steps=1 or more")
    require(c.group_size >= 2, "group_size", f"must be >= 2 for group-relative advantages, got {c.group_size}", "set group_size=2 or more (paper: 16)")
    require(c.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {c.prompts_per_step}", "set prompts_per_step=1 or more")
    require(c.mini_batch_size >= 1 and c.prompts_per_step % c.mini_batch_size == 0, "mini_batch_size",
             f"{c.mini_batch_size} does not divide prompts_per_step={c.prompts_per_step}", "choose a divisor of prompts_per_step")
    samples_per_mini = c.mini_batch_size * c.group_size
    require(c.micro_batch_size is not None and c.micro_batch_size >= 1 and samples_per_mini % c.micro_batch_size == 0, "micro_batch_size",
             f"{c.micro_batch_size} does not divide the mini-batch of {samples_per_mini} samples (mini_batch_size × group_size)",
             "choose a divisor of mini_batch_size × group_size")
    require(c.ppo_epochs >= 1, "ppo_epochs", f"must be >= 1, got {c.ppo_epochs}", "set ppo_epochs=1 or more")
    require(c.loss.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {c.loss.kl_coef}", "0 disables the KL term")
    require(c.loss.norm_constant is None or c.loss.norm_constant > 0, "loss.norm_constant", "must be positive", "use null for max_response_length")
    L = c.rollout.max_response_length
    require(L >= 1, "rollout.max_response_length", f"must be >= 1, got {L}", "set a positive token count")
    require(c.rollout.temperature > 0, "rollout.temperature", f"must be > 0 for sampling, got {c.rollout.temperature}", "paper: 1.0")
    require(0 < c.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {c.rollout.top_p}", "1.0 disables it")
    require(c.rollout.top_k >= 0, "rollout.top_k", f"must be >= 0, got {c.rollout.top_k}", "0 disables it")
    require(c.rollout.max_batch_prompts >= 1, "rollout.max_batch_prompts", f"must be >= 1, got {c.rollout.max_batch_prompts}", "default 64")
    require(c.rollout_correction.cap > 1, "rollout_correction.cap", f"must be > 1, got {c.rollout_correction.cap}",
             "e.g. 2 (truncate weights at 2; mask outside [0.5, 2])")
    require_choice(c.rollout.dtype, "rollout.dtype", ("auto", "float32", "bfloat16", "float16"))
    require(c.rollout.dtype != "float16" or c.rollout.engine in ("vllm", "vllm-server"), "rollout.dtype",
            f"float16 is for the vLLM engines, not rollout.engine={c.rollout.engine}", "use bfloat16 (or auto)")
    require(c.rollout.dtype in ("auto", "float32") or c.rollout.engine != "hf", "rollout.dtype",
            "the hf engine samples in the training model's own dtype", "use rollout.engine=fast for bfloat16 sampling")
    _validate_server(c)
    require(0 < c.rollout.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization",
             f"must be in (0, 1], got {c.rollout.vllm_gpu_memory_utilization}", "e.g. 0.4, leaving the rest for training")
    if c.overlong.soft_punishment:
        require(0 < c.overlong.cache_length < L, "overlong.cache_length",
                 f"L_cache={c.overlong.cache_length} must be > 0 and < rollout.max_response_length={L}",
                 "choose a smaller cache_length (paper: 4096 of 20480)")
    require(c.optim.lr > 0, "optim.lr", f"must be > 0, got {c.optim.lr}", "paper: 1e-6 for 32B models")
    require_choice(c.optim.schedule, "optim.schedule", ("constant", "cosine"))
    require(c.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0", "0 disables clipping")
    require(c.eval.samples_per_prompt >= 1, "eval.samples_per_prompt", "must be >= 1", "e.g. 4")
    require(c.eval.interval >= 0, "eval.interval", "must be >= 0", "0 evaluates only before and after training")
    require(c.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0", "0 checkpoints only at the end")
    require(c.reward.correct > c.reward.incorrect, "reward.correct", "must be greater than reward.incorrect", "paper: +1 / -1")
    require(c.reward.timeout_s > 0, "reward.timeout_s", "must be > 0", "e.g. 5")
    require(not c.reward.weights or len(c.reward.weights) == len(c.reward.functions), "reward.weights",
            f"has {len(c.reward.weights)} entries for {len(c.reward.functions)} reward.functions", "give one weight per function, or none")
    require_choice(c.distributed.strategy, "distributed.strategy", DISTRIBUTED_STRATEGIES)
    require_choice(c.model.dtype, "model.dtype", ("auto", "float32", "bf16-autocast"))
    require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", c.model.device) is not None, "model.device",
             f"{c.model.device!r} is not a device", "use auto, cpu, cuda or cuda:N")
    require(bool(c.model.path.strip()), "model.path", "is empty", f"give a local Hugging Face model folder or {BUILTIN_MODEL}")
    require(not (c.resume and c.overwrite), "resume", "resume=true and overwrite=true contradict each other", "choose one")
    require(bool(c.output_dir.strip()), "output_dir", "is empty", "give a folder path, e.g. output_dir=runs/my-run")
    _validate_data(c)
    _validate_lora(c)
    require(c.optim.warmup_updates >= 0, "optim.warmup_updates", f"must be >= 0, got {c.optim.warmup_updates}", "0 disables warm-up")
    require(0 <= c.optim.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {c.optim.beta1}", "default 0.9")
    require(0 <= c.optim.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {c.optim.beta2}", "default 0.99")
    require(c.optim.eps > 0, "optim.eps", f"must be > 0, got {c.optim.eps}", "default 1e-8")
    require(c.optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {c.optim.weight_decay}", "0 disables it")
    require(c.advantage.eps >= 0, "advantage.eps", f"must be >= 0, got {c.advantage.eps}", "default 1e-6")
    require(all(t >= 0 for t in c.rollout.stop_token_ids), "rollout.stop_token_ids", "token ids must be >= 0", "list token ids, e.g. [2]")
    require(c.eval.temperature >= 0, "eval.temperature", f"must be >= 0, got {c.eval.temperature}", "0 = greedy, paper: 1.0")
    require(0 < c.eval.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {c.eval.top_p}", "1.0 disables it")
    require(c.checkpoint.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {c.checkpoint.keep_last}", "0 keeps every checkpoint")
    q = c.quickstart
    for key, value in (("warmup_steps", q.warmup_steps), ("warmup_batch", q.warmup_batch), ("num_layers", q.num_layers)):
        require(value is None or value >= 1, f"quickstart.{key}", f"must be >= 1, got {value}", "see the defaults in config.py")
    require(q.hidden_size >= 4 and q.hidden_size % 4 == 0, "quickstart.hidden_size", f"must be a positive multiple of 4 (4 heads), got {q.hidden_size}", "default 64")
    require(q.warmup_lr > 0, "quickstart.warmup_lr", f"must be > 0, got {q.warmup_lr}", "default 3e-3")
    for key, value in (("step_error", q.step_error), ("recheck", q.recheck)):
        require(0 <= value <= 1, f"quickstart.{key}", f"is a probability, got {value}", "choose a value in [0, 1]")


def _validate_server(c: Config) -> None:
    r, sc = c.rollout, c.rollout.server
    validate_multi_turn_fields(r, "rollout.")
    require(r.async_steps == 0 or not (r.tools or r.environment), "rollout.async_steps",
            "one-step-off overlap does not take multi-turn rollouts yet", "set rollout.async_steps=0")
    require(r.async_steps in (0, 1), "rollout.async_steps", f"must be 0 or 1, got {r.async_steps}",
            "0 = sample and train in turn, 1 = one-step-off overlap")
    require(sc.timeout_s > 0, "rollout.server.timeout_s", f"must be > 0, got {sc.timeout_s}", "e.g. 300")
    require(sc.start_timeout_s > 0, "rollout.server.start_timeout_s", f"must be > 0, got {sc.start_timeout_s}", "e.g. 600")


def _validate_data(c: Config) -> None:
    d = c.data
    require(bool(d.train.strip()), "data.train", "is empty", f"give a dataset path or {BUILTIN_DATA}")
    validate_prompt_fields(d, "data.")
    require(d.builtin_train_size >= 1, "data.builtin_train_size", f"must be >= 1, got {d.builtin_train_size}", "default 20000")
    require(d.retire_solved_after >= 0, "data.retire_solved_after", f"must be >= 0, got {d.retire_solved_after}", "0 never retires a prompt")
    require(0 <= d.unsolved_weight <= 1, "data.unsolved_weight", f"must be in [0, 1], got {d.unsolved_weight}", "1 samples unsolved prompts as often as any")


def validate_multi_turn_fields(f: MultiTurnFields, prefix: str = "") -> None:
    """The rules of the :class:`MultiTurnFields` that need no import (``prefix``: ``"rollout."``
    for ``dapo train``, none for ``dapo eval``)."""
    require(f.max_turns >= 1, f"{prefix}max_turns", f"must be >= 1, got {f.max_turns}", "e.g. 4")
    require(f.max_tool_response_tokens >= 1, f"{prefix}max_tool_response_tokens", f"must be >= 1, got {f.max_tool_response_tokens}", "e.g. 256")
    require(f.tool_timeout_s > 0, f"{prefix}tool_timeout_s", f"must be > 0, got {f.tool_timeout_s}", "e.g. 10")
    require(f.tool_wait_steps >= 0, f"{prefix}tool_wait_steps", f"must be >= 0, got {f.tool_wait_steps}", "e.g. 16, or 0 to wait for each reply")
    require(f.max_environment_failures >= 1, f"{prefix}max_environment_failures", f"must be >= 1, got {f.max_environment_failures}", "default 20")
    require(not (f.tools and f.environment), f"{prefix}tools", f"and {prefix}environment are both set",
            "give tools, or an environment (whose step() may call your functions itself)")


def validate_prompt_fields(f: PromptFields, prefix: str = "") -> None:
    """The rules of the :class:`PromptFields` that need no registry (``prefix``: their section,
    ``"data."`` for ``dapo train``, none for ``dapo eval``); their names are checked by
    :func:`dapo_rl.data.check_prompt_fields`."""
    if f.preset == "custom":
        require(bool(f.prompt_field) and bool(f.answer_field), f"{prefix}preset", f"custom needs {prefix}prompt_field and {prefix}answer_field",
                f"set both, e.g. {prefix}prompt_field=question {prefix}answer_field=solution")
    require(f.max_prompt_length >= 1, f"{prefix}max_prompt_length", f"must be >= 1, got {f.max_prompt_length}", "default 512")
    require(f.max_rows is None or f.max_rows >= 1, f"{prefix}max_rows", f"must be >= 1 or null, got {f.max_rows}", "null reads every row")
    require(f.builtin_eval_size >= 1, f"{prefix}builtin_eval_size", f"must be >= 1, got {f.builtin_eval_size}", "or data.eval=null for no evaluation")


def _validate_lora(c: Config) -> None:
    """What can be checked without the model (target module names and ``init_from``'s base are
    checked when the model is loaded, :func:`dapo_rl.models.lora.add_adapters`)."""
    lora = c.model.lora
    require(lora.r >= 0, "model.lora.r", f"must be >= 0, got {lora.r}", "0 turns LoRA off; e.g. 16")
    if lora.r == 0:
        require(lora.init_from is None, "model.lora.init_from", "is set but model.lora.r=0 (LoRA off)",
                 "set model.lora.r to the adapter's rank, or init_from=null")
        return
    require(lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {lora.alpha}", "e.g. 2 × r")
    require(0 <= lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lora.dropout}", "0 disables it")
    require(len(lora.target_modules) > 0, "model.lora.target_modules", "is empty", f"use [{LORA_ALL_LINEAR}] or names such as [q_proj,v_proj]")

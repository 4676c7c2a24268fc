"""The `fast` rollout engine (`DecoderEngine`): sampling that does only the work that can change the samples.

Compared with :class:`~dapo_rl.rollout.hf.HFGenerateEngine` (``generate`` with
``num_return_sequences=G``), for B prompts × G samples:

- **One prefill per prompt.** The B prompts are prefilled once (``[B, P]``), then their KV cache
  and last logits are repeated G times; ``generate`` prefills ``[B·G, P]``.
- **Finished rows leave the batch.** When rows emit a stop token their KV cache rows are dropped
  and the next decode steps run on the rows still going (the batch shrinks through a fixed ladder
  of row counts, :func:`ladder_rows`); ``generate`` keeps decoding them as padding until the
  longest row ends.
- **A pre-allocated KV cache.** Each layer's keys/values live in one ``[rows, heads, P + T, d]``
  buffer written in place, instead of ``torch.cat``-ing a new tensor every step (quadratic copying).
- **Sampler log-probs.** Each token comes with ``log softmax(logits / T)`` of the token
  (``Sample.logprobs``), the quantity the trainer computes, so an exactly on-policy trainer could
  skip its own log-prob pass.

Sampling draws from the same distribution as Hugging Face ``generate``: ``softmax(logits / T)``
after top-k (keep tokens whose logit ties or beats the k-th largest) and then top-p (keep the
smallest set of most likely tokens whose probability reaches p, at least one), by inverse
transform sampling (:func:`draw`: ``torch.multinomial``'s distribution from one uniform per row)
on the global torch RNG, so ``torch.manual_seed`` makes runs reproducible.
``temperature == 0`` is greedy (argmax).

Decode steps run on :class:`~dapo_rl.models.decode.SpecDecoder` for every model a
:class:`~dapo_rl.models.spec.ModelSpec` describes (Llama, Qwen2/3, Mistral, Phi-3, Gemma2/3;
sliding windows included). Any other causal LM that accepts ``past_key_values``/``position_ids``
decodes through its Hugging Face ``forward`` (announced once), with Hugging Face's own
``DynamicCache`` for sliding-window layers (still one prefill per prompt and dropping finished rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dapo_rl.config import ConfigError
from dapo_rl.models.decode import SpecDecoder
from dapo_rl.models.lora import adapters_active
from dapo_rl.models.precision import Precision, product_shape, resolve_precision
from dapo_rl.models.spec import fast_spec, has_sliding_layers
from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, InProcessEngine, Sample, SamplingParams
import dapo_rl.rollout.decoder_turns as decoder_turns
from dapo_rl.rollout.hf import left_pad

if TYPE_CHECKING:
    from dapo_rl.config import Config

F = torch.nn.functional


class _PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in a buffer ``[rows, heads, capacity, d]`` filled left to right.

    ``self.keys`` / ``self.values`` are views ``buffer[:rows, :, :length]``, so everything in
    transformers that reads a ``DynamicLayer`` (sequence length, mask sizes) keeps working.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.rows = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buffer = torch.empty((b, h, self.capacity, d), dtype=key_states.dtype, device=key_states.device)
        self.value_buffer = torch.empty((b, value_states.shape[1], self.capacity, value_states.shape[3]),
                                        dtype=value_states.dtype, device=value_states.device)
        self.rows = b
        self.length = 0
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self.key_buffer[: self.rows, :, : self.length]
        self.values = self.value_buffer[: self.rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``[rows, heads, q, d]`` new states after the cached ones; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.length + q > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
        self.key_buffer[: self.rows, :, self.length : self.length + q] = key_states
        self.value_buffer[: self.rows, :, self.length : self.length + q] = value_states
        self.length += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Rows ``[b]`` → ``[b·repeats]`` (row i becomes rows i·repeats … i·repeats + repeats − 1)."""
        if not self.is_initialized:
            return
        # A fresh buffer with room for the grown batch; only the filled part is copied.
        filled = slice(0, self.length)
        new_k = self.key_buffer.new_empty((self.rows * repeats, *self.key_buffer.shape[1:]))
        new_v = self.value_buffer.new_empty((self.rows * repeats, *self.value_buffer.shape[1:]))
        new_k[:, :, filled] = self.key_buffer[: self.rows, :, filled].repeat_interleave(repeats, dim=0)
        new_v[:, :, filled] = self.value_buffer[: self.rows, :, filled].repeat_interleave(repeats, dim=0)
        self.key_buffer, self.value_buffer = new_k, new_v
        self.rows *= repeats
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (ascending), compacted to the front of the buffer in place."""
        if not self.is_initialized:
            return
        k = indices.numel()
        # Advanced indexing makes a copy first, so overlapping source and destination are safe.
        self.key_buffer[:k, :, : self.length] = self.key_buffer[indices, :, : self.length]
        self.value_buffer[:k, :, : self.length] = self.value_buffer[indices, :, : self.length]
        self.rows = k
        self._views()


def ladder_rows(running: int) -> int:
    """The decode batch's row count while ``running`` rows are unfinished: the smallest ladder
    value ≥ ``running``. The ladder is 1…8, then four values per doubling (10, 12, 14, 16, 20, 24,
    28, 32, 40, 48, …), so a batch carries at most a quarter of dead rows, and up to 64 rows
    there are 20 distinct counts."""
    if running <= 8:
        return running
    step = 1 << ((running - 1).bit_length() - 3)
    return -(-running // step) * step


def _make_cache(model, capacity: int) -> Cache:
    config = model.config
    if has_sliding_layers(config):
        return DynamicCache(config=config)
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(layers)])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p masking of ``[rows, vocab]`` (already temperature-scaled) logits.

    Removed tokens get ``-inf``. Semantics follow Hugging Face's ``TopKLogitsWarper`` (keep every
    token whose logit is ≥ the k-th largest, so ties at the boundary stay) and
    ``TopPLogitsWarper`` (sort ascending, drop tokens whose cumulative probability is ≤ 1 − p,
    always keep the most likely one).
    """
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``[rows, vocab]`` float logits.

    Returns ``tokens [rows]`` (long) and ``logprobs [rows]``: ``log softmax(logits / T)`` at the
    token (T = 1 when greedy), before top-k/top-p, i.e. what the trainer's log-prob pass computes.
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    scaled = logits / params.temperature if params.temperature != 1.0 else logits  # x / 1 == x exactly
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    if params.top_k or params.top_p < 1.0:
        probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    else:
        probs = logprobs_all.exp()  # softmax(scaled), reusing the log-softmax
    tokens = draw(probs)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [rows, vocab]`` (non-negative, rows need not sum to 1), drawn
    with probability proportional to its entry: ``torch.multinomial(probs, 1)``'s distribution, by
    inverse transform sampling.

    ``torch.multinomial`` draws an exponential variate for every vocabulary entry of every row;
    over a 50k–150k vocabulary that is a large share of a small model's sampling step. Here each row takes
    one uniform ``u`` from the global torch RNG (so ``torch.manual_seed`` reproduces the draws),
    scaled to the row's total, and picks the first token whose cumulative sum (float64, so a
    150k-entry sum loses nothing that matters) exceeds it. A zero-probability token is never
    drawn: its cumulative sum equals its predecessor's. Returns ``[rows]`` long.
    """
    cumulative = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # [rows, vocab]
    total = cumulative[:, -1:]
    # u < total always (a product that rounds up to the total would pick past the last positive token).
    u = torch.minimum(torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)


def sampling_precision(setting: str, model) -> Precision:
    """What ``rollout.dtype`` (``auto``, ``float32``, ``bfloat16``) means for the fast engine
    sampling from ``model`` (:func:`~dapo_rl.models.precision.resolve_precision`, probing the fused
    gate/up product at a decode step's row count). The model's own dtype where the direct decoder
    cannot cast: a model it does not serve, or one whose LoRA adapters it reads in place.

    Raises:
        ConfigError: ``bfloat16`` asked for explicitly where it cannot be had (the message names ``rollout.dtype``).
    """
    own = next(model.parameters()).dtype
    precision = resolve_precision(setting, next(model.parameters()).device, *product_shape(model.config), use="decode")
    if precision.dtype == own:
        return precision
    blocker = ("the fast decoder does not serve this model" if fast_spec(model, 1) is None
               else "its LoRA adapters are read in place" if adapters_active(model) else None)
    if blocker is None:
        return precision
    if setting == "auto":
        return Precision(own, f"auto: the model's {str(own).removeprefix('torch.')}, {blocker}")
    raise ConfigError(f"rollout.dtype={setting}: the fast engine samples in the model's own dtype here ({blocker}); "
                     f"set rollout.dtype=auto")


class DecoderEngine(InProcessEngine):
    """Samples from the training model itself with one prefill per prompt and finished-row dropping.

    Args:
        model: a Hugging Face causal LM (the policy being trained; no weight copy is made).
        pad_token_id: id used to left-pad prompts (never attended to).
        eos_token_id: the tokenizer's EOS; generation also stops at ``params.stop_token_ids``.
        max_batch_prompts: prompts prefilled together; their ``n`` samples decode together.
        row_ladder: the decode batch shrinks only to row counts of :func:`ladder_rows` (finished
            rows wait as dead rows until the rows still running fit a smaller ladder value). The
            products then see a bounded set of shapes: oneDNN builds and caches a kernel per input
            shape (time and memory per new shape), so free-running row counts cost
            time in every step that meets a new count and memory that grows for the whole run.
        compact_min_fraction: without ``row_ladder``, finished rows are dropped from the decode
            batch once they are at least this fraction of it (copying the cache for every single
            finished row costs more than decoding a few dead rows); 0 drops them immediately.
        direct_decode: decode steps computed straight from the model's weights (see
            :class:`~dapo_rl.models.decode.SpecDecoder`) instead of through its Hugging Face
            modules, for every model :func:`~dapo_rl.models.spec.fast_spec` accepts.
        pack_weights: on a CPU, run the direct decode's products on oneDNN with weights packed
            once per call (float32 only; ignored elsewhere); None (default): where
            :func:`~dapo_rl.models.decode.packs_by_default` says it is faster.
        native_kernels: on a CPU in float32, run the direct decode's norms, rotary, attention and
            gated MLP activation as fused C kernels (:mod:`dapo_rl.models.native`; PyTorch ops where they cannot be built).
        read_in_place: the direct decoder's products read the model's own matrices, LoRA adapters
            on the fly, instead of fused/packed/merged copies (see
            :class:`~dapo_rl.models.decode.Projection`); None (default): for models with active adapters.
        keep_decoder: keep the direct decoder (its fused, packed copies of the weights) between
            ``generate`` calls, until :meth:`sync_weights` (the engine contract: call it after
            changing the weights, as for any engine that holds its own copy) or
            :meth:`release_memory`. As a second guard it is rebuilt when a parameter's storage or
            version counter moved (in-place ops and ``load_state_dict`` move it; fused optimiser
            kernels such as ``AdamW(fused=True)`` do not). The trainer's weight-sync probe, its
            next step's sampling rounds and an evaluation between them then build it once; the
            trainer releases it before each update, so it is never held through one, and under
            FSDP2 when the gathered parameters it reads are resharded. Off by default: a plain
            ``generate`` holds no copy after it returns.
        dtype: the direct decoder's weights, activations and key/value cache in this dtype
            (``torch.bfloat16``: ``rollout.dtype=bfloat16``); logits, log-softmax, sampling and
            the reported log-probs stay float32, and so does the prompt's prefill (through the
            model itself). None: the model's own dtype. Ignored where the direct decoder does not
            serve the model (the Hugging Face path samples in the model's dtype).
    """

    probes_precision = True  # rollout.dtype=auto: sampling_precision may time a probe

    def __init__(self, model, pad_token_id: int, eos_token_id: int, max_batch_prompts: int = 64,
                 compact_min_fraction: float = 0.125, direct_decode: bool = True, pack_weights: bool | None = None,
                 native_kernels: bool = True, row_ladder: bool = True, read_in_place: bool | None = None,
                 keep_decoder: bool = False, dtype: torch.dtype | None = None):
        super().__init__(model, pad_token_id, eos_token_id, max_batch_prompts)
        self.dtype = dtype
        self.direct_decode = direct_decode
        self.pack_weights = pack_weights
        self.native_kernels = native_kernels
        self.compact_min_fraction = compact_min_fraction
        self.row_ladder = row_ladder
        self.read_in_place = read_in_place
        self.keep_decoder = keep_decoder
        self._kept: tuple[tuple, object, SpecDecoder] | None = None  # (weights' identity, spec, decoder)
        # Multi-turn (continue_conversations): each stopped sample's keys/values [layers, 2·kv_heads,
        # L, d] (keys in the model's order) by its tokens, from the previous call (read) and this one (written).
        self._continuing = False
        self._previous: dict[tuple[int, ...], torch.Tensor] = {}
        self._written: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: Config, model, tokenizer) -> "DecoderEngine":
        """The trainer's and ``dapo eval``'s engine: it keeps its decoder between calls (the trainer
        releases it before every update); ``rollout.dtype`` resolved for this model and machine
        (:func:`sampling_precision`, its reason in :attr:`precision_reason`)."""
        precision = sampling_precision(config.rollout.dtype, model)
        engine = cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     max_batch_prompts=config.rollout.max_batch_prompts, keep_decoder=True,
                     dtype=precision.dtype if precision.dtype != next(model.parameters()).dtype else None)
        engine.precision_reason = precision.reason
        return engine

    @property
    def precision(self) -> str | None:
        """``"bfloat16"`` when the decoder samples in bf16 (its own copy of the weights); None: the
        model's own weights and dtype."""
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        return "the fast engine" if self.dtype is None else f"the fast engine ({self.precision} weights and cache)"

    def sync_weights(self, model: torch.nn.Module) -> None:
        super().sync_weights(model)
        self._kept = None
        self._previous, self._written = {}, {}

    def release_memory(self) -> None:
        """Drop the kept decoder (``keep_decoder``) and any kept conversation; the next ``generate``
        builds a new one."""
        self._kept = None
        self._previous, self._written = {}, {}

    def continue_conversations(self, enabled: bool) -> None:
        """While on, every sample that stops keeps its keys and values (the direct decoder's path),
        and a prompt of the next call that extends a kept sample's tokens prefills only its new
        tokens: the conversation is never prefilled again from the start. Off: nothing is kept."""
        self._continuing = enabled
        self._previous, self._written = {}, {}

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        # What the previous call kept is read by this call (each of its chunks), then replaced.
        self._previous, self._written = self._written, {}
        try:
            return super().generate(prompts, n, params)
        finally:
            self._previous = {}

    def _decoder(self, model, spec) -> SpecDecoder:
        """A decoder of the model's current weights: the kept one while every parameter is the same
        storage at the same version, else a new one (kept when ``keep_decoder``)."""
        weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
        if self._kept is not None and self._kept[0] == weights and self._kept[1] == spec:
            return self._kept[2]
        self._kept = None  # before building: never two copies at once
        decoder = SpecDecoder(model, spec, pack_weights=self.pack_weights, native_kernels=self.native_kernels,
                              in_place=self.read_in_place, dtype=self.dtype)
        if self.keep_decoder:
            self._kept = (weights, spec, decoder)
        return decoder

    @torch.no_grad()
    def generate_turns(self, prompts: Sequence[list[int]], n: int, params: SamplingParams, respond, *,
                       wait_steps: int = 0, max_turns: int = 1) -> list[list[Sample]] | None:
        """Whole multi-turn trajectories in one decode loop (see :class:`~dapo_rl.rollout.decoder_turns.LoopTurns`): a row whose turn
        ends takes its message and goes on while the others sample. ``respond(row, turn_ids)``:
        ``row`` counts samples across all prompts (prompt i's are ``i·n … i·n + n − 1``).
        ``wait_steps``: the replies run in threads and are fed that many steps after their turn
        (at most ``max_turns`` waits per row). None where the direct decoder does not serve this
        model (the caller goes turn by turn)."""
        extra = wait_steps * max_turns  # decode steps a row may spend waiting
        longest = max((len(p) for p in prompts), default=0) + params.max_new_tokens + extra
        spec = fast_spec(self.model, longest) if self.direct_decode else None
        if spec is None or not prompts:
            return None
        if any(w is not None and w < longest for w in spec.windows):
            # A sliding window counts cached columns, and a gap is a column: such a model waits for each reply.
            wait_steps = extra = 0
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            offset = start * n
            results.extend(self._generate_chunk(prompts[start : start + self.max_batch_prompts], n, params,
                                                respond=lambda row, ids, offset=offset: respond(offset + row, ids),
                                                wait_steps=wait_steps, extra=extra))
        return results

    def _generate_chunk(self, prompts: Sequence[list[int]], n: int, params: SamplingParams, respond=None,
                        wait_steps: int = 0, extra: int = 0) -> list[list[Sample]]:
        model = self.model
        device = next(model.parameters()).device
        max_new = params.max_new_tokens
        if max_new <= 0:
            return [[Sample(list(p), [], FINISH_LENGTH, []) for _ in range(n)] for p in prompts]
        # Either prefill is max(prompt lengths) columns wide (a continued one right-aligns each row).
        width = max(len(p) for p in prompts)
        capacity = width + max_new + extra
        # Decode steps bypass the HF modules when the spec computes this model exactly at this length.
        spec = fast_spec(model, capacity) if self.direct_decode else None
        direct = spec is not None
        # Kept keys/values serve the direct decoder only.
        kept = decoder_turns.kept_prefixes(self._previous, prompts) if self._continuing and direct and respond is None else None
        if kept is not None:  # a conversation goes on: prefill its new tokens onto its kept keys/values
            cache, input_ids, attention, positions = decoder_turns.continued_prefill(prompts, kept, self.pad_token_id, device,
                                                                                     dtype=next(model.parameters()).dtype)
        else:
            cache = None
            input_ids, attention = left_pad(prompts, self.pad_token_id, device)  # [b, P] each
            positions = (attention.cumsum(-1) - 1).clamp_min(0)  # padding does not shift positions

        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                # Prefill: b rows, not b·n; only the last position's logits are needed. The direct
                # decoder needs every prompt position, so its cache never evicts (no config).
                if cache is None:
                    cache = DynamicCache() if direct else _make_cache(model, capacity)
                out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions[:, width - input_ids.shape[1]:],
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [b·n, V]
                next_pos = positions[:, -1].repeat_interleave(n) + 1  # [b·n]
                # is_stop[token]: one lookup per step instead of comparing against every stop id.
                stop_ids = [self.eos_token_id, *params.stop_token_ids]
                is_stop = torch.zeros(max(logits.shape[-1], *stop_ids) + 1, dtype=torch.bool, device=device)
                is_stop[stop_ids] = True
                if direct:
                    decoder = self._decoder(model, spec)
                    decoder.start(out.past_key_values, n, attention, capacity)
                    try:
                        keep_kv = decoder_turns.row_keeper(decoder, prompts, n, width) if self._continuing and respond is None else None
                        result = self._decode_direct(decoder, logits, next_pos, is_stop, params, capacity, keep_kv, respond,
                                                     wait_steps, extra)
                    finally:
                        decoder.finish()
                else:
                    result = self._decode_hf(out.past_key_values, logits, next_pos, attention, n, is_stop, params)
        finally:
            model.train(was_training)

        tokens_list, logprobs_list, lengths_list, stopped_list = (r.tolist() for r in result[:4])
        if respond is not None:  # whole trajectories: the fed messages' tokens are the environment's, gaps are dropped
            marks = result[4].tolist()

            def trajectory(row: int, prompt: Sequence[int]) -> Sample:
                kept = [c for c in range(lengths_list[row]) if marks[row][c] != 2]
                return Sample(prompt_ids=list(prompt), response_ids=[tokens_list[row][c] for c in kept],
                              finish_reason=FINISH_STOP if stopped_list[row] else FINISH_LENGTH,
                              logprobs=[logprobs_list[row][c] for c in kept], model_mask=[int(marks[row][c] == 0) for c in kept])

            return [[trajectory(row, prompt) for row in range(i * n, (i + 1) * n)] for i, prompt in enumerate(prompts)]
        if len(result) > 4:  # the stopped rows' keys/values, by their tokens (all but the last, never fed)
            for row, kv in result[4].items():
                context = list(prompts[row // n])
                self._written[tuple(context + tokens_list[row][: lengths_list[row] - 1])] = kv
        grouped: list[list[Sample]] = []
        for i, prompt in enumerate(prompts):
            group = []
            for row in range(i * n, (i + 1) * n):
                length = lengths_list[row]
                group.append(Sample(
                    prompt_ids=list(prompt), response_ids=tokens_list[row][:length],
                    finish_reason=FINISH_STOP if stopped_list[row] else FINISH_LENGTH,
                    logprobs=logprobs_list[row][:length],
                ))
            grouped.append(group)
        return grouped

    def _decode_direct(self, decoder: SpecDecoder, logits: torch.Tensor, next_pos: torch.Tensor,
                       is_stop: torch.Tensor, params: SamplingParams, capacity: int, keep_kv=None, respond=None,
                       wait_steps: int = 0, extra: int = 0):
        """The sampling loop on :class:`SpecDecoder`; returns (tokens, logprobs, lengths, stopped) per original row.

        Per step: sample, look up stops, one ``nonzero`` (the only host sync); when rows finish
        they are dropped (all at once, or once they reach ``compact_min_fraction`` of the batch).
        Tokens and log-probs of each step are kept as they come and scattered to their rows once
        at the end; tokens sampled by finished rows still in the batch are cut off by ``lengths``.
        """
        device = logits.device
        rows_total, max_new = logits.shape[0], params.max_new_tokens
        steps = max_new + extra  # multi-turn with waits: gap steps do not count against a row's budget
        lengths = torch.full((rows_total,), steps, dtype=torch.long, device=device)
        stopped = torch.zeros(rows_total, dtype=torch.bool, device=device)
        live = torch.arange(rows_total, device=device)  # live[i] = original row of decode row i
        done = None  # [rows] bool once finished rows wait in the batch for a compaction
        waiting = 0  # how many
        tables = decoder.rotary_tables(capacity, device)
        step_rows: list[torch.Tensor] = []
        step_tokens: list[torch.Tensor] = []
        step_logprobs: list[torch.Tensor] = []
        turns = decoder_turns.LoopTurns(rows_total, respond, max_new, wait_steps) if respond is not None else None
        gap = None
        for t in range(steps):
            token, logprob = sample_tokens(logits, params)  # [rows] each
            if turns is not None:  # an environment message's tokens are fed, not sampled; a waiting row's are gaps
                token, logprob, forced, gap = turns.force(live, token, logprob, t)  # gap: a row mask, carried through compactions
            step_rows.append(live)
            step_tokens.append(token)
            step_logprobs.append(logprob)
            hit = is_stop[token]
            if done is not None:
                hit &= ~done
            if turns is not None:
                hit = turns.end_turns(live, token, hit, forced, gap, done, t)
            finished = hit.nonzero().squeeze(-1)
            if finished.numel():
                ended = live[finished]
                lengths[ended] = t + 1
                stopped[ended] = True if turns is None else turns.stopped(ended, device)
                waiting += finished.numel()
                rows = live.numel()
                if waiting == rows:
                    if keep_kv is not None:
                        keep_kv(torch.arange(rows, device=device), live, lengths)
                    break
                done = hit if done is None else done | hit
                if self.row_ladder:
                    keep = ladder_rows(rows - waiting)
                else:
                    keep = rows - waiting if waiting >= self.compact_min_fraction * rows else rows
                if keep < rows:
                    dead = keep - (rows - waiting)  # finished rows that stay, as dead rows
                    # Drop the highest finished rows: the fewest survivors move.
                    drop = done.nonzero().squeeze(-1)[dead:]
                    if keep_kv is not None:
                        keep_kv(drop, live[drop], lengths)
                    done[drop] = False
                    # (live and token are also held by step_rows/step_tokens: move copies)
                    carried = [live.clone(), token.clone(), next_pos, done] + ([gap] if gap is not None else [])
                    live, token, next_pos, done, *rest = decoder.drop_rows(drop, carried)
                    gap = rest[0] if rest else None
                    waiting = dead
                    if not waiting:
                        done = None
            if t == steps - 1:
                if keep_kv is not None and done is not None:  # the stopped rows still in the batch
                    waiting_rows = done.nonzero().squeeze(-1)
                    keep_kv(waiting_rows, live[waiting_rows], lengths)
                break
            if gap is not None:  # a waiting row: what it is fed now is never attended to, and its position holds
                decoder.hide(gap.nonzero().squeeze(-1))
            logits = decoder(token, decoder.rotary_at(tables, next_pos)).float()  # no copy for float32 models
            next_pos = next_pos + 1 if gap is None else next_pos + (~gap).long()
        tokens_out = torch.full((rows_total, steps), self.pad_token_id, dtype=torch.long, device=device)
        logprobs_out = torch.zeros((rows_total, steps), dtype=torch.float32, device=device)
        cols = torch.cat([torch.full_like(r, t) for t, r in enumerate(step_rows)])
        rows = torch.cat(step_rows)
        tokens_out[rows, cols] = torch.cat(step_tokens)
        logprobs_out[rows, cols] = torch.cat(step_logprobs).float()
        if keep_kv is not None:
            return tokens_out, logprobs_out, lengths, stopped, keep_kv.kept
        if turns is not None:
            turns.close()
            return tokens_out, logprobs_out, lengths, stopped, turns.environment_mask(steps, device)
        return tokens_out, logprobs_out, lengths, stopped

    def _decode_hf(self, cache: Cache, logits: torch.Tensor, next_pos: torch.Tensor, attention: torch.Tensor,
                   n: int, is_stop: torch.Tensor, params: SamplingParams):
        """The sampling loop through the model's own ``forward`` (any causal LM); same results as
        :meth:`_decode_direct`, with the prompt-padding mask grown by one column per step."""
        device = logits.device
        prompt_width, max_new = attention.shape[1], params.max_new_tokens
        cache.batch_repeat_interleave(n)
        rows_total = logits.shape[0]
        # Attention mask over the whole sequence, pre-allocated: column P + t is the t-th new token.
        mask = torch.zeros((rows_total, prompt_width + max_new), dtype=attention.dtype, device=device)
        mask[:, :prompt_width] = attention.repeat_interleave(n, dim=0)
        tokens_out = torch.full((rows_total, max_new), self.pad_token_id, dtype=torch.long, device=device)
        logprobs_out = torch.zeros((rows_total, max_new), dtype=torch.float32, device=device)
        lengths = torch.full((rows_total,), max_new, dtype=torch.long, device=device)
        stopped = torch.zeros(rows_total, dtype=torch.bool, device=device)
        # live[i] = original row of decode-batch row i; done[i] = row i already finished
        # (kept in the batch until compaction; its later tokens are discarded).
        live = torch.arange(rows_total, device=device)
        done = torch.zeros(rows_total, dtype=torch.bool, device=device)
        for t in range(max_new):
            token, logprob = sample_tokens(logits, params)  # [rows] each
            keep_rows = live[~done] if done.any() else live
            if keep_rows.numel() != live.numel():
                token_k, logprob_k = token[~done], logprob[~done]
            else:
                token_k, logprob_k = token, logprob
            tokens_out[keep_rows, t] = token_k
            logprobs_out[keep_rows, t] = logprob_k
            hit = is_stop[token] & ~done
            if hit.any():
                ended = live[hit]
                lengths[ended] = t + 1
                stopped[ended] = True
                done |= hit
            if t == max_new - 1 or bool(done.all()):
                break
            mask[:, prompt_width + t] = 1
            if done.any() and done.float().mean().item() >= self.compact_min_fraction:
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, token, next_pos = live[keep], token[keep], next_pos[keep]
                mask = mask[keep]
                done = done[keep]
            out = self.model(input_ids=token[:, None], attention_mask=mask[:, : prompt_width + t + 1],
                             position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return tokens_out, logprobs_out, lengths, stopped

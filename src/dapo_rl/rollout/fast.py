"""A rollout engine that does only the work that can change the samples.

Compared with :class:`~dapo_rl.rollout.hf.HFGenerateEngine` (``generate`` with
``num_return_sequences=G``), for B prompts × G samples:

- **One prefill per prompt.** The B prompts are prefilled once (``[B, P]``), then their KV cache
  and last logits are repeated G times; ``generate`` prefills ``[B·G, P]``.
- **Finished rows leave the batch.** When a row emits a stop token its KV cache rows are dropped
  and the next decode step runs on the rows still going; ``generate`` keeps decoding them as
  padding until the longest row ends.
- **A pre-allocated KV cache.** Each layer's keys/values live in one ``[rows, heads, P + T, d]``
  buffer written in place, instead of ``torch.cat``-ing a new tensor every step (quadratic copying).
- **Sampler log-probs.** Each token comes with ``log softmax(logits / T)`` of the token
  (``Sample.logprobs``), the quantity the trainer computes, so an exactly on-policy trainer could
  skip its own log-prob pass.

Sampling draws from the same distribution as Hugging Face ``generate``: ``softmax(logits / T)``
after top-k (keep tokens whose logit ties or beats the k-th largest) and then top-p (keep the
smallest set of most likely tokens whose probability reaches p, at least one), by
``torch.multinomial`` on the global torch RNG, so ``torch.manual_seed`` makes runs reproducible.
``temperature == 0`` is greedy (argmax).

The model is called through its ordinary Hugging Face ``forward`` with a cache object, so any
causal LM that accepts ``past_key_values``/``position_ids`` works; models with sliding-window
layers fall back to Hugging Face's own ``DynamicCache`` (still one prefill per prompt and
dropping finished rows).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, InProcessEngine, Sample, SamplingParams
from dapo_rl.rollout.hf import left_pad

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


def _has_sliding_layers(config) -> bool:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    return any("sliding" in str(t) for t in types) or bool(getattr(text, "use_sliding_window", False))


def _make_cache(model, capacity: int) -> Cache:
    config = model.config
    if _has_sliding_layers(config):
        return DynamicCache(config=config)
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(layers)])


class _LlamaDecodeStep:
    """One decode step of a Llama-architecture model computed straight from its weights.

    Same arithmetic as the Hugging Face modules (their RMSNorm and rotary modules are called
    as they are), minus the per-call overhead that dominates a small model's decode step: mask
    building, cache bookkeeping, ~10 module calls per layer. Q/K/V and gate/up projections are
    fused into one matrix each (built per ``generate`` call, since training changes the weights).
    """

    def __init__(self, model):
        inner, config = model.model, model.config
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.lm_head = model.lm_head.weight
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                layer.post_attention_layernorm, torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight,
            ))

    @staticmethod
    def supports(model) -> bool:
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        return (config is not None and getattr(config, "model_type", None) == "llama" and inner is not None
                and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")
                and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
                and getattr(config, "hidden_act", "silu") == "silu" and getattr(config, "pretraining_tp", 1) == 1
                and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager"))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, key_mask: torch.Tensor) -> torch.Tensor:
        """``tokens``/``positions`` ``[rows]``, ``key_mask`` ``[rows, cached + 1]`` bool → logits ``[rows, V]``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        rows, d = tokens.shape[0], self.head_dim
        q_size, kv_size = self.heads * d, self.kv_heads * d
        x = F.embedding(tokens, self.embed)[:, None, :]  # [rows, 1, hidden]
        cos, sin = self.rotary(x, positions[:, None])
        mask = key_mask[:, None, None, :]  # [rows, 1, 1, keys]
        for i, (norm1, qkv_w, o_w, norm2, gate_up_w, down_w) in enumerate(self.layers):
            q, k, v = F.linear(norm1(x), qkv_w).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(rows, 1, self.heads, d).transpose(1, 2)  # [rows, heads, 1, d]
            k = k.view(rows, 1, self.kv_heads, d).transpose(1, 2)
            v = v.view(rows, 1, self.kv_heads, d).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = cache.layers[i].update(k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(out.transpose(1, 2).reshape(rows, 1, q_size), o_w)
            gate, up = F.linear(norm2(x), gate_up_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        return F.linear(self.norm(x[:, 0]), self.lm_head)


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
    scaled = logits / params.temperature
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    if params.top_k or params.top_p < 1.0:
        probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
    else:
        probs = logprobs_all.exp()  # softmax(scaled), reusing the log-softmax
    tokens = torch.multinomial(probs, num_samples=1).squeeze(-1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)


class FastRolloutEngine(InProcessEngine):
    """Samples from the training model itself with one prefill per prompt and finished-row dropping.

    Args:
        model: a Hugging Face causal LM (the policy being trained; no weight copy is made).
        pad_token_id: id used to left-pad prompts (never attended to).
        eos_token_id: the tokenizer's EOS; generation also stops at ``params.stop_token_ids``.
        max_batch_prompts: prompts prefilled together; their ``n`` samples decode together.
        compact_min_fraction: finished rows are dropped from the decode batch once they are at least
            this fraction of it (copying the cache for every single finished row costs more than
            decoding a few dead rows); 0 drops them immediately.
    """

    def __init__(self, model, pad_token_id: int, eos_token_id: int, max_batch_prompts: int = 64,
                 compact_min_fraction: float = 0.125, direct_decode: bool = True):
        super().__init__(model, pad_token_id, eos_token_id, max_batch_prompts)
        self.direct_decode = direct_decode
        self.compact_min_fraction = compact_min_fraction

    def _generate_chunk(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        model = self.model
        device = next(model.parameters()).device
        b, max_new = len(prompts), params.max_new_tokens
        if max_new <= 0:
            return [[Sample(list(p), [], FINISH_LENGTH, []) for _ in range(n)] for p in prompts]
        stop_ids = torch.tensor(sorted({self.eos_token_id, *params.stop_token_ids}), device=device)
        input_ids, attention = left_pad(prompts, self.pad_token_id, device)  # [b, P] each
        positions = (attention.cumsum(-1) - 1).clamp_min(0)  # padding does not shift positions
        prompt_width = input_ids.shape[1]
        cache = _make_cache(model, prompt_width + max_new)
        # Decode steps bypass the HF modules when the architecture is one we compute exactly.
        step = (_LlamaDecodeStep(model) if self.direct_decode and isinstance(cache.layers[0], _PreallocatedLayer)
                and _LlamaDecodeStep.supports(model) else None)

        was_training = model.training
        model.eval()
        try:
            # Prefill: b rows, not b·n; only the last position's logits are needed.
            out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [b·n, V]
            cache.batch_repeat_interleave(n)
            rows_total = b * n
            # Attention mask over the whole sequence, pre-allocated: column P + t is the t-th new token.
            mask = torch.zeros((rows_total, prompt_width + max_new), dtype=attention.dtype, device=device)
            mask[:, :prompt_width] = attention.repeat_interleave(n, dim=0)
            next_pos = positions[:, -1].repeat_interleave(n) + 1  # [rows]
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
                hit = torch.isin(token, stop_ids) & ~done
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
                if step is not None:
                    logits = step(token, next_pos, cache, mask[:, : prompt_width + t + 1].bool()).float()
                else:
                    out = model(input_ids=token[:, None], attention_mask=mask[:, : prompt_width + t + 1],
                                position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
                    logits = out.logits[:, -1].float()
                next_pos = next_pos + 1
        finally:
            model.train(was_training)

        tokens_list = tokens_out.tolist()
        logprobs_list = logprobs_out.tolist()
        lengths_list = lengths.tolist()
        stopped_list = stopped.tolist()
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

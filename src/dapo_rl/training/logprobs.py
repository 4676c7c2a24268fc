"""π_θ(token) and the entropy of every response token of a micro-batch: one function, four paths.

:func:`logprobs` is the only way the trainer runs the policy (and the KL reference). Log-probs and
entropy come from ``logits / temperature``: the distribution the rollout sampled from, so the
importance ratio is exactly 1 on-policy. The paths all compute the same numbers (to rounding,
tested); :func:`forward_path` says which one a batch takes:

- ``flat``: every real token of the distinct prompts (each run once) and of the responses in one
  unpadded batch (:func:`dapo_rl.models.packed_forward.flat_logits`): no projection or MLP computes
  padding, and no Hugging Face forward or cache is involved. Models the architecture spec
  supports (:mod:`dapo_rl.models.spec`: Llama, Qwen2/3, Mistral, Phi-3, Gemma2/3), sliding
  windows included, in one process.
- ``shared``: each distinct prompt run once, responses run on its cache in length groups
  (a group's G responses share their prompt, and causal attention makes the prompt's keys and
  values independent of the response: 1/G of the prompt compute). Not for models with
  sliding-window layers, whose Hugging Face cache evicts positions.
- ``buckets``: nothing repeats; rows run in length groups (:func:`length_buckets`), each cut to
  its own widest prompt and response.
- ``whole``: one forward of the whole padded batch (FSDP2, where every forward is a collective
  and all ranks must make the same calls, or a single row).

Only the logits of response positions are materialised.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache

from dapo_rl.algorithm import token_entropy, token_logprobs
from dapo_rl.models.packed_forward import FlatPrompts, FlatResponses, flat_logits, recomputes_layers
from dapo_rl.models.spec import has_sliding_layers, supports_fast_path
from dapo_rl.training.batching import PackedBatch, length_buckets

F = torch.nn.functional


@dataclass(frozen=True)
class ForwardSettings:
    """How :func:`logprobs` may run the model.

    ``one_forward``: exactly one model call per batch, the same on every rank (FSDP2).
    ``flat``: the unpadded flat forward is allowed (off when a DDP or FSDP2 wrapper must see every
    forward through its own ``forward``). ``share_prompts``: run each distinct prompt once.
    """

    temperature: float = 1.0
    autocast_dtype: torch.dtype | None = None
    share_prompts: bool = True
    flat: bool = True
    one_forward: bool = False

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


@dataclass
class DistinctPrompts:
    """Which rows of a micro-batch share a prompt."""

    prompt_of: torch.Tensor  # [b] which distinct prompt each row has
    first: torch.Tensor  # [U] a row holding each distinct prompt


def distinct_prompts(batch: PackedBatch) -> DistinctPrompts | None:
    """The distinct prompts of ``batch`` (in order of first appearance), or None when none repeats."""
    b = batch.response_ids.shape[0]
    if b < 2:
        return None
    width = batch.prompt_width
    keys = [tuple(row[width - length :]) for row, length in zip(batch.input_ids[:, :width].tolist(), batch.prompt_lengths)]
    slot: dict[tuple, int] = {}
    prompt_of = [slot.setdefault(key, len(slot)) for key in keys]
    if len(slot) == b:
        return None
    device = batch.input_ids.device
    return DistinctPrompts(prompt_of=torch.tensor(prompt_of, device=device),
                           first=torch.tensor([prompt_of.index(u) for u in range(len(slot))], device=device))


def _plan(model: torch.nn.Module, batch: PackedBatch, settings: ForwardSettings) -> tuple[str, DistinctPrompts | None]:
    if settings.one_forward or batch.response_ids.shape[0] < 2:
        return "whole", None
    plain = getattr(model, "module", model)  # under DDP, the wrapped model
    config = getattr(plain, "config", None)
    shared = distinct_prompts(batch) if settings.share_prompts and config is not None else None
    if shared is None:
        return "buckets", None
    # The flat forward applies sliding windows itself and keeps every prompt position; Hugging
    # Face's own cache evicts them, so the "shared" path cannot serve such models.
    if settings.flat and model is plain and supports_fast_path(plain, max_length=batch.input_ids.shape[1]):
        return "flat", shared
    # Under gradient checkpointing Hugging Face drops the cache the "shared" path runs on.
    return ("buckets", None) if has_sliding_layers(config) or recomputes_layers(plain) else ("shared", shared)


@contextmanager
def _layers_not_checkpointed(model: torch.nn.Module) -> Iterator[None]:
    """Hugging Face's checkpointed layers refuse a KV cache (they run with ``past_key_values=None``
    and leave the cache empty); the prompt forward of the ``shared`` path needs it, so its layers
    run plainly. The flat forward checkpoints its layers itself (:func:`~dapo_rl.models.packed_forward.flat_logits`)."""
    if not recomputes_layers(model):
        yield
        return
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def forward_path(model: torch.nn.Module, batch: PackedBatch, settings: ForwardSettings = ForwardSettings()) -> str:
    """Which path :func:`logprobs` takes for ``batch``: ``flat``, ``shared``, ``buckets`` or ``whole``."""
    return _plan(model, batch, settings)[0]


def logprobs(model: torch.nn.Module, batch: PackedBatch, settings: ForwardSettings = ForwardSettings(), *,
             with_entropy: bool = False, entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens and, with ``with_entropy``, the entropy of each position.

    Args:
        model: a Hugging Face causal LM, or its DDP / FSDP2 wrapper.
        batch: the packed micro-batch.
        settings: which paths are allowed, the temperature and the autocast dtype.
        entropy_grad: the entropy keeps its graph (an entropy bonus); otherwise it is a metric,
            computed without one.
    Returns:
        ``logp [b, R]`` (differentiable, float32 or wider) and ``entropy [b, R]`` (detached unless
        ``entropy_grad``) or None. Positions past a row's response are 0 and must be masked by
        ``response_mask``.
    """
    path, shared = _plan(model, batch, settings)
    if path == "flat":
        return _flat(model, batch, shared, settings, with_entropy, entropy_grad)
    b, width = batch.response_ids.shape
    cache = _prompt_cache(model, batch, shared, settings) if shared is not None else None
    if path == "whole":
        groups = [list(range(b))]
    else:  # with shared prompts a group's cost is its response widths only
        groups = length_buckets([0] * b if shared is not None else batch.prompt_lengths, batch.response_lengths)
    logp_parts, entropy_parts = [], []
    for rows in groups:
        whole = len(groups) == 1  # the whole batch, in its own order: no row gather, full width
        if whole:
            rows = list(range(b))
        max_r = width if whole else max(max(batch.response_lengths[r] for r in rows), 1)
        index = None if whole else torch.tensor(rows, device=batch.input_ids.device)
        if cache is not None:
            logits = _logits_on_prompt_cache(model, batch, rows, max_r, cache, settings)
        else:
            max_p = batch.prompt_width if whole else max(batch.prompt_lengths[r] for r in rows)
            logits = _logits_full(model, batch, index, max_p, max_r, settings)
        response_ids = batch.response_ids[:, :max_r] if whole else batch.response_ids[index, :max_r]
        logp_parts.append(F.pad(token_logprobs(logits, response_ids, temperature=settings.temperature), (0, width - max_r)))
        if with_entropy:
            with nullcontext() if entropy_grad else torch.no_grad():
                source = logits if entropy_grad else logits.detach()
                entropy_parts.append(F.pad(token_entropy(source, temperature=settings.temperature), (0, width - max_r)))
    if len(groups) == 1:
        return logp_parts[0], (entropy_parts[0] if with_entropy else None)
    # Back to the caller's row order: rows were concatenated group by group.
    inverse = torch.empty(b, dtype=torch.long)
    inverse[torch.tensor([r for rows in groups for r in rows])] = torch.arange(b)
    inverse = inverse.to(logp_parts[0].device)
    return (torch.cat(logp_parts).index_select(0, inverse),
            torch.cat(entropy_parts).index_select(0, inverse) if with_entropy else None)


def _logits_full(model, batch: PackedBatch, index: torch.Tensor | None, max_p: int, max_r: int,
                 settings: ForwardSettings) -> torch.Tensor:
    """Logits ``[rows, max_r, V]`` predicting response tokens 0..max_r-1 from a forward of prompt + response."""
    columns = slice(batch.prompt_width - max_p, batch.prompt_width + max_r)
    pick = (lambda t: t[:, columns]) if index is None else (lambda t: t[index, columns])
    with settings.autocast(batch.input_ids.device):
        out = model(input_ids=pick(batch.input_ids), attention_mask=pick(batch.attention_mask),
                    position_ids=pick(batch.position_ids), logits_to_keep=max_r + 1, use_cache=False)
    return out.logits[:, :-1]  # position t predicts response token t


@dataclass
class _PromptCache:
    shared: DistinctPrompts
    last_logits: torch.Tensor  # [U, V] logits at each prompt's last token (predict response token 0)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [U, kv_heads, P, head_dim]
    columns: slice  # the prompt columns of the packed batch that were run
    attention: torch.Tensor  # [U, P] 1 on each distinct prompt's real tokens (0 on left padding)


def _prompt_cache(model, batch: PackedBatch, shared: DistinctPrompts, settings: ForwardSettings) -> _PromptCache:
    """One forward over the distinct prompts: their keys, values and last logits."""
    columns = slice(batch.prompt_width - max(batch.prompt_lengths), batch.prompt_width)
    first = shared.first
    with settings.autocast(batch.input_ids.device), _layers_not_checkpointed(model):
        # A cache built without the model's config keeps every position, windowed layers too.
        out = model(input_ids=batch.input_ids[first, columns], attention_mask=batch.attention_mask[first, columns],
                    position_ids=batch.position_ids[first, columns], logits_to_keep=1, use_cache=True,
                    past_key_values=DynamicCache())
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return _PromptCache(shared=shared, last_logits=out.logits[:, -1], kv=kv, columns=columns,
                        attention=batch.attention_mask[first, columns])


def _logits_on_prompt_cache(model, batch: PackedBatch, rows: list[int], max_r: int, cache: _PromptCache,
                            settings: ForwardSettings) -> torch.Tensor:
    """Logits ``[rows, max_r, V]`` predicting response tokens 0..max_r-1, the responses run on their prompts' caches."""
    index = torch.tensor(rows, device=batch.input_ids.device)
    owner = cache.shared.prompt_of[index]
    past = DynamicCache(ddp_cache_data=[(k.index_select(0, owner), v.index_select(0, owner)) for k, v in cache.kv])
    response = slice(batch.prompt_width, batch.prompt_width + max_r)
    mask = torch.cat([batch.attention_mask[index, cache.columns], batch.attention_mask[index, response]], dim=1)
    with settings.autocast(batch.input_ids.device):
        out = model(input_ids=batch.response_ids[index, :max_r], attention_mask=mask,
                    position_ids=batch.position_ids[index, response], past_key_values=past, use_cache=True)
    # The prompt's last position predicts response token 0; response position t predicts t + 1.
    return torch.cat([cache.last_logits.index_select(0, owner).unsqueeze(1), out.logits[:, : max_r - 1]], dim=1)


def _flat(model, batch: PackedBatch, shared: DistinctPrompts, settings: ForwardSettings, with_entropy: bool,
          entropy_grad: bool = False):
    """Every real token of the distinct prompts and of the responses in one unpadded batch;
    attention per prompt and per length group (:func:`~dapo_rl.models.packed_forward.flat_logits`)."""
    b, width = batch.response_ids.shape
    device = batch.response_ids.device
    columns = slice(batch.prompt_width - max(batch.prompt_lengths), batch.prompt_width)
    prompts = FlatPrompts.build(batch.input_ids[shared.first, columns], batch.attention_mask[shared.first, columns])
    flat = FlatResponses.build(length_buckets([0] * b, batch.response_lengths), batch.prompt_lengths,
                               batch.response_lengths, device)
    row_of, step_of = flat.row_of, flat.step_of
    n = row_of.numel()
    tokens = batch.response_ids[row_of, step_of]
    with settings.autocast(device):
        after, last = flat_logits(model, prompts, shared.prompt_of, tokens, flat)  # [N, V], [U, V]
    # Response token 0 is predicted by its prompt's last position, token t > 0 by flat position
    # j − 1. Each position is scored against the token after it (a row's last position against a
    # dummy 0, never read), so no shifted [N, V] copy of the logits is made; only [N] vectors move.
    position = torch.arange(n, device=device)
    after_next = (position + 1).clamp_max(n - 1)
    target = torch.where(row_of[after_next] == row_of, tokens[after_next], 0)
    starts = step_of == 0
    first = starts.nonzero().squeeze(-1)  # flat position of each row's token 0
    head = last.index_select(0, shared.prompt_of[row_of[first]])  # [rows, V]
    source = torch.where(starts, n + starts.long().cumsum(0) - 1, position - 1)
    temperature = settings.temperature
    logp_flat = torch.cat([token_logprobs(after, target, temperature=temperature),
                           token_logprobs(head, tokens[first], temperature=temperature)]).index_select(0, source)
    logp = logp_flat.new_zeros((b, width)).index_put((row_of, step_of), logp_flat)
    if not with_entropy:
        return logp, None
    with nullcontext() if entropy_grad else torch.no_grad():
        if not entropy_grad:
            after, head = after.detach(), head.detach()
        entropy_flat = torch.cat([token_entropy(after, temperature=temperature),
                                  token_entropy(head, temperature=temperature)]).index_select(0, source)
    return logp, entropy_flat.new_zeros((b, width)).index_put((row_of, step_of), entropy_flat)

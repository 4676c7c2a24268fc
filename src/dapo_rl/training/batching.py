"""Samples → padded micro-batch tensors, the length groups that keep padding out of the compute,
and one step's samples made ready for the update (:class:`PreparedBatch`, its loss masks).

Prompts are left-padded and responses right-padded inside a micro-batch, so response token j
sits at the same column in every row; position ids follow the attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dapo_rl.algorithm import overlong_filter_mask
from dapo_rl.rollout.base import Sample


@dataclass
class PackedBatch:
    """Micro-batch tensors; per-token ones are response-aligned ``[batch, max_response_len]``."""

    input_ids: torch.Tensor  # [b, P + R] prompts left-padded, responses right-padded
    attention_mask: torch.Tensor  # [b, P + R]
    position_ids: torch.Tensor  # [b, P + R]
    response_ids: torch.Tensor  # [b, R]
    response_mask: torch.Tensor  # [b, R] 1 on real response tokens
    prompt_lengths: list[int] = field(default_factory=list)  # [b] real prompt tokens per row
    response_lengths: list[int] = field(default_factory=list)  # [b] real response tokens per row

    @property
    def prompt_width(self) -> int:
        """P: the columns before the responses."""
        return self.input_ids.shape[1] - self.response_ids.shape[1]


def pack(samples: list[Sample], pad_id: int, device: torch.device) -> PackedBatch:
    """Left-pad prompts and right-pad responses into one ``[b, P + R]`` batch (P, R = widest in ``samples``)."""
    prompt_lengths = [len(s.prompt_ids) for s in samples]
    response_lengths = [len(s.response_ids) for s in samples]
    prompt_width = max(prompt_lengths)
    response_width = max(max(response_lengths), 1)
    # Built as Python rows and converted once: one tensor per row costs more than the copy here.
    rows = [[pad_id] * (prompt_width - p) + list(s.prompt_ids) + list(s.response_ids) + [pad_id] * (response_width - r)
            for s, p, r in zip(samples, prompt_lengths, response_lengths)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    column = torch.arange(prompt_width + response_width)
    start = prompt_width - torch.tensor(prompt_lengths)
    end = prompt_width + torch.tensor(response_lengths)
    attention = ((column >= start[:, None]) & (column < end[:, None])).long()
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    return PackedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=position_ids.to(device),
        response_ids=input_ids[:, prompt_width:].to(device),
        response_mask=response_mask(response_lengths).to(device),
        prompt_lengths=prompt_lengths,
        response_lengths=response_lengths,
    )


# Fixed cost of one extra forward/backward call (Python, kernel launches, small-matrix
# inefficiency), in padded tokens; it decides when splitting a micro-batch by length pays off.
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(prompt_lengths: list[int], response_lengths: list[int],
                   overhead_tokens: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split rows into groups that each pad only to their own widest prompt and response.

    One padded batch costs ``rows × (max prompt + max response)`` tokens of compute; with response
    lengths spread from 1 to L, most of it is padding. Rows sorted by length are cut where that
    saves more than ``overhead_tokens`` per extra group (exact dynamic programme over cut points).

    Returns:
        Lists of row indices, every row exactly once.
    """
    n = len(response_lengths)
    order = sorted(range(n), key=lambda i: (response_lengths[i], prompt_lengths[i]))
    if n > 512:  # keep the O(n²) search cheap; equal-size groups of sorted rows are nearly as good
        return [order[i : i + 64] for i in range(0, n, 64)]
    best = [0.0] + [math.inf] * n  # best[j]: cost of rows order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        max_p = max_r = 0
        for i in range(j - 1, -1, -1):  # group = order[i:j]
            row = order[i]
            max_p = max(max_p, prompt_lengths[row])
            max_r = max(max_r, response_lengths[row])
            cost = best[i] + overhead_tokens + (j - i) * (max_p + max_r)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def response_mask(lengths: list[int]) -> torch.Tensor:
    """``[b, max(lengths)]`` float mask, 1 on each row's first ``lengths[i]`` columns."""
    return (torch.arange(max(max(lengths), 1))[None] < torch.tensor(lengths)[:, None]).float()


def pad_rows(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Per-sample ``[len_i]`` tensors → ``[b, width]``, zeros after each row's end."""
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows]).to(device)


def per_sample_rows(values: dict[int, torch.Tensor], idx: list[int], samples: list[Sample], like: torch.Tensor) -> torch.Tensor:
    """``values[i]`` ``[len_i]`` for each sample of ``idx`` that has one, 1 on the others' tokens,
    as ``[len(idx), width]`` with the dtype, device and width of ``like`` (0 past each response)."""
    rows = [values.get(i, torch.ones(len(samples[i].response_ids))).to(like.dtype) for i in idx]
    return pad_rows(rows, like.shape[1], like.device)


@dataclass
class PreparedBatch:
    """One step's samples made ready for the update (:meth:`Trainer.prepare`): what every epoch,
    mini-batch and micro-batch reads. Indices are sample positions in ``samples`` (group-major)."""

    samples: list[Sample]
    advantages: torch.Tensor  # [n] one per sample
    filtered: torch.Tensor  # [n] bool: overlong-filtered out of the loss
    trainable: torch.Tensor  # [n] bool: run forward and backward (in the loss, advantage != 0 or a KL term)
    old_logp: dict[int, torch.Tensor] | None  # π_old [len] per sample; None: exactly on-policy (the first forward stands in)
    ref_logp: dict[int, torch.Tensor] | None  # the KL reference's [len] per trainable sample
    rollout_logp: list[torch.Tensor] | None  # π_rollout [len] per sample, when the engine reports it
    weights: dict[int, torch.Tensor]  # the rollout correction's loss weights [len] (this rank's samples)
    kept: dict[int, torch.Tensor]  # the rollout correction's loss mask [len] (every rank's samples)
    model: dict[int, torch.Tensor]  # multi-turn samples: 1 on model tokens, 0 on environment tokens [len]
    mismatch: list[torch.Tensor]  # π_old - π_rollout [len] per sample scored so far
    old_logprob_seconds: float

    def loss_mask(self, idx: list[int]) -> torch.Tensor:
        """``[len(idx), widest response]`` float mask of the tokens in the loss and its normaliser:
        the model's response tokens (never the environment's), less overlong-filtered rows and the
        correction's rejections."""
        lengths = [len(self.samples[i].response_ids) for i in idx]
        mask = overlong_filter_mask(response_mask(lengths), self.filtered[idx])
        if self.model:  # multi-turn: environment tokens are context only
            mask = mask * per_sample_rows(self.model, idx, self.samples, mask)
        if self.kept:  # the correction's rejections
            mask = mask * per_sample_rows(self.kept, idx, self.samples, mask)
        return mask

    def trainable_among(self, idx: list[int]) -> torch.Tensor:
        """``[n]`` bool: the trainable samples among ``idx``."""
        among = torch.zeros_like(self.trainable)
        among[idx] = True
        return self.trainable & among

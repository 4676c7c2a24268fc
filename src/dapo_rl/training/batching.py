"""Samples → padded micro-batch tensors, and the length groups that keep padding out of the compute.

Prompts are left-padded and responses right-padded inside a micro-batch, so response token j
sits at the same column in every row; position ids follow the attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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

"""The fast engine's multi-turn machinery (:class:`~dapo_rl.rollout.decoder_engine.DecoderEngine`):
whole trajectories in one decode loop (:class:`LoopTurns`), and, turn by turn, conversations
continued from the keys and values kept from the previous call (:func:`row_keeper`,
:func:`kept_prefixes`, :func:`continued_prefill`)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache

from dapo_rl.models.decode import SpecDecoder
from dapo_rl.rollout.hf import left_pad


class LoopTurns:
    """A multi-turn call's state inside the decode loop (:meth:`~dapo_rl.rollout.decoder_engine.DecoderEngine.generate_turns`).

    When a row samples a stop token, ``respond(row, turn_ids)`` gives the ids of the message to feed
    before its next turn, or None to end it; the message's tokens are then fed one per decode step
    (teacher-forced, log-prob 0), while the other rows go on sampling. A message that would leave
    no room for the model within the budget ends the row as truncated.

    ``wait_steps`` > 0: ``respond`` runs in a thread (the row's tools run while every other row
    samples) and its message is fed ``wait_steps`` decode steps after the turn ended; the loop
    waits only for a reply slower than that. The steps a row waits are *gaps*: the decoder computes
    the row anyway (it stays in the batch), but the gap's keys/values are never attended to, its
    positions do not advance and its columns are dropped from the sample, so the trajectory is the
    one a full forward of its tokens computes. Gaps do not count against the row's budget. The step
    a message is fed at does not depend on how long its tool took, so runs stay reproducible.
    """

    def __init__(self, rows: int, respond, max_new: int, wait_steps: int = 0):
        self.respond = respond
        self.max_new = max_new  # the budget of each row's real tokens (model + environment)
        self.wait_steps = wait_steps
        self.turn: list[list[int]] = [[] for _ in range(rows)]  # the current turn's sampled ids per original row
        self.queue: dict[int, list[int]] = {}  # original row -> message ids still to feed
        self.environment: list[tuple[int, int]] = []  # (original row, step) of each fed message token
        self.truncated: set[int] = set()  # rows ended by a message that did not fit, or by the budget
        self.pending: dict[int, tuple[Future, int]] = {}  # original row -> (its reply, the step it is fed from)
        self.gaps: list[tuple[int, int]] = []  # (original row, step) of each step a row waited
        self.skipped = [0] * rows  # gap steps per original row
        self.ending: set[int] = set()  # rows whose reply, due now, ends them
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dapo-reply") if wait_steps else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _fits(self, o: int, start: int, message: list[int]) -> bool:
        """Whether ``message``, fed from real position ``start`` of row ``o``, leaves the model room."""
        if start + len(message) >= self.max_new:
            self.truncated.add(o)
            return False
        return True

    def force(self, live: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor, t: int):
        """Put the next message token of every row that has one in place of its sample; a waiting
        row's sample is ignored (a gap). Returns the tokens, log-probs, the decode rows fed a
        message token (indices, or None) and the decode rows in a gap at this step (a ``[rows]``
        bool mask, or None)."""
        if not (self.pending or self.queue):
            return token, logprob, None, None
        where = {o: i for i, o in enumerate(live.tolist())}
        waiting = []
        for o in sorted(self.pending):
            reply, due = self.pending[o]
            if due == t:
                del self.pending[o]
                message = reply.result()  # waits only for a reply slower than wait_steps
                if message and self._fits(o, t - self.skipped[o], message):
                    self.queue[o] = list(message)
                    continue
                self.ending.add(o)
            waiting.append(where[o])
            self.gaps.append((o, t))
            self.skipped[o] += 1
        token, logprob = token.clone(), logprob.clone()
        gap = None
        if waiting:
            gap = torch.zeros(live.numel(), dtype=torch.bool, device=token.device)
            gap[waiting] = True
            logprob[gap] = 0.0
        if not self.queue:
            return token, logprob, None, gap
        rows, ids = [], []
        for o in list(self.queue):
            rows.append(where[o])
            ids.append(self.queue[o].pop(0))
            self.environment.append((o, t))
            if not self.queue[o]:
                del self.queue[o]
        forced = torch.tensor(rows, device=token.device)
        token[forced] = torch.tensor(ids, dtype=token.dtype, device=token.device)
        logprob[forced] = 0.0
        return token, logprob, forced, gap

    def end_turns(self, live, token, hit, forced, gap, done, t: int) -> torch.Tensor:
        """(``forced``: indices, ``gap``: a bool mask, as :meth:`force` returns them.) Record each sampling row's token; for every row whose turn ended, ask for the message
        (now, or in a thread with ``wait_steps``). Returns which rows end at this step: ``hit``
        less the rows that go on (a message to feed or to wait for), plus the rows whose due reply
        ended them and, with gaps, the rows that reached the budget."""
        skip = set(forced.tolist()) if forced is not None else set()
        if forced is not None or gap is not None:
            hit = hit.clone()
            if forced is not None:
                hit[forced] = False  # a message's tokens never end a turn
            if gap is not None:
                skip |= set(gap.nonzero().squeeze(-1).tolist())
                hit[gap] = False
        dead = done.tolist() if done is not None else None
        ends = set(hit.nonzero().squeeze(-1).tolist())
        goes_on, stops = [], []
        for i, (o, tok) in enumerate(zip(live.tolist(), token.tolist())):
            if o in self.ending:
                self.ending.discard(o)
                stops.append(i)
                continue
            if i in skip or (dead is not None and dead[i]):
                continue
            self.turn[o].append(tok)
            if i not in ends:
                if self.wait_steps and t + 1 - self.skipped[o] >= self.max_new:  # the budget, gaps not counted
                    self.truncated.add(o)
                    stops.append(i)
                continue
            ids, self.turn[o] = self.turn[o], []
            if self.wait_steps:
                self.pending[o] = (self._pool.submit(self.respond, o, ids), t + 1 + self.wait_steps)
                goes_on.append(i)
                continue
            message = self.respond(o, ids)
            if message and self._fits(o, t + 1, message):
                self.queue[o] = list(message)
                goes_on.append(i)
        if goes_on or stops:
            hit = hit.clone()
            if goes_on:
                hit[torch.tensor(goes_on, device=hit.device)] = False
            if stops:
                hit[torch.tensor(stops, device=hit.device)] = True
        return hit

    def stopped(self, ended: torch.Tensor, device) -> torch.Tensor:
        """Which of the ``ended`` rows stopped (not ended by a message that did not fit, or the budget)."""
        return torch.tensor([o not in self.truncated for o in ended.tolist()], dtype=torch.bool, device=device)

    def environment_mask(self, steps: int, device) -> torch.Tensor:
        """``[rows, steps]`` int8: 1 where a message token was fed, 2 where the row waited (a gap
        column, dropped from the sample), 0 where the model sampled."""
        mask = torch.zeros((len(self.turn), steps), dtype=torch.int8, device=device)
        for marks, value in ((self.environment, 1), (self.gaps, 2)):
            if marks:
                rows, cols = zip(*marks)
                mask[list(rows), list(cols)] = value
        return mask


def kept_prefixes(kept: dict[tuple[int, ...], torch.Tensor], prompts: Sequence[list[int]]) -> list[tuple[int, torch.Tensor | None]] | None:
    """For each prompt, the longest kept sample (``kept``: keys/values by tokens) it extends:
    ``(its length, its keys/values)``, ``(0, None)`` where there is none; None when no prompt
    extends one."""
    if not kept:
        return None
    lengths = sorted({len(k) for k in kept}, reverse=True)
    found = []
    for prompt in prompts:
        match = next(((n, kept[key]) for n in lengths if n < len(prompt) and (key := tuple(prompt[:n])) in kept), (0, None))
        found.append(match)
    return found if any(kv is not None for _, kv in found) else None

def continued_prefill(prompts: Sequence[list[int]], kept: list[tuple[int, torch.Tensor | None]], pad_token_id: int, device,
                      dtype: torch.dtype | None = None):
    """The prefill of prompts that extend kept samples: each row feeds its last ``S`` tokens (S:
    the most new tokens of any row, so a row with fewer re-feeds a few kept ones) onto its kept
    keys/values, right-aligned behind left padding as a prompt would be. Returns the cache
    holding the kept part (in ``dtype``, the model's, when given: a bf16 decoder keeps bf16 keys),
    the fed ids ``[b, S]``, the mask ``[b, W]`` and positions ``[b, W]``."""
    fed_width = max(len(p) - n for p, (n, _) in zip(prompts, kept))
    past = [max(0, len(p) - fed_width) for p in prompts]  # kept positions each row attends to
    past_width = max(past)
    fed, fed_mask = left_pad([p[len(p) - min(len(p), fed_width):] for p in prompts], pad_token_id, device)
    attention = torch.cat([torch.arange(past_width, device=device)[None] >= past_width - torch.tensor(past, device=device)[:, None],
                           fed_mask.bool()], dim=1).long()
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    some = next(kv for _, kv in kept if kv is not None)  # [layers, 2·kv_heads, L, d]
    layers, kv_heads, d = some.shape[0], some.shape[1] // 2, some.shape[-1]
    for layer in range(layers):
        keys = some.new_zeros((len(prompts), kv_heads, past_width, d), dtype=dtype or some.dtype)
        values = torch.zeros_like(keys)
        for row, ((_, kv), length) in enumerate(zip(kept, past)):
            if length:
                keys[row, :, past_width - length:] = kv[layer, :kv_heads, :length]
                values[row, :, past_width - length:] = kv[layer, kv_heads:, :length]
        cache.update(keys, values, layer)
    return cache, fed, attention, positions

def row_keeper(decoder: SpecDecoder, prompts: Sequence[list[int]], n: int, width: int):
    """A function ``keep(decode_rows, original_rows, lengths)`` that copies those rows' real keys
    and values out of the decoder's buffer (the prompt's real positions, then every generated
    token but the last, which was never fed) into ``keep.kept[original_row]``, keys in the
    model's order (the decoder may keep them in its own)."""
    contexts = [len(prompts[row // n]) for row in range(len(prompts) * n)]
    heads = decoder.kv.shape[2] // 2
    order = decoder.key_order
    inverse = None if order is None else torch.argsort(torch.as_tensor(order, device=decoder.kv.device))

    def keep(decode_rows: torch.Tensor, original_rows: torch.Tensor, lengths: torch.Tensor) -> None:
        for r, o in zip(decode_rows.tolist(), original_rows.tolist()):
            if o in keep.kept:
                continue
            start, end = width - contexts[o], width + int(lengths[o]) - 1
            kv = decoder.kv[:, r, :, start:end].clone()
            if inverse is not None:
                kv[:, :heads] = kv[:, :heads][..., inverse]
            keep.kept[o] = kv

    keep.kept = {}
    return keep

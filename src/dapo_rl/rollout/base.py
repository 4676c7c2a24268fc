"""The rollout interface: prompts in, G sampled responses per prompt out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

FINISH_STOP = "stop"  # ended with EOS or a stop token (the token is part of the response)
FINISH_LENGTH = "length"  # hit max_new_tokens: truncated


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS


@dataclass
class Sample:
    """One generated response.

    ``response_ids`` includes the stop token when ``finish_reason == "stop"``: emitting it is an
    action of the policy and is trained like any other token.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None  # sampler's log-prob of each response token, when the engine gives them

    @property
    def truncated(self) -> bool:
        return self.finish_reason == FINISH_LENGTH


class RolloutEngine(Protocol):
    """Anything that samples responses from the current policy."""

    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids, no padding); result[i] holds prompt i's samples."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights."""
        ...


class InProcessEngine:
    """Base of the engines that sample from the training model itself, in chunks of prompts.

    Subclasses implement :meth:`_generate_chunk`; chunking bounds the memory of one call.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int, max_batch_prompts: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch_prompts = max_batch_prompts

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # the same module object: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), self.max_batch_prompts):
            results.extend(self._generate_chunk(prompts[start : start + self.max_batch_prompts], n, params))
        return results

    def _generate_chunk(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        raise NotImplementedError

"""Rollouts with Hugging Face ``generate`` on the training model itself."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, InProcessEngine, Sample, SamplingParams


def left_pad(sequences: Sequence[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, max_len]`` ids and attention mask with the sequences right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def split_response(generated: list[int], stop_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row at its first stop token (kept); the rest is padding."""
    for pos, token in enumerate(generated):
        if token in stop_ids:
            return generated[: pos + 1], FINISH_STOP
    return generated[:max_new_tokens], FINISH_LENGTH


class HFGenerateEngine(InProcessEngine):
    """Samples with ``model.generate`` from the very model being trained (no weight copy needed).

    Prompts are left-padded so every row's last prompt token is at the same position and
    generation starts in lock-step; ``generate`` derives position ids from the attention mask,
    so padding does not shift positions. ``generate`` does not report the sampler's log-probs.
    """

    reports_logprobs = False

    def _generate_chunk(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id, device)
        stop_ids = {self.eos_token_id, *params.stop_token_ids}
        greedy = params.temperature == 0
        # A fresh GenerationConfig, so that a checkpoint's generation_config.json (top_k=50,
        # repetition penalties, ...) cannot silently change the distribution we sample from.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            # Greedy decoding is deterministic: decode each prompt once and repeat it n times below.
            num_return_sequences=1 if greedy else n,
            eos_token_id=sorted(stop_ids),
            pad_token_id=self.pad_token_id,
            temperature=params.temperature if not greedy else 1.0,
            top_p=params.top_p if not greedy else 1.0,
            top_k=params.top_k if not greedy else 0,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        finally:
            self.model.train(was_training)
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        if greedy and n > 1:
            new_tokens = [row for row in new_tokens for _ in range(n)]
        grouped: list[list[Sample]] = []
        for i, prompt in enumerate(prompts):
            samples = []
            for row in new_tokens[i * n : (i + 1) * n]:
                response, reason = split_response(row, stop_ids, params.max_new_tokens)
                samples.append(Sample(prompt_ids=list(prompt), response_ids=response, finish_reason=reason))
            grouped.append(samples)
        return grouped

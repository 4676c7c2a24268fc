"""A toy rollout engine, added the way a user adds one: this module and an import path
(``rollout.engine=tests.toy:Engine``), no change to the library. It samples token by token with a
full forward of the whole sequence each time (no cache), so it is slow and obviously correct."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dapo_rl.rollout import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample, SamplingParams


class Engine(RolloutEngine):
    calls = 0  # generate calls made by every instance (the test reads it)

    def __init__(self, model: torch.nn.Module, eos_token_id: int):
        self.model = model
        self.eos_token_id = eos_token_id

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module, tokenizer: Any) -> "Engine":
        return cls(model, tokenizer.eos_token_id)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams) -> list[list[Sample]]:
        type(self).calls += 1
        was_training = self.model.training
        self.model.eval()
        stop = {self.eos_token_id, *params.stop_token_ids}
        out = []
        for prompt in prompts:
            samples = []
            for _ in range(n):
                ids, logps, reason = list(prompt), [], FINISH_LENGTH
                for _ in range(params.max_new_tokens):
                    logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                    greedy = params.temperature == 0  # greedy: log-probs at temperature 1
                    logp = torch.log_softmax(logits / (1.0 if greedy else params.temperature), -1)
                    token = int(logits.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1))
                    logps.append(float(logp[token]))
                    ids.append(token)
                    if token in stop:
                        reason = FINISH_STOP
                        break
                samples.append(Sample(prompt_ids=list(prompt), response_ids=ids[len(prompt):], finish_reason=reason, logprobs=logps))
            out.append(samples)
        self.model.train(was_training)
        return out

"""Examples → prompt token ids, with the configured template."""

from __future__ import annotations

from dataclasses import dataclass

from dapo_rl.data.datasets import Example, RowProblem
from dapo_rl.data.templates import render_prompt


@dataclass(frozen=True)
class EncodedPrompt:
    example: Example
    text: str
    ids: tuple[int, ...]


def encode_prompts(
    examples: list[Example],
    tokenizer,
    *,
    template: str = "raw",
    use_chat_template: bool = False,
    max_prompt_length: int | None = None,
) -> tuple[list[EncodedPrompt], list[RowProblem]]:
    """Render and tokenize each example; prompts longer than ``max_prompt_length`` are reported, not kept.

    A chat template already writes the special tokens it wants, so the tokenizer adds none then;
    otherwise it adds its usual ones (e.g. BOS).
    """
    encoded, skipped = [], []
    for index, example in enumerate(examples):
        text = render_prompt(example, template, tokenizer=tokenizer, use_chat_template=use_chat_template)
        ids = tuple(tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"])
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            row = example.metadata.get("source_row", index) if isinstance(example.metadata, dict) else index
            skipped.append(RowProblem(row=row, reason=f"prompt has {len(ids)} tokens > data.max_prompt_length={max_prompt_length}"))
            continue
        encoded.append(EncodedPrompt(example=example, text=text, ids=ids))
    return encoded, skipped

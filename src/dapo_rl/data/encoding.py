"""Examples → prompt token ids, with the configured template; a dataset (or the built-in task)
→ encoded prompts, the one loader that ``dapo train`` and ``dapo eval`` share."""

from __future__ import annotations

from dataclasses import dataclass

from dapo_rl.config import BUILTIN_PREFIX, PromptFields, require_choice
from dapo_rl.data.datasets import FORMATS, PRESETS, DatasetError, DatasetSpec, Example, RowProblem, load_examples
from dapo_rl.data.builtin_tasks import builtin_task
from dapo_rl.data.templates import TEMPLATES, render_prompt


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
    tools: list[dict] | None = None,
) -> tuple[list[EncodedPrompt], list[RowProblem]]:
    """Render and tokenize each example; prompts longer than ``max_prompt_length`` are reported, not kept.

    A chat template already writes the special tokens it wants, so the tokenizer adds none then;
    otherwise it adds its usual ones (e.g. BOS).
    """
    encoded, skipped = [], []
    for index, example in enumerate(examples):
        text = render_prompt(example, template, tokenizer=tokenizer, use_chat_template=use_chat_template, tools=tools)
        ids = tuple(tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"])
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            row = example.metadata.get("source_row", index) if isinstance(example.metadata, dict) else index
            skipped.append(RowProblem(row=row, reason=f"prompt has {len(ids)} tokens > data.max_prompt_length={max_prompt_length}"))
            continue
        encoded.append(EncodedPrompt(example=example, text=text, ids=ids))
    return encoded, skipped


@dataclass(frozen=True)
class PromptSource:
    """Where prompts come from and how they are rendered (config section ``data``, or ``dapo eval``'s options).

    ``dataset.path`` is a dataset path or ``builtin:chain``; ``held_out`` picks the built-in
    task's held-out split (the one evaluations use). The rendering fields are those of
    :func:`encode_prompts`.
    """

    dataset: DatasetSpec
    held_out: bool = False
    template: str = "raw"
    use_chat_template: bool = False
    max_prompt_length: int | None = None
    builtin_train_size: int = 20000
    builtin_eval_size: int = 256
    tools: tuple = ()  # JSON schemas of the tools the chat template shows the model


def check_prompt_fields(fields: PromptFields, prefix: str = "") -> None:
    """The names among ``fields`` this room knows (format, preset, template); raises
    :class:`~dapo_rl.config.ConfigError` naming ``prefix`` + the key (``"data."`` for ``dapo train``)."""
    require_choice(fields.format, f"{prefix}format", FORMATS)
    require_choice(fields.preset, f"{prefix}preset", PRESETS)
    require_choice(fields.template, f"{prefix}template", TEMPLATES)


def prompt_source(fields: PromptFields, path: str, *, held_out: bool, split: str = "train", max_rows: int | None = None,
                  builtin_train_size: int = 20000, tools: tuple = ()) -> PromptSource:
    """Where the prompts of ``path`` come from and how they are rendered, as ``fields`` (``dapo
    train``'s ``data`` section or ``dapo eval``'s options) say. ``max_rows`` caps the usable rows."""
    dataset = DatasetSpec(path=path, format=fields.format, preset=fields.preset, split=split, prompt_field=fields.prompt_field,
                          answer_field=fields.answer_field, max_rows=max_rows)
    return PromptSource(dataset=dataset, held_out=held_out, template=fields.template, use_chat_template=fields.use_chat_template,
                        max_prompt_length=fields.max_prompt_length, builtin_train_size=builtin_train_size,
                        builtin_eval_size=fields.builtin_eval_size, tools=tuple(tools))


def skipped_rows_note(skipped: list[RowProblem], shown: int = 3) -> str:
    """One line for rows :func:`load_prompts` skipped: how many, and why for the first ``shown``."""
    reasons = "; ".join(str(p) for p in skipped[:shown])
    return f"skipped {len(skipped)} unusable rows ({reasons}{'; ...' if len(skipped) > shown else ''})"


def load_prompts(source: PromptSource, tokenizer) -> tuple[list[EncodedPrompt], list[RowProblem]]:
    """The encoded prompts of ``source`` and the rows skipped (unusable, or prompts too long).

    Raises:
        DatasetError: the dataset cannot be read, or it has no usable row (the message says why,
            naming the path as ``data.path``).
        TemplateError: the template cannot render a prompt.
    """
    path = source.dataset.path
    if path.startswith(BUILTIN_PREFIX):
        try:
            task = builtin_task(path)
        except KeyError as exc:
            raise DatasetError(f"data.path: {exc.args[0]}, or a dataset path") from None
        # The held-out set is drawn first and does not depend on the train size, so it does not
        # build the (large) train split.
        train, held_out = task.splits(1 if source.held_out else source.builtin_train_size, source.builtin_eval_size, seed=0)
        examples, skipped = (held_out if source.held_out else train), []
    else:
        try:
            loaded = load_examples(source.dataset)
        except ValueError as exc:  # DatasetError, or a spec the loader refuses
            raise DatasetError(str(exc)) from None
        examples, skipped = list(loaded.examples), list(loaded.skipped)
    prompts, too_long = encode_prompts(examples, tokenizer, template=source.template, use_chat_template=source.use_chat_template,
                                       max_prompt_length=source.max_prompt_length, tools=list(source.tools) or None)
    skipped += too_long
    if source.dataset.max_rows is not None:
        prompts = prompts[: source.dataset.max_rows]
    if not prompts:
        reasons = "; ".join(str(p) for p in skipped[:3])
        raise DatasetError(f"data.path: {path} has no usable rows ({reasons}); fix the rows, the field mapping "
                           f"(preset, prompt_field, answer_field) or max_prompt_length")
    return prompts, skipped

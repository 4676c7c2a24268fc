"""Prompt templates: how an :class:`~dapo_rl.data.datasets.Example` becomes the text a model sees.

The instruction wording matters for RL from verifiable rewards: the reward function can only
verify an answer it can find, so the prompt must ask for it in the form the verifier parses
(``Answer: ...`` for DAPO-Math, ``#### ...`` for GSM8K).

Every template works on chat messages internally: a plain-text prompt is one user message, and an
instruction wraps the *last user message* (the question; a system prompt or few-shot turns before
it stay untouched). The result is then either rendered with the tokenizer's chat template (for
instruction-tuned models) or, without one, the message contents are joined (for base models).
"""

from __future__ import annotations

from pathlib import Path

from typing import Any

from dapo_rl.data.datasets import Example

__all__ = [
    "DAPO_INSTRUCTION",
    "GSM8K_INSTRUCTION",
    "TEMPLATES",
    "TemplateError",
    "apply_instruction",
    "render_messages",
    "render_prompt",
]

#: The DAPO-Math-17k prompt (arXiv 2503.14476); DAPO's verifier reads the ``Answer:`` line.
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

#: The GSM8K instruction as verl's preprocessing writes it (question, one space, instruction), so
#: results stay comparable with verl runs; the GSM8K verifier reads the ``####`` line.
GSM8K_INSTRUCTION = '{problem} Let\'s think step by step and output the final answer after "####".'

#: Template names (config key ``data.template``). ``chat`` is ``raw`` through the chat template.
TEMPLATES: tuple[str, ...] = ("raw", "dapo", "gsm8k", "chat")

_INSTRUCTIONS = {"dapo": DAPO_INSTRUCTION, "gsm8k": GSM8K_INSTRUCTION}

# Text around the "{problem}" slot, used to recognise an already-wrapped question.
_INSTRUCTION_AFFIXES = {name: tuple(fmt.split("{problem}")) for name, fmt in _INSTRUCTIONS.items()}

# How message contents are joined when no chat template is used: a blank line keeps a system
# prompt or few-shot turn visibly apart from the question.
_RAW_JOIN = "\n\n"


class TemplateError(ValueError):
    """A prompt cannot be rendered as asked (unknown template, tokenizer without chat template)."""


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise TemplateError(f"data.template={template!r} is not a known template; valid values: {', '.join(TEMPLATES)}")


def _as_messages(example: Example) -> list[dict[str, str]]:
    # Copies, so wrapping an instruction never mutates the (shared, frozen) example.
    if isinstance(example.prompt, str):
        return [{"role": "user", "content": example.prompt}]
    return [dict(message) for message in example.prompt]


def _last_user_index(messages: list[dict[str, str]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise TemplateError("the prompt has no user message to put the question instruction on")


def apply_instruction(problem: str, template: str) -> str:
    """Wrap one question in the template's instruction (``raw``/``chat`` leave it as is).

    Idempotent: a question already in the instruction's form is returned unchanged. This matters
    because DAPO-Math-17k ships its prompts pre-wrapped, and wrapping twice would show the model a
    prompt it was never meant to see.
    """
    _check_template(template)
    if template not in _INSTRUCTIONS:
        return problem
    prefix, suffix = _INSTRUCTION_AFFIXES[template]
    if problem.startswith(prefix) and problem.endswith(suffix):
        return problem
    return _INSTRUCTIONS[template].format(problem=problem)


def render_messages(example: Example, template: str) -> list[dict[str, str]]:
    """The example as chat messages with the template's instruction applied to the last user turn.

    This is what a chat-template tokenizer or a chat-completions endpoint (e.g. vLLM's) takes.
    """
    _check_template(template)
    messages = _as_messages(example)
    index = _last_user_index(messages)
    messages[index]["content"] = apply_instruction(messages[index]["content"], template)
    return messages


def render_prompt(
    example: Example,
    template: str,
    tokenizer: Any | None = None,
    use_chat_template: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The exact text fed to the model for ``example``.

    ``template`` picks the instruction (``raw``, ``dapo``, ``gsm8k``); ``chat`` is ``raw`` with the
    chat template forced on. With ``use_chat_template`` (or ``chat``) the messages go through
    ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)``, so the
    text ends where the assistant's reply begins; a tokenizer without a chat template is an error
    rather than a silent fallback, because a chat model prompted without its template trains on
    the wrong distribution. Without a chat template, message contents are joined by a blank line.
    ``tools``: the JSON schemas of the tools the model may call, rendered by the chat template
    (its ``tools=`` argument); a template that ignores them is an error naming ``data.chat_template``.
    """
    messages = render_messages(example, template)
    if template == "chat" or use_chat_template:
        return _apply_chat_template(messages, tokenizer, tools)
    return _RAW_JOIN.join(message["content"] for message in messages)


def _apply_chat_template(messages: list[dict[str, str]], tokenizer: Any | None, tools: list[dict[str, Any]] | None = None) -> str:
    if tokenizer is None:
        raise TemplateError(
            "a chat template was requested (data.use_chat_template=true or data.template='chat') but no "
            "tokenizer was given"
        )
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TemplateError(
            f"tokenizer {name!r} has no chat template, but one was requested (data.use_chat_template=true "
            "or data.template='chat'); fix: set data.use_chat_template=false and a non-chat data.template, "
            "or use a model whose tokenizer defines a chat template"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools or None)
    if not isinstance(text, str):  # guards against a tokenizer API that tokenizes regardless
        raise TemplateError(f"tokenizer.apply_chat_template returned {type(text).__name__}, expected text")
    if tools and text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True):
        raise TemplateError("data.chat_template: the model's chat template ignores tools= (the prompt renders the same "
                            "with and without rollout.tools); give a template that shows them, data.chat_template=PATH "
                            "(a Jinja file)")
    return text


_OBSERVATION_MARK = "\x00OBSERVATION\x00"


def observation_glue(tokenizer: Any, role: str = "tool") -> tuple[str, str]:
    """How the chat template continues a conversation after the model's turn with a ``role``
    message: ``(before, after)`` such that the text ``before + observation + after`` follows the
    model's end-of-turn token and ends where the model's next turn begins.

    Found by rendering a dummy conversation with and without the message (TRL's approach) and
    keeping the difference, so that the whole conversation stays a prefix-extension of what came
    before: the model's tokens are never re-tokenized. The part of the template after the
    assistant's content that the model emits itself (its end-of-turn token) is not repeated.
    Without a chat template the observation follows the model's text as it is: ``("", "")``.

    Raises:
        TemplateError: the template does not render the conversation as an extension (the message
            names ``data.chat_template``).
    """
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    dummy = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    base = tokenizer.apply_chat_template(dummy, tokenize=False)
    full = tokenizer.apply_chat_template(dummy + [{"role": role, "content": _OBSERVATION_MARK}], tokenize=False,
                                         add_generation_prompt=True)
    if not (isinstance(base, str) and isinstance(full, str) and full.startswith(base) and _OBSERVATION_MARK in full):
        raise TemplateError(f"the chat template does not render a {role} message after the model's turn as a continuation "
                            f"of the conversation; give one that does with data.chat_template=PATH (a Jinja file)")
    tail = base[base.rindex("A") + 1:]  # what the template writes after the assistant's content
    eos = tokenizer.eos_token or ""
    emitted = eos if eos and tail.startswith(eos) else ""  # the model's own end-of-turn token
    before, _, after = (tail[len(emitted):] + full[len(base):]).partition(_OBSERVATION_MARK)
    return before, after


def use_chat_template_file(tokenizer: Any, path: str | None) -> None:
    """Give ``tokenizer`` the chat template in the Jinja file ``path`` (``data.chat_template``);
    None keeps its own. It is saved with the tokenizer (the final policy, checkpoints).

    Raises:
        TemplateError: the file cannot be read (the message names data.chat_template).
    """
    if path is None:
        return
    try:
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"data.chat_template: cannot read {path} ({exc.__class__.__name__}); give a Jinja chat-template file") from None

"""Answer extraction: find the final answer a model wrote inside a free-form response.

Three answer formats are understood:

* **DAPO** (``"dapo"``): the DAPO paper's prompt asks for a last line ``Answer: X``. The *last*
  occurrence wins, so a model that writes ``Answer:`` while thinking and corrects itself later is
  judged on its final word. Markdown emphasis (``**Answer:** X``, ``**Answer**: X``), a trailing
  period, ``$...$`` around the value and a ``\\boxed{}`` around it are tolerated.
* **GSM8K** (``"gsm8k"``): ``#### X``, the convention of the GSM8K reference solutions.
* **Boxed** (``"boxed"``): LaTeX ``\\boxed{X}`` or ``\\fbox{X}`` with arbitrarily nested braces;
  the last one wins.

``"auto"`` tries DAPO, then boxed, then GSM8K. Extraction is purely syntactic and never raises on
any input string; judging whether the extracted answer is right is :mod:`dapo_rl.rewards.verify`'s
job.
"""

from __future__ import annotations

import re

__all__ = [
    "ANSWER_STYLES",
    "extract_answer",
    "extract_boxed",
    "extract_dapo",
    "extract_ground_truth",
    "extract_gsm8k",
    "find_boxed",
    "strip_math_delimiters",
    "unwrap_boxes",
]

#: The styles accepted by :func:`extract_answer` and :func:`extract_ground_truth`.
ANSWER_STYLES: tuple[str, ...] = ("auto", "dapo", "gsm8k", "boxed")

# ``answer`` must not be the tail of a longer word ("reanswer:"), but "Final Answer:" is welcome.
# Emphasis markers may sit on either side of the colon (``**Answer:**`` and ``**Answer**:``); a
# full-width colon shows up in outputs of models trained on Chinese data. One character class
# between the word and the colon (not ``[ ]*[*]*[ ]*``) keeps matching linear on long blank runs.
_DAPO_RE = re.compile(r"(?<![A-Za-z])answer[ \t*_]*[:：](?P<value>[^\n]*)", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####(?P<value>[^\n]*)")
# ``\boxed`` / ``\fbox`` not followed by a letter, so ``\boxedsomething`` is not a box.
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Pairs of math delimiters that may wrap a whole answer, outermost first.
_DELIMITERS: tuple[tuple[str, str], ...] = (
    ("$$", "$$"),
    ("$", "$"),
    ("\\(", "\\)"),
    ("\\[", "\\]"),
)


def _match_brace(text: str, open_index: int) -> int | None:
    """Return the index of the ``}`` closing the ``{`` at ``open_index``, or ``None``.

    Escaped braces (``\\{`` and ``\\}``, as in a LaTeX set ``\\{1, 2\\}``) do not count, which is
    why this is a scanner and not a regular expression.
    """
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _brace_matches(text: str) -> dict[int, int]:
    """Map the index of every unescaped ``{`` in ``text`` to its closing ``}``, in one pass.

    Unclosed braces are absent from the map. One pass over the text keeps extraction linear even
    for adversarial responses with thousands of unclosed ``\\boxed{`` (a scan per box would be
    quadratic).
    """
    matches: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            matches[stack.pop()] = i
        i += 1
    return matches


def find_boxed(text: str) -> list[str]:
    """Return the contents of every top-level ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Boxes nested inside another box are part of the outer box's content, not separate entries.
    A box whose braces never close (a truncated response) is skipped. The brace-less form
    ``\\boxed 5`` (seen in MATH reference solutions) yields the single token after the space.
    """
    found: list[str] = []
    if "\\" not in text:
        return found
    matches: dict[int, int] | None = None
    pos = 0
    n = len(text)
    while pos < n:
        m = _BOX_CMD_RE.search(text, pos)
        if m is None:
            break
        j = m.end()
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            if matches is None:
                matches = _brace_matches(text)
            close = matches.get(j)
            if close is None:
                pos = m.end()
                continue
            found.append(text[j + 1 : close])
            pos = close + 1
        elif j > m.end() and j < n:
            # ``\\boxed 5``: the argument is one token, ending at whitespace or a math delimiter.
            k = j
            while k < n and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > j:
                found.append(text[j:k])
            pos = k
        else:
            pos = m.end()
    return found


def unwrap_boxes(value: str) -> str:
    """Peel ``\\boxed{...}`` layers that wrap the *whole* value (``\\boxed{\\boxed{5}}`` -> ``5``)."""
    for _ in range(16):  # bounded: a pathological input cannot make this loop forever
        stripped = value.strip()
        m = _BOX_CMD_RE.match(stripped)
        if m is None:
            return stripped
        j = m.end()
        while j < len(stripped) and stripped[j] in " \t":
            j += 1
        if j >= len(stripped) or stripped[j] != "{":
            # Brace-less ``\\boxed 5`` holding the whole value.
            rest = stripped[m.end() :]
            if rest[:1].isspace() and rest.strip() and not any(c.isspace() for c in rest.strip()):
                return rest.strip()
            return stripped
        close = _match_brace(stripped, j)
        if close is None or close != len(stripped) - 1:
            return stripped
        value = stripped[j + 1 : close]
    return value.strip()


def strip_math_delimiters(value: str) -> str:
    """Remove one or more layers of ``$...$``, ``$$...$$``, ``\\(...\\)``, ``\\[...\\]`` around ``value``.

    Only delimiters that wrap the whole string are removed: ``$5$ and $6$`` is left alone because
    its first ``$`` does not pair with its last one.
    """
    value = value.strip()
    for _ in range(8):
        for left, right in _DELIMITERS:
            if len(value) >= len(left) + len(right) and value.startswith(left) and value.endswith(right):
                inner = value[len(left) : len(value) - len(right)]
                # ``$5$ and $6$`` starts and ends with ``$`` but is two formulas, not one.
                if left == "$" and "$" in inner:
                    continue
                value = inner.strip()
                break
        else:
            return value
    return value


def _clean_value(value: str) -> str | None:
    """Tidy a raw answer value cut out of a line; ``None`` when nothing meaningful is left."""
    # Emphasis wrapped around the value (``Answer: **5**``) or left over from ``**Answer:**``.
    value = _strip_emphasis(value)
    # A sentence-ending period is punctuation, not part of the answer; ``5.`` is still 5.
    while value.endswith(".") and not value.endswith("..."):
        value = value[:-1].rstrip()
    value = strip_math_delimiters(value)
    value = unwrap_boxes(value)
    value = strip_math_delimiters(value)
    value = _strip_emphasis(value)
    return value or None


def _strip_emphasis(value: str) -> str:
    """Strip whitespace and markdown emphasis markers from both ends, in any interleaving."""
    previous = None
    while value != previous:
        previous = value
        value = value.strip().strip("*_")
    return value


def extract_dapo(text: str) -> str | None:
    """Return the value of the last ``Answer: X`` in ``text`` (case-insensitive), or ``None``.

    The value runs to the end of its line. If the last ``Answer:`` has nothing after it the
    response has no answer (``None``): an earlier ``Answer:`` was superseded by the empty one.
    """
    last = None
    for last in _DAPO_RE.finditer(text):
        pass
    if last is None:
        return None
    return _clean_value(last.group("value"))


def extract_gsm8k(text: str) -> str | None:
    """Return the value after the last ``####`` in ``text`` (GSM8K convention), or ``None``."""
    last = None
    for last in _GSM8K_RE.finditer(text):
        pass
    if last is None:
        return None
    return _clean_value(last.group("value"))


def extract_boxed(text: str) -> str | None:
    """Return the content of the last top-level ``\\boxed{}`` / ``\\fbox{}`` in ``text``, or ``None``.

    Nested boxes are peeled: ``\\boxed{\\boxed{5}}`` gives ``5``.
    """
    boxes = find_boxed(text)
    if not boxes:
        return None
    return _clean_value(boxes[-1])


def _check_style(style: str) -> None:
    if style not in ANSWER_STYLES:
        raise ValueError(f"Unknown answer style {style!r}; expected one of {', '.join(ANSWER_STYLES)}.")


def extract_answer(text: str, style: str = "auto") -> str | None:
    """Extract the final answer from a model response.

    Args:
        text: the response. Anything that is not a string yields ``None``.
        style: ``"dapo"`` (last ``Answer: X``), ``"gsm8k"`` (last ``#### X``), ``"boxed"`` (last
            ``\\boxed{X}``) or ``"auto"`` (try them in the order dapo, boxed, gsm8k).

    Returns:
        The answer string, stripped of surrounding markup, or ``None`` when the response holds no
        answer in the requested format.

    Raises:
        ValueError: ``style`` is not one of :data:`ANSWER_STYLES` (a configuration error, raised
            eagerly so it is not mistaken for a wrong answer).
    """
    _check_style(style)
    if not isinstance(text, str) or not text:
        return None
    if style == "dapo":
        return extract_dapo(text)
    if style == "gsm8k":
        return extract_gsm8k(text)
    if style == "boxed":
        return extract_boxed(text)
    for extractor in (extract_dapo, extract_boxed, extract_gsm8k):
        answer = extractor(text)
        if answer is not None:
            return answer
    return None


def extract_ground_truth(text: str, style: str = "auto") -> str:
    """Extract the reference answer from a dataset's ground-truth field.

    Datasets store ground truths in several shapes, all handled here:

    * a GSM8K reference solution, ``"... reasoning ... #### 72"`` -> ``"72"``;
    * a MATH-style solution or a bare ``\\boxed{...}`` -> the last box's content;
    * a plain answer (``"72"``, ``"\\frac{1}{2}"``, ``"$x^2$"``) -> itself, delimiters removed.

    ``style`` names the format to look for first (``"auto"`` looks for ``####``, then a box, then
    ``Answer:``); when that marker is absent the text is taken as a plain answer, because a ground
    truth, unlike a model response, is always meant to hold an answer.

    Returns:
        The reference answer; ``""`` only when ``text`` is empty or not a string.
    """
    _check_style(style)
    if not isinstance(text, str):
        return ""
    if style == "auto":
        order = (extract_gsm8k, extract_boxed, extract_dapo)
    elif style == "gsm8k":
        order = (extract_gsm8k,)
    elif style == "boxed":
        order = (extract_boxed,)
    else:
        order = (extract_dapo,)
    for extractor in order:
        answer = extractor(text)
        if answer is not None:
            return answer
    return _clean_value(text) or ""

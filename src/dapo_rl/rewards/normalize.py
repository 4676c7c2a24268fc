"""Cheap, in-process answer normalisation and exact numeric comparison.

This is the fast path of verification: most answers in RL-from-verifiable-rewards training are
plain numbers or short strings, and deciding ``"1,000 dollars"`` vs ``"1000"`` must not cost a
subprocess round trip or a SymPy parse. Everything here is pure string work on bounded inputs and
never raises on any string.

Conventions (chosen deliberately; tests pin them down):

* Thousands separators are removed only where they form proper groups of three:
  ``"1,000"`` is 1000, but ``"1,2"`` is not a number (it reads as the pair (1, 2)) and is **not**
  equal to 12 or 1.2; ``"1.000"`` is one, so ``"1,000"`` vs ``"1.000"`` is False.
* Units after a number are dropped: ``"72 dollars"``, ``"5 cm"``, ``"5cm"``, ``"18 per week"``
  all reduce to the number. With a space, any word of two letters or more counts as a unit except
  mathematical names (``2 pi`` stays ``2 pi``); without a space only known unit abbreviations do
  (``5x`` stays ``5x``). A single-letter unit is recognised only inside ``\\text{}`` (``5\\text{ m}``).
* A percentage equals both its number and its fraction: ``"50%"`` matches ``"50"`` and ``"0.5"``.
* Numbers compare exactly as rationals (``3/4`` = ``0.75`` = ``\\frac{3}{4}``). A decimal written
  with six or more decimal places also matches any value that rounds to it (``0.333333`` = 1/3),
  and values that differ only by floating-point noise (relative 1e-12, one side written with 12+
  decimals) match; a coarser decimal does not (``0.33`` != 1/3).
* A leading ``+``, ``x =`` (a single-letter variable assignment), a trailing period, ``$``,
  ``\\left``/``\\right``, spacing commands and degree signs are ignored; ``\\dfrac``/``\\tfrac``
  read as ``\\frac``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from .extract import strip_math_delimiters, unwrap_boxes

__all__ = [
    "ParsedNumber",
    "clean_answer",
    "normalize_answer",
    "numbers_match",
    "parse_number",
]

# Longest string the number parser looks at: Python refuses int() on > 4300 digits, and nothing a
# model writes as a final answer is that long.
_MAX_NUMBER_CHARS = 2000
# Scientific-notation exponents beyond this would build enormous exact rationals.
_MAX_EXPONENT = 400

_TEXT_COMMANDS = (
    "text",
    "textbf",
    "textit",
    "textrm",
    "textnormal",
    "texttt",
    "textsf",
    "mathrm",
    "mathbf",
    "mathit",
    "mathsf",
    "mathtt",
    "mbox",
    "hbox",
    "operatorname",
)
_TEXT_CMD_RE = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")(?![A-Za-z])\s*\{")

# Number as it may appear before a unit: sign, digits with separators, decimals, a/b, percent.
_NUM_PREFIX = (
    r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:/\d+)?(?:\s*%)?"
    r"|[-+]?\\frac\{[-+]?\d+(?:\.\d+)?\}\{[-+]?\d+(?:\.\d+)?\}"
)
# ``5\text{ m}``: a number followed by one final text group; the group is a unit whatever it says.
_NUM_THEN_TEXT_RE = re.compile(
    r"^(?P<num>" + _NUM_PREFIX + r")\s*\\(?:text|mathrm|textrm|mbox|textnormal)\s*\{[^{}]*\}\s*\.?$"
)
_NUM_THEN_REST_RE = re.compile(r"^(?P<num>" + _NUM_PREFIX + r")(?P<space>\s*)(?P<rest>.+)$", re.DOTALL)
# What a unit phrase may consist of: words, spaces, "/", "per", exponents 2 and 3 (cm^2, m³).
# Possessive quantifiers: with plain ``+`` a long letter run followed by a stray character makes
# the engine try every way of splitting the run into words (exponential time).
_UNIT_PHRASE_RE = re.compile(r"(?:[A-Za-z]++\.?|\s++|/|\^\{?[23]\}?|[²³])++")
_WORD_RE = re.compile(r"[A-Za-z]+")

# Unit abbreviations accepted glued to a number (``5cm``); with a space any word qualifies.
_KNOWN_UNITS = frozenset(
    """
    cm mm km nm um dm ft yd mi inch inches feet foot meter meters metre metres mph kph kmh
    kg mg lb lbs oz ton tons gram grams kilogram kilograms pound pounds ounce ounces
    ml mL cl dl liter liters litre litres gal gallon gallons cup cups
    sec secs min mins hr hrs hour hours day days week weeks month months year years yr yrs
    second seconds minute minutes
    usd dollar dollars cent cents euro euros
    deg degree degrees rad kb mb gb tb kw kwh
    """.split()
)
# Words that are mathematics, not units: ``2 pi`` must not become ``2``.
_MATH_WORDS = frozenset(
    """
    pi e i oo inf infty infinity sqrt exp ln log lg sin cos tan cot sec csc arcsin arccos arctan
    sinh cosh tanh mod pmod frac dfrac tfrac binom choose cdot times div and or to
    """.split()
)

_SPACING_RE = re.compile(r"\\[,!;:> ]|~")
_SIZING_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![A-Za-z])")
_DISPLAY_RE = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°")
_PERCENT_WORD_RE = re.compile(r"(?<=\d)\s*(?:percent|per\s+cent|pct)\b\.?", re.IGNORECASE)
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z]\s*=\s*(?P<rhs>[^=<>]+)$")
_THOUSANDS_COMMA_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")
_THOUSANDS_SPACE_RE = re.compile(r"^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?%?$")
_COMMAND_TAIL_RE = re.compile(r"\\[A-Za-z]+$")

# Number grammar used by :func:`parse_number` (input has no whitespace).
_DECIMAL_RE = re.compile(r"^(?P<sign>[-+]?)(?P<int>\d*)(?:\.(?P<frac>\d*))?(?:[eE](?P<exp>[-+]?\d{1,6}))?(?P<pct>%?)$")
_SLASH_RE = re.compile(r"^(?P<sign>[-+]?)(?P<a>\d+(?:\.\d+)?)/(?P<b>\d+(?:\.\d+)?)(?P<pct>%?)$")
_FRAC_RE = re.compile(r"^(?P<sign>[-+]?)\\frac\{(?P<a>[-+]?\d+(?:\.\d+)?)\}\{(?P<b>[-+]?\d+(?:\.\d+)?)\}(?P<pct>%?)$")
_FRAC_SHORT_RE = re.compile(r"^(?P<sign>[-+]?)\\frac(?P<a>\d)(?P<b>\d)(?P<pct>%?)$")


def _unwrap_text_commands(text: str) -> str:
    """Replace ``\\text{...}`` (and friends) by their content, innermost braces respected."""
    for _ in range(64):  # bounded: each round removes one command
        m = _TEXT_CMD_RE.search(text)
        if m is None:
            return text
        open_index = m.end() - 1
        depth = 0
        close = None
        for k in range(open_index, len(text)):
            ch = text[k]
            if ch == "{" and (k == 0 or text[k - 1] != "\\"):
                depth += 1
            elif ch == "}" and (k == 0 or text[k - 1] != "\\"):
                depth -= 1
                if depth == 0:
                    close = k
                    break
        if close is None:
            # Unclosed ``\text{``: drop the command word so the loop terminates.
            text = text[: m.start()] + text[open_index + 1 :]
        else:
            text = text[: m.start()] + text[open_index + 1 : close] + text[close + 1 :]
    return text


def _strip_units(text: str) -> str:
    """Drop a unit phrase after a leading number (``"72 dollars"`` -> ``"72"``); see module doc."""
    m = _NUM_THEN_REST_RE.match(text)
    if m is None:
        return text
    rest = m.group("rest").strip()
    if not rest or not _UNIT_PHRASE_RE.fullmatch(rest):
        return text
    words = [w.lower() for w in _WORD_RE.findall(rest)]
    if not words or len(words) > 4:
        return text
    if any(w in _MATH_WORDS for w in words if w != "per"):
        return text
    # Only the first word decides: after it, ``km/h`` or ``per week`` are clearly unit phrases.
    first = words[0]
    ok = (len(first) >= 2 or first in _KNOWN_UNITS) if m.group("space") else first in _KNOWN_UNITS
    return m.group("num").strip() if ok else text


def squeeze_spaces(text: str) -> str:
    """Remove whitespace, except where removing it would merge tokens.

    ``1 2`` must not become ``12``, and ``\\pi r`` must not become the unknown command ``\\pir``.
    """
    parts = re.split(r"(\s+)", text)
    out: list[str] = []
    for idx, part in enumerate(parts):
        if not part:
            continue
        if not part.isspace():
            out.append(part)
            continue
        left = parts[idx - 1] if idx > 0 else ""
        right = parts[idx + 1] if idx + 1 < len(parts) else ""
        digits_apart = bool(left) and bool(right) and left[-1].isdigit() and right[0].isdigit()
        command_then_letter = bool(right) and right[0].isalpha() and _COMMAND_TAIL_RE.search(left) is not None
        if digits_apart or command_then_letter:
            out.append(" ")
    return "".join(out)


def clean_answer(text: str) -> str:
    """Normalise an answer string while keeping the spacing LaTeX needs.

    This is the form handed to the symbolic verifier: markup, units, currency, separators and
    assignment prefixes are gone, but ``\\pi r`` keeps its space. See the module docstring for
    the exact conventions. Non-strings give ``""``.
    """
    if not isinstance(text, str):
        return ""
    s = text.replace("\u2212", "-").replace("\u00a0", " ").replace("\u2009", " ").replace("\u202f", " ")
    s = strip_math_delimiters(s)
    s = unwrap_boxes(s)
    s = strip_math_delimiters(s)
    s = _SIZING_RE.sub("", s)
    s = _DISPLAY_RE.sub("", s)
    # LaTeX's ``1{,}000`` and thin-space ``1\,000`` are thousands separators.
    s = s.replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", "", s)
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\%", "%").replace("\\$", "$").replace("$", "")
    for currency in ("£", "€", "¥"):
        s = s.replace(currency, "")
    s = _DEGREE_RE.sub("", s)
    s = s.strip()
    m = _NUM_THEN_TEXT_RE.match(s)
    if m is not None:
        s = m.group("num")
    s = _unwrap_text_commands(s)
    s = _PERCENT_WORD_RE.sub("%", s)
    s = " ".join(s.split())
    while s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _ASSIGNMENT_RE.match(s)
    if m is not None and m.group("rhs").strip():
        s = m.group("rhs").strip()
    s = _strip_units(s)
    if s.startswith("+") and len(s) > 1:
        s = s[1:].lstrip()
    if _THOUSANDS_COMMA_RE.match(s):
        s = s.replace(",", "")
    elif _THOUSANDS_SPACE_RE.match(s):
        s = s.replace(" ", "")
    return s.strip()


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer, for exact string comparison.

    :func:`clean_answer` followed by whitespace removal (except between two digits or after a
    LaTeX command followed by a letter). Two answers with equal normal forms are equivalent;
    unequal normal forms may still be equivalent mathematically (that is the verifier's job).
    """
    return squeeze_spaces(clean_answer(text))


@dataclass(frozen=True)
class ParsedNumber:
    """A number read from an answer string.

    Attributes:
        value: the exact value (a percentage keeps its written number: ``50%`` has value 50).
        decimals: digits written after the decimal point, or ``None`` for integers and fractions;
            it sets how precisely the author meant the value (``0.333333`` vs ``0.33``).
        percent: whether the number carried a ``%``.
    """

    value: Fraction
    decimals: int | None
    percent: bool


def parse_number(text: str) -> ParsedNumber | None:
    """Parse a normalised answer (see :func:`normalize_answer`) as a number, or return ``None``.

    Accepted: integers, decimals, scientific notation (``1e3``), ``a/b``, ``\\frac{a}{b}``,
    ``\\frac12``, each with an optional sign and ``%``. Anything else, including division by zero
    and absurdly long digit strings, is not a number.
    """
    if not text or len(text) > _MAX_NUMBER_CHARS:
        return None
    try:
        m = _DECIMAL_RE.match(text)
        if m is not None:
            int_part, frac_part = m.group("int"), m.group("frac")
            if not int_part and not frac_part:
                return None
            value = Fraction(int(int_part or "0"))
            if frac_part:
                value += Fraction(int(frac_part), 10 ** len(frac_part))
            decimals = len(frac_part) if frac_part else None
            if m.group("exp"):
                exponent = int(m.group("exp"))
                if abs(exponent) > _MAX_EXPONENT:
                    return None
                value *= Fraction(10) ** exponent
                # 1.5e-3 is written to 4 decimal places; 1.5e3 to none.
                decimals = max(0, (decimals or 0) - exponent) or None
            if m.group("sign") == "-":
                value = -value
            return ParsedNumber(value, decimals, bool(m.group("pct")))
        m = _SLASH_RE.match(text) or _FRAC_RE.match(text) or _FRAC_SHORT_RE.match(text)
        if m is not None:
            numerator = Fraction(m.group("a"))
            denominator = Fraction(m.group("b"))
            if denominator == 0:
                return None
            value = numerator / denominator
            if m.group("sign") == "-":
                value = -value
            return ParsedNumber(value, None, bool(m.group("pct")))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _close(a: ParsedNumber, a_value: Fraction, b: ParsedNumber, b_value: Fraction) -> bool:
    """Whether two values match, allowing for the precision a written decimal implies."""
    if a_value == b_value:
        return True
    diff = abs(a_value - b_value)
    for number in (a, b):
        # A decimal with 6+ places is a rounded value: accept what rounds to it.
        if number.decimals is not None and number.decimals >= 6 and diff <= Fraction(1, 2 * 10**number.decimals):
            return True
    # Float noise such as 0.30000000000000004 written out by a model's calculator.
    if max(a.decimals or 0, b.decimals or 0) >= 12:
        scale = max(abs(a_value), abs(b_value))
        if diff <= scale * Fraction(1, 10**12):
            return True
    return False


def numbers_match(prediction: ParsedNumber, ground_truth: ParsedNumber) -> bool:
    """Whether two parsed numbers denote the same answer (conventions in the module docstring)."""
    if prediction.percent == ground_truth.percent:
        return _close(prediction, prediction.value, ground_truth, ground_truth.value)
    # Exactly one side is a percentage: ``50%`` answers both "50" and "0.5".
    pct, plain = (prediction, ground_truth) if prediction.percent else (ground_truth, prediction)
    return _close(pct, pct.value, plain, plain.value) or _close(pct, pct.value / 100, plain, plain.value)

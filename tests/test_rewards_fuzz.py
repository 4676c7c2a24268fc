"""Property-based fuzzing of extraction, verification and scoring (10,500 generated examples).

The properties: no exception ever escapes, every call returns within its timeout (plus slack for
killing a worker), and round trips that must hold (a number written several ways, an ``Answer:``
line after decoys) do hold. The strategies mix random text with the pieces answers are made of:
LaTeX commands, braces, digits, separators, ``Answer:`` and ``####`` markers.
"""

from __future__ import annotations

import time
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dapo_rl.rewards import (
    ANSWER_STYLES,
    extract_answer,
    extract_ground_truth,
    is_equivalent,
    normalize_answer,
    parse_number,
    resolve_reward_fn,
    score_responses,
    verifier_stats,
    verify_answer,
    verify_batch,
    warm_up,
)

# Kill + reply + scheduling on a loaded 2-core machine, and, rarely, waiting for a replacement
# worker when both were just killed for timeouts.
SLACK_S = 5.0


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# fmt: off
FRAGMENTS = st.sampled_from(
    [
        "\\frac{", "\\dfrac", "\\boxed{", "\\fbox{", "\\boxed ", "\\text{", "\\left(", "\\right)", "\\sqrt",
        "\\pi", "\\%", "\\$", "\\,", "\\{", "\\}", "{,}", "{", "}", "(", ")", "[", "]", "$", "$$", "\\(", "\\)",
        "^", "_", "\\", "%", ",", ".", "-", "+", "/", "*", "=", " ", "\n", "\t", "**", "Answer:", "**Answer:**",
        "answer：", "Final Answer: ", "####", "# ", "x", "e", "pi", "dollars", "cm", "percent", "\u2212", "°",
        "π", "∞", "1,000", "0.5", "1e5", "−", "\x00", "\ud800",
    ]
)
# fmt: on
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.builds("{}.{}".format, st.integers(-999_999, 999_999), st.integers(0, 9999)),
)
# Random text of any script, plus the fragments above; joined into one string.
MIXED = st.lists(st.one_of(st.text(max_size=8), NUMBERS, FRAGMENTS, FRAGMENTS), max_size=25).map("".join)
LONG_MIXED = st.lists(st.one_of(st.text(min_size=10, max_size=80), NUMBERS, FRAGMENTS), min_size=5, max_size=40).map(
    "".join
)

# Answers as models and datasets actually write them: mostly numbers in various dress, some words,
# some short LaTeX, some junk.
UNITS = st.sampled_from(["", " dollars", " cm", "cm", " km/h", "%", "\\%", " percent", "^\\circ", "\\text{ m}", "."])
DRESSED_NUMBER = st.builds(
    lambda sign, number, unit, wrap: wrap.format(sign + number + unit),
    st.sampled_from(["", "-", "+", "\u2212"]),
    st.one_of(
        NUMBERS,
        st.integers(0, 10**9).map(lambda n: f"{n:,}"),
        st.builds(lambda a, b: f"\\frac{{{a}}}{{{b}}}", st.integers(-99, 99), st.integers(0, 99)),
        st.builds(lambda a, b: f"{a}/{b}", st.integers(0, 999), st.integers(0, 99)),
    ),
    UNITS,
    st.sampled_from(["{}", "${}$", "\\boxed{{{}}}", "\\({}\\)", "{} ", "x = {}"]),
)
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
WORDS = st.lists(st.text(alphabet=LETTERS, min_size=1, max_size=8), min_size=1, max_size=3).map(" ".join)
ANSWERS = st.one_of(DRESSED_NUMBER, DRESSED_NUMBER, DRESSED_NUMBER, WORDS, MIXED)


@fuzz_settings(3000)
@given(text=MIXED, style=st.sampled_from(ANSWER_STYLES))
def test_extraction_never_raises(text, style):
    answer = extract_answer(text, style)
    assert answer is None or (isinstance(answer, str) and answer == answer.strip() and answer)
    truth = extract_ground_truth(text, style)
    assert isinstance(truth, str)
    assert isinstance(normalize_answer(text), str)


@fuzz_settings(1000)
@given(text=LONG_MIXED)
def test_extraction_on_long_responses_is_fast(text):
    start = time.monotonic()
    for style in ANSWER_STYLES:
        extract_answer(text, style)
    assert time.monotonic() - start < 1.0


@fuzz_settings(1000)
@given(
    decoys=st.lists(st.tuples(st.text(max_size=30), st.integers(-1000, 1000)), max_size=5),
    answer=st.one_of(st.integers(-(10**6), 10**6).map(str), WORDS, NUMBERS),
    emphasis=st.sampled_from(["Answer: {}", "**Answer:** {}", "ANSWER: ${}$", "Final Answer: {}.", "answer:{}"]),
)
def test_last_answer_line_wins(decoys, answer, emphasis):
    # Decoy lines may say "Answer: <other>"; the final line is what counts.
    lines = [f"{text.replace(chr(10), ' ')} Answer: {number}" for text, number in decoys]
    response = "\n".join(lines + [emphasis.format(answer)])
    assert extract_answer(response, "dapo") == answer.rstrip(".")
    assert extract_answer(response, "auto") == answer.rstrip(".")


@fuzz_settings(1500)
@given(
    n=st.integers(-(10**12), 10**12),
    a=st.integers(-(10**6), 10**6),
    b=st.integers(1, 10**6),
)
def test_numbers_in_different_dress_are_equivalent(n, a, b):
    assert is_equivalent(f"{n:,}", str(n))
    assert is_equivalent(f"{n} dollars", f"${n}$")
    assert not is_equivalent(str(n), str(n + 1))
    assert not is_equivalent(str(n), str(-n)) or n == 0
    assert is_equivalent(f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}")
    value = Fraction(a, b)
    if value.denominator in (1, 2, 4, 5, 8, 10, 16, 20, 25, 40, 50, 100):
        assert is_equivalent(f"{a}/{b}", str(float(value)))
    parsed = parse_number(normalize_answer(f"{a}/{b}"))
    assert parsed is not None and parsed.value == value


@fuzz_settings(3500)
@given(prediction=ANSWERS, ground_truth=st.one_of(DRESSED_NUMBER, WORDS))
def test_verification_is_bounded_and_total(prediction, ground_truth):
    timeout = 2.0
    start = time.monotonic()
    outcome = verify_answer(prediction, ground_truth, timeout_s=timeout)
    elapsed = time.monotonic() - start
    assert isinstance(outcome.correct, bool)
    assert elapsed < timeout + SLACK_S, (prediction, ground_truth, elapsed)
    # Equivalence is reflexive for anything with an answer in it.
    if normalize_answer(prediction):
        assert verify_answer(prediction, prediction, timeout_s=timeout).correct


@fuzz_settings(300)
@given(pairs=st.lists(st.tuples(MIXED, MIXED), min_size=1, max_size=4))
def test_symbolic_garbage_is_bounded(pairs):
    # Junk on both sides reaches math-verify in the workers; each pair is bounded by its timeout
    # and a batch by ceil(k / workers) timeouts.
    timeout = 1.0
    start = time.monotonic()
    outcomes = verify_batch(pairs, timeout_s=timeout)
    elapsed = time.monotonic() - start
    assert len(outcomes) == len(pairs)
    assert all(isinstance(o.correct, bool) for o in outcomes)
    assert elapsed < len(pairs) * timeout + SLACK_S, elapsed


@fuzz_settings(200)
@given(
    responses=st.lists(st.one_of(MIXED, ANSWERS.map(lambda a: f"Let me think.\nAnswer: {a}")), min_size=1, max_size=8),
    truth=st.one_of(DRESSED_NUMBER, MIXED),
    name=st.sampled_from(["math", "dapo", "gsm8k", "boxed", "exact"]),
)
def test_reward_scoring_never_raises(responses, truth, name):
    results = score_responses(resolve_reward_fn(name), responses, [truth] * len(responses), None, timeout_s=2.0)
    assert len(results) == len(responses)
    for result in results:
        assert result.score in (1.0, -1.0)
        assert result.correct == (result.score == 1.0)


def test_fuzz_budget_adds_up():
    # The brief: at least 10,000 generated examples across the fuzz tests above.
    total = sum(
        t._hypothesis_internal_use_settings.max_examples  # type: ignore[attr-defined]
        for t in (
            test_extraction_never_raises,
            test_extraction_on_long_responses_is_fast,
            test_last_answer_line_wins,
            test_numbers_in_different_dress_are_equivalent,
            test_verification_is_bounded_and_total,
            test_symbolic_garbage_is_bounded,
            test_reward_scoring_never_raises,
        )
    )
    assert total >= 10_000


def setup_module() -> None:
    warm_up()


def teardown_module() -> None:
    stats = verifier_stats()
    # Visible with -s: how much of the fuzzing the fast path absorbed.
    print(f"\nverifier stats after fuzzing: {stats.as_dict()}")

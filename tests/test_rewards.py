"""Tests for dapo_rl.rewards: extraction, equivalence, timeouts, reward functions, registry."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dapo_rl.rewards import (
    MathReward,
    NamedReward,
    RewardFunctionWarning,
    RewardResult,
    available_rewards,
    coerce_reward_output,
    configure_verifier,
    extract_answer,
    extract_ground_truth,
    is_equivalent,
    normalize_answer,
    register_reward,
    resolve_reward_fn,
    score_responses,
    shutdown_verifier,
    verifier_stats,
    verify_answer,
    verify_batch,
    warm_up,
)
from dapo_rl.rewards import verify as verify_module

# An expression SymPy needs minutes for: 9^(9^9) has ~370 million digits. Checked by
# test_hanging_expression_really_hangs_in_process (marked slow).
HANGING = "9^{9^{9}}"
# Time allowed beyond a timeout for the kill, the reply and thread scheduling on a loaded 2-core box.
SLACK_S = 3.0


@pytest.fixture(scope="module", autouse=True)
def _warm_verifier():
    # Start workers once, so that timings below measure verification, not interpreter start-up.
    warm_up()
    yield


# ---------------------------------------------------------------------------------------------
# The table: response, ground truth, expected correctness under the "math" reward (auto style).
# ---------------------------------------------------------------------------------------------

END_TO_END_CASES = [
    # fractions and decimals
    ("Answer: \\frac{1}{2}", "0.5", True),
    ("Answer: 1/2", "\\frac{1}{2}", True),
    ("Answer: 0.5", "1/2", True),
    ("Answer: \\dfrac{3}{4}", "0.75", True),
    ("Answer: 2/4", "1/2", True),
    ("Answer: 0.33", "1/3", False),  # a coarse decimal is not the fraction
    ("Answer: 0.333333", "\\frac{1}{3}", True),  # six decimals: accepted as the rounded value
    ("Answer: 3.0", "3", True),
    ("Answer: 1e3", "1000", True),
    # LaTeX that needs the symbolic path
    ("Answer: $2\\sqrt{2}$", "\\sqrt{8}", True),
    ("The answer is \\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("so \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", True),
    ("Answer: \\{1,2\\}", "\\{2,1\\}", True),  # sets are unordered
    ("Answer: (1,2)", "(2,1)", False),  # ordered pairs are not
    ("Answer: \\sqrt{4}", "3", False),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}", True),
    # units and currency
    ("#### 72 dollars", "72", True),
    ("Answer: 5 cm", "5", True),
    ("Answer: \\$18", "18", True),
    ("Answer: 90^\\circ", "90", True),
    ("Answer: 10 km/h", "10", True),
    ("Answer: 5\\text{ m}", "5", True),
    # signs
    ("Answer: -5", "5", False),
    ("Answer: -5", "-5", True),
    ("Answer: \u22123", "-3", True),  # unicode minus
    ("Answer: -\\frac{1}{2}", "-0.5", True),
    ("Answer: +7", "7", True),
    # thousands separators
    ("#### 1,000", "1000", True),
    ("Answer: 1,000", "1.000", False),  # "1.000" is one, not a thousand
    ("Answer: 12", "1,2", False),  # "1,2" is not a thousands group: it reads as the pair (1, 2)
    ("Answer: 1{,}000{,}000", "1000000", True),
    ("Answer: 100", "1000", False),
    # percentages
    ("Answer: 50\\%", "50", True),
    ("Answer: 50%", "0.5", True),
    ("Answer: 25 percent", "25", True),
    ("Answer: 5%", "50", False),
    # boxes: nesting, last one wins, \fbox
    ("first \\boxed{3}, then corrected: \\boxed{4}", "4", True),
    ("first \\boxed{3}, then corrected: \\boxed{4}", "3", False),
    ("\\boxed{\\boxed{7}}", "7", True),
    ("\\fbox{12}", "12", True),
    ("\\boxed{\\frac{1}{2}} is wrong, truncated \\boxed{\\frac{3", "1/2", True),
    # DAPO format with decoys: the last Answer: line counts
    ("Answer: 3\n...wait, I made an error...\nAnswer: 4", "4", True),
    ("Answer: 3\n...wait, I made an error...\nAnswer: 4", "3", False),
    ("Let me think.\n**Answer:** 42.", "42", True),
    ("answer: $17$", "17", True),
    ("I considered answer: 7 first.\n\n**Final Answer**: 8", "8", True),
    ("Answer: x = 5", "5", True),
    ("Answer: \\text{Yes}", "yes", True),
    # GSM8K
    ("She has 3+4=7 apples.\n#### 7", "Natalia had 3 and got 4, 3+4=<<3+4=7>>7\n#### 7", True),
    ("#### 7", "#### 8", False),
    ("#### 1,234,567", "1234567", True),
    # no answer at all
    ("I don't know", "5", False),
    ("Answer:", "5", False),
    ("", "5", False),
]


@pytest.mark.parametrize(("response", "ground_truth", "expected"), END_TO_END_CASES)
def test_end_to_end_table(response, ground_truth, expected):
    reward = resolve_reward_fn("math")
    result = score_responses(reward, [response], [ground_truth], [{}], timeout_s=10.0)[0]
    assert result.correct is expected, (response, ground_truth, result)
    assert result.score == (1.0 if expected else -1.0)
    assert not result.failed


def test_table_is_big_enough():
    assert len(END_TO_END_CASES) >= 40


EXTRACTION_CASES = [
    ("Answer: 5", "auto", "5"),
    ("Answer: 3\nmore thinking\nANSWER: 4", "dapo", "4"),
    ("**Answer:** $\\boxed{\\frac{1}{2}}$.", "dapo", "\\frac{1}{2}"),
    ("**Answer**: 12", "dapo", "12"),
    ("Answer: **12**", "dapo", "12"),
    ("Final answer：9", "dapo", "9"),  # full-width colon
    ("reanswer: 5", "dapo", None),  # "answer" must be a word of its own
    ("no marker here 5", "dapo", None),
    ("Answer: 5\nAnswer:", "dapo", None),  # the last Answer: is empty: no answer
    ("x \\boxed{a{b}c} y", "boxed", "a{b}c"),
    ("\\boxed{\\{1,2\\}}", "boxed", "\\{1,2\\}"),  # escaped braces do not close the box
    ("\\boxed{1} \\boxed{2}", "boxed", "2"),
    ("\\boxed{\\boxed{3}}", "boxed", "3"),
    ("\\boxed 5 is it", "boxed", "5"),
    ("unclosed \\boxed{5", "boxed", None),
    ("\\boxedx{5}", "boxed", None),
    ("#### 72", "gsm8k", "72"),
    ("#### 1\n#### 2", "gsm8k", "2"),
    ("Answer: 1 and \\boxed{2} and #### 3", "auto", "1 and \\boxed{2} and #### 3"),
    ("\\boxed{2} and #### 3", "auto", "2"),
    ("#### 3", "auto", "3"),
    ("Answer: 5", "gsm8k", None),
]


@pytest.mark.parametrize(("text", "style", "expected"), EXTRACTION_CASES)
def test_extract_answer(text, style, expected):
    assert extract_answer(text, style) == expected


def test_extract_answer_rejects_unknown_style():
    with pytest.raises(ValueError, match="style"):
        extract_answer("Answer: 5", "latex")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("72", "72"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("\\boxed{3}", "3"),
        ("The solution gives \\boxed{x+1}.", "x+1"),
        ("  17.  ", "17"),
        ("", ""),
    ],
)
def test_extract_ground_truth(text, expected):
    assert extract_ground_truth(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72 dollars", "72"),
        ("\\$1,000.50", "1000.50"),
        ("1 000", "1000"),
        ("1 2", "1 2"),  # digits separated by a space are not merged
        ("2 pi", "2pi"),  # "pi" is mathematics, not a unit
        ("5x", "5x"),  # an unknown glued suffix is not a unit
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\pi r", "\\pi r"),  # stripping this space would make the unknown command \pir
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("50 percent", "50%"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "answer" + " " * 20000 + "x",  # a blank run after "answer" that never reaches a colon
        "1 " + "a" * 5000 + "!",  # a unit-like letter run that is not a unit phrase
        "1 " + "ab " * 5000 + "!",
        "\\boxed{" * 5000,  # thousands of unclosed boxes
        "\\text{" * 3000,
        "{" * 20000,
        "Answer: " * 5000,
        "#### " * 3000,
        "1," * 3000 + "000",
        "9" * 5000,  # longer than Python's int() digit limit
    ],
    ids=lambda text: repr(text[:12]),
)
def test_pathological_inputs_are_handled_in_linear_time(text):
    # Regular-expression backtracking or a scan per box would turn these into minutes.
    start = time.monotonic()
    for style in ("auto", "dapo", "gsm8k", "boxed"):
        extract_answer(text, style)
        extract_ground_truth(text, style)
    normalize_answer(text)
    verify_answer(text, "5")
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------------------------------------
# is_equivalent / verify
# ---------------------------------------------------------------------------------------------


def test_plain_numbers_take_the_fast_path():
    before = verifier_stats()
    outcome = verify_answer("1,000", "1000")
    assert outcome.correct and outcome.method == "fast"
    assert verifier_stats().symbolic == before.symbolic


def test_symbolic_path_and_cache():
    first = verify_answer("\\sqrt{12}", "2\\sqrt{3}")
    assert first.correct and first.method == "symbolic"
    again = verify_answer("\\sqrt{12}", "2\\sqrt{3}")
    assert again.correct and again.method == "cache"


def test_none_and_non_strings_are_never_correct_and_never_raise():
    assert not is_equivalent(None, "5")  # type: ignore[arg-type]
    assert not is_equivalent("5", None)  # type: ignore[arg-type]
    assert is_equivalent(5, "5")  # type: ignore[arg-type]


def test_invalid_timeout_is_a_configuration_error():
    with pytest.raises(ValueError, match="timeout_s"):
        is_equivalent("1", "1", timeout_s=0)


def test_verify_batch_keeps_order_and_deduplicates():
    pairs = [("\\sqrt{18}", "3\\sqrt{2}"), ("1", "2"), ("\\sqrt{18}", "3\\sqrt{2}"), ("2", "2")]
    before = verifier_stats()
    outcomes = verify_batch(pairs, timeout_s=10.0)
    assert [o.correct for o in outcomes] == [True, False, True, True]
    assert verifier_stats().symbolic - before.symbolic <= 1  # the repeated pair was verified once


@pytest.mark.slow
def test_hanging_expression_really_hangs_in_process():
    """Without our bound, math-verify spends well over 10 s on HANGING (it has no timeout here)."""
    code = textwrap.dedent(
        f"""
        from math_verify import parse, verify
        gold = parse("\\\\boxed{{5}}", parsing_timeout=None)
        pred = parse("\\\\boxed{{{HANGING}}}", parsing_timeout=None)
        verify(gold, pred, timeout_seconds=None)
        """
    )
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", code], timeout=10, capture_output=True, check=False)


def test_timeout_returns_false_within_bound():
    warm_up()  # the contract bounds verification; a cold worker's start-up comes on top
    start = time.monotonic()
    outcome = verify_answer(HANGING, "5", timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert outcome.timed_out and not outcome.correct and outcome.error is None
    assert elapsed < 1.5 + SLACK_S, elapsed
    # The killed worker was replaced: the next symbolic check works.
    assert is_equivalent("\\sqrt{16}", "4")


def test_timeout_works_in_a_non_main_thread():
    results: list[tuple[object, float]] = []

    def check() -> None:
        start = time.monotonic()
        results.append((verify_answer(HANGING, "6", timeout_s=1.0), time.monotonic() - start))

    warm_up()
    thread = threading.Thread(target=check)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    ((outcome, elapsed),) = results
    assert outcome.timed_out and not outcome.correct
    assert elapsed < 1.0 + SLACK_S, elapsed


def test_concurrent_callers_from_many_threads():
    pairs = [(f"\\sqrt{{{k * k}}}", str(k)) for k in range(2, 10)] + [(HANGING, "7")]
    warm_up()
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda pair: verify_answer(pair[0], pair[1], timeout_s=1.0), pairs))
    assert [o.correct for o in outcomes[:-1]] == [True] * (len(pairs) - 1)
    assert outcomes[-1].timed_out


def _child_verify(queue: multiprocessing.Queue) -> None:
    result = {}

    def run() -> None:
        start = time.monotonic()
        outcome = verify_answer(HANGING, "8", timeout_s=1.0)
        result["outcome"] = (outcome.timed_out, outcome.correct, time.monotonic() - start)
        result["easy"] = is_equivalent("\\sqrt{25}", "5")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    shutdown_verifier()
    queue.put(result)


def test_timeout_works_in_a_forked_child_process_thread():
    # The child inherits the parent's pool object; it must start its own workers, not share ours.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child_verify, args=(queue,))
    process.start()
    result = queue.get(timeout=60)
    process.join(10)
    timed_out, correct, elapsed = result["outcome"]
    assert timed_out and not correct
    assert elapsed < 1.0 + SLACK_S + 5.0  # the child also waits for its own workers to start
    assert result["easy"] is True
    # And the parent's workers were left alone.
    assert is_equivalent("\\sqrt{36}", "6")


def test_worker_crash_mid_request_is_reported_and_recovered():
    pool = verify_module._get_pool()
    outcomes = []
    thread = threading.Thread(target=lambda: outcomes.append(verify_answer(HANGING, "9", timeout_s=20.0)))
    start = time.monotonic()
    thread.start()
    time.sleep(1.0)
    with pool._lock:
        workers = list(pool._all)
    for worker in workers:  # kill every worker, the busy one included
        worker.proc.kill()
    thread.join(30)
    elapsed = time.monotonic() - start
    (outcome,) = outcomes
    assert not outcome.correct and not outcome.timed_out and outcome.error
    assert elapsed < 10.0
    assert is_equivalent("\\sqrt{49}", "7")  # replacement workers serve the next call


def test_symbolic_path_can_be_switched_off():
    configure_verifier(symbolic=False)
    try:
        outcome = verify_answer("\\sqrt{4}", "2")
        assert not outcome.correct and outcome.method == "skipped"
        assert is_equivalent("\\frac{1}{2}", "0.5")  # still decided by the fast path
    finally:
        configure_verifier(symbolic=True)
        warm_up()


def test_broken_worker_start_is_reported_not_raised(monkeypatch, tmp_path):
    script = tmp_path / "broken_worker.py"
    script.write_text("import sys\nsys.exit(3)\n")
    pool = verify_module.VerifierPool(num_workers=1, startup_timeout_s=10.0)
    monkeypatch.setattr(verify_module, "_WORKER_SCRIPT", script)
    try:
        with pytest.warns(RuntimeWarning, match="disabled"):
            outcomes = [pool.verify("\\sqrt{4}", "2", 1.0) for _ in range(verify_module._MAX_START_FAILURES)]
        assert all(not o.correct and o.error for o in outcomes)
        assert "disabled" in (pool.verify("\\sqrt{4}", "2", 1.0).error or "")
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------


def test_builtin_registry_names():
    assert {"math", "dapo", "gsm8k", "boxed", "exact"} <= set(available_rewards())


@pytest.mark.parametrize(
    ("name", "response", "correct"),
    [
        ("dapo", "Answer: 4", True),
        ("dapo", "\\boxed{4}", False),  # dapo looks only at Answer: lines
        ("boxed", "\\boxed{4}", True),
        ("boxed", "Answer: 4", False),
        ("gsm8k", "#### 4", True),
        ("gsm8k", "Answer: 4", False),
        ("math", "#### 4", True),
        ("exact", "Answer: 4.", True),
        ("exact", "Answer: \\sqrt{16}", False),  # no symbolic evaluation in "exact"
    ],
)
def test_builtin_rewards_by_style(name, response, correct):
    result = score_responses(resolve_reward_fn(name), [response], ["4"], [{}], timeout_s=10.0)[0]
    assert result.correct is correct
    assert result.metrics["answer_found"] in (0.0, 1.0)


def test_custom_reward_values():
    reward = resolve_reward_fn("math", correct_reward=2.0, incorrect_reward=0.0)
    results = score_responses(reward, ["Answer: 1", "Answer: 2", "nothing"], ["1", "1", "1"], None, 10.0)
    assert [r.score for r in results] == [2.0, 0.0, 0.0]
    assert [r.correct for r in results] == [True, False, False]
    assert [r.metrics["answer_found"] for r in results] == [1.0, 1.0, 0.0]


def test_builtin_called_directly_returns_the_dict_protocol():
    out = MathReward(style="dapo")("Answer: 7", "7", {})
    assert out["score"] == 1.0 and out["correct"] is True and out["answer_found"] == 1.0


def test_builtin_timeout_is_a_failed_result():
    reward = resolve_reward_fn("math")
    with pytest.warns(RewardFunctionWarning, match="timed out"):
        results = score_responses(reward, [f"Answer: {HANGING}", "Answer: 5"], ["5", "5"], None, timeout_s=1.0)
    assert results[0].failed and not results[0].correct and results[0].score == -1.0
    assert results[0].metrics["verify_timeout"] == 1.0
    assert results[1].correct and not results[1].failed


def test_a_training_batch_of_128_is_fast():
    reward = resolve_reward_fn("dapo")
    responses = [f"reasoning...\nAnswer: {k % 10}" for k in range(120)] + ["Answer: \\frac{6}{2}"] * 8
    truths = ["3"] * 128
    start = time.monotonic()
    results = score_responses(reward, responses, truths, None, timeout_s=10.0)
    assert time.monotonic() - start < 5.0
    assert sum(r.correct for r in results) == 12 + 8


@pytest.mark.parametrize(
    ("output", "score", "correct", "metrics"),
    [
        (1.0, 1.0, True, {}),
        (0, 0.0, False, {}),  # correct defaults to score > 0
        (-0.5, -0.5, False, {}),
        (True, 1.0, True, {}),  # bools become the configured rewards
        (False, -1.0, False, {}),
        ({"score": 0.2}, 0.2, True, {}),
        ({"score": 0.2, "correct": False}, 0.2, False, {}),
        ({"score": -1, "length": 12, "flag": True, "note": "ignored"}, -1.0, False, {"length": 12.0, "flag": 1.0}),
    ],
)
def test_reward_output_protocol(output, score, correct, metrics):
    result = coerce_reward_output(output, 1.0, -1.0)
    assert (result.score, result.correct, result.metrics, result.failed) == (score, correct, metrics, False)


@pytest.mark.parametrize(
    "output",
    [
        "1.0",
        None,
        [1.0],
        {"correct": True},
        {"score": "high"},
        float("nan"),
        float("inf"),
        {"score": 1, "correct": "yes"},
    ],
)
def test_garbage_outputs_are_failed_results(output):
    fn = NamedReward(lambda r, g, m: output, "garbage")
    with pytest.warns(RewardFunctionWarning):
        (result,) = score_responses(fn, ["x"], ["1"], [{}], timeout_s=5.0)
    assert result.failed and not result.correct and result.score == -1.0


def test_raising_reward_fn_is_training_safe():
    calls = []

    def flaky(response, ground_truth, metadata):
        calls.append(response)
        if response == "bad":
            raise RuntimeError("reward service unavailable")
        return 1.0

    fn = resolve_reward_fn(flaky, incorrect_reward=-2.0)
    with pytest.warns(RewardFunctionWarning, match="reward service unavailable"):
        results = score_responses(fn, ["ok", "bad", "ok", "bad"], ["1"] * 4, None, timeout_s=5.0)
    assert [r.failed for r in results] == [False, True, False, True]
    assert [r.score for r in results] == [1.0, -2.0, 1.0, -2.0]
    assert results[1].error == "RuntimeError: reward service unavailable"
    assert len(calls) == 4


def test_distinct_errors_warn_once_each(recwarn):
    def failing(response, ground_truth, metadata):
        raise ValueError(f"error {response}")

    fn = NamedReward(failing, "warn-once-test")
    score_responses(fn, ["a", "b", "a", "a", "b"], ["1"] * 5, None, timeout_s=5.0)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, RewardFunctionWarning)]
    assert len(messages) == 2


def test_hanging_reward_fn_is_abandoned_within_timeout():
    release = threading.Event()

    def hangs_on_b(response, ground_truth, metadata):
        if response == "b":
            release.wait(60)
        return 1.0

    fn = NamedReward(hangs_on_b, "hangs")
    start = time.monotonic()
    try:
        with pytest.warns(RewardFunctionWarning, match="did not return"):
            results = score_responses(fn, ["a", "b", "c"], ["1"] * 3, None, timeout_s=0.5)
        elapsed = time.monotonic() - start
    finally:
        release.set()  # let the abandoned thread finish
    assert [r.failed for r in results] == [False, True, False]
    assert [r.correct for r in results] == [True, False, True]
    assert elapsed < 0.5 + SLACK_S


def test_each_call_has_its_own_timeout_and_a_batch_shares_one_thread():
    # Four calls of 0.3 s under a 1 s timeout all succeed (the limit is per call, not per
    # batch), in order, on one helper thread.
    seen = []

    def slow(response, ground_truth, metadata):
        seen.append((response, threading.get_ident()))
        time.sleep(0.3)
        return 1.0

    results = score_responses(NamedReward(slow, "slow"), ["a", "b", "c", "d"], ["1"] * 4, None, timeout_s=1.0)
    assert not any(r.failed for r in results)
    assert [r for r, _ in seen] == ["a", "b", "c", "d"]
    assert len({ident for _, ident in seen}) == 1 and seen[0][1] != threading.get_ident()


def test_calls_after_a_hang_run_on_a_new_thread_and_each_hang_is_reported():
    release = threading.Event()
    threads = {}

    def hangs_on_x(response, ground_truth, metadata):
        threads[response] = threading.get_ident()
        if response.startswith("x"):
            release.wait(60)
        return 1.0

    try:
        with pytest.warns(RewardFunctionWarning, match="did not return"):
            results = score_responses(NamedReward(hangs_on_x, "hangs-twice"), ["a", "x1", "b", "x2", "c"],
                                      ["1"] * 5, None, timeout_s=1.0)
    finally:
        release.set()
    assert [r.failed for r in results] == [False, True, False, True, False]
    assert threads["a"] == threads["x1"] != threads["b"] == threads["x2"] != threads["c"]


def test_calls_are_refused_while_too_many_hung_threads_remain(monkeypatch):
    from dapo_rl.rewards import functions

    release = threading.Event()
    calls = []

    def hangs(response, ground_truth, metadata):
        calls.append(response)
        release.wait(60)
        return 1.0

    monkeypatch.setattr(functions, "_MAX_ABANDONED_THREADS", 1)
    monkeypatch.setattr(functions, "_abandoned", [])  # no hung threads left over from other tests
    try:
        with pytest.warns(RewardFunctionWarning):
            results = score_responses(NamedReward(hangs, "hangs-always"), ["a", "b"], ["1"] * 2, None, timeout_s=0.2)
    finally:
        release.set()
    assert calls == ["a"]  # "b" was never called
    assert [r.failed for r in results] == [True, True] and "still hung" in results[1].error


def test_sys_exit_in_reward_fn_does_not_end_training():
    def exits(response, ground_truth, metadata):
        raise SystemExit(1)

    with pytest.warns(RewardFunctionWarning):
        (result,) = score_responses(NamedReward(exits, "exits"), ["x"], ["1"], None, timeout_s=5.0)
    assert result.failed


def test_metadata_is_passed_and_copied():
    seen = []

    def uses_metadata(response, ground_truth, metadata):
        seen.append(dict(metadata))
        metadata["mutated"] = True
        return {"score": float(metadata["weight"]), "weight": metadata["weight"]}

    metas = [{"weight": 0.5}, {"weight": 2}]
    results = score_responses(NamedReward(uses_metadata, "meta"), ["a", "b"], ["1", "1"], metas, timeout_s=5.0)
    assert [r.score for r in results] == [0.5, 2.0]
    assert [r.metrics for r in results] == [{"weight": 0.5}, {"weight": 2.0}]
    assert seen == [{"weight": 0.5}, {"weight": 2}]
    assert "mutated" not in metas[0]


def test_length_mismatch_is_a_caller_error():
    with pytest.raises(ValueError, match="ground truth"):
        score_responses(resolve_reward_fn("math"), ["a", "b"], ["1"], None)


def test_batch_scorer_that_breaks_fails_its_batch():
    class Broken:
        incorrect_reward = -1.0

        def __call__(self, response, ground_truth, metadata):
            return 1.0

        def score_batch(self, responses, ground_truths, metadatas, timeout_s):
            return [RewardResult(1.0, True)]  # wrong length

    with pytest.warns(RewardFunctionWarning, match="score_batch"):
        results = score_responses(Broken(), ["a", "b"], ["1", "1"], None)
    assert all(r.failed for r in results)


# ---------------------------------------------------------------------------------------------
# Registry and import paths
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    name = f"user_reward_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from dapo_rl.rewards import extract_answer, is_equivalent

            NOT_CALLABLE = 42

            def reward(response, ground_truth, metadata):
                answer = extract_answer(response)
                ok = answer is not None and is_equivalent(answer, ground_truth)
                return {"score": 1.0 if ok else 0.0, "correct": ok, "length": len(response)}

            class Scorers:
                @staticmethod
                def always_true(response, ground_truth, metadata):
                    return True
            """
        )
    )
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_reward_by_import_path(reward_module):
    fn = resolve_reward_fn(f"{reward_module}:reward", correct_reward=1.0, incorrect_reward=0.0)
    results = score_responses(fn, ["Answer: 4", "Answer: 5"], ["4", "4"], None, timeout_s=10.0)
    assert [r.score for r in results] == [1.0, 0.0]
    assert [r.correct for r in results] == [True, False]
    assert results[0].metrics == {"length": 9.0}


def test_user_reward_nested_attribute_and_bool_return(reward_module):
    fn = resolve_reward_fn(f"{reward_module}:Scorers.always_true", correct_reward=3.0)
    (result,) = score_responses(fn, ["x"], ["y"], None)
    assert result.score == 3.0 and result.correct


@pytest.mark.parametrize(
    ("spec_suffix", "message"),
    [
        (":NOT_CALLABLE", "not a callable"),
        (":missing", "has no attribute"),
        ("_broken:reward", "broken at import"),
        ("_nonexistent:reward", "cannot import reward function"),
        (":", "package.module:function"),
    ],
)
def test_bad_import_paths_give_clear_errors(reward_module, spec_suffix, message):
    spec = reward_module + spec_suffix
    with pytest.raises(ValueError, match=message) as info:
        resolve_reward_fn(spec)
    assert repr(spec) in str(info.value)


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="math") as info:
        resolve_reward_fn("my.module.fn")
    assert "'my.module:fn'" in str(info.value)


def test_register_reward_and_duplicate_names():
    name = f"test-reward-{time.monotonic_ns()}"

    @register_reward(name)
    def length_reward(response, ground_truth, metadata):
        return len(response) > 3

    fn = resolve_reward_fn(name, correct_reward=5.0, incorrect_reward=-5.0)
    results = score_responses(fn, ["long answer", "no"], ["", ""], None)
    assert [r.score for r in results] == [5.0, -5.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward(name, length_reward)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math", length_reward)


@pytest.mark.parametrize(
    "response,truth,correct",
    [
        ("3 + 4 = 7", "7", True),
        ("9 - 5 is 4.", "4", True),
        ("She has 1,000 apples", "1000", True),
        ("-3", "-3", True),
        ("7 then 8", "7", False),  # the last number counts
        ("no idea", "3", False),
        ("2.50 dollars", "2.5", True),
    ],
)
def test_last_number_reward(response, truth, correct):
    fn = resolve_reward_fn("last_number", correct_reward=1.0, incorrect_reward=-1.0)
    result = score_responses(fn, [response], [truth], None, 5.0)[0]
    assert result.correct is correct
    assert result.score == (1.0 if correct else -1.0)

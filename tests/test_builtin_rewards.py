"""Verdicts of the built-in rewards, row by row (docs/rewards.md's tables plus llmrl's decisions)."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from llmrl.reward import resolve_reward
from llmrl.reward.builtin.arithmetic import arithmetic
from llmrl.reward.builtin.format import format_reward
from llmrl.reward.builtin.gsm8k import canonical_number, gsm8k, gsm8k_extract, gsm8k_flexible
from llmrl.reward.builtin.length import overlong, overlong_penalty
from llmrl.reward.builtin.math import extract_last_boxed, math_equal, math_reward
from llmrl.reward.builtin.toy import toy_token_fraction
from llmrl.types import Span, Task, Trajectory

# `rewards/` is not an installed package: the example plugin is loaded by path, as a recipe names it.
brevity = resolve_reward(f"{Path(__file__).resolve().parents[1] / 'rewards' / 'example_plugin.py'}:brevity")


def make_task(answer: str | None) -> Task:
    return Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer=answer)


def make_trajectory(policy_ids: list[int], prompt_ids: tuple[int, ...] = (10, 20, 30)) -> Trajectory:
    prompt_len = len(prompt_ids)
    token_ids = [*prompt_ids, *policy_ids]
    return Trajectory(
        task=make_task("1"),
        token_ids=token_ids,
        spans=[Span("prompt", 0, prompt_len), Span("policy", prompt_len, len(token_ids))],
        rollout_logprobs=[0.0] * len(token_ids),
        finish_reason="stop",
        group_id=0,
    )


# ------------------------ gsm8k (verl gsm8k.py vs ours; GSM8K: Cobbe et al. 2021, arXiv 2110.14168)

GSM8K_ROWS = [
    # completion, gold, strict, flexible
    ("Adding them up gives 42.\n#### 42", "42", 1.0, 1.0),
    ("#### 1,234", "1234", 1.0, 1.0),  # verl flexible: 0 (keeps the comma); we compare values
    ("#### $42", "42", 1.0, 1.0),  # verl strict: 0 (no digit after the space)
    ("#### 42.0", "42", 1.0, 1.0),  # verl: 0 (string compare)
    ("####42", "42", 1.0, 1.0),  # verl strict: 0; we accept the missing space
    ("The answer is 42.", "42", 0.0, 1.0),  # verl flexible: 0 ("42." kept); we drop the period
    ("#### 42 wait, no. #### 43", "42", 0.0, 0.0),  # the last match wins
    ("#### 41", "42", 0.0, 0.0),
    ("no digits here", "42", 0.0, 0.0),
    ("#### -17", "-17", 1.0, 1.0),
    ("#### 1234", "1,234", 1.0, 1.0),  # gold commas are stripped too
]


@pytest.mark.parametrize(("completion", "gold", "strict", "flexible"), GSM8K_ROWS)
def test_gsm8k_strict_and_flexible_verdicts(completion: str, gold: str, strict: float, flexible: float) -> None:
    assert gsm8k(completion, make_task(gold)) == {"score": strict, "acc": strict}
    assert gsm8k_flexible(completion, make_task(gold)) == {"score": flexible, "acc": flexible}


def test_gsm8k_searches_only_the_last_300_characters() -> None:
    answer_then_chatter = "#### 42\n" + "x" * 300
    assert gsm8k(answer_then_chatter, make_task("42"))["score"] == 0.0
    just_inside = "#### 42\n" + "x" * 290
    assert gsm8k(just_inside, make_task("42"))["score"] == 1.0


def test_gsm8k_format_score_only_for_extracted_but_wrong() -> None:
    assert gsm8k("#### 41", make_task("42"), format_score=0.1) == {"score": 0.1, "acc": 0.0}
    assert gsm8k("forty-two", make_task("42"), format_score=0.1) == {"score": 0.0, "acc": 0.0}
    assert gsm8k("#### 42", make_task("42"), format_score=0.1) == {"score": 1.0, "acc": 1.0}


def test_gsm8k_without_gold_raises_so_the_computer_counts_it() -> None:
    with pytest.raises(ValueError, match="no gold answer"):
        gsm8k("#### 42", make_task(None))


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("so #### 1,234.50 dollars", "strict", "1234.5"),  # canonical: majority-vote key
        ("#### 42.0", "strict", "42"),
        ("#### .5", "strict", "0.5"),
        ("the answer is 7", "strict", None),
        ("the answer is 7", "flexible", "7"),
        ("from 10-17 we get", "flexible", "17"),  # a minus after a digit is subtraction
        ("x = -3.", "flexible", "-3"),
        ("", "flexible", None),
    ],
)
def test_gsm8k_extract(text: str, mode: str, expected: str | None) -> None:
    assert gsm8k_extract(text, mode) == expected


def test_gsm8k_extract_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="strict"):
        gsm8k_extract("#### 1", "loose")


def test_canonical_number() -> None:
    assert canonical_number("$1,000") == "1000"
    assert canonical_number("-0.250") == "-0.25"
    assert canonical_number("abc") is None


# --------------------------------------------- math (MATH: Hendrycks et al. 2021, arXiv 2103.03874)

MATH_ROWS = [
    # completion, gold, score
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{2+3}", "5", 1.0),  # math-verify accepts unsimplified arithmetic (docs/rewards.md, `math`)
    ("The answer is 5", "5", 0.0),  # no box, no answer
    (r"\boxed{5 \text{ cm}}", "5", 1.0),
    (r"\boxed{x = 5}", "5", 1.0),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),
    (r"\boxed{10\%}", "0.1", 1.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{0.3333333}", r"\frac{1}{3}", 1.0),
    (r"\boxed{2}, then \boxed{3}", "3", 1.0),  # math-verify on the whole text says 0 (a set); our last box wins
    (r"\boxed{2}, then \boxed{3}", "2", 0.0),
    (r"\fbox{7}", "7", 1.0),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\sqrt2}", r"\sqrt{2}", 1.0),
    (r"\boxed{3}", "4", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "score"), MATH_ROWS)
def test_math_verdicts(completion: str, gold: str, score: float) -> None:
    assert math_reward(completion, make_task(gold)) == {"score": score, "acc": score}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"we get \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} and finally \boxed{ 2 }", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\boxed 5$ done", "5"),  # lm-eval's space form
        (r"\boxed{2} then \boxed{3", None),  # last box cut off: no answer
        (r"\boxed{}", None),
        (r"\boxeddot{3}", None),  # another command, not a box
        ("no box at all", None),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


def test_math_equal_works_off_the_main_thread() -> None:
    # math-verify's signal timeout would raise ValueError in a thread; we switch it off there.
    results: list[object] = []

    def grade() -> None:
        try:
            results.append((math_equal("0.5", r"\frac{1}{2}"), math_equal("3", "4")))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            results.append(exc)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join()
    assert results == [(True, False)]


def test_math_equal_empty_answer_is_false() -> None:
    assert math_equal("", "5") is False
    assert math_equal("5", " ") is False


# ---------------------------------------------------------------- format

@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("work...\n#### 12", 1.0),
        ("####-3", 1.0),
        (r"so \boxed{x}", 1.0),
        ("#### twelve", 0.0),
        ("the answer is 12", 0.0),
    ],
)
def test_format_default_pattern(completion: str, expected: float) -> None:
    assert format_reward(completion, make_task("12")) == expected


def test_format_custom_pattern_and_fullmatch() -> None:
    tagged = "<think>a</think><answer>4</answer>"
    pattern = r"(?s)<think>.*?</think><answer>.*?</answer>"
    assert format_reward(tagged, make_task("4"), pattern=pattern, fullmatch=True) == 1.0
    assert format_reward(tagged + " extra", make_task("4"), pattern=pattern, fullmatch=True) == 0.0
    assert format_reward(tagged + " extra", make_task("4"), pattern=pattern) == 1.0


# ------------------------------------------------ overlong (DAPO: Yu et al. 2025, arXiv 2503.14476)

@pytest.mark.parametrize(
    ("length", "expected"),
    [(10000, 0.0), (16384, 0.0), (18432, -0.5), (20480, -1.0), (22528, -1.5)],
)
def test_overlong_spec_numbers(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_len=20480, buffer_len=4096) == expected


def test_overlong_reads_policy_tokens_and_penalty_factor() -> None:
    trajectory = make_trajectory([5] * 18432, prompt_ids=tuple(range(500)))  # prompt not counted
    score = overlong("", trajectory.task, trajectory=trajectory, max_len=20480, buffer_len=4096, penalty_factor=0.5)
    assert score == -0.25


def test_overlong_rejects_a_bad_buffer() -> None:
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(10, max_len=100, buffer_len=0)


# ---------------------------------------------------------------- arithmetic

@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        ("#### -17", "-17", 1.0),
        ("so 3+4 = 7", "7", 1.0),
        ("12", "13", 0.0),
        ("", "13", 0.0),
        ("#### 7.0", "7", 1.0),
        ("I think 5, so #### 8", "8", 1.0),
        ("#### 8 but the last number is 5", "5", 0.0),  # the marked answer wins over later text
        ("3 - 20 = -17", "-17", 1.0),
    ],
)
def test_arithmetic_verdicts(completion: str, gold: str, score: float) -> None:
    assert arithmetic(completion, make_task(gold)) == {"score": score, "acc": score}


# ---------------------------------------------------------------- toy_token_fraction

def test_toy_token_fraction_counts_policy_ids_divisible_by_ten() -> None:
    # The prompt ids 10, 20, 30 are all rewarded ids but are not policy tokens.
    trajectory = make_trajectory([10, 3, 20, 7, 0])
    assert toy_token_fraction("", trajectory.task, trajectory=trajectory) == pytest.approx(3 / 5)


def test_toy_token_fraction_empty_response_is_zero() -> None:
    trajectory = make_trajectory([])
    assert toy_token_fraction("", trajectory.task, trajectory=trajectory) == 0.0


# ---------------------------------------------------------------- registry and example plugin

@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("gsm8k", gsm8k),
        ("gsm8k_flexible", gsm8k_flexible),
        ("math", math_reward),
        ("format", format_reward),
        ("overlong", overlong),
        ("arithmetic", arithmetic),
        ("toy_token_fraction", toy_token_fraction),
    ],
)
def test_builtins_are_registered_by_name(name: str, fn: object) -> None:
    assert resolve_reward(name) is fn


def test_example_plugin_brevity() -> None:
    task = make_task("1")
    assert brevity("x" * 100, task, finish_reason="stop", target_chars=200) == {"score": 1.0, "chars": 100.0}
    assert brevity("x" * 300, task, finish_reason="stop", target_chars=200) == {"score": 0.5, "chars": 300.0}
    assert brevity("x" * 500, task, finish_reason="stop", target_chars=200)["score"] == 0.0
    assert brevity("x" * 10, task, finish_reason="length", target_chars=200)["score"] == 0.0

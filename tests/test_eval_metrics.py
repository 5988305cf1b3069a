"""pass@k, maj@k and the other evaluation metrics against hand-computed values."""
import pytest

from llmrl.eval.benchmarks import normalise_math_answer
from llmrl.eval.harness import derangement, verdict
from llmrl.eval.metrics import (
    GradedSample,
    accuracy_metrics,
    breakdown,
    group_by_item,
    majority_answer,
    pass_at_k,
    powers_of_two_up_to,
    sample_metrics,
)
from llmrl.eval.report import summary_table
from llmrl.reward import RewardResult


def samples(task_id, verdicts, answers, lengths=None, truncated=None):
    lengths = lengths or [10] * len(verdicts)
    truncated = truncated or [False] * len(verdicts)
    return [
        GradedSample(task_id, i, ok, answer, length, cut)
        for i, (ok, answer, length, cut) in enumerate(zip(verdicts, answers, lengths, truncated))
    ]


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(6, 2, 3) == pytest.approx(0.8)  # 1 - C(4,3)/C(6,3) = 1 - 4/20
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is c/n
    for k in (1, 2, 4, 8):
        assert pass_at_k(8, 0, k) == 0.0
    for n in (1, 2, 5):
        assert pass_at_k(n, n, n) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every draw of 3 holds a correct sample


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_k_values_are_powers_of_two():
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(6) == [1, 2, 4]
    assert powers_of_two_up_to(8) == [1, 2, 4, 8]


def test_majority_vote_and_its_tie_rule():
    assert majority_answer(["7", None, "9", "9"]) == 2
    # 3 and 5 tie with two votes each: the answer seen first (sample 0) wins.
    assert majority_answer(["3", "5", "3", None, "5"]) == 0
    assert majority_answer(["5", "3", "3", None, "5"]) == 0
    assert majority_answer([None, "4"]) == 1  # samples without an answer do not vote
    assert majority_answer([None, None]) is None


def test_accuracy_metrics_on_a_hand_made_example():
    items = group_by_item(
        samples("a", [True, False, False, True], ["18", "20", "20", "18"])
        + samples("b", [False, False, False, True], ["5", "5", None, "7"])
    )
    metrics = accuracy_metrics(items)
    assert metrics["pass@1"] == pytest.approx(3 / 8)
    # a: 1 - C(2,2)/C(4,2) = 5/6; b: 1 - C(3,2)/C(4,2) = 1/2
    assert metrics["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert metrics["pass@4"] == pytest.approx(1.0)
    # maj@2: a votes 18 vs 20, tie -> 18 (first), correct; b votes 5, wrong.
    assert metrics["maj@2"] == pytest.approx(0.5)
    # maj@4: a ties 18/20 -> 18, correct; b: 5 (2 votes) beats 7, wrong.
    assert metrics["maj@4"] == pytest.approx(0.5)
    assert set(metrics) == {"pass@1", "pass@2", "pass@4", "maj@2", "maj@4"}


def test_maj_at_n_is_reported_when_n_is_not_a_power_of_two():
    items = group_by_item(samples("a", [False, True, True], ["1", "2", "2"]))
    metrics = accuracy_metrics(items)
    assert set(metrics) == {"pass@1", "pass@2", "maj@2", "maj@3"}
    assert metrics["maj@2"] == 0.0  # 1 vs 2 tie -> "1", wrong
    assert metrics["maj@3"] == 1.0


def test_sample_metrics_length_truncation_and_extraction():
    group = samples("a", [True, False, False, False], ["1", None, "2", "3"], [10, 20, 30, 40], [False, False, True, False])
    assert sample_metrics(group) == {"response_tokens_mean": 25.0, "truncated_frac": 0.25, "extracted_frac": 0.75}


def test_breakdown_by_label():
    items = group_by_item(
        samples("p1", [True, False], ["1", "2"]) + samples("p2", [True, True], ["1", "1"]) + samples("g1", [False, False], [None, None])
    )
    labels = {"p1": "Prealgebra", "p2": "Prealgebra", "g1": "Geometry"}
    assert breakdown(items, labels) == {
        "Geometry": {"pass@1": 0.0, "items": 1.0},
        "Prealgebra": {"pass@1": 0.75, "items": 2.0},
    }
    levels = breakdown(items, {"p1": "10", "p2": "2", "g1": "1"})
    assert list(levels) == ["1", "2", "10"]  # numeric labels sort by value


def test_math_vote_key_normalisation():
    assert normalise_math_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert normalise_math_answer("\\left( 3, \\frac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalise_math_answer("\\text{(B)}") == "(B)"
    assert normalise_math_answer("90^\\circ") == "90"
    assert normalise_math_answer("1,000.50") == "1000.5"
    assert normalise_math_answer("5.") == "5"
    assert normalise_math_answer("0.5") != normalise_math_answer("\\frac12")  # only math-verify equates these


def test_verdict_prefers_acc_then_needs_full_marks():
    assert verdict(RewardResult(score=0.1, parts={"acc": 1.0}))
    assert not verdict(RewardResult(score=1.0, parts={"acc": 0.0}))
    assert verdict(RewardResult(score=1.0))
    assert not verdict(RewardResult(score=0.5))


def test_derangement_never_gives_an_item_an_equal_answer():
    keys = ["2", "2", "5", "7", "2", "9", "5", "11"]
    order = derangement(keys, seed=3)
    assert sorted(order) == list(range(len(keys)))
    assert all(keys[order[i]] != keys[i] for i in range(len(keys)))
    assert order == derangement(keys, seed=3)  # fixed


def test_summary_table_shows_percentages_and_breakdown():
    entry = {
        "metrics": {"pass@1": 0.375, "pass@2": 2 / 3, "maj@2": 0.5, "items": 2.0, "n": 4.0, "extracted_frac": 0.75,
                    "response_tokens_mean": 25.0, "truncated_frac": 0.25},
        "run": {"samples_per_s": 1.5, "tokens_per_s": 37.5, "time_s": 5.3},
        "breakdown": {"level": {"1": {"pass@1": 1.0, "items": 1.0}}},
    }
    lines = summary_table({"math500": entry}).splitlines()
    assert lines[0].split() == ["bench", "items", "n", "pass@1", "pass@2", "maj@2", "extracted%", "len", "trunc%", "samples/s", "tok/s", "time_s"]
    assert lines[1].split() == ["math500", "2", "4", "37.5", "66.7", "50.0", "75.0", "25.0", "25.0", "1.50", "37.5", "5"]
    assert "math500 pass@1 by level:" in lines
    assert lines[-1].split() == ["1", "1", "100.0"]

"""IGPO: information gains and the turn-level advantage against the worked example of
docs/formulas.md#igpo-worked-example (a group of two: A with l = [-2.0, -1.2, -0.3] and F1 1, B with
l = [-2.0, -2.5, -2.4] and F1 0), plus the edge cases."""
import math

import numpy as np
import pytest
import torch

from llmrl.algorithms import AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import AdvantageInputs
from llmrl.algorithms.igpo import igpo, population_stats
from llmrl.batch import collate
from llmrl.rollout.multi_turn import INFO_GAIN, information_gains
from llmrl.types import RewardEntry, Span, Task, Trajectory

ELL_A, ELL_B = [-2.0, -1.2, -0.3], [-2.0, -2.5, -2.4]


def cfg(**kw):
    return resolve_algorithm(AlgorithmConfig(name="igpo", **kw))


def three_turn_row(gains, outcome, group_id=0, turns=3):
    """prompt(2) then `turns` x [policy(2), observation(1)] minus the last observation."""
    spans, ends, pos = [Span("prompt", 0, 2)], [], 2
    for k in range(turns):
        spans.append(Span("policy", pos, pos + 2))
        ends.append(pos + 1)
        pos += 2
        if k < turns - 1:
            spans.append(Span("observation", pos, pos + 1, weight=0.0))
            pos += 1
    traj = Trajectory(Task("t", []), list(range(pos)), spans, [0.0] * pos, "stop", group_id, turn_ends=ends)
    traj.rewards = [RewardEntry(end, INFO_GAIN, g) for end, g in zip(ends, gains)]
    traj.set_outcome(outcome)
    return traj


def turn_advantages(rows, **kw):
    batch = collate(rows, pad_id=0)
    adv, metrics = igpo(AdvantageInputs.from_batch(batch, cfg(**kw)))
    out = []
    for i, traj in enumerate(rows):
        per_turn = []
        for end in traj.turn_ends:
            span = [s for s in traj.spans if s.role == "policy" and s.end - 1 == end][0]
            values = adv[i, span.start : span.end]
            assert torch.allclose(values, values[0].expand_as(values)), "one value over each turn's tokens"
            per_turn.append(float(values[0]))
        assert float(adv[i][batch["loss_mask"][i] == 0].abs().sum()) == 0.0, "nothing outside policy tokens"
        out.append(per_turn)
    return out, metrics


def test_information_gains_both_definitions():
    assert information_gains(ELL_A, "prob_diff") == pytest.approx([0.165859, 0.439624], abs=1e-6)
    assert information_gains(ELL_B, "prob_diff") == pytest.approx([-0.053250, 0.008633], abs=1e-6)
    assert information_gains(ELL_A, "log_prob_diff") == pytest.approx([0.8, 0.9])
    assert information_gains(ELL_B, "log_prob_diff") == pytest.approx([-0.5, 0.1])
    assert information_gains([-1.0], "log_prob_diff") == []


def test_population_std_and_pool_of_one():
    mean, std = population_stats([0.8, 0.9, -0.5, 0.1])
    assert mean == pytest.approx(0.325) and std == pytest.approx(math.sqrt(1.2875 / 4 + 1e-8))
    assert population_stats([3.0]) == (3.0, 1.0)


def worked_rows(kind):
    return [
        three_turn_row(information_gains(ELL_A, kind), 1.0),
        three_turn_row(information_gains(ELL_B, kind), 0.0),
    ]


def test_worked_example_separate_gamma_1():
    (a, b), metrics = turn_advantages(worked_rows("log_prob_diff"))
    assert a == pytest.approx([2.850736, 2.013497, 0.999998], abs=1e-5)
    assert b == pytest.approx([-2.850736, -1.396585, -0.999998], abs=1e-5)
    assert metrics["adv/nonzero_groups"] == 1.0 and metrics["igpo/outcome_nonzero_groups"] == 1.0


def test_worked_example_separate_gamma_09():
    (a, _), _ = turn_advantages(worked_rows("log_prob_diff"), gamma=0.9)
    assert a == pytest.approx([2.559386, 1.913497, 0.999998], abs=1e-5)


def test_worked_example_joint_gamma_1():
    (a, _), _ = turn_advantages(worked_rows("log_prob_diff"), igpo_norm_mode="joint")
    assert a == pytest.approx([2.807882, 2.053075, 1.117114], abs=1e-5)


@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_prob_diff_matches_a_direct_computation(mode, gamma):
    ig = [information_gains(ELL_A, "prob_diff"), information_gains(ELL_B, "prob_diff")]
    f1 = [1.0, 0.0]

    def z(x, pool):
        pool = np.array(pool)
        std = math.sqrt(((pool - pool.mean()) ** 2).mean() + 1e-8)
        return (x - pool.mean()) / (std + 1e-6)

    ig_pool = ig[0] + ig[1] if mode == "separate" else ig[0] + ig[1] + f1
    f1_pool = f1 if mode == "separate" else ig_pool
    expected = []
    for row in range(2):
        r = [z(x, ig_pool) for x in ig[row]] + [z(f1[row], f1_pool)]
        acc, out = 0.0, []
        for x in reversed(r):
            acc = x + gamma * acc
            out.insert(0, acc)
        expected.append(out)
    got, _ = turn_advantages(worked_rows("prob_diff"), igpo_norm_mode=mode, gamma=gamma)
    assert got[0] == pytest.approx(expected[0], abs=1e-5) and got[1] == pytest.approx(expected[1], abs=1e-5)


def test_all_equal_outcomes_leave_only_the_information_gain():
    rows = [three_turn_row([0.8, 0.9], 1.0), three_turn_row([-0.5, 0.1], 1.0)]
    (a, b), metrics = turn_advantages(rows)
    assert a[2] == 0.0 and b[2] == 0.0  # the final turn: F1 ties, normalised to exactly 0
    assert a[1] == pytest.approx(1.013499, abs=1e-5) and a[0] == pytest.approx(0.837239 + 1.013499, abs=1e-5)
    assert metrics["igpo/outcome_nonzero_groups"] == 0.0 and metrics["adv/nonzero_groups"] == 1.0


def test_a_zero_gain_is_left_out_of_the_pool_in_separate_mode():
    rows = [three_turn_row([0.0, 0.9], 1.0), three_turn_row([-0.5, 0.1], 0.0)]
    (a, _), _ = turn_advantages(rows)
    mean, std = population_stats([0.9, -0.5, 0.1])
    second = (0.9 - mean) / (std + 1e-6) + 0.999998
    assert a[1] == pytest.approx(second, abs=1e-5)
    assert a[0] == pytest.approx(second, abs=1e-5)  # its own normalised reward is 0; gamma 1 carries the rest


def test_singleton_group_and_single_turn_rows():
    (only,), _ = turn_advantages([three_turn_row([0.8, 0.9], 1.0, turns=3)])
    assert only[2] == 0.0  # one F1 in its pool: centred to 0
    assert only[1] == pytest.approx(0.05 / (0.05 + 1e-6) * 1.0, abs=1e-4)  # IG pool [0.8, 0.9]: +1 std
    (x, y), _ = turn_advantages([three_turn_row([], 1.0, turns=1), three_turn_row([], 0.0, turns=1)])
    assert x == pytest.approx([0.999998], abs=1e-6) and y == pytest.approx([-0.999998], abs=1e-6)


def test_empty_response_row_gets_zero():
    empty = Trajectory(Task("t", []), [1, 2], [Span("prompt", 0, 2)], [0.0, 0.0], "length", 0)
    empty.set_outcome(-2.0)
    other = three_turn_row([], 1.0, turns=1)
    batch = collate([empty, other], pad_id=0)
    adv, _ = igpo(AdvantageInputs.from_batch(batch, cfg()))
    assert float(adv[0].abs().sum()) == 0.0
    assert float(adv[1][batch["loss_mask"][1] > 0][0]) == pytest.approx(0.0)  # pool of one F1


def test_norm_by_std_off_only_centres():
    (a, b), _ = turn_advantages(worked_rows("log_prob_diff"), norm_adv_by_std=False)
    assert a[2] == pytest.approx(0.5) and b[2] == pytest.approx(-0.5)
    assert a[1] == pytest.approx(0.9 - 0.325 + 0.5)


def test_preset_switches_information_gain_on():
    from llmrl.recipe import Recipe, resolve_recipe

    resolved = resolve_recipe(Recipe.model_validate({"algorithm": {"name": "igpo"}}))
    assert resolved.rollout.workflow.name == "multi_turn"
    assert resolved.rollout.workflow.options()["info_gain"] == "log_prob_diff"
    assert resolved.algorithm.advantage == "igpo" and resolved.algorithm.igpo_norm_mode == "separate"
    chosen = resolve_recipe(Recipe.model_validate({"algorithm": {"name": "igpo"}, "rollout": {"workflow": {"name": "multi_turn", "info_gain": "prob_diff"}}}))
    assert chosen.rollout.workflow.options()["info_gain"] == "prob_diff"

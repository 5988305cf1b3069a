"""Advantage estimators against the worked examples of docs/formulas.md (GRPO, PPO/GAE, RLOO,
REINFORCE++, Lite PPO) plus the edge cases: all-equal group, singleton group, empty response,
masked tokens, expert rows."""
from __future__ import annotations

import math
import random

import pytest
import torch

from llmrl.algorithms import ADVANTAGES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.advantages import (
    discounted_returns,
    dynamic_sampling_keep,
    gae_advantages_and_returns,
    mask_truncated,
    masked_whiten,
)
from llmrl.algorithms.base import AdvantageInputs, total_token_rewards
from llmrl.algorithms.kl import kl_reward_channel


def cfg(**kw) -> AlgorithmConfig:
    return resolve_algorithm(AlgorithmConfig(**kw))


def outcome_batch(scores, lengths, prompt_len=2, width=None):
    """Rows laid out like llmrl.batch.collate: prompt tokens (mask 0), then `length` policy tokens,
    then padding; the score sits at the last policy token (the last prompt token when empty)."""
    width = width or prompt_len + max(lengths) + 1
    B = len(scores)
    rewards = torch.zeros(B, width)
    mask = torch.zeros(B, width)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, prompt_len : prompt_len + n] = 1
        last = prompt_len + n - 1 if n else prompt_len - 1
        rewards[i, last] = s
    return rewards, mask


def run(name, scores, groups, lengths=None, values=None, **kw):
    lengths = lengths or [3] * len(scores)
    rewards, mask = outcome_batch(scores, lengths)
    turn_ids = torch.zeros_like(mask, dtype=torch.long)
    adv, metrics = ADVANTAGES[name](AdvantageInputs.outcome(rewards, mask, torch.tensor(groups), cfg(**kw), turn_ids=turn_ids, values=values))
    return adv, mask, metrics


def row_values(adv, mask):
    """The advantage each row carries on its policy tokens (asserting it is constant there)."""
    out = []
    for a, m in zip(adv, mask):
        vals = a[m > 0]
        if len(vals) == 0:
            out.append(0.0)
            continue
        assert torch.allclose(vals, vals[0].expand_as(vals))
        out.append(float(vals[0]))
    return out


# --------------------------------------------------------------------------- GRPO docs/formulas.md#grpo-worked-examples


def test_grpo_verl_example():
    adv, mask, metrics = run("grpo", [1, 0, 0, 1], [0, 0, 0, 0])
    assert row_values(adv, mask) == pytest.approx([0.866024, -0.866024, -0.866024, 0.866024], abs=1e-6)
    assert metrics["adv/zero_std_groups"] == 0.0


def test_grpo_trl_epsilon():
    adv, mask, _ = run("grpo", [1, 0, 0, 1], [0, 0, 0, 0], adv_eps=1e-4)
    assert row_values(adv, mask) == pytest.approx([0.865875, -0.865875, -0.865875, 0.865875], abs=1e-6)


def test_grpo_one_success():
    adv, mask, _ = run("grpo", [1, 0, 0, 0], [0, 0, 0, 0])
    assert row_values(adv, mask) == pytest.approx([1.499997, -0.499999, -0.499999, -0.499999], abs=1e-6)


def test_dr_grpo_no_std_both_ways():
    expected = [0.5, -0.5, -0.5, 0.5]
    adv, mask, _ = run("grpo", [1, 0, 0, 1], [0, 0, 0, 0], norm_adv_by_std=False)
    assert row_values(adv, mask) == pytest.approx(expected, abs=1e-7)
    adv, mask, _ = run("dr_grpo", [1, 0, 0, 1], [0, 0, 0, 0], norm_adv_by_std=True)  # the alias ignores std
    assert row_values(adv, mask) == pytest.approx(expected, abs=1e-7)
    # and the preset turns std off
    assert cfg(name="dr_grpo").norm_adv_by_std is False


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "lite", "reinforce_pp_baseline"])
def test_all_equal_group_gives_exact_zero(name):
    # 0.1 is not representable: a computed std would be tiny but non-zero; the result must be 0.
    adv, mask, metrics = run(name, [0.1, 0.1, 0.1, 1.0, 0.0], [0, 0, 0, 1, 1])
    assert row_values(adv, mask)[:3] == [0.0, 0.0, 0.0]
    assert metrics["adv/zero_std_groups"] == pytest.approx(0.5)
    adv, mask, _ = run(name, [0, 0, 0, 0], [7, 7, 7, 7])
    assert torch.equal(adv, torch.zeros_like(adv))


def test_grpo_singleton_both_options():
    scores, groups = [2.0, 1.0, 0.0], [5, 9, 9]
    adv, mask, metrics = run("grpo", scores, groups, singleton_group="zero")
    assert row_values(adv, mask) == pytest.approx([0.0, 0.707106, -0.707106], abs=1e-6)
    assert metrics["adv/singleton_groups"] == pytest.approx(0.5)
    adv, mask, _ = run("grpo", scores, groups, singleton_group="raw")  # verl: mean 0, std 1
    assert row_values(adv, mask)[0] == pytest.approx(2.0 / (1 + 1e-6), abs=1e-7)
    assert row_values(adv, mask)[0] != 2.0
    adv, mask, _ = run("grpo", scores, groups, singleton_group="raw", norm_adv_by_std=False)
    assert row_values(adv, mask)[0] == pytest.approx(2.0)


def test_advantages_only_on_policy_tokens_and_group_ids_any_order():
    # interleaved, non-contiguous group ids
    adv, mask, _ = run("grpo", [1, 5, 0, 5, 0, 1], [3, 1, 3, 1, 3, 3], lengths=[1, 2, 3, 4, 2, 1])
    assert torch.all(adv[mask == 0] == 0)
    vals = row_values(adv, mask)
    assert vals[1] == 0.0 and vals[3] == 0.0  # group 1 all equal
    assert vals[0] == pytest.approx(0.866024, abs=1e-6) and vals[2] == pytest.approx(-0.866024, abs=1e-6)


def test_empty_response_row_scores_but_gets_no_advantage():
    # Row 0 is empty: its reward sits on its last (prompt) token; it still counts in the group.
    adv, mask, _ = run("grpo", [1, 0, 0, 1], [0, 0, 0, 0], lengths=[0, 3, 2, 1])
    assert mask[0].sum() == 0
    assert torch.equal(adv[0], torch.zeros_like(adv[0]))
    assert row_values(adv, mask)[1:] == pytest.approx([-0.866024, -0.866024, 0.866024], abs=1e-6)


# --------------------------------------------------------------------------- RLOO docs/formulas.md#rloo-worked-examples


def test_rloo_examples():
    adv, mask, _ = run("rloo", [1, 0, 0, 1], [0, 0, 0, 0])
    assert row_values(adv, mask) == pytest.approx([0.666667, -0.666667, -0.666667, 0.666667], abs=1e-6)
    adv, mask, _ = run("rloo", [1, 0.5, 0, 0], [0, 0, 0, 0])
    assert row_values(adv, mask) == pytest.approx([0.833333, 0.166667, -0.5, -0.5], abs=1e-6)


def test_rloo_singleton_both_options():
    adv, mask, _ = run("rloo", [0.7, 1, 0], [1, 2, 2], singleton_group="zero")
    assert row_values(adv, mask) == pytest.approx([0.0, 1.0, -1.0])
    adv, mask, _ = run("rloo", [0.7, 1, 0], [1, 2, 2], singleton_group="raw")
    assert row_values(adv, mask) == pytest.approx([0.7, 1.0, -1.0])


def test_rloo_batch_normalize():
    adv, mask, _ = run("rloo", [1, 0, 0, 1], [0, 0, 0, 0], rloo_batch_normalize=True)
    # A = +-2/3, batch mean 0, unbiased std (2/3)*sqrt(4/3) -> +-sqrt(3)/2 (eps 1e-6)
    expected = (2 / 3) / ((2 / 3) * math.sqrt(4 / 3) + 1e-6)
    assert row_values(adv, mask) == pytest.approx([expected, -expected, -expected, expected], abs=1e-6)


# --------------------------------------------------------------------------- Lite PPO docs/formulas.md#lite-ppo


def test_lite_group_mean_batch_std():
    scores = [1, 0, 0, 1, 1, 1, 1, 0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    adv, mask, _ = run("lite", scores, groups)
    assert row_values(adv, mask) == pytest.approx(
        [0.966090, -0.966090, -0.966090, 0.966090, 0.483045, 0.483045, 0.483045, -1.449135], abs=1e-6
    )
    adv, mask, _ = run("grpo", scores, groups)
    assert row_values(adv, mask) == pytest.approx(
        [0.866024, -0.866024, -0.866024, 0.866024, 0.499999, 0.499999, 0.499999, -1.499997], abs=1e-6
    )
    assert cfg(name="lite_ppo").advantage == "lite"


# --------------------------------------------------------------------------- REINFORCE++ docs/formulas.md#reinforce-and-its-baseline-variant


def test_reinforce_pp_baseline_example():
    adv, mask, _ = run("reinforce_pp_baseline", [1, 0, 1, 1], [0, 0, 1, 1], lengths=[2, 3, 1, 2])
    assert row_values(adv, mask) == pytest.approx([1.348076, -1.048503, 0.149786, 0.149786], abs=1e-5)
    valid = adv[mask > 0]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)


def test_reinforce_pp_baseline_singleton_options():
    # groups {1, 0} and the singleton {1}; lengths 1 each, so whitening is over 3 tokens
    adv, mask, _ = run("reinforce_pp_baseline", [1, 0, 1], [0, 0, 1], lengths=[1, 1, 1], singleton_group="zero")
    # centred [0.5, -0.5, 0]: mean 0, unbiased var 0.25 -> [1, -1, 0]
    assert row_values(adv, mask) == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)
    adv, mask, _ = run("reinforce_pp_baseline", [1, 0, 1], [0, 0, 1], lengths=[1, 1, 1], singleton_group="raw")
    # centred [0.5, -0.5, 1]: mean 1/3, var ((1/6)^2 + (5/6)^2 + (2/3)^2)/2 = 7/12
    s = math.sqrt(7 / 12 + 1e-8)
    assert row_values(adv, mask) == pytest.approx([(0.5 - 1 / 3) / s, (-0.5 - 1 / 3) / s, (1 - 1 / 3) / s], abs=1e-6)


def test_reinforce_pp_discounted_returns():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    g = discounted_returns(rewards, mask, gamma=0.5)
    assert g.tolist() == [[0.0, 0.25, 0.5, 1.0, 0.0]]
    # an observation token (mask 0) in the middle is skipped, not a cut
    mask_obs = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    rewards_obs = torch.tensor([[0.0, 0.0, 7.0, 1.0, 0.0]])  # reward on a masked token is ignored
    assert discounted_returns(rewards_obs, mask_obs, 0.5).tolist() == [[0.25, 0.5, 0.0, 1.0, 0.0]]

    adv, _ = ADVANTAGES["reinforce_pp"](AdvantageInputs.outcome(rewards, mask, torch.tensor([0]), cfg(gamma=0.5, whiten_advantages=False)))
    assert adv.tolist() == [[0.0, 0.25, 0.5, 1.0, 0.0]]
    adv, _ = ADVANTAGES["reinforce_pp"](AdvantageInputs.outcome(rewards, mask, torch.tensor([0]), cfg(gamma=0.5)))
    # whitened [0.25, 0.5, 1.0]: mean 7/12, unbiased var = 7/48
    s = math.sqrt(7 / 48 + 1e-8)
    assert adv[0, 1:4].tolist() == pytest.approx([(0.25 - 7 / 12) / s, (0.5 - 7 / 12) / s, (1 - 7 / 12) / s], abs=1e-6)
    assert adv[0, 0] == 0 and adv[0, 4] == 0


# --------------------------------------------------------------------------- GAE docs/formulas.md#ppo-worked-example


def test_gae_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    raw, returns = gae_advantages_and_returns(rewards, values, mask, gamma=1.0, lam=0.95, whiten=False)
    assert raw.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0], abs=1e-6)
    white, returns2 = gae_advantages_and_returns(rewards, values, mask, 1.0, 0.95)
    assert white.tolist()[0] == pytest.approx([0.991344, 0.017092, -1.008436], abs=1e-6)
    assert torch.equal(returns, returns2)  # returns come from the un-whitened advantages

    adv, metrics = ADVANTAGES["gae"](AdvantageInputs.outcome(rewards, mask, torch.tensor([0]), cfg(name="ppo", lam=0.95), values=values))
    assert adv.tolist()[0] == pytest.approx([0.991344, 0.017092, -1.008436], abs=1e-6)
    assert metrics["critic/returns_mean"] == pytest.approx((0.96575 + 0.985 + 1.0) / 3, abs=1e-6)


def test_gae_skips_observation_and_prompt_tokens():
    # prompt token, policy, observation (value 9, reward 5: both ignored), policy, policy, pad
    rewards = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[3.0, 0.5, 9.0, 0.6, 0.7, 4.0]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    raw, returns = gae_advantages_and_returns(rewards, values, mask, 1.0, 0.95, whiten=False)
    assert raw.tolist()[0] == pytest.approx([0.0, 0.46575, 0.0, 0.385, 0.3, 0.0], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.0, 0.96575, 0.0, 0.985, 1.0, 0.0], abs=1e-6)


def test_gae_needs_values():
    rewards, mask = outcome_batch([1.0], [2])
    with pytest.raises(ValueError, match="critic values"):
        ADVANTAGES["gae"](AdvantageInputs.outcome(rewards, mask, torch.tensor([0]), cfg(name="ppo")))


def test_masked_whiten_edge_cases():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(masked_whiten(x, torch.zeros(1, 3)), torch.zeros(1, 3))
    one = masked_whiten(x, torch.tensor([[0.0, 1.0, 0.0]]))
    assert one.tolist() == [[0.0, 0.0, 0.0]]


def test_kl_in_reward_example():
    scores = torch.tensor([[0.0, 0.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = old - torch.tensor([[0.1, -0.05, 0.2]])  # k1 = old - ref = [0.1, -0.05, 0.2]
    penalty, kl = kl_reward_channel(old, ref, torch.ones(1, 3), kl_coef=0.1, estimator="k1")
    r = total_token_rewards({"outcome": scores, "kl": penalty})
    assert kl.tolist()[0] == pytest.approx([0.1, -0.05, 0.2], abs=1e-6)
    assert r.tolist()[0] == pytest.approx([-0.01, 0.005, 0.98], abs=1e-6)
    penalty_masked, _ = kl_reward_channel(old, ref, torch.tensor([[0.0, 1.0, 1.0]]), 0.1, "k1")
    r_masked = total_token_rewards({"outcome": scores, "kl": penalty_masked})
    assert r_masked[0, 0] == 0.0


# --------------------------------------------------------------------------- DAPO helpers


def test_dynamic_sampling_keep():
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    acc = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.1, 0.1, 0.1])
    assert dynamic_sampling_keep(groups, acc).tolist() == [False, False, True, True, True, False, False, False]


def test_mask_truncated():
    mask = torch.ones(3, 4)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1.0] * 4, [0.0] * 4, [1.0] * 4]


# --------------------------------------------------------------------------- independent cross-check


def test_grpo_matches_plain_python_rederivation():
    rng = random.Random(1234)
    B = 24
    groups = [rng.randrange(6) for _ in range(B)]
    scores = [rng.choice([0.0, 1.0, 0.5, rng.random()]) for _ in range(B)]
    lengths = [rng.randrange(0, 5) for _ in range(B)]
    eps = 1e-6
    expected = []
    for i in range(B):
        members = [scores[j] for j in range(B) if groups[j] == groups[i]]
        n = len(members)
        if n == 1 or max(members) == min(members):
            expected.append(0.0)
            continue
        mean = sum(members) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        expected.append((scores[i] - mean) / (std + eps))
    adv, mask, _ = run("grpo", scores, groups, lengths=lengths)
    for i in range(B):
        for t in range(adv.shape[1]):
            want = expected[i] if mask[i, t] > 0 else 0.0
            assert float(adv[i, t]) == pytest.approx(want, abs=1e-5)

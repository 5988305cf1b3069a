"""Cross-checks of the estimators and losses that TRL or verl also implement, against plain-Python
re-derivations written from the papers' formulas (docs/formulas.md), on random inputs.

The re-derivations take a different route from the library code where one exists: GAE and the
REINFORCE++ returns are computed on each row *compressed* to its policy tokens (what "masked
positions are skipped" means), not with the library's masked backward sweep; group statistics
are recomputed per row by scanning the batch.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from llmrl.algorithms.base import AdvantageInputs
from llmrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import LossContext


def cfg(**kw) -> AlgorithmConfig:
    return resolve_algorithm(AlgorithmConfig(**kw))


def random_rows(rng: random.Random, B: int, T: int, holes: bool = False) -> list[list[float]]:
    """Loss masks: a prompt, then policy tokens (with masked observation holes when `holes`),
    then padding; some rows are empty."""
    rows = []
    for _ in range(B):
        start, end = rng.randrange(1, 3), rng.randrange(1, T + 1)
        row = [1.0 if start <= t < end else 0.0 for t in range(T)]
        if holes:
            row = [0.0 if (m and rng.random() < 0.25) else m for m in row]
        rows.append(row)
    return rows


def outcome_rewards(mask: list[list[float]], scores: list[float]) -> list[list[float]]:
    """The score on each row's last policy token, or on the prompt's last token when the
    response is empty (as llmrl.batch.collate places it)."""
    out = []
    for row, s in zip(mask, scores):
        r = [0.0] * len(row)
        valid = [t for t, m in enumerate(row) if m]
        r[valid[-1] if valid else 0] = s
        out.append(r)
    return out


def whiten(values_by_row: list[list[float]], mask: list[list[float]]) -> list[list[float]]:
    """(x - mean) / sqrt(unbiased var + 1e-8) over every valid token of the batch (docs/formulas.md#gae-and-returns)."""
    flat = [v for row, m in zip(values_by_row, mask) for v, k in zip(row, m) if k]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) if k else 0.0 for v, k in zip(row, m)] for row, m in zip(values_by_row, mask)]


def advantages(estimator: str, token_rewards, mask, groups, values=None, **kw) -> torch.Tensor:
    mask_t = torch.tensor(mask)
    values_t = None if values is None else torch.tensor(values, dtype=torch.float32)
    inputs = AdvantageInputs.outcome(torch.tensor(token_rewards, dtype=torch.float32), mask_t, torch.tensor(groups), cfg(**kw), values=values_t)
    adv, _ = ADVANTAGES[estimator](inputs)
    return adv


def assert_rows_close(got: torch.Tensor, expected: list[list[float]], tol: float = 1e-4) -> None:
    for i, row in enumerate(expected):
        for t, want in enumerate(row):
            assert float(got[i, t]) == pytest.approx(want, abs=tol), (i, t)


def group_scan(scores: list[float], groups: list[int], i: int) -> list[float]:
    return [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_matches_leave_one_out_rederivation(seed):
    """TRL RLOOTrainer / verl rloo: A_i = r_i - mean of the *other* members; a singleton gets 0."""
    rng = random.Random(seed)
    B, T = 20, 7
    groups = [rng.randrange(7) for _ in range(B)]
    scores = [rng.choice([0.0, 1.0, rng.uniform(-1, 2)]) for _ in range(B)]
    mask = random_rows(rng, B, T)
    expected_rows = []
    for i in range(B):
        members = group_scan(scores, groups, i)
        others = len(members) - 1
        expected_rows.append(0.0 if others == 0 else scores[i] - (sum(members) - scores[i]) / others)
    got = advantages("rloo", outcome_rewards(mask, scores), mask, groups, name="rloo")
    assert_rows_close(got, [[a * m for m in row] for a, row in zip(expected_rows, mask)])

    # TRL normalize_advantages: standardise the per-row advantages over the batch, std unbiased
    mean = sum(expected_rows) / B
    std = math.sqrt(sum((a - mean) ** 2 for a in expected_rows) / (B - 1))
    normed = [(a - mean) / (std + 1e-6) for a in expected_rows]
    got = advantages("rloo", outcome_rewards(mask, scores), mask, groups, name="rloo", rloo_batch_normalize=True)
    assert_rows_close(got, [[a * m for m in row] for a, row in zip(normed, mask)])


@pytest.mark.parametrize("seed", [0, 1])
def test_lite_matches_group_mean_batch_std_rederivation(seed):
    """Lite PPO (docs/formulas.md#lite-ppo): (r - group mean) / (unbiased std over the batch's rows + eps)."""
    rng = random.Random(seed)
    B, T = 16, 6
    groups = [rng.randrange(4) for _ in range(B)]
    scores = [rng.uniform(-1, 1) for _ in range(B)]
    mask = random_rows(rng, B, T)
    mean_all = sum(scores) / B
    batch_std = math.sqrt(sum((s - mean_all) ** 2 for s in scores) / (B - 1))
    expected = []
    for i in range(B):
        members = group_scan(scores, groups, i)
        a = 0.0 if len(members) == 1 else (scores[i] - sum(members) / len(members)) / (batch_std + 1e-6)
        expected.append([a * m for m in mask[i]])
    assert_rows_close(advantages("lite", outcome_rewards(mask, scores), mask, groups, name="lite_ppo"), expected)


def gae_on_valid_positions(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE (Schulman et al. 2016) on one compressed sequence; V after the end is 0."""
    adv = [0.0] * len(rewards)
    running = 0.0
    for k in range(len(rewards) - 1, -1, -1):
        next_v = values[k + 1] if k + 1 < len(rewards) else 0.0
        delta = rewards[k] + gamma * next_v - values[k]
        running = delta + gamma * lam * running
        adv[k] = running
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_compressed_sequence_rederivation(seed):
    """verl compute_gae_advantage_return, mask-aware (docs/formulas.md#gae-and-returns): masked positions inside a response
    are skipped, so GAE on the row equals textbook GAE on the row's policy tokens alone."""
    rng = random.Random(seed)
    B, T = 9, 10
    gamma, lam = rng.choice([1.0, 0.99]), rng.choice([1.0, 0.95])
    mask = random_rows(rng, B, T, holes=True)
    if not any(any(row) for row in mask):
        mask[0][3] = 1.0
    token_rewards = [[rng.uniform(-0.2, 0.2) if m else rng.uniform(-5, 5) for m in row] for row in mask]  # junk off-mask
    values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in range(B)]
    raw_adv, returns = [], []
    for i in range(B):
        where = [t for t in range(T) if mask[i][t]]
        a, r = gae_on_valid_positions([token_rewards[i][t] for t in where], [values[i][t] for t in where], gamma, lam)
        row_a, row_r = [0.0] * T, [0.0] * T
        for k, t in enumerate(where):
            row_a[t], row_r[t] = a[k], r[k]
        raw_adv.append(row_a)
        returns.append(row_r)
    from llmrl.algorithms.advantages import gae_advantages_and_returns

    got_adv, got_ret = gae_advantages_and_returns(
        torch.tensor(token_rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64), torch.tensor(mask), gamma, lam
    )
    assert_rows_close(got_ret, returns, tol=1e-9)
    assert_rows_close(got_adv, whiten(raw_adv, mask), tol=1e-7)
    # the registered estimator is the same whitened GAE
    got = advantages("gae", token_rewards, mask, [0] * B, values=values, name="ppo", gamma=gamma, lam=lam)
    assert_rows_close(got, whiten(raw_adv, mask), tol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_matches_discounted_return_rederivation(seed):
    """verl reinforce_plus_plus (docs/formulas.md#reinforce-and-its-baseline-variant): G_t = sum_k gamma^(k-t) r_k over policy tokens, then
    whitened over the batch's policy tokens."""
    rng = random.Random(seed)
    B, T, gamma = 8, 9, 0.9
    mask = random_rows(rng, B, T)
    token_rewards = [[rng.uniform(-1, 1) if m else 0.0 for m in row] for row in mask]
    returns = []
    for i in range(B):
        where = [t for t in range(T) if mask[i][t]]
        row = [0.0] * T
        for k, t in enumerate(where):
            row[t] = sum(gamma ** (j - k) * token_rewards[i][where[j]] for j in range(k, len(where)))
        returns.append(row)
    got = advantages("reinforce_pp", token_rewards, mask, list(range(B)), name="reinforce_pp", gamma=gamma)
    assert_rows_close(got, whiten(returns, mask))


@pytest.mark.parametrize("seed", [0, 1])
def test_reinforce_pp_baseline_matches_rederivation(seed):
    """verl reinforce_plus_plus_baseline (docs/formulas.md#reinforce-and-its-baseline-variant): r - group mean broadcast to tokens, whitened over
    the batch's tokens (token-weighted); a singleton keeps its raw score (verl)."""
    rng = random.Random(seed)
    B, T = 12, 7
    groups = [rng.randrange(5) for _ in range(B)]
    scores = [rng.choice([0.0, 1.0]) for _ in range(B)]
    mask = random_rows(rng, B, T)
    per_row = []
    for i in range(B):
        members = group_scan(scores, groups, i)
        per_row.append(scores[i] if len(members) == 1 else scores[i] - sum(members) / len(members))
    got = advantages(
        "reinforce_pp_baseline", outcome_rewards(mask, scores), mask, groups, name="reinforce_pp_baseline", singleton_group="raw"
    )
    assert_rows_close(got, whiten([[a * m for m in row] for a, row in zip(per_row, mask)], mask))


# --------------------------------------------------------------------------- losses


def loss_value(loss_name: str, mb: dict, out: dict, **kw) -> float:
    context = LossContext(step=0, cfg=cfg(**kw), generator=torch.Generator().manual_seed(0))
    loss = LOSSES[loss_name]
    result = loss(mb, out, context)
    denoms = loss.denominators(mb, context)
    return float(sum(result.weights.get(p, 1.0) * s / denoms[p] for p, s in result.sums.items() if denoms[p] > 0))


def random_policy_batch(rng: random.Random, B: int, T: int) -> tuple[list[list[float]], list[float], list[list[float]], list[list[float]]]:
    mask = random_rows(rng, B, T)
    adv = [rng.uniform(-2, 2) for _ in range(B)]
    old = [[rng.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
    new = [[o + rng.uniform(-0.4, 0.4) for o in row] for row in old]
    return mask, adv, old, new


def tensors(mask, adv, old, new) -> tuple[dict, dict]:
    mask_t = torch.tensor(mask)
    mb = {"loss_mask": mask_t, "old_logprobs": torch.tensor(old), "advantages": torch.tensor(adv)[:, None] * mask_t}
    return mb, {"logprobs": torch.tensor(new)}


def nonempty_rows(mask: list[list[float]]) -> list[tuple[int, list[int]]]:
    """(row, its policy positions) for every row with at least one policy token."""
    rows = [(i, [t for t, m in enumerate(row) if m]) for i, row in enumerate(mask)]
    return [(i, where) for i, where in rows if where]


@pytest.mark.parametrize("seed", [0, 1])
def test_gspo_matches_sequence_ratio_rederivation(seed):
    """GSPO (docs/formulas.md#gspo; verl gspo, TRL importance_sampling_level='sequence'): s_i = exp(mean_t(new - old)),
    token loss max(-A s, -A clip(s)), averaged per row then over non-empty rows."""
    rng = random.Random(seed)
    mask, adv, old, new = random_policy_batch(rng, 9, 6)
    per_row = []
    for i, where in nonempty_rows(mask):
        s = math.exp(sum(new[i][t] - old[i][t] for t in where) / len(where))
        per_row.append(max(-adv[i] * s, -adv[i] * min(max(s, 1 - 0.0003), 1 + 0.0004)))
    expected = sum(per_row) / len(per_row)
    got = loss_value("gspo", *tensors(mask, adv, old, new), name="gspo", clip_eps_low=0.0003, clip_eps_high=0.0004)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_sequence_loss_matches_trl_rederivation(seed):
    """TRL RLOOTrainer (docs/formulas.md#rloo-sequence-level-loss): r_i = exp(sum new - sum old), max(-A r, -A clip(r)), mean over rows."""
    rng = random.Random(seed)
    mask, adv, old, new = random_policy_batch(rng, 9, 6)
    terms = []
    for i, where in nonempty_rows(mask):
        r = math.exp(sum(new[i][t] for t in where) - sum(old[i][t] for t in where))
        terms.append(max(-adv[i] * r, -adv[i] * min(max(r, 0.8), 1.2)))
    got = loss_value("rloo_seq", *tensors(mask, adv, old, new), name="rloo", loss="rloo_seq")
    assert got == pytest.approx(sum(terms) / len(terms), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_value_loss_matches_clipped_rederivation(seed):
    """verl compute_value_loss (docs/formulas.md#value-loss): 0.5 * token-mean of max((V-R)^2, (clip(V, V_old +- c) - R)^2)."""
    rng = random.Random(seed)
    B, T, c = 7, 6, 0.5
    mask = random_rows(rng, B, T)
    v = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    v_old = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    ret = [[rng.uniform(-2, 2) for _ in range(T)] for _ in range(B)]
    terms = [
        0.5 * max((v[i][t] - ret[i][t]) ** 2, (min(max(v[i][t], v_old[i][t] - c), v_old[i][t] + c) - ret[i][t]) ** 2)
        for i in range(B) for t in range(T) if mask[i][t]
    ]
    mb = {"loss_mask": torch.tensor(mask), "old_values": torch.tensor(v_old), "returns": torch.tensor(ret)}
    got = loss_value("value", mb, {"values": torch.tensor(v)}, name="ppo", value_clip=c, vf_coef=1.0)
    assert got == pytest.approx(sum(terms) / len(terms), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_cov_matches_rederivation(seed):
    """KL-Cov (docs/formulas.md#kl-cov; verl kl_cov): Cov = (A - mean A)(logp - mean logp) over valid tokens; the top
    max(1, floor(N * ratio)) get -A r + kappa |logp - old|, the rest -A r; token-mean."""
    rng = random.Random(seed)
    mask, adv, old, new = random_policy_batch(rng, 8, 7)
    valid = [(i, t) for i in range(len(mask)) for t in range(7) if mask[i][t]]
    mean_a = sum(adv[i] for i, _ in valid) / len(valid)
    mean_lp = sum(new[i][t] for i, t in valid) / len(valid)
    cov = {(i, t): (adv[i] - mean_a) * (new[i][t] - mean_lp) for i, t in valid}
    ratio, kappa = 0.2, 1.0
    k = max(1, int(len(valid) * ratio))
    top = set(sorted(valid, key=lambda it: cov[it], reverse=True)[:k])
    total = 0.0
    for i, t in valid:
        term = -adv[i] * math.exp(new[i][t] - old[i][t])
        if (i, t) in top:
            term += kappa * abs(new[i][t] - old[i][t])
        total += term
    got = loss_value(
        "ppo_clip", *tensors(mask, adv, old, new), entropy_control="kl_cov", kl_cov_ratio=ratio, kl_cov_coef=kappa, dual_clip_c=None
    )
    assert got == pytest.approx(total / len(valid), abs=1e-5)


def test_kl_estimators_match_schulman_formulas():
    """k1, k2, k3 of Schulman's note (verl kl, mse, low_var_kl; TRL's k3 in GRPO)."""
    rng = random.Random(5)
    logp = [rng.uniform(-6, 0) for _ in range(50)]
    ref = [rng.uniform(-6, 0) for _ in range(50)]
    lp, rf = torch.tensor(logp, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    expected = {
        "k1": [a - b for a, b in zip(logp, ref)],
        "k2": [0.5 * (a - b) ** 2 for a, b in zip(logp, ref)],
        "k3": [math.exp(b - a) - (b - a) - 1 for a, b in zip(logp, ref)],
    }
    for name, want in expected.items():
        got = KL_ESTIMATORS[name](lp, rf).tolist()
        assert got == pytest.approx([min(max(w, -10), 10) if name == "k3" else w for w in want], abs=1e-9), name

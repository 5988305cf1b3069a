"""Losses, aggregation, KL estimators and entropy control against the worked examples of
docs/formulas.md (aggregation, PPO clip, KL, GRPO, PPO value loss, SFT, Clip-Cov / KL-Cov, GSPO,
RLOO's sequence loss), micro-batch invariance, edge cases and gradients."""
from __future__ import annotations

import math
import random

import pytest
import torch

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.aggregation import agg_denominator, agg_sum, aggregate
from llmrl.algorithms.base import LossContext
from llmrl.algorithms.entropy import clip_cov_selection, token_covariance
from llmrl.algorithms.kl import kl_penalty
from llmrl.algorithms.losses import ppo_clip_token_terms

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def cfg(**kw) -> AlgorithmConfig:
    kw.setdefault("loss_scale_factor", 4)
    return resolve_algorithm(AlgorithmConfig(**kw))


def ctx(seed: int = 0, **kw) -> LossContext:
    return LossContext(step=0, cfg=cfg(**kw), generator=torch.Generator().manual_seed(seed))


def engine_value(loss, micro_batches, outs, context):
    """What the train engine minimises: per part, sum over micro-batches of sums divided by the
    summed denominators, times the part weight."""
    denoms: dict[str, float] = {}
    for mb in micro_batches:
        for k, v in loss.denominators(mb, context).items():
            denoms[k] = denoms.get(k, 0.0) + v
    total = 0.0
    results = [loss(mb, out, context) for mb, out in zip(micro_batches, outs)]
    for part in denoms:
        if denoms[part] <= 0:
            continue
        s = sum(r.sums[part] for r in results if part in r.sums)
        total = total + results[0].weights.get(part, 1.0) * s / denoms[part]
    return total, results


# --------------------------------------------------------------------------- aggregation docs/formulas.md#loss-aggregation


def example_12():
    values = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    return values, mask


@pytest.mark.parametrize(
    "mode,expected", [("token-mean", 10 / 6), ("seq-mean-token-mean", 1.5), ("seq-mean-token-sum", 5.0), ("seq-mean-token-sum-norm", 1.25)]
)
def test_aggregation_worked_example(mode, expected):
    values, mask = example_12()
    assert float(aggregate(values, mask, mode, scale_factor=4)) == pytest.approx(expected, abs=1e-6)
    # split into 2 micro-batches, each trimmed to its own width as llmrl.batch does
    parts = [(values[:1, :2], mask[:1, :2]), (values[1:], mask[1:])]
    total = sum(float(agg_sum(v, m, mode, 4)) for v, m in parts) / sum(agg_denominator(m, mode) for _, m in parts)
    assert total == pytest.approx(expected, abs=1e-6)


def test_aggregation_named_values():
    values, mask = example_12()
    assert float(aggregate(values, mask, "token-mean")) == pytest.approx(1.666667, abs=1e-6)
    # llmrl's Dr. GRPO uses TRL's sum/(B*C): 10/(2*4) = 1.25, not verl's 10/4 = 2.5
    assert float(aggregate(values, mask, "seq-mean-token-sum-norm", 4)) == pytest.approx(1.25)


@pytest.mark.parametrize("mode,expected", [("token-mean", 10 / 6), ("seq-mean-token-mean", 1.5), ("seq-mean-token-sum", 10 / 3), ("seq-mean-token-sum-norm", 10 / 12)])
def test_aggregation_fully_masked_row(mode, expected):
    values, mask = example_12()
    values = torch.cat([values, torch.full((1, 4), float("nan"))])  # garbage under a zero mask
    mask = torch.cat([mask, torch.zeros(1, 4)])
    out = aggregate(values, mask, mode, 4)
    assert torch.isfinite(out) and float(out) == pytest.approx(expected, abs=1e-6)
    # a micro-batch holding only the empty row contributes nothing to the sum
    assert float(agg_sum(values[2:], mask[2:], mode, 4)) == 0.0
    # an all-empty batch: 0, not NaN
    assert float(aggregate(values[2:], mask[2:], mode, 4)) == 0.0


def test_sum_norm_requires_scale_factor():
    values, mask = example_12()
    with pytest.raises(ValueError, match="loss_scale_factor"):
        agg_sum(values, mask, "seq-mean-token-sum-norm", None)


def test_aggregation_rows_subset():
    values, mask = example_12()
    rows = torch.tensor([False, True])
    assert float(aggregate(values, mask, "seq-mean-token-sum", rows=rows)) == 8.0
    assert agg_denominator(mask, "seq-mean-token-sum", rows=rows) == 1.0


# --------------------------------------------------------------------------- PPO clip docs/formulas.md#ppo-clip

RATIOS = torch.tensor([[0.7, 1.0, 1.25, 1.5, 5.0]])


def ppo_tokens(adv: float, eps_low=0.2, eps_high=0.2, c=3.0):
    old = torch.zeros_like(RATIOS)
    terms, dual = ppo_clip_token_terms(RATIOS.log(), old, torch.full_like(RATIOS, adv), torch.ones_like(RATIOS), eps_low, eps_high, c)
    return terms, dual


def test_ppo_clip_worked_example():
    terms, _ = ppo_tokens(1.0)
    assert terms.loss.tolist()[0] == pytest.approx([-0.7, -1.0, -1.2, -1.2, -1.2], abs=1e-6)
    assert terms.clipped.tolist()[0] == [False, False, True, True, True]
    terms, _ = ppo_tokens(1.0, eps_high=0.28)
    assert terms.loss.tolist()[0] == pytest.approx([-0.7, -1.0, -1.25, -1.28, -1.28], abs=1e-6)
    terms, dual = ppo_tokens(-1.0)
    assert terms.loss.tolist()[0] == pytest.approx([0.8, 1.0, 1.25, 1.5, 3.0], abs=1e-6)
    assert dual.tolist()[0] == [False, False, False, False, True]
    terms, dual = ppo_tokens(-1.0, c=None)
    assert terms.loss.tolist()[0][-1] == pytest.approx(5.0)
    assert not dual.any()


def test_ppo_clip_loss_metrics_on_worked_example():
    logp = RATIOS.log()
    mb = {"loss_mask": torch.ones(1, 5), "old_logprobs": torch.zeros(1, 5), "advantages": -torch.ones(1, 5)}
    out = loss_out = LOSSES["ppo_clip"](mb, {"logprobs": logp}, ctx())
    assert float(out.sums["pg"]) == pytest.approx(0.8 + 1.0 + 1.25 + 1.5 + 3.0, abs=1e-5)
    assert LOSSES["ppo_clip"].denominators(mb, ctx()) == {"pg": 5.0}
    m = loss_out.metrics
    assert m["actor/clipfrac"] == (1.0, 5.0)  # only 0.7 is clipped (to 0.8) when A < 0
    assert m["actor/dual_clip_frac"] == (1.0, 5.0)
    assert m["actor/ratio_mean"][0] == pytest.approx(0.7 + 1 + 1.25 + 1.5 + 5.0, abs=1e-5)
    # approx_kl is k3 of KL(old || new): r - 1 - log r per token
    k3 = sum(r - 1 - math.log(r) for r in [0.7, 1.0, 1.25, 1.5, 5.0])
    assert m["actor/approx_kl"][0] == pytest.approx(k3, abs=1e-5)
    assert m["actor/pg_loss"] == (pytest.approx(7.55, abs=1e-5), 5.0)


def test_ppo_log_ratio_clamp_keeps_finite():
    logp = torch.tensor([[0.0, -0.1]])
    old = torch.tensor([[-100.0, -0.1]])  # log-ratio 100 -> clamped at 20
    mb = {"loss_mask": torch.ones(1, 2), "old_logprobs": old, "advantages": -torch.ones(1, 2)}
    out = LOSSES["ppo_clip"](mb, {"logprobs": logp.requires_grad_()}, ctx(dual_clip_c=None))
    assert torch.isfinite(out.sums["pg"])
    assert float(out.sums["pg"].detach()) == pytest.approx(math.exp(20) + 1.0, rel=1e-5)


def test_grpo_token_mean_loss_example():
    # docs/formulas.md#grpo-worked-examples: rho = 1, A = +0.866 (2 tokens) and -0.866 (4 tokens), token-mean -> +0.288675
    a = math.sqrt(3) / 2
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.tensor([[a], [-a]]) * mask
    logp = torch.full((2, 5), -0.7) * mask
    mb = {"loss_mask": mask, "old_logprobs": logp.clone(), "advantages": adv}
    total, _ = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": logp}], ctx())
    assert float(total.detach()) == pytest.approx(0.288675, abs=1e-6)


# --------------------------------------------------------------------------- micro-batch invariance


def random_mb(seed: int, B: int = 6, T: int = 7, empty_rows=(2,)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for i in range(B):
        if i in empty_rows:
            continue
        start = int(torch.randint(1, 3, (1,), generator=g))
        n = int(torch.randint(1, T - start + 1, (1,), generator=g))
        mask[i, start : start + n] = 1
    adv = torch.randn(B, 1, generator=g) * mask
    old = -torch.rand(B, T, generator=g) * 2
    logp = old + 0.3 * torch.randn(B, T, generator=g)
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    entropy = torch.rand(B, T, generator=g) * mask
    mb = {"loss_mask": mask, "old_logprobs": old, "advantages": adv, "ref_logprobs": ref}
    return mb, {"logprobs": logp, "entropy": entropy}


def split(mb, out, cut):
    a = {k: v[:cut] for k, v in mb.items()}, {k: v[:cut] for k, v in out.items()}
    b = {k: v[cut:] for k, v in mb.items()}, {k: v[cut:] for k, v in out.items()}
    return [a[0], b[0]], [a[1], b[1]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_name", ["ppo_clip", "gspo", "rloo_seq"])
def test_two_micro_batches_equal_one(mode, loss_name):
    mb, out = random_mb(3)
    context = ctx(loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.01)
    one, results = engine_value(LOSSES[loss_name], [mb], [out], context)
    assert {"pg", "kl", "entropy"} <= set(results[0].sums)
    assert results[0].weights["kl"] == 0.1 and results[0].weights["entropy"] == -0.01
    mbs, outs = split(mb, out, 3)
    two, _ = engine_value(LOSSES[loss_name], mbs, outs, context)
    assert torch.isfinite(one) and float(two) == pytest.approx(float(one), abs=1e-6)


# --------------------------------------------------------------------------- KL docs/formulas.md#kl-to-the-reference


def test_kl_estimators_example():
    a, b = torch.tensor(-1.0), torch.tensor(-1.5)
    assert float(kl_penalty(a, b, "k1")) == pytest.approx(0.5)
    assert float(kl_penalty(a, b, "k2")) == pytest.approx(0.125)
    assert float(kl_penalty(a, b, "k3")) == pytest.approx(0.106531, abs=1e-6)
    assert float(kl_penalty(a, b, "abs")) == pytest.approx(0.5)
    assert float(kl_penalty(b, a, "k1")) == pytest.approx(-0.5)
    assert float(kl_penalty(b, a, "k2")) == pytest.approx(0.125)
    assert float(kl_penalty(b, a, "k3")) == pytest.approx(0.148721, abs=1e-6)
    assert float(kl_penalty(b, a, "abs")) == pytest.approx(0.5)
    # verl spellings
    assert float(kl_penalty(b, a, "low_var_kl")) == float(kl_penalty(b, a, "k3"))
    assert float(kl_penalty(b, a, "mse")) == float(kl_penalty(b, a, "k2"))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(a, b, "k4")


def test_k3_clamps():
    far = kl_penalty(torch.tensor([0.0, -30.0]), torch.tensor([-30.0, 0.0]), "k3")
    # ref - logp = -30 -> clamp -20 -> exp(-20) + 19 -> clamp 10; +30 -> exp(20) - 21 -> clamp 10
    assert far.tolist() == [10.0, 10.0]


def test_kl_part_only_in_loss_placement():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    logp = torch.tensor([[0.0, -1.0, -1.5]])
    ref = torch.tensor([[5.0, -1.5, -1.0]])
    mb = {"loss_mask": mask, "old_logprobs": logp.clone(), "advantages": torch.zeros(1, 3), "ref_logprobs": ref}
    out = LOSSES["ppo_clip"](mb, {"logprobs": logp}, ctx(kl_coef=0.5))
    assert float(out.sums["kl"]) == pytest.approx(0.106531 + 0.148721, abs=1e-6)
    assert out.weights["kl"] == 0.5
    assert out.metrics["actor/kl_ref"] == (pytest.approx(0.255252, abs=1e-6), 2.0)
    placed_in_reward = LOSSES["ppo_clip"](mb, {"logprobs": logp}, ctx(kl_coef=0.5, kl_placement="reward"))
    assert "kl" not in placed_in_reward.sums and "kl" not in LOSSES["ppo_clip"].denominators(mb, ctx(kl_coef=0.5, kl_placement="reward"))
    assert "actor/kl_ref" in placed_in_reward.metrics
    no_ref = {k: v for k, v in mb.items() if k != "ref_logprobs"}
    with pytest.raises(ValueError, match="ref_logprobs"):
        LOSSES["ppo_clip"](no_ref, {"logprobs": logp}, ctx(kl_coef=0.5))


def test_entropy_part_and_metric():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    mb = {"loss_mask": mask, "old_logprobs": torch.zeros(1, 3), "advantages": torch.zeros(1, 3)}
    ent = torch.tensor([[9.0, 0.5, 1.5]])
    out = LOSSES["ppo_clip"](mb, {"logprobs": torch.zeros(1, 3), "entropy": ent}, ctx(entropy_coef=0.01))
    assert float(out.sums["entropy"]) == pytest.approx(2.0)
    assert out.weights["entropy"] == -0.01
    assert out.metrics["actor/entropy"] == (2.0, 2.0)
    with pytest.raises(ValueError, match="entropy"):
        LOSSES["ppo_clip"](mb, {"logprobs": torch.zeros(1, 3)}, ctx(entropy_coef=0.01))


# --------------------------------------------------------------------------- Clip-Cov / KL-Cov docs/formulas.md#clip-cov-and-kl-cov-worked-example

A_85 = torch.tensor([[3.0, 3.0, 3.0, -1.0, -1.0, -1.0]])
LOGP_85 = torch.tensor([[-0.1, -2.0, -1.0, -0.5, -1.5, -1.0]])


def test_covariance_values():
    cov = token_covariance(A_85, LOGP_85, torch.ones(1, 6))
    assert cov.tolist()[0] == pytest.approx([1.833333, -1.966667, 0.033333, -1.033333, 0.966667, -0.033333], abs=1e-6)


def test_clip_cov_example():
    mb = {"loss_mask": torch.ones(1, 6), "old_logprobs": LOGP_85.clone(), "advantages": A_85}
    context = ctx(entropy_control="clip_cov", clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0)
    total, results = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": LOGP_85.clone()}], context)
    assert float(total.detach()) == pytest.approx(-0.5, abs=1e-6)
    m = results[0].metrics
    assert m["entropy_ctl/affected_frac"] == (1.0, 6.0)
    assert m["entropy_ctl/cov_max"][0] == pytest.approx(1.833333, abs=1e-6)
    assert m["entropy_ctl/cov_mean"][0] / m["entropy_ctl/cov_mean"][1] == pytest.approx(-0.033333, abs=1e-6)
    # without Clip-Cov the same batch gives -1.0
    plain, _ = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": LOGP_85.clone()}], ctx())
    assert float(plain) == pytest.approx(-1.0, abs=1e-6)


def test_clip_cov_zeroes_gradient_of_chosen_token():
    logp = LOGP_85.clone().requires_grad_()
    mb = {"loss_mask": torch.ones(1, 6), "old_logprobs": LOGP_85.clone(), "advantages": A_85}
    out = LOSSES["ppo_clip"](mb, {"logprobs": logp}, ctx(entropy_control="clip_cov"))
    out.sums["pg"].backward()
    assert logp.grad[0, 0] == 0.0
    assert logp.grad[0, 1:].tolist() == pytest.approx([-3.0, -3.0, 1.0, 1.0, 1.0])


def test_clip_cov_random_choice_uses_generator_and_skips_clipped():
    cov = torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5, 9.0]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    clipped = torch.zeros(1, 8, dtype=torch.bool)
    clipped[0, 0] = True
    picks = set()
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        chosen = clip_cov_selection(cov, valid, clipped, ratio=0.25, lower=1.0, upper=5.0, generator=gen)
        assert int(chosen.sum()) == 2  # floor(0.25 * 8)
        assert not chosen[0, 0] and not chosen[0, 6] and not chosen[0, 7]
        again = clip_cov_selection(cov, valid, clipped, 0.25, 1.0, 5.0, torch.Generator().manual_seed(seed))
        assert torch.equal(chosen, again)
        picks.add(tuple(chosen[0].tolist()))
    assert len(picks) > 1  # the choice really is random across seeds


def test_kl_cov_example():
    old = LOGP_85.clone()
    old[0, 0] -= 0.1
    mb = {"loss_mask": torch.ones(1, 6), "old_logprobs": old, "advantages": A_85}
    context = ctx(entropy_control="kl_cov", kl_cov_ratio=0.0002, kl_cov_coef=1.0)
    total, results = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": LOGP_85.clone()}], context)
    assert float(total.detach()) == pytest.approx(-1.035919, abs=1e-6)
    assert results[0].metrics["entropy_ctl/affected_frac"] == (1.0, 6.0)
    assert results[0].metrics["actor/clipfrac"] == (0.0, 6.0)
    # verl's default kappa 0.1
    total01, _ = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": LOGP_85.clone()}], ctx(entropy_control="kl_cov"))
    assert float(total01) == pytest.approx((-3 * math.exp(0.1) + 0.01 - 6 + 3) / 6, abs=1e-6)


def test_kl_cov_has_no_ratio_clip():
    # ratio 1.5 with A > 0 would be clipped to 1.2 by PPO; KL-Cov uses -A r unclipped
    logp = torch.tensor([[math.log(1.5), 0.0]])
    mb = {"loss_mask": torch.ones(1, 2), "old_logprobs": torch.zeros(1, 2), "advantages": torch.tensor([[1.0, -1.0]])}
    out = LOSSES["ppo_clip"](mb, {"logprobs": logp}, ctx(entropy_control="kl_cov", kl_cov_coef=0.0))
    assert float(out.sums["pg"]) == pytest.approx(-1.5 + 1.0, abs=1e-6)


# --------------------------------------------------------------------------- GSPO docs/formulas.md#gspo, RLOO seq docs/formulas.md#rloo-sequence-level-loss

LOGP_91 = torch.tensor([[-1.0, -2.0, -0.5]])
OLD_91 = torch.tensor([[-1.1, -1.9, -0.8]])


def test_gspo_sequence_ratio_and_gradient():
    logp = LOGP_91.clone().requires_grad_()
    mb = {"loss_mask": torch.ones(1, 3), "old_logprobs": OLD_91, "advantages": torch.ones(1, 3)}
    wide = ctx(name="gspo", clip_eps_low=0.5, clip_eps_high=0.5)
    out = LOSSES["gspo"](mb, {"logprobs": logp}, wide)
    assert out.metrics["actor/ratio_mean"][0] / 3 == pytest.approx(1.105171, abs=1e-6)
    total, _ = engine_value(LOSSES["gspo"], [mb], [{"logprobs": logp}], wide)
    assert float(total.detach()) == pytest.approx(-1.105171, abs=1e-6)  # seq-mean-token-mean of -A s
    total.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.105171 / 3] * 3, abs=1e-6)
    # the per-token ratios GSPO replaces
    assert (LOGP_91 - OLD_91).exp().tolist()[0] == pytest.approx([1.105171, 0.904837, 1.349859], abs=1e-6)


def test_gspo_preset_clip_range():
    logp = LOGP_91.clone().requires_grad_()
    mb = {"loss_mask": torch.ones(1, 3), "old_logprobs": OLD_91, "advantages": torch.ones(1, 3)}
    total, results = engine_value(LOSSES["gspo"], [mb], [{"logprobs": logp}], ctx(name="gspo"))
    assert float(total.detach()) == pytest.approx(-(1 + 4e-4), abs=1e-7)
    assert results[0].metrics["actor/clipfrac"] == (3.0, 3.0)
    total.backward()
    assert torch.all(logp.grad == 0)


def test_rloo_seq_ratio():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    logp = torch.cat([LOGP_91, LOGP_91, torch.zeros(1, 3)])
    old = torch.cat([OLD_91, OLD_91, torch.zeros(1, 3)])
    adv = torch.tensor([[1.0], [-1.0], [0.0]]) * mask
    mb = {"loss_mask": mask, "old_logprobs": old, "advantages": adv}
    # log r = 0.3 -> r = 1.349859; A=+1 clipped at 1.2 -> -1.2; A=-1 -> 1.349859; empty row excluded
    assert LOSSES["rloo_seq"].denominators(mb, ctx()) == {"pg": 2.0}
    total, results = engine_value(LOSSES["rloo_seq"], [mb], [{"logprobs": logp}], ctx())
    assert float(total.detach()) == pytest.approx((-1.2 + 1.349859) / 2, abs=1e-6)
    assert results[0].metrics["actor/clipfrac"] == (1.0, 2.0)


# --------------------------------------------------------------------------- value docs/formulas.md#ppo-worked-example, SFT docs/formulas.md#sft-loss


def value_mb(v, old, ret, clip):
    mb = {"loss_mask": torch.tensor([[0.0, 1.0]]), "old_values": torch.tensor([[0.0, old]]), "returns": torch.tensor([[0.0, ret]])}
    values = torch.tensor([[7.0, v]], requires_grad=True)
    return mb, {"values": values}, ctx(name="ppo", value_clip=clip)


def test_value_loss_example():
    mb, out, context = value_mb(1.0, 0.4, 0.9, 0.5)
    total, results = engine_value(LOSSES["value"], [mb], [out], context)
    assert float(total.detach()) == pytest.approx(0.005, abs=1e-7)
    assert results[0].weights["vf"] == 1.0
    mb, out, context = value_mb(1.0, 0.4, 0.9, 0.1)  # clip V to 0.5: 0.5 * max(0.01, 0.16)
    total, results = engine_value(LOSSES["value"], [mb], [out], context)
    assert float(total.detach()) == pytest.approx(0.08, abs=1e-7)
    assert results[0].metrics["critic/vf_clipfrac"] == (1.0, 1.0)
    total.backward()
    assert out["values"].grad[0, 0] == 0.0 and out["values"].grad[0, 1] == 0.0  # clipped branch is flat
    mb, out, context = value_mb(1.0, 0.4, 0.9, None)
    total, _ = engine_value(LOSSES["value"], [mb], [out], context)
    assert float(total.detach()) == pytest.approx(0.005, abs=1e-7)


def test_sft_loss_example():
    probs = torch.tensor([[0.5, 0.9, 0.1]])
    logp = torch.cat([torch.zeros(1, 1), probs.log()], dim=1)
    mb = {"loss_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0]])}
    total, _ = engine_value(LOSSES["sft"], [mb], [{"logprobs": logp}], ctx())
    assert float(total.detach()) == pytest.approx(1.033698, abs=1e-6)


# --------------------------------------------------------------------------- empty rows and gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_name", ["ppo_clip", "gspo", "rloo_seq", "sft"])
def test_empty_row_contributes_nothing(mode, loss_name):
    mb, out = random_mb(5, empty_rows=(1,))
    # garbage logprobs under the empty row's zero mask
    out["logprobs"][1] = -1e4
    mb["old_logprobs"][1] = 50.0
    mb["advantages"][1] = 0.0
    logp = out["logprobs"].clone().requires_grad_()
    context = ctx(loss_agg_mode=mode)
    total, _ = engine_value(LOSSES[loss_name], [mb], [{**out, "logprobs": logp}], context)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[1] == 0)
    # the same rows without the empty one: same numerators
    keep = [0, 2, 3, 4, 5]
    mb2 = {k: v[keep] for k, v in mb.items()}
    out2 = {k: v[keep] for k, v in out.items()}
    with_empty = LOSSES[loss_name](mb, out, context).sums
    without = LOSSES[loss_name](mb2, out2, context).sums
    for part in with_empty:
        assert float(with_empty[part]) == pytest.approx(float(without[part]), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    "loss_name,control",
    [("ppo_clip", "none"), ("ppo_clip", "clip_cov"), ("ppo_clip", "kl_cov"), ("gspo", "none"), ("rloo_seq", "none"), ("sft", "none")],
)
def test_gradient_finite_and_zero_outside_mask(loss_name, control):
    mb, out = random_mb(7)
    mb["old_logprobs"] = torch.where(mb["loss_mask"] > 0, mb["old_logprobs"], torch.full_like(mb["old_logprobs"], -1e9))
    logp = out["logprobs"].clone().requires_grad_()
    context = ctx(entropy_control=control, kl_coef=0.1, entropy_coef=0.01, clip_cov_ratio=0.2, clip_cov_lb=-10.0, kl_cov_ratio=0.2)
    total, _ = engine_value(LOSSES[loss_name], [mb], [{**out, "logprobs": logp}], context)
    total.backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[mb["loss_mask"] == 0] == 0)
    assert logp.grad[mb["loss_mask"] > 0].abs().sum() > 0


@pytest.mark.parametrize("loss_name", ["gspo", "rloo_seq"])
def test_entropy_control_only_with_ppo_clip(loss_name):
    mb, out = random_mb(7)
    with pytest.raises(ValueError, match="entropy_control"):
        LOSSES[loss_name](mb, out, ctx(entropy_control="clip_cov"))


# --------------------------------------------------------------------------- independent cross-check


def test_token_mean_ppo_matches_plain_python_rederivation():
    rng = random.Random(99)
    B, T = 7, 6
    mask = [[1.0 if (t >= 1 and t <= rng.randrange(0, T)) else 0.0 for t in range(T)] for _ in range(B)]
    adv_rows = [rng.uniform(-2, 2) for _ in range(B)]
    old = [[rng.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
    new = [[old[i][t] + rng.uniform(-0.6, 0.6) for t in range(T)] for i in range(B)]
    eps_lo, eps_hi, c = 0.2, 0.28, 3.0
    total, count = 0.0, 0.0
    for i in range(B):
        for t in range(T):
            if mask[i][t] == 0:
                continue
            a = adv_rows[i]
            r = math.exp(new[i][t] - old[i][t])
            r_clip = min(max(r, 1 - eps_lo), 1 + eps_hi)
            token = max(-a * r, -a * r_clip)
            if a < 0:
                token = min(token, -a * c)
            total += token
            count += 1
    expected = total / count
    mask_t = torch.tensor(mask)
    mb = {
        "loss_mask": mask_t,
        "old_logprobs": torch.tensor(old),
        "advantages": torch.tensor(adv_rows)[:, None] * mask_t,
    }
    got, _ = engine_value(LOSSES["ppo_clip"], [mb], [{"logprobs": torch.tensor(new)}], ctx(clip_eps_high=0.28))
    assert float(got) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- truncated importance sampling


def test_truncated_is_weights_the_rollout_mismatch():
    """A = 1 on three tokens, the update still on-policy (ratio 1). pi_old / pi_rollout is
    0.5, 4 and 1; with cap 2 the weights are 0.5, 2, 1 and the token-mean loss -(0.5+2+1)/3."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    old = torch.log(torch.tensor([[1.0, 0.2, 0.4, 0.3]]))
    rollout = torch.log(torch.tensor([[1.0, 0.4, 0.1, 0.3]]))
    mb = {"loss_mask": mask, "old_logprobs": old, "rollout_logprobs": rollout, "advantages": mask.clone()}
    out = {"logprobs": old.clone()}
    value, metrics = engine_value(LOSSES["ppo_clip"], [mb], [out], ctx(rollout_is_cap=2.0))
    assert float(value) == pytest.approx(-(0.5 + 2.0 + 1.0) / 3, abs=1e-6)
    plain, _ = engine_value(LOSSES["ppo_clip"], [mb], [out], ctx())
    assert float(plain) == pytest.approx(-1.0, abs=1e-6)


def test_truncated_is_only_with_token_level_loss():
    mask = torch.tensor([[0.0, 1.0]])
    mb = {"loss_mask": mask, "old_logprobs": torch.zeros(1, 2), "rollout_logprobs": torch.zeros(1, 2), "advantages": mask}
    with pytest.raises(ValueError, match="rollout_is_cap"):
        LOSSES["gspo"](mb, {"logprobs": torch.zeros(1, 2)}, ctx(rollout_is_cap=2.0))

"""Advantage estimators: a registry of pure functions over token-aligned tensors.

Every function has the `AdvantageFn` signature of llmrl/algorithms/base.py:

    fn(inputs: AdvantageInputs) -> (advantages[B,T], metrics)

`inputs` holds the reward channels, loss mask, group ids, turn ids, critic values, expert mask
and the resolved `AlgorithmConfig`. `inputs.token_rewards` is the sum of the reward channels: the
outcome score sits at the row's last policy token (its last token when the response is empty),
and a KL-in-reward penalty (channel `kl`) spreads over the policy tokens; the scalar outcome of a
row is its row sum. Advantages are exactly 0 outside `loss_mask`. Call estimators through
`compute_advantages`, which keeps expert rows out of every statistic.

Formulas, the reference each follows, and the worked examples the tests use: docs/formulas.md.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from llmrl.algorithms.base import AdvantageFn, AdvantageInputs
from llmrl.registry import Registry

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    return ADVANTAGES.register(name)


def compute_advantages(fn: AdvantageFn, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """`fn` over the RL rows only. Expert rows (CHORD's demonstrations) are kept out of every
    group and batch statistic and get advantage 0: they feed their own loss part."""
    expert = inputs.expert_mask
    if expert is None or not bool(expert.any()):
        return fn(inputs)
    rl_rows = (~expert.bool()).nonzero().flatten()
    full = torch.zeros_like(inputs.loss_mask, dtype=torch.float32)
    if len(rl_rows) == 0:
        return full, {}
    adv, metrics = fn(inputs.select(rl_rows))
    full[rl_rows] = adv.to(full.dtype)
    return full, metrics


# --------------------------------------------------------------------------- shared pieces


def scalar_rewards(token_rewards: torch.Tensor) -> torch.Tensor:
    """One outcome reward per row: the row sum of the token rewards."""
    return token_rewards.sum(-1)


class GroupStats:
    """Per-row statistics of the row's group (rows sharing a group id), in float64.

    mean, unbiased std (Bessel; 0 for a group of one), size, and whether every member
    scored the same (exactly, so an all-equal group gets exactly 0 advantage).
    """

    def __init__(self, scores: torch.Tensor, group_ids: torch.Tensor) -> None:
        x = scores.double()
        _, inverse = torch.unique(group_ids, return_inverse=True)
        n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
        size = x.new_zeros(n_groups).index_add_(0, inverse, torch.ones_like(x))
        total = x.new_zeros(n_groups).index_add_(0, inverse, x)
        mean = total / size
        sq = x.new_zeros(n_groups).index_add_(0, inverse, (x - mean[inverse]).square())
        std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
        hi = x.new_full((n_groups,), -torch.inf).scatter_reduce(0, inverse, x, "amax")
        lo = x.new_full((n_groups,), torch.inf).scatter_reduce(0, inverse, x, "amin")
        self.inverse = inverse
        self.group_size = size
        self.group_equal = hi == lo
        self.scores = x
        self.mean = mean[inverse]
        self.std = std[inverse]
        self.size = size[inverse]
        self.equal = self.group_equal[inverse]
        self.singleton = self.size == 1

    def zero_all_equal(self, seq: torch.Tensor) -> torch.Tensor:
        """`seq` with 0 for every row of a group of two or more whose members all scored the same
        (exactly 0: no float residue of a mean subtraction), whatever the estimator computed."""
        return torch.where(self.equal & ~self.singleton, torch.zeros_like(seq), seq)

    def metrics(self) -> dict[str, float]:
        n = max(len(self.group_size), 1)
        multi = self.group_size > 1
        return {
            "adv/zero_std_groups": float((self.group_equal & multi).sum()) / n,
            "adv/singleton_groups": float((~multi).sum()) / n,
        }


def broadcast(seq_adv: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """A per-row advantage [B] on every policy token of its row; 0 elsewhere."""
    full = seq_adv.float()[:, None].expand(loss_mask.shape)
    return torch.where(loss_mask > 0, full, torch.zeros_like(full))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mu) / sqrt(var + eps) over the valid tokens of the whole batch, unbiased var (verl
    `masked_whiten`, shift_mean=True; docs/formulas.md#gae-and-returns). Zero outside the mask; with < 2 valid tokens the
    centred value (0) is returned."""
    valid = mask > 0
    n = valid.sum()
    if n == 0:
        return torch.zeros_like(x)
    xd = x.double()
    mean = xd[valid].mean()
    var = ((xd[valid] - mean).square().sum() / (n - 1)) if n > 1 else xd.new_zeros(())
    out = (xd - mean) * torch.rsqrt(var + eps)
    return torch.where(valid, out, torch.zeros_like(out)).to(x.dtype)


def token_metrics(advantages: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, float]:
    vals = advantages[loss_mask > 0].double()
    if vals.numel() == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/max": 0.0, "adv/min": 0.0}
    return {
        "adv/mean": float(vals.mean()),
        "adv/std": float(vals.std()) if vals.numel() > 1 else 0.0,
        "adv/max": float(vals.max()),
        "adv/min": float(vals.min()),
    }


def _group_mean_baseline(stats: GroupStats, singleton: str) -> torch.Tensor:
    """Group mean as the baseline; a group of one gets its own score ('zero': A = 0) or 0 ('raw',
    verl: the raw reward passes through)."""
    if singleton == "raw":
        return torch.where(stats.singleton, torch.zeros_like(stats.mean), stats.mean)
    return stats.mean


# --------------------------------------------------------------------------- group outcome advantages


def grpo_sequence_advantages(scores: torch.Tensor, group_ids: torch.Tensor, cfg: Any, norm_by_std: bool | None = None) -> tuple[torch.Tensor, GroupStats]:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300; verl `compute_grpo_outcome_advantage`):
    A_i = (r_i - mean_g) / (std_g + eps) with the unbiased group std, or r_i - mean_g (Dr. GRPO).
    A group of one: cfg.singleton_group 'zero' -> 0, 'raw' -> verl's mean 0, std 1 -> r / (1 + eps).
    """
    stats = GroupStats(scores, group_ids)
    norm = cfg.norm_adv_by_std if norm_by_std is None else norm_by_std
    raw = cfg.singleton_group == "raw"
    mean = _group_mean_baseline(stats, cfg.singleton_group)
    centred = stats.scores - mean
    if norm:
        std = torch.where(stats.singleton & raw, torch.ones_like(stats.std), stats.std)
        centred = centred / (std + cfg.adv_eps)
    adv = stats.zero_all_equal(centred)
    if not raw:
        adv = torch.where(stats.singleton, torch.zeros_like(adv), adv)
    return adv.to(scores.dtype), stats


def _row_advantages(seq: torch.Tensor, stats: GroupStats, inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """A per-row advantage broadcast over the row's policy tokens, with the group metrics."""
    adv = broadcast(seq.to(inputs.loss_mask.dtype), inputs.loss_mask)
    return adv, {**token_metrics(adv, inputs.loss_mask), **stats.metrics()}


@register_advantage("grpo")
def grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Group-relative outcome advantage (GRPO); std division per cfg.norm_adv_by_std."""
    seq, stats = grpo_sequence_advantages(scalar_rewards(inputs.token_rewards), inputs.group_ids, inputs.cfg)
    return _row_advantages(seq, stats, inputs)


@register_advantage("dr_grpo")
def dr_grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): GRPO without the std division, whatever
    cfg.norm_adv_by_std says (the `dr_grpo` preset uses `grpo` with norm_adv_by_std=False)."""
    seq, stats = grpo_sequence_advantages(scalar_rewards(inputs.token_rewards), inputs.group_ids, inputs.cfg, norm_by_std=False)
    return _row_advantages(seq, stats, inputs)


@register_advantage("rloo")
def rloo(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740):
    A_i = r_i - mean_{j != i} r_j = k/(k-1) (r_i - mean). No std division.
    A group of one: 'zero' -> 0 (verl `rloo_vectorized`, TRL), 'raw' -> r_i (verl `rloo`).
    cfg.rloo_batch_normalize: then (A - mean_batch) / (std_batch + adv_eps) over rows (TRL
    `normalize_advantages`). A KL penalty in the reward (kl_placement='reward', k1) becomes
    TRL's  r - beta * sum_t k1  because the row reward is the row sum.
    """
    cfg = inputs.cfg
    stats = GroupStats(scalar_rewards(inputs.token_rewards), inputs.group_ids)
    k = stats.size
    others = (stats.mean * k - stats.scores) / (k - 1).clamp(min=1)
    seq = stats.scores - others
    seq = torch.where(stats.singleton, stats.scores if cfg.singleton_group == "raw" else torch.zeros_like(seq), seq)
    seq = stats.zero_all_equal(seq)
    if cfg.rloo_batch_normalize and seq.numel() > 1:
        seq = (seq - seq.mean()) / (seq.std() + cfg.adv_eps)
    return _row_advantages(seq, stats, inputs)


@register_advantage("lite")
def lite(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Lite PPO (Liu et al. 2025, "Tricks or Traps", arXiv 2508.08221; ROLL `reward_norm` with
    norm_mean_type=group, norm_std_type=batch): A_i = (r_i - mean_group) / (std_batch + eps),
    std_batch the unbiased std over every row of the batch."""
    cfg = inputs.cfg
    stats = GroupStats(scalar_rewards(inputs.token_rewards), inputs.group_ids)
    seq = stats.scores - _group_mean_baseline(stats, cfg.singleton_group)
    if cfg.norm_adv_by_std:
        batch_std = stats.scores.std() if stats.scores.numel() > 1 else stats.scores.new_zeros(())
        seq = seq / (batch_std + cfg.adv_eps)
    return _row_advantages(stats.zero_all_equal(seq), stats, inputs)


# --------------------------------------------------------------------------- token-level returns


def discounted_returns(token_rewards: torch.Tensor, loss_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k-t) r_k over policy tokens (REINFORCE++, docs/formulas.md#reinforce-and-its-baseline-variant).

    Mask-aware like verl's GAE: a position with mask 0 (prompt, padding, an observation span) is
    skipped, so credit flows across observation spans as if they were absent and a reward on a
    masked position is ignored. (verl's REINFORCE++ loop instead cuts the return at masked
    positions; the two agree on single-turn rows.)
    """
    B, T = token_rewards.shape
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(B, dtype=token_rewards.dtype, device=token_rewards.device)
    valid = loss_mask > 0
    for t in range(T - 1, -1, -1):
        running = torch.where(valid[:, t], token_rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return out


@register_advantage("reinforce_pp")
def reinforce_pp(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262; verl `reinforce_plus_plus`, docs/formulas.md#reinforce-and-its-baseline-variant): per-token
    discounted return (cfg.gamma), then masked whitening over every valid token of the batch."""
    cfg, loss_mask = inputs.cfg, inputs.loss_mask
    returns = discounted_returns(inputs.token_rewards, loss_mask, cfg.gamma)
    adv = masked_whiten(returns, loss_mask) if cfg.whiten_advantages else returns
    return adv, token_metrics(adv, loss_mask)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++-baseline (verl `reinforce_plus_plus_baseline`, docs/formulas.md#reinforce-and-its-baseline-variant): row score minus the group
    mean (no std), broadcast over tokens, then masked whitening over all valid tokens of the batch
    (so the std is token-weighted). A group of one: per cfg.singleton_group ('raw' = verl)."""
    cfg, loss_mask = inputs.cfg, inputs.loss_mask
    stats = GroupStats(scalar_rewards(inputs.token_rewards), inputs.group_ids)
    seq = stats.zero_all_equal(stats.scores - _group_mean_baseline(stats, cfg.singleton_group))
    adv = broadcast(seq.to(loss_mask.dtype), loss_mask)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, loss_mask)
    return adv, {**token_metrics(adv, loss_mask), **stats.metrics()}


def gae_advantages_and_returns(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, arXiv 1506.02438; verl `compute_gae_advantage_return`, docs/formulas.md#gae-and-returns).

    delta_t = r_t + gamma V_next - V_t,  A_t = delta_t + gamma lam A_next,  returns = A + V
    (from the un-whitened A), then A is whitened over the valid tokens of the batch when `whiten`.
    Mask-aware: at a position with mask 0 neither V_next nor the running A moves, so observation
    tokens inside a multi-turn response are skipped. `values[:, t]` is the critic's value of the
    state that token t is sampled from (the train engine's token alignment). Both outputs are 0
    outside the mask.
    """
    B, T = token_rewards.shape
    valid = loss_mask > 0
    r = token_rewards.double()
    v = values.detach().double()
    next_v = torch.zeros(B, dtype=torch.float64, device=r.device)
    last = torch.zeros(B, dtype=torch.float64, device=r.device)
    adv = torch.zeros(B, T, dtype=torch.float64, device=r.device)
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        candidate = delta + gamma * lam * last
        next_v = torch.where(valid[:, t], v[:, t], next_v)
        last = torch.where(valid[:, t], candidate, last)
        adv[:, t] = last
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    returns = torch.where(valid, adv + v, torch.zeros_like(adv))
    if whiten:
        adv = masked_whiten(adv, loss_mask)
    return adv.to(token_rewards.dtype), returns.to(token_rewards.dtype)


@register_advantage("gae")
def gae(inputs: AdvantageInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """GAE advantages for PPO with a critic; call `gae_advantages_and_returns` for the returns."""
    cfg, loss_mask, values = inputs.cfg, inputs.loss_mask, inputs.values
    if values is None:
        raise ValueError("advantage 'gae' needs critic values (batch['old_values']); use a preset with the critic stage")
    adv, returns = gae_advantages_and_returns(inputs.token_rewards, values, loss_mask, cfg.gamma, cfg.lam, cfg.whiten_advantages)
    metrics = token_metrics(adv, loss_mask)
    valid = loss_mask > 0
    if valid.any():
        metrics["critic/returns_mean"] = float(returns[valid].mean())
        metrics["critic/values_mean"] = float(values[valid].double().mean())
    return adv, metrics


gae.required_stages = ("critic",)  # type: ignore[attr-defined]  # its values; `llmrl validate` checks the stage runs


# --------------------------------------------------------------------------- DAPO batch helpers


def dynamic_sampling_keep(group_ids: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476; verl DAPO recipe, docs/formulas.md#dapo-dynamic-sampling).

    Returns a [B] bool mask: True for every row of a group whose `metric` (e.g. `acc`) varies
    (population std > 0) or that has a single member. "Varies" is tested as max > min, which is
    std > 0 without the float round-off a computed std can leave on equal values.
    """
    stats = GroupStats(metric, group_ids)
    return (~stats.equal) | stats.singleton


def mask_truncated(loss_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering (DAPO paper; TRL `mask_truncated_completions`, docs/formulas.md#dapo-overlong-filtering): rows whose
    response hit the length limit get an all-zero loss mask, so they add no loss."""
    return loss_mask * (~truncated.bool()).to(loss_mask.dtype)[:, None]

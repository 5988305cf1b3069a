"""Loss functions: a registry of `LossFn` objects (contract in llmrl/algorithms/base.py).

A loss is called by the train engine once per micro-batch:

    loss.denominators(mb, ctx) -> {part: float}      masks only, before any forward
    loss(mb, out, ctx)         -> LossOutput(sums={part: differentiable scalar},
                                             weights={part: float}, metrics={name: (sum, count)})

and the engine minimises  sum_p weight_p * sum_p / D_p  with D_p summed over the mini-batch.
`ctx.cfg` is the resolved `AlgorithmConfig`. Token alignment: position t of every [B,T] tensor
is token t of input_ids; only `loss_mask` positions count.

Micro-batch keys read:
  ppo_clip / gspo / rloo_seq: loss_mask, old_logprobs, advantages; ref_logprobs when a KL term or
      the actor/kl_ref metric needs it.  Model outputs: logprobs (and entropy when given).
  value: loss_mask, old_values, returns.  Model outputs: values.
  sft:   loss_mask.  Model outputs: logprobs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from llmrl.algorithms.aggregation import agg_denominator, agg_sum
from llmrl.algorithms.base import Batch, LossContext, LossFn, LossOutput
from llmrl.algorithms.entropy import ENTROPY_CONTROLS, PolicyTokenTerms
from llmrl.algorithms.kl import kl_k3, kl_penalty
from llmrl.registry import Registry

LOSSES: Registry[LossFn] = Registry("loss")

LOG_RATIO_CLAMP = 20.0  # verl / Trinity clamp log(pi/pi_old) to +-20 before exp (docs/formulas.md#ppo-clip)
GSPO_LOG_RATIO_MAX = 10.0  # verl `gspo` clamps the sequence log-ratio from above at 10 (docs/formulas.md#gspo)

Metrics = dict[str, tuple[float, float]]


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: registers one instance of the class under `name`."""

    def register(cls: type) -> type:
        LOSSES.register(name, cls())
        return cls

    return register


# --------------------------------------------------------------------------- shared pieces


def _valid(mb: Batch) -> torch.Tensor:
    return mb["loss_mask"] > 0


def _zero_outside(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def _masked_mean_metric(x: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    return float(_zero_outside(x.detach().double(), valid).sum()), float(valid.sum())


def kl_in_loss(cfg: Any) -> bool:
    return cfg.kl_coef > 0 and cfg.kl_placement == "loss"


def regulariser_denominators(mb: Batch, cfg: Any) -> dict[str, float]:
    d: dict[str, float] = {}
    if kl_in_loss(cfg):
        d["kl"] = agg_denominator(mb["loss_mask"], cfg.loss_agg_mode)
    if cfg.entropy_coef > 0:
        d["entropy"] = agg_denominator(mb["loss_mask"], cfg.loss_agg_mode)
    return d


def regulariser_parts(mb: Batch, out: Batch, cfg: Any) -> tuple[dict[str, torch.Tensor], dict[str, float], Metrics]:
    """The reference-KL part (weight kl_coef; current logp vs ref, as verl's `use_kl_loss` and TRL
    GRPO's beta term) and the entropy bonus (weight -entropy_coef), both aggregated with
    cfg.loss_agg_mode, plus the actor/kl_ref and actor/entropy metrics when the inputs exist."""
    mask, valid = mb["loss_mask"], _valid(mb)
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    metrics: Metrics = {}
    logp = out["logprobs"]
    if kl_in_loss(cfg) and "ref_logprobs" not in mb:
        raise ValueError("algorithm.kl_coef > 0 with kl_placement='loss' needs mb['ref_logprobs'] (a reference model)")
    if "ref_logprobs" in mb:
        kl = _zero_outside(kl_penalty(logp, mb["ref_logprobs"], cfg.kl_estimator), valid)
        metrics["actor/kl_ref"] = _masked_mean_metric(kl, valid)
        if kl_in_loss(cfg):
            sums["kl"] = agg_sum(kl, mask, cfg.loss_agg_mode, cfg.loss_scale_factor)
            weights["kl"] = float(cfg.kl_coef)
    if "entropy" in out:
        metrics["actor/entropy"] = _masked_mean_metric(out["entropy"], valid)
    if cfg.entropy_coef > 0:
        if "entropy" not in out:
            raise ValueError("algorithm.entropy_coef > 0 needs the model's entropy output (want={'entropy'})")
        sums["entropy"] = agg_sum(out["entropy"], mask, cfg.loss_agg_mode, cfg.loss_scale_factor)
        weights["entropy"] = -float(cfg.entropy_coef)
    return sums, weights, metrics


def _ratio_metrics(old: torch.Tensor, logp: torch.Tensor, ratio: torch.Tensor, valid: torch.Tensor) -> Metrics:
    # approx_kl: k3 estimate of KL(pi_old || pi_theta) on valid tokens (samples come from pi_old):
    # (r - 1) - log r with r = pi_theta / pi_old; non-negative, lower variance than verl's k1 ppo_kl.
    approx = kl_k3(old.detach(), logp.detach())
    return {
        "actor/approx_kl": _masked_mean_metric(approx, valid),
        "actor/ratio_mean": _masked_mean_metric(ratio, valid),
    }


def clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate (Schulman et al. 2017, arXiv 1707.06347) with decoupled clip
    (DAPO): max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)). Returns the loss, the unclipped
    branch, and a bool mask of where the clipped branch is strictly larger (the clip fraction)."""
    unclipped = -adv * ratio
    clipped_branch = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped_branch), unclipped, clipped_branch > unclipped


def ppo_clip_token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> tuple[PolicyTokenTerms, torch.Tensor]:
    """Per-token PPO clipped surrogate with decoupled clip and dual clip (docs/formulas.md#ppo-clip).

    Schulman et al. 2017 (arXiv 1707.06347) clip; decoupled eps_low/eps_high from DAPO
    (arXiv 2503.14476); dual clip from Ye et al. 2020 (arXiv 1912.09729) as in verl `vanilla`:
        r = exp(clamp(logp - old, -20, 20))
        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  if A < 0: l = min(l, -A c)
    Returns the terms (for entropy control) and the dual-clip-active bool mask.
    """
    valid = loss_mask > 0
    adv = _zero_outside(advantages, valid)
    log_ratio = _zero_outside((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), valid)
    ratio = log_ratio.exp()
    loss, unclipped, clipped = clipped_surrogate(ratio, adv, eps_low, eps_high)
    clipped = clipped & valid
    dual = torch.zeros_like(valid)
    if dual_clip_c is not None:
        cap = -adv * dual_clip_c
        negative = adv < 0
        dual = negative & (loss > cap) & valid
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    terms = PolicyTokenTerms(
        logp=logp, old_logp=old_logp, advantages=adv, mask=valid, ratio=ratio, unclipped=unclipped, loss=loss, clipped=clipped
    )
    return terms, dual


class _PolicyLoss(ABC):
    """Common shape: a policy-gradient part "pg" plus the optional "kl" and "entropy" parts."""

    def pg_denominator(self, mb: Batch, cfg: Any) -> float:
        return agg_denominator(mb["loss_mask"], cfg.loss_agg_mode)

    def gradient_outputs(self, cfg: Any) -> set[str]:
        """Entropy is a metric unless the entropy bonus uses it (Clip-Cov and KL-Cov read logprobs)."""
        return {"logprobs", "entropy"} if cfg.entropy_coef > 0 else {"logprobs"}

    def denominators(self, mb: Batch, ctx: LossContext) -> dict[str, float]:
        return {"pg": self.pg_denominator(mb, ctx.cfg), **regulariser_denominators(mb, ctx.cfg)}

    @abstractmethod
    def policy_part(self, mb: Batch, out: Batch, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """The "pg" sum for this micro-batch and its metrics."""

    def rows_with_gradient(self, mb: Batch, ctx: LossContext) -> torch.Tensor | None:
        """[B] bool: rows whose loss can have a non-zero gradient, or None for "all of them".

        Every policy-gradient term is -A x f(ratio), so a row whose advantage is zero on all its
        policy tokens (a GRPO group where every sample scored the same) adds exactly zero to
        the gradient. The engine then skips that row's forward and backward; denominators still
        count it, so the update is unchanged. Any KL, entropy or entropy-control term keeps
        every row, because those act where A = 0 too.
        """
        cfg = ctx.cfg
        if kl_in_loss(cfg) or cfg.entropy_coef > 0 or cfg.entropy_control != "none":
            return None
        return ((mb["advantages"] != 0) & _valid(mb)).any(dim=-1)

    def skipped_row_metrics(self, mb: Batch, ctx: LossContext) -> Metrics:
        """Metrics of rows that `rows_with_gradient` dropped, known without their forward.

        Their policy terms are exactly zero, so they enter the pg_loss mean with sum 0 and their
        share of the denominator, and pg_loss reads the same with skipping on or off (and on
        backends that never skip). Ratio, KL and entropy figures need logprobs: trained rows only.
        """
        return {"actor/pg_loss": (0.0, self.pg_denominator(mb, ctx.cfg))}

    def __call__(self, mb: Batch, out: Batch, ctx: LossContext) -> LossOutput:
        pg, metrics = self.policy_part(mb, out, ctx)
        metrics["actor/pg_loss"] = (float(pg.detach()), self.pg_denominator(mb, ctx.cfg))
        sums, weights, reg_metrics = regulariser_parts(mb, out, ctx.cfg)
        return LossOutput(sums={"pg": pg, **sums}, weights={"pg": 1.0, **weights}, metrics={**metrics, **reg_metrics})


# Options that reshape the per-token PPO clip terms; a loss honours them when it sets
# `reshapes_token_terms` (ppo_clip). Each entry: is the option in use, and what it is.
TOKEN_TERM_OPTIONS: dict[str, Callable[[Any], bool]] = {
    "entropy_control": lambda cfg: cfg.entropy_control != "none",
    "rollout_is_cap": lambda cfg: cfg.rollout_is_cap is not None,
}


def on_policy_loss_name(loss_name: str, cfg: Any) -> str:
    """The loss the sampled rows are trained with: the loss itself, or the one it hands them to
    (CHORD's `algorithm.rl_loss`)."""
    delegate = getattr(LOSSES[loss_name], "on_policy_loss_name", None)
    return delegate(cfg) if delegate is not None else loss_name


def loss_options_problem(loss_name: str, cfg: Any) -> str | None:
    """Why the resolved `algorithm` options cannot run with loss `loss_name`, naming the key; None
    when they can. `llmrl validate` asks this before a run starts; the losses ask it again when
    called on their own."""
    name = on_policy_loss_name(loss_name, cfg)
    if getattr(LOSSES[name], "reshapes_token_terms", False):
        return None
    for key, in_use in TOKEN_TERM_OPTIONS.items():
        if in_use(cfg):
            via = f" (algorithm.rl_loss of loss '{loss_name}')" if name != loss_name else ""
            return (
                f"algorithm.{key}: {getattr(cfg, key)!r} reshapes the token-level PPO clip terms, so it works with loss "
                f"'ppo_clip' only, not '{name}'{via}; unset it, or train with a ppo_clip algorithm (grpo, dapo, rloo, ...)"
            )
    return None


def _check_options(cfg: Any, loss_name: str) -> None:
    problem = loss_options_problem(loss_name, cfg)
    if problem:
        raise ValueError(problem)


# --------------------------------------------------------------------------- policy losses


@register_loss("ppo_clip")
class PPOClipLoss(_PolicyLoss):
    """Token-level PPO clip (decoupled + dual clip), aggregated with cfg.loss_agg_mode; with
    cfg.entropy_control 'clip_cov' / 'kl_cov' the per-token loss is reshaped first (docs/formulas.md#clip-cov-and-kl-cov)."""

    reshapes_token_terms = True  # honours entropy_control and rollout_is_cap (TOKEN_TERM_OPTIONS)

    def policy_part(self, mb: Batch, out: Batch, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        cfg = ctx.cfg
        valid = _valid(mb)
        terms, dual = ppo_clip_token_terms(
            out["logprobs"], mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
            cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c,
        )
        n = float(valid.sum())
        metrics: Metrics = {
            "actor/clipfrac": (float(terms.clipped.sum()), n),
            "actor/dual_clip_frac": (float(dual.sum()), n),
            **_ratio_metrics(mb["old_logprobs"], out["logprobs"], terms.ratio, valid),
        }
        loss, control_metrics = ENTROPY_CONTROLS[cfg.entropy_control](terms, cfg, ctx.generator)
        metrics.update(control_metrics)
        if cfg.rollout_is_cap is not None:
            weights = truncated_is_weights(mb["old_logprobs"], mb["rollout_logprobs"], cfg.rollout_is_cap)
            loss = loss * _zero_outside(weights, valid)
            metrics["rollout/is_weight_mean"] = _masked_mean_metric(weights, valid)
            metrics["rollout/is_capped_frac"] = (float(((weights >= cfg.rollout_is_cap) & valid).sum()), n)
        pg = agg_sum(loss, mb["loss_mask"], cfg.loss_agg_mode, cfg.loss_scale_factor)
        return pg, metrics


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling for the rollout/trainer mismatch (Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl `tis_imp_ratio_cap`):
    w = min(pi_old / pi_rollout, cap) per token, detached. pi_old is the trainer's logprob of the
    sampled token before the update, pi_rollout the engine's."""
    log_w = (old_logp.detach() - rollout_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_w.exp().clamp(max=cap)


@register_loss("gspo")
class GSPOLoss(_PolicyLoss):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071; verl `gspo`, docs/formulas.md#gspo), GSPO-token form:
        log s_i   = (1/|o_i|) sum_t m (logp - old)                 (sequence ratio, detached)
        log s_i,t = sg[log s_i] + logp_t - sg[logp_t], clamped at <= 10
        L_i,t     = max(-A s_i,t, -A clip(s_i,t, 1 - eps_low, 1 + eps_high))
    Value s_i on every token, gradient per token. No dual clip (as verl). Aggregated with
    cfg.loss_agg_mode; the `gspo` preset sets seq-mean-token-mean (verl forces it).
    """

    def policy_part(self, mb: Batch, out: Batch, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        cfg = ctx.cfg
        _check_options(cfg, "gspo")
        valid = _valid(mb)
        logp, old = out["logprobs"], mb["old_logprobs"]
        adv = _zero_outside(mb["advantages"], valid)
        diff = _zero_outside(logp.detach() - old, valid)
        seq_log = diff.sum(-1) / valid.sum(-1).clamp(min=1)
        log_s = (seq_log[:, None] + logp - logp.detach()).clamp(max=GSPO_LOG_RATIO_MAX)
        log_s = _zero_outside(log_s, valid)
        s = log_s.exp()
        loss, _, clipped = clipped_surrogate(s, adv, cfg.clip_eps_low, cfg.clip_eps_high)
        n = float(valid.sum())
        metrics: Metrics = {
            "actor/clipfrac": (float((clipped & valid).sum()), n),
            **_ratio_metrics(old, logp, s, valid),
        }
        return agg_sum(loss, mb["loss_mask"], cfg.loss_agg_mode, cfg.loss_scale_factor), metrics


@register_loss("rloo_seq")
class RLOOSequenceLoss(_PolicyLoss):
    """TRL RLOOTrainer's sequence-level clipped loss (docs/formulas.md#rloo-sequence-level-loss):
        log r_i = sum_t m logp - sum_t m old  (clamped +-20),  A_i = the row's advantage,
        L_i = max(-A_i r_i, -A_i clip(r_i, 1 - eps_low, 1 + eps_high)),  pg = mean_i L_i
    over rows with at least one policy token (an empty row has no ratio and adds nothing).
    No dual clip (TRL has none). The "kl"/"entropy" parts use cfg.loss_agg_mode as usual.
    """

    def pg_denominator(self, mb: Batch, cfg: Any) -> float:
        return float((mb["loss_mask"].sum(-1) > 0).sum())

    def policy_part(self, mb: Batch, out: Batch, ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        cfg = ctx.cfg
        _check_options(cfg, "rloo_seq")
        valid = _valid(mb)
        rows = valid.any(-1)
        logp, old = out["logprobs"], mb["old_logprobs"]
        log_r = _zero_outside(logp - old, valid).sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        r = log_r.exp()
        adv = _zero_outside(mb["advantages"], valid).sum(-1) / valid.sum(-1).clamp(min=1)
        surrogate, _, clipped = clipped_surrogate(r, adv, cfg.clip_eps_low, cfg.clip_eps_high)
        loss = _zero_outside(surrogate, rows)
        n_rows = float(rows.sum())
        metrics: Metrics = {
            "actor/clipfrac": (float((clipped & rows).sum()), n_rows),
            "actor/ratio_mean": (float(_zero_outside(r.detach(), rows).sum()), n_rows),
            "actor/approx_kl": _masked_mean_metric(kl_k3(old.detach(), logp.detach()), valid),  # per token, as ppo_clip
        }
        return loss.sum(), metrics


# --------------------------------------------------------------------------- critic and SFT


@register_loss("value")
class ValueLoss:
    """Clipped value loss for a critic (docs/formulas.md#value-loss; verl `compute_value_loss`, PPO2 baselines):
        vf = 0.5 * agg( max((V - R)^2, (clip(V, V_old - c_v, V_old + c_v) - R)^2) )
    c_v = cfg.value_clip (None: no clipping), aggregated with cfg.loss_agg_mode, part "vf" with
    weight cfg.vf_coef. Reads out['values'], mb['old_values'], mb['returns'], mb['loss_mask'].
    """

    outputs = ("values",)  # what the train engine's forward must produce for this loss

    def denominators(self, mb: Batch, ctx: LossContext) -> dict[str, float]:
        return {"vf": agg_denominator(mb["loss_mask"], ctx.cfg.loss_agg_mode)}

    def __call__(self, mb: Batch, out: Batch, ctx: LossContext) -> LossOutput:
        cfg = ctx.cfg
        valid = _valid(mb)
        v, returns = out["values"], mb["returns"]
        vf1 = (v - returns).square()
        vf = vf1
        clipfrac = 0.0
        if cfg.value_clip is not None:
            old = mb["old_values"]
            v_clipped = old + (v - old).clamp(-cfg.value_clip, cfg.value_clip)
            vf2 = (v_clipped - returns).square()
            vf = torch.maximum(vf1, vf2)
            clipfrac = float(((vf2 > vf1) & valid).sum())
        total = agg_sum(0.5 * vf, mb["loss_mask"], cfg.loss_agg_mode, cfg.loss_scale_factor)
        n = float(valid.sum())
        metrics: Metrics = {
            "critic/vf_loss": (float(total.detach()), agg_denominator(mb["loss_mask"], cfg.loss_agg_mode)),
            "critic/vf_clipfrac": (clipfrac, n),
            "critic/vpred_mean": _masked_mean_metric(v, valid),
        }
        return LossOutput(sums={"vf": total}, weights={"vf": float(cfg.vf_coef)}, metrics=metrics)


@register_loss("sft")
class SFTLoss:
    """Token-mean negative log-likelihood on loss_mask tokens, part "sft" (CHORD's L_SFT, docs/formulas.md#sft-loss)."""

    outputs = ("logprobs",)

    def denominators(self, mb: Batch, ctx: LossContext) -> dict[str, float]:
        return {"sft": agg_denominator(mb["loss_mask"], "token-mean")}

    def __call__(self, mb: Batch, out: Batch, ctx: LossContext) -> LossOutput:
        valid = _valid(mb)
        nll = -out["logprobs"]
        total = agg_sum(nll, mb["loss_mask"], "token-mean")
        return LossOutput(sums={"sft": total}, weights={"sft": 1.0}, metrics={"actor/sft_nll": _masked_mean_metric(nll, valid)})

"""The recipe's `algorithm` section.

Defaults are GRPO as verl runs it. `name` picks a preset (llmrl/algorithms/presets.py) whose
defaults fill every field the user did not set: `resolve_algorithm(cfg)` returns that resolved
copy, which is what the loop, advantages and losses read. Formulas and the reference choices
named in the descriptions: docs/formulas.md and docs/algorithms.md.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmrl.algorithms.advantages import ADVANTAGES
from llmrl.algorithms.aggregation import AGG_MODES
from llmrl.algorithms.entropy import ENTROPY_CONTROLS
from llmrl.algorithms.kl import KL_ESTIMATORS
from llmrl.algorithms.kl_controller import KL_CONTROLLERS
from llmrl.algorithms.losses import LOSSES
from llmrl.algorithms import chord as _chord  # noqa: F401  registers the "chord" loss before names are checked
from llmrl.algorithms import igpo as _igpo  # noqa: F401  registers the "igpo" advantage before names are checked
from llmrl.algorithms.presets import PRESETS, get_preset
from llmrl.config_base import Section
from llmrl.registry import registered_name



class AlgorithmConfig(Section):
    # ---------------------------------------------------------------- what runs
    name: registered_name(PRESETS) = Field(
        "grpo",
        description=(
            "Algorithm preset: picks the workflow, advantage, loss and default options "
            "(grpo, dr_grpo, dapo, rloo, reinforce_pp, reinforce_pp_baseline, gspo, lite_ppo, ppo, ...). "
            "Any key set here overrides the preset's default for it."
        ),
    )
    advantage: registered_name(ADVANTAGES) | None = Field(
        None, description="Advantage estimator by registered name (grpo, dr_grpo, rloo, lite, reinforce_pp, reinforce_pp_baseline, gae, igpo); None = the preset's."
    )
    loss: registered_name(LOSSES) | None = Field(
        None, description="Policy loss by registered name (ppo_clip, gspo, rloo_seq, chord, sft); None = the preset's."
    )

    # ---------------------------------------------------------------- advantages
    norm_adv_by_std: bool = Field(
        True,
        description="Divide group-centred rewards by the std (GRPO; batch std for `lite`). False = Dr. GRPO (verl norm_adv_by_std_in_grpo).",
    )
    adv_eps: float = Field(
        1e-6,
        ge=0,
        description="Epsilon added to the std in advantage normalisation. 1e-6 is verl's choice; TRL uses 1e-4.",
    )
    singleton_group: Literal["zero", "raw"] = Field(
        "zero",
        description=(
            "Advantage of a group with one member (no sibling to compare with). 'zero': A = 0 "
            "(verl rloo_vectorized, TRL). 'raw': baseline 0, so the reward passes through: GRPO "
            "A = r/(1+eps) (verl grpo: mean 0, std 1), RLOO A = r (verl rloo)."
        ),
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount for GAE, REINFORCE++ returns and IGPO's turn accumulation (verl and IGPO 1.0).")
    igpo_norm_mode: Literal["separate", "joint"] = Field(
        "separate",
        description="igpo: group-normalise information-gain and outcome rewards in separate pools (the authors' train.sh) or in one joint pool.",
    )
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda (verl 1.0; TRL PPO uses 0.95).")
    whiten_advantages: bool = Field(
        True,
        description="Whiten token advantages over the batch's valid tokens, (A - mean)/sqrt(var + 1e-8): gae, reinforce_pp, reinforce_pp_baseline.",
    )
    rloo_batch_normalize: bool = Field(
        False, description="RLOO: standardise advantages over the batch, (A - mean)/(std + adv_eps) (TRL normalize_advantages)."
    )

    # ---------------------------------------------------------------- policy loss
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="PPO clip: ratios below 1 - clip_eps_low are clipped.")
    clip_eps_high: float = Field(
        0.2, ge=0, description="PPO clip: ratios above 1 + clip_eps_high are clipped (DAPO clip-higher: 0.28)."
    )
    dual_clip_c: float | None = Field(
        3.0,
        gt=1,
        description="Dual clip for A < 0: the per-token loss is capped at -A*c (verl clip_ratio_c 3; DAPO scripts 10). None = off. ppo_clip only.",
    )
    loss_agg_mode: registered_name(AGG_MODES) = Field(
        "token-mean",
        description=(
            "How per-token losses become one number over the mini-batch: token-mean (sum/valid tokens), "
            "seq-mean-token-mean (mean of per-row token means, empty rows excluded), seq-mean-token-sum "
            "(mean of per-row sums), seq-mean-token-sum-norm (Dr. GRPO, TRL convention: sum/(rows * loss_scale_factor); "
            "verl divides by loss_scale_factor only)."
        ),
    )
    loss_scale_factor: int | None = Field(
        None, gt=0, description="The constant C of seq-mean-token-sum-norm; None = rollout.max_new_tokens (the loop fills it)."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's batch (verl ppo_epochs 1; TRL PPO 4).")
    rollout_is_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling for the rollout engine's logprob mismatch (Yao et al. 2025): each "
        "token's policy loss is multiplied by min(pi_trainer / pi_rollout, cap). None = off; verl's example cap is 2. ppo_clip only.",
    )

    # ---------------------------------------------------------------- KL to a reference, entropy bonus
    kl_coef: float = Field(
        0.0, ge=0, description="Weight beta of the KL to the frozen reference. 0 = no reference model is loaded."
    )
    kl_estimator: registered_name(KL_ESTIMATORS) = Field(
        "k3",
        description="Per-token KL estimator: k1 = logp-ref, k2 = 0.5(logp-ref)^2 (verl mse), k3 = exp(ref-logp)-(ref-logp)-1 (verl low_var_kl), abs.",
    )
    kl_placement: Literal["loss", "reward"] = Field(
        "loss",
        description="'loss': kl_coef * KL(current, ref) is a loss part, aggregated like the policy loss. 'reward': r_t -= kl_coef * KL(old, ref) on policy tokens before advantages.",
    )
    kl_controller: registered_name(KL_CONTROLLERS) = Field(
        "fixed",
        description="'fixed': kl_coef stays put. 'adaptive' (Ziegler et al. 2019; kl_placement='reward' only): after each "
        "step kl_coef *= 1 + clip(KL/kl_target - 1, -0.2, 0.2) * trajectories/kl_horizon, KL the batch mean of per-row token-mean KL.",
    )
    kl_target: float = Field(0.1, gt=0, description="Adaptive KL controller: the KL it steers towards (verl target_kl 0.1).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL controller: trajectories over which a full correction applies (verl 10000).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight: the loss adds -entropy_coef * aggregated entropy.")

    # ---------------------------------------------------------------- critic (ppo)
    value_clip: float | None = Field(
        0.5, gt=0, description="Critic value clip c_v around the old values (verl 0.5; TRL 0.2). None = unclipped."
    )
    vf_coef: float = Field(
        1.0, ge=0, description="Weight of the value loss. The critic has its own optimizer (as verl), so 1.0; TRL's shared loss uses 0.1."
    )
    critic_model: str | None = Field(
        None, description="Model the critic's decoder starts from (built-in name, hub id or HF directory); None = model.name. A fresh scalar value head replaces its lm_head."
    )
    critic_lr: float = Field(1e-5, ge=0, description="Critic learning rate (verl critic.optim.lr 1e-5); the other optimizer knobs follow train.*.")
    critic_warmup_steps: int = Field(
        0, ge=0, description="First RL steps in which only the critic learns and the policy is not updated (verl trainer.critic_warmup)."
    )

    # ---------------------------------------------------------------- DAPO
    dynamic_sampling: bool = Field(
        False, description="DAPO: drop groups whose dynamic_sampling_metric is the same for every member, and sample more prompts."
    )
    dynamic_sampling_metric: str = Field("acc", description="Reward part that dynamic sampling filters on (falls back to the score).")
    max_num_gen_batches: int = Field(10, description="Dynamic sampling gives up after this many generation rounds per step (<= 0: no limit).")
    overlong_shaping: bool = Field(
        False,
        description="DAPO overlong reward shaping: add min(-(L - (L_max - buffer))/buffer * factor, 0) to the score (reward `overlong`).",
    )
    overlong_buffer_len: int | None = Field(
        None, gt=0, description="Overlong shaping buffer in tokens; None = rollout.max_new_tokens // 5 (DAPO's 4096 of 20480)."
    )
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Overlong shaping: the penalty at L = L_max.")
    mask_truncated_completions: bool = Field(
        False, description="Overlong filtering: responses cut by the length limit get no loss (TRL mask_truncated_completions)."
    )

    # ---------------------------------------------------------------- entropy control (Cui et al. 2025)
    entropy_control: registered_name(ENTROPY_CONTROLS) = Field(
        "none",
        description="Restrain high-covariance tokens in the ppo_clip loss: clip_cov drops a random few from the gradient, kl_cov adds kl_cov_coef*|logp - old| to the top few. ppo_clip only (validate refuses other losses).",
    )
    clip_cov_ratio: float = Field(0.0002, gt=0, le=1, description="Clip-Cov: fraction of valid tokens to drop (at least 1).")
    clip_cov_lb: float = Field(1.0, description="Clip-Cov: lower covariance bound of candidate tokens (exclusive).")
    clip_cov_ub: float = Field(5.0, description="Clip-Cov: upper covariance bound of candidate tokens (exclusive).")
    kl_cov_ratio: float = Field(
        0.0002,
        gt=0,
        le=1,
        description=(
            "KL-Cov: FRACTION of valid tokens (top by covariance) that get the penalty, as verl's kl_cov_ratio. "
            "Not a percent: PRIME-RL's k_percent=0.2 means 0.002 here."
        ),
    )
    kl_cov_coef: float = Field(0.1, ge=0, description="KL-Cov: the penalty weight kappa (verl actor.yaml 0.1; PRIME-RL scripts 1).")

    # ---------------------------------------------------------------- CHORD (Zhang et al. 2025, arXiv 2508.11408)
    rl_loss: registered_name(LOSSES) = Field(
        "ppo_clip", description="chord: the loss of the on-policy rows' part, (1 - mu) x L_RL (ppo_clip as the reference; gspo, rloo_seq)."
    )
    mu_warmup_steps: int = Field(0, ge=0, description="chord: steps over which mu rises linearly from 0 to mu_peak (Trinity default 0).")
    mu_decay_steps: int = Field(0, ge=0, description="chord: steps of cosine decay from mu_peak to mu_valley after the warm-up (Trinity default 0).")
    mu_peak: float = Field(0.1, ge=0, le=1, description="chord: the SFT weight mu after warm-up (Trinity default 0.1, the CHORD-phi setting).")
    mu_valley: float = Field(0.1, ge=0, le=1, description="chord: the SFT weight mu after the decay, for the rest of the run (Trinity default 0.1).")
    sft_phi: bool = Field(
        True,
        description="chord: weight each expert token's -log p by sg[p (1 - p)] of the current policy (CHORD-phi, Trinity "
        "enable_phi_function); false: plain token NLL (CHORD-mu, and the sft preset).",
    )
    sft_cutoff_prob: float = Field(
        1.0, gt=0, le=1, description="chord: clamp log p of expert tokens at log(cutoff) from above, so tokens above it carry no gradient (1.0 = off)."
    )
    sft_loss_agg_mode: Literal["token-mean", "seq-mean-token-mean"] = Field(
        "token-mean",
        description="chord: how the SFT part averages: over every expert token of the mini-batch (Trinity "
        "use_token_level_loss_in_sft: true), or per expert row then over rows.",
    )

    # ---------------------------------------------------------------- checks
    @field_validator("loss")
    @classmethod
    def _policy_loss(cls, loss: str | None) -> str | None:
        if loss == "value":
            raise ValueError("'value' is the critic's loss (the ppo preset fits it); the policy trains with ppo_clip, gspo, rloo_seq, chord or sft")
        return loss

    @model_validator(mode="after")
    def _consistent(self) -> "AlgorithmConfig":
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})")
        if self.rl_loss in ("chord", "sft", "value"):
            raise ValueError(f"rl_loss: '{self.rl_loss}' is not a policy-gradient loss; use ppo_clip, gspo or rloo_seq")
        return self


def needs_reference(cfg: AlgorithmConfig) -> bool:
    """True iff a frozen reference policy must be loaded (a KL term with a positive weight)."""
    return cfg.kl_coef > 0


def resolve_algorithm(cfg: AlgorithmConfig) -> AlgorithmConfig:
    """A validated copy with the preset's defaults applied to every field the user left unset
    (pydantic's `model_fields_set`), and `advantage` / `loss` filled from the preset when None."""
    preset = get_preset(cfg.name)
    data = cfg.model_dump()
    for key, value in preset.defaults.items():
        if key not in cfg.model_fields_set:
            data[key] = value
    if data["advantage"] is None:
        data["advantage"] = preset.advantage
    if data["loss"] is None:
        data["loss"] = preset.loss
    return type(cfg).model_validate(data)

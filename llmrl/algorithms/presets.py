"""Algorithm presets: a name picks a workflow, an advantage function, a loss and default options.

`algorithm.name` in a recipe selects one; any `algorithm.*` key the user sets wins over the
preset's default for that key (see `config.resolve_algorithm`). Adding an algorithm is one
`register_preset` call (plus a registry entry when it needs a new advantage or loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmrl.registry import Registry

PRESETS: Registry["AlgorithmPreset"] = Registry("algorithm")


@dataclass(frozen=True)
class AlgorithmPreset:
    workflow: str  # key of llmrl.rollout.workflows.WORKFLOWS
    advantage: str  # key of llmrl.algorithms.advantages.ADVANTAGES
    loss: str  # key of llmrl.algorithms.losses.LOSSES
    defaults: dict[str, Any] = field(default_factory=dict)  # AlgorithmConfig field -> value
    # Stages (llmrl/stages.py) the algorithm always runs, beyond those its options switch on:
    # PPO's `critic` builds a value model and fits it.
    stages: tuple[str, ...] = ()
    description: str = ""
    # Options the preset's workflow gets unless the recipe sets them (IGPO switches on info_gain).
    workflow_options: dict[str, Any] = field(default_factory=dict)


def register_preset(name: str, preset: AlgorithmPreset) -> AlgorithmPreset:
    """Register `preset` under `name`. Later packages (POPE, IGPO, CHORD) add theirs the same way."""
    return PRESETS.register(name, preset)


def get_preset(name: str) -> AlgorithmPreset:
    return PRESETS[name]


# --------------------------------------------------------------------------- built-in presets
# AlgorithmConfig's own defaults are GRPO as verl runs it (std-normalised group advantage,
# eps 0.2/0.2, dual clip 3, token-mean, no KL); presets only state what differs.

register_preset(
    "grpo",
    AlgorithmPreset(
        "single_turn", "grpo", "ppo_clip", {},
        description="GRPO (Shao et al. 2024, arXiv 2402.03300) with verl's defaults: group z-score advantage, PPO clip loss, token-mean.",
    ),
)

register_preset(
    "pope",
    AlgorithmPreset(
        "guided", "grpo", "ppo_clip", {},
        description="POPE (Qu et al. 2026, arXiv 2601.18779): GRPO plus guided copies of hard problems whose reply "
        "begins with an oracle-solution prefix that is never trained on (rollout.workflow options).",
    ),
)

register_preset(
    "dr_grpo",
    AlgorithmPreset(
        "single_turn", "grpo", "ppo_clip",
        {"norm_adv_by_std": False, "loss_agg_mode": "seq-mean-token-sum-norm"},
        description="Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): no std division, constant length normaliser.",
    ),
)

register_preset(
    "dapo",
    AlgorithmPreset(
        "single_turn", "grpo", "ppo_clip",
        {
            "clip_eps_high": 0.28,
            "loss_agg_mode": "token-mean",
            "dual_clip_c": 10.0,  # verl DAPO recipe scripts (clip_ratio_c=10)
            "overlong_shaping": True,
            "dynamic_sampling": True,
        },
        description="DAPO (Yu et al. 2025, arXiv 2503.14476): clip-higher, token-mean, overlong shaping, dynamic sampling.",
    ),
)

register_preset(
    "rloo",
    AlgorithmPreset(
        "single_turn", "rloo", "ppo_clip", {},
        description="RLOO (Ahmadian et al. 2024, arXiv 2402.14740): leave-one-out baseline; token-level PPO loss as in verl.",
    ),
)

register_preset(
    "reinforce_pp",
    AlgorithmPreset(
        "single_turn", "reinforce_pp", "ppo_clip",
        {"kl_placement": "reward", "kl_estimator": "k1"},
        description="REINFORCE++ (Hu 2025, arXiv 2501.03262): discounted token returns, batch whitening, KL in the reward.",
    ),
)

register_preset(
    "reinforce_pp_baseline",
    AlgorithmPreset(
        "single_turn", "reinforce_pp_baseline", "ppo_clip",
        {"kl_placement": "reward", "kl_estimator": "k1"},
        description="REINFORCE++-baseline: group-mean baseline, then token-weighted batch whitening.",
    ),
)

register_preset(
    "gspo",
    AlgorithmPreset(
        "single_turn", "grpo", "gspo",
        {"clip_eps_low": 3e-4, "clip_eps_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"},
        description="GSPO (Zheng et al. 2025, arXiv 2507.18071): sequence-level ratio (GSPO-token form), verl example clip 3e-4/4e-4.",
    ),
)

register_preset(
    "lite_ppo",
    AlgorithmPreset(
        "single_turn", "lite", "ppo_clip", {"loss_agg_mode": "token-mean"},
        description="Lite PPO (Liu et al. 2025, arXiv 2508.08221): group-mean / batch-std advantage, token-mean PPO clip.",
    ),
)

register_preset(
    "ppo",
    AlgorithmPreset(
        "single_turn", "gae", "ppo_clip",
        {"kl_placement": "reward", "kl_estimator": "k1"},
        stages=("critic",),
        description="PPO with a critic (Ouyang et al. 2022 style): GAE, whitened advantages, clipped value loss.",
    ),
)

# CHORD (Zhang et al. 2025, arXiv 2508.11408): expert rows (the `expert` recipe section) join every
# step through the `expert_mix` stage; the `chord` loss mixes their SFT part with the RL part.
# `chord` ships the authors' code defaults (CHORD-phi, mu fixed at 0.1): with phi weighting the paper
# needs no schedule. `chord_mu` is their CHORD-mu setting, mu cosine-decayed 0.9 -> 0.05 over 200 steps.
register_preset(
    "chord",
    AlgorithmPreset(
        "single_turn", "grpo", "chord", {}, stages=("expert_mix",),
        description="CHORD-phi: GRPO on the rollouts plus mu x SFT on expert rows, each expert token weighted by p(1-p).",
    ),
)

register_preset(
    "chord_mu",
    AlgorithmPreset(
        "single_turn", "grpo", "chord", {"sft_phi": False, "mu_peak": 0.9, "mu_valley": 0.05, "mu_decay_steps": 200},
        stages=("expert_mix",),
        description="CHORD-mu: GRPO plus plain SFT on expert rows, mu decayed from 0.9 to 0.05 (cosine, 200 steps).",
    ),
)

register_preset(
    "sft",
    AlgorithmPreset(
        "none", "grpo", "chord", {"sft_phi": False, "mu_peak": 1.0, "mu_valley": 1.0}, stages=("expert_mix",),
        description="Supervised fine-tuning on the expert rows (CHORD with mu = 1 and no rollouts): no generation, "
        "one forward/backward over prompts_per_step x rollout.n expert rows a step.",
    ),
)

# IGPO (Wang et al. 2025, arXiv 2510.14967): multi-turn agent rollouts whose non-final turns earn the
# information gain on the gold answer; turn-level advantage (llmrl/algorithms/igpo.py). The IG
# definition ships as log_prob_diff, the authors' updated train.sh setting.
register_preset(
    "igpo",
    AlgorithmPreset(
        "multi_turn", "igpo", "ppo_clip", {},
        workflow_options={"info_gain": "log_prob_diff"},
        description="IGPO: multi_turn rollouts, information-gain turn rewards (rollout.workflow.info_gain) plus the final "
        "F1, normalised per group (separate pools), accumulated over turns with gamma and broadcast over each turn's tokens.",
    ),
)

"""Algorithm presets and the `algorithm` config section: name validation, preset defaults filling
only unset fields, registries, and the recipe-level wiring."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmrl.algorithms import ADVANTAGES, LOSSES, PRESETS, AlgorithmConfig, AlgorithmPreset, get_preset, needs_reference, register_preset, resolve_algorithm
from llmrl.rollout.workflows import WORKFLOWS

BUILT_IN = ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "lite_ppo", "ppo", "pope", "chord", "chord_mu", "sft"]


def test_built_in_presets_are_registered_and_consistent():
    assert set(BUILT_IN) <= set(PRESETS)
    fields = set(AlgorithmConfig.model_fields)
    for name in BUILT_IN:
        preset = get_preset(name)
        assert preset.workflow in WORKFLOWS, name
        assert preset.advantage in ADVANTAGES, name
        assert preset.loss in LOSSES, name
        assert set(preset.defaults) <= fields, (name, set(preset.defaults) - fields)
        resolved = resolve_algorithm(AlgorithmConfig(name=name))
        assert (resolved.advantage, resolved.loss) == (preset.advantage, preset.loss)
        for key, value in preset.defaults.items():
            assert getattr(resolved, key) == value, (name, key)


def test_preset_contents():
    assert get_preset("grpo") == AlgorithmPreset("single_turn", "grpo", "ppo_clip", {}, description=get_preset("grpo").description)
    dr = resolve_algorithm(AlgorithmConfig(name="dr_grpo"))
    assert dr.norm_adv_by_std is False and dr.loss_agg_mode == "seq-mean-token-sum-norm"
    dapo = resolve_algorithm(AlgorithmConfig(name="dapo"))
    assert (dapo.clip_eps_low, dapo.clip_eps_high, dapo.loss_agg_mode) == (0.2, 0.28, "token-mean")
    assert dapo.overlong_shaping and dapo.dynamic_sampling and dapo.dual_clip_c == 10.0
    gspo = resolve_algorithm(AlgorithmConfig(name="gspo"))
    assert (gspo.clip_eps_low, gspo.clip_eps_high, gspo.loss_agg_mode, gspo.loss) == (3e-4, 4e-4, "seq-mean-token-mean", "gspo")
    assert resolve_algorithm(AlgorithmConfig(name="rloo")).advantage == "rloo"
    assert resolve_algorithm(AlgorithmConfig(name="reinforce_pp_baseline")).kl_placement == "reward"
    assert resolve_algorithm(AlgorithmConfig(name="lite_ppo")).advantage == "lite"
    ppo = resolve_algorithm(AlgorithmConfig(name="ppo"))
    assert ppo.advantage == "gae" and "critic" in get_preset("ppo").stages
    assert [n for n in BUILT_IN if "critic" in get_preset(n).stages] == ["ppo"]
    assert [n for n in BUILT_IN if "expert_mix" in get_preset(n).stages] == ["chord", "chord_mu", "sft"]
    chord = resolve_algorithm(AlgorithmConfig(name="chord"))
    assert (chord.loss, chord.rl_loss, chord.sft_phi, chord.mu_peak, chord.mu_valley) == ("chord", "ppo_clip", True, 0.1, 0.1)
    sft = resolve_algorithm(AlgorithmConfig(name="sft"))
    assert (sft.mu_peak, sft.mu_valley, sft.sft_phi, get_preset("sft").workflow) == (1.0, 1.0, False, "none")
    with pytest.raises(ValidationError, match="rl_loss: 'sft' is not a policy-gradient loss"):
        AlgorithmConfig(name="chord", rl_loss="sft")


def test_defaults_are_grpo_verl():
    cfg = resolve_algorithm(AlgorithmConfig())
    assert (cfg.name, cfg.advantage, cfg.loss) == ("grpo", "grpo", "ppo_clip")
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c) == (0.2, 0.2, 3.0)
    assert (cfg.adv_eps, cfg.singleton_group, cfg.loss_agg_mode) == (1e-6, "zero", "token-mean")
    assert (cfg.kl_coef, cfg.entropy_coef, cfg.ppo_epochs, cfg.entropy_control) == (0.0, 0.0, 1, "none")
    assert (cfg.kl_cov_ratio, cfg.kl_cov_coef, cfg.clip_cov_ratio) == (0.0002, 0.1, 0.0002)


def test_user_values_win_over_preset_even_when_equal_to_the_default():
    cfg = resolve_algorithm(AlgorithmConfig(name="dapo", clip_eps_high=0.2, loss_agg_mode="seq-mean-token-mean"))
    assert cfg.clip_eps_high == 0.2 and cfg.loss_agg_mode == "seq-mean-token-mean"
    assert cfg.dynamic_sampling is True  # not set by the user: the preset's
    validated = resolve_algorithm(AlgorithmConfig.model_validate({"name": "dr_grpo", "norm_adv_by_std": True}))
    assert validated.norm_adv_by_std is True and validated.loss_agg_mode == "seq-mean-token-sum-norm"


def test_advantage_and_loss_override_and_idempotence():
    cfg = resolve_algorithm(AlgorithmConfig(name="grpo", loss="gspo", advantage="rloo"))
    assert (cfg.advantage, cfg.loss) == ("rloo", "gspo")
    once = resolve_algorithm(AlgorithmConfig(name="dapo"))
    assert resolve_algorithm(once) == once


def test_unknown_names_list_known_and_suggest():
    with pytest.raises(ValidationError) as err:
        AlgorithmConfig(name="grp0")
    msg = str(err.value)
    assert "did you mean 'grpo'" in msg and "dr_grpo" in msg and "lite_ppo" in msg
    with pytest.raises(ValueError, match="did you mean 'dapo'"):
        get_preset("dappo")
    with pytest.raises(ValidationError, match="did you mean 'rloo'"):
        AlgorithmConfig(advantage="rlo")
    with pytest.raises(ValidationError, match="did you mean 'ppo_clip'"):
        AlgorithmConfig(loss="ppo_clp")


def test_field_validation():
    with pytest.raises(ValidationError, match="kl_cov_ratio"):
        AlgorithmConfig(kl_cov_ratio=2.0)  # a percent written as such is refused above 1
    with pytest.raises(ValidationError, match="dual_clip_c"):
        AlgorithmConfig(dual_clip_c=1.0)
    with pytest.raises(ValidationError, match="loss_agg_mode"):
        AlgorithmConfig(loss_agg_mode="token-sum")
    with pytest.raises(ValidationError, match="kl_estimator"):
        AlgorithmConfig(kl_estimator="k4")
    with pytest.raises(ValidationError, match="clip_cov_lb"):
        AlgorithmConfig(clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValidationError, match="clip_eps"):
        AlgorithmConfig(clip_eps_hi=0.3)
    assert AlgorithmConfig(dual_clip_c=None).dual_clip_c is None


def test_every_field_is_documented():
    for name, field in AlgorithmConfig.model_fields.items():
        assert field.description and len(field.description) > 10, name


def test_needs_reference():
    assert not needs_reference(AlgorithmConfig())
    assert needs_reference(AlgorithmConfig(kl_coef=0.001))
    assert needs_reference(AlgorithmConfig(kl_coef=0.05, kl_placement="reward"))


def test_registry_is_open():
    name = "test_only_preset"
    try:
        register_preset(name, AlgorithmPreset("single_turn", "rloo", "rloo_seq", {"clip_eps_high": 0.3}))
        cfg = resolve_algorithm(AlgorithmConfig(name=name))
        assert (cfg.advantage, cfg.loss, cfg.clip_eps_high) == ("rloo", "rloo_seq", 0.3)
        with pytest.raises(ValueError, match="already registered"):
            register_preset(name, AlgorithmPreset("single_turn", "grpo", "ppo_clip"))
    finally:
        PRESETS.unregister(name)


def test_recipe_wiring():
    from llmrl.recipe import RecipeError, load_recipe

    recipe = load_recipe(None, ["algorithm.name=dr_grpo", "algorithm.clip_eps_high=0.28"])
    cfg = resolve_algorithm(recipe.algorithm)
    assert cfg.clip_eps_high == 0.28 and cfg.norm_adv_by_std is False
    with pytest.raises(RecipeError, match=r"algorithm.name.*did you mean 'gspo'"):
        load_recipe(None, ["algorithm.name=gspoo"])

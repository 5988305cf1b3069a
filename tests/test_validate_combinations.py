"""`llmrl validate` refuses, with exit 2, every combination that would only fail once training runs:
algorithm options the loss has no place for, an advantage whose stage is not run, an overlong
buffer past the generation limit, and a vLLM-CPU engine for a model whose head size it lacks."""
import importlib.metadata
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from llmrl.algorithms import ADVANTAGES, LOSSES, PRESETS
from llmrl.algorithms.advantages import compute_advantages
from llmrl.algorithms.base import AdvantageInputs, LossContext
from llmrl.algorithms.config import needs_reference
from llmrl.algorithms.entropy import ENTROPY_CONTROLS
from llmrl.recipe import Recipe, RecipeError, check_recipe, load_recipe, resolve_recipe
from llmrl.stages import active_stage_names
from llmrl.train.critic import value_targets

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
TINY = ["model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "eval.benches=[]"]
TINY_SECTIONS = {"model": {"name": "tiny"}, "rollout": {"n": 4}, "train": {"prompts_per_step": 2, "micro_batch_size": 4}, "eval": {"benches": []}}


def validate(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "validate", QUICKSTART, *TINY, *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )


def test_gspo_with_clip_cov_is_refused_at_validate():
    done = validate("algorithm.name=gspo", "algorithm.entropy_control=clip_cov")
    assert done.returncode == 2, done.stdout[-500:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llmrl: error: algorithm.entropy_control: 'clip_cov'") and "'gspo'" in line and "ppo_clip" in line


def one_step_of_the_update(recipe) -> None:
    """What the loop computes for a step once the rollouts are in, on a synthetic batch with every
    key collate and the stages provide: advantages, the policy loss (sums, denominators, metrics)
    from the outputs the policy engine gives (logprobs, entropy; no values: it has no value head),
    and the critic's value loss when the critic stage runs."""
    algo = recipe.algorithm
    stages = active_stage_names(algo)
    B, T = 8, 6
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, T)
    mask[:, 2:] = 1
    batch = {
        "input_ids": torch.randint(0, 50, (B, T), generator=g), "attention_mask": torch.ones(B, T, dtype=torch.long),
        "position_ids": torch.arange(T).repeat(B, 1), "loss_mask": mask, "rollout_logprobs": -torch.rand(B, T, generator=g),
        "rewards/outcome": torch.zeros(B, T), "turn_ids": torch.zeros(B, T, dtype=torch.long), "group_ids": torch.arange(B) // 4,
        "expert_mask": torch.zeros(B, dtype=torch.bool), "truncated": torch.zeros(B, dtype=torch.bool),
        "old_logprobs": -torch.rand(B, T, generator=g),
    }
    batch["rewards/outcome"][:, -1] = torch.rand(B, generator=g)
    if "expert_mix" in stages:
        batch["expert_mask"][-2:] = True
    if needs_reference(algo):
        batch["ref_logprobs"] = -torch.rand(B, T, generator=g)
    if "critic" in stages:
        batch["old_values"] = torch.rand(B, T, generator=g)
    batch["advantages"], _ = compute_advantages(ADVANTAGES[algo.advantage], AdvantageInputs.from_batch(batch, algo))
    ctx = LossContext(step=0, cfg=algo, generator=torch.Generator().manual_seed(0))
    loss = LOSSES[algo.loss]
    assert "values" not in set(getattr(loss, "outputs", ())), "the policy has no value head"
    out = {"logprobs": (-torch.rand(B, T, generator=g)).requires_grad_(), "entropy": torch.rand(B, T, generator=g)}
    loss.denominators(batch, ctx)
    assert loss(batch, out, ctx).sums
    if "critic" in stages:
        batch["returns"] = value_targets(batch, algo)
        LOSSES["value"](batch, {"values": torch.rand(B, T, requires_grad=True)}, ctx)


def validated(algorithm: dict):
    """load_recipe's checks on the tiny recipe with this `algorithm` section (built as a mapping:
    parsing thousands of YAML overrides would dominate the test's time); None when refused."""
    try:
        recipe = resolve_recipe(Recipe.model_validate({**TINY_SECTIONS, "algorithm": algorithm}))
        check_recipe(recipe, "(test)")
    except (ValidationError, ValueError):  # ValueError covers RecipeError; load_recipe turns both into exit 2
        return None
    return recipe


def test_every_combination_either_runs_or_is_refused_at_validate():
    # Every preset x policy loss (the preset's own included) x entropy control x advantage, and
    # the options only some losses honour: truncated IS, and CHORD's rl_loss.
    ran = refused = 0
    failures = []
    options = ({}, {"rollout_is_cap": 2.0}, {"rl_loss": "gspo"}, {"rl_loss": "rloo_seq"})
    for preset, loss, control, advantage, extra in itertools.product(
        PRESETS.names(), [None, *LOSSES.names()], ENTROPY_CONTROLS.names(), ADVANTAGES.names(), options
    ):
        algorithm = {"name": preset, "loss": loss, "entropy_control": control, "advantage": advantage, **extra}
        recipe = validated(algorithm)
        if recipe is None:
            refused += 1
            continue
        try:
            one_step_of_the_update(recipe)
            ran += 1
        except Exception as err:  # noqa: BLE001  every failure is collected and shown
            failures.append(f"{algorithm}: {type(err).__name__}: {err}")
    assert not failures, f"{len(failures)} combinations validate and then fail:\n" + "\n".join(failures[:10])
    assert ran > 0 and refused > 0
    # The case, through the real loader: refused with the key named.
    with pytest.raises(RecipeError, match="algorithm.entropy_control: 'clip_cov'.*not 'gspo'"):
        load_recipe(QUICKSTART, TINY + ["algorithm.name=gspo", "algorithm.entropy_control=clip_cov"])


def test_overlong_buffer_longer_than_the_generation_limit_is_refused_at_validate():
    with pytest.raises(RecipeError, match=r"overlong_buffer_len \(64\) must not exceed rollout.max_new_tokens \(20\)"):
        load_recipe(QUICKSTART, TINY + ["algorithm.name=dapo", "algorithm.overlong_buffer_len=64"])


# ------------------------------------------------------------------------------ vLLM-CPU head sizes


def vllm_cpu_installed() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_vllm_cpu = pytest.mark.skipif(not vllm_cpu_installed(), reason="vllm-cpu not installed")


@needs_vllm_cpu
def test_vllm_cpu_with_the_tiny_model_is_refused_at_validate_naming_its_head_dim():
    done = validate("rollout.engine=vllm")
    assert done.returncode == 2, done.stdout[-500:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llmrl: error: rollout.engine: 'vllm': vLLM-CPU")
    assert "'tiny' has head_dim 16" in line and "rollout.engine=hf" in line


@needs_vllm_cpu
def test_vllm_cpu_head_sizes_match_the_installed_kernels_and_smollm2_passes():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from llmrl.rollout.vllm_engine import VLLM_CPU_HEAD_SIZES

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == VLLM_CPU_HEAD_SIZES
    recipe = load_recipe(QUICKSTART, ["rollout.engine=vllm", "eval.benches=[]"])  # smollm2-135m: head_dim 64
    assert recipe.rollout.engine == "vllm"

"""PPO with a critic: the KL controllers, the critic's targets, and the loop's wiring of both."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmrl.algorithms import AlgorithmConfig
from llmrl.algorithms.kl_controller import build_kl_controller, mean_sequence_kl
from llmrl.loop import train
from llmrl.recipe import load_recipe
from llmrl.train.critic import value_targets

REPO = Path(__file__).resolve().parents[1]
PPO_RECIPE = str(REPO / "recipes" / "arith_ppo.yaml")
TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "logging.progress=false", "logging.tensorboard=false", "logging.rollouts_every=0", "eval.benches=[]",
    "reward.functions=[toy_token_fraction]", "train.lr=1e-3", "algorithm.critic_lr=1e-3",
]


def adaptive(kl_coef=0.1, target=0.1, horizon=100):
    return build_kl_controller(AlgorithmConfig(kl_coef=kl_coef, kl_placement="reward", kl_controller="adaptive", kl_target=target, kl_horizon=horizon))


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (0.15, 0.1 * (1 + 0.2 * 10 / 100)),  # error 0.5 clipped to 0.2 -> 0.102
        (0.11, 0.1 * (1 + 0.1 * 10 / 100)),  # error 0.1 -> 0.101
        (0.05, 0.1 * (1 - 0.2 * 10 / 100)),  # error -0.5 clipped to -0.2 -> 0.098
        (0.1, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_kl_controller_worked_numbers(current_kl, expected):
    ctl = adaptive()
    ctl.update(current_kl, n_trajectories=10)
    assert ctl.value == pytest.approx(expected, abs=1e-12)


def test_adaptive_kl_controller_compounds_and_restores_state():
    ctl = adaptive()
    ctl.update(1.0, 10)
    ctl.update(1.0, 10)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 1.02)
    fresh = adaptive()
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = build_kl_controller(AlgorithmConfig(kl_coef=0.05))
    ctl.update(10.0, 1000)
    assert ctl.value == 0.05


def test_mean_sequence_kl_averages_row_token_means_and_skips_empty_rows():
    kl = torch.tensor([[0.0, 1.0, 3.0], [0.0, 4.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert mean_sequence_kl(kl, mask) == pytest.approx((2.0 + 4.0) / 2)
    assert mean_sequence_kl(kl, torch.zeros_like(mask)) == 0.0


def test_value_targets_are_the_gae_returns_of_the_worked_example():
    """docs/formulas.md#ppo-worked-example: rewards [0,0,1], values [.5,.6,.7], gamma 1, lambda .95 -> returns [.96575, .985, 1.0],
    computed from the un-whitened advantages even though PPO whitens the advantages."""
    batch = {
        "rewards/outcome": torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]),
        "old_values": torch.tensor([[0.0, 0.5, 0.6, 0.7, 0.0]]),
        "loss_mask": torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]),  # a prompt token, three policy tokens, padding
    }
    cfg = AlgorithmConfig(name="ppo", gamma=1.0, lam=0.95, whiten_advantages=True)
    returns = value_targets(batch, cfg)
    torch.testing.assert_close(returns, torch.tensor([[0.0, 0.96575, 0.985, 1.0, 0.0]]), rtol=0, atol=1e-6)


def test_adaptive_controller_without_a_reward_kl_is_a_recipe_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "validate", PPO_RECIPE, "algorithm.kl_controller=adaptive"],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "algorithm.kl_controller" in out.stderr and "kl_coef" in out.stderr and "Traceback" not in out.stderr


def read_rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_warmup_adaptive_kl_and_resume(tmp_path, tiny_path):
    """Critic warm-up leaves the policy untouched; the adaptive KL weight follows its formula
    step to step; the critic and the controller come back exactly on resume."""
    common = TINY + [
        "algorithm.critic_warmup_steps=1", "algorithm.kl_coef=0.05", "algorithm.kl_controller=adaptive",
        "algorithm.kl_target=0.01", "algorithm.kl_horizon=100", "checkpoint.every=1", "checkpoint.keep_last=3",
    ]
    straight = train(load_recipe(PPO_RECIPE, common + ["train.steps=3", f"output_dir={tmp_path / 'a'}"]))
    rows = read_rows(straight)

    assert "actor/updates" not in rows[0] and rows[0]["critic/updates"] == 1
    assert rows[1]["actor/updates"] == 1 and rows[2]["actor/updates"] == 1
    initial = load_file(Path(tiny_path) / "model.safetensors")
    after_warmup = load_file(straight / "checkpoints" / "step_1" / "policy" / "model.safetensors")
    after_update = load_file(straight / "checkpoints" / "step_2" / "policy" / "model.safetensors")
    assert all(torch.equal(after_warmup[n], initial[n]) for n in initial)
    assert any(not torch.equal(after_update[n], initial[n]) for n in initial)
    assert (straight / "checkpoints" / "step_1" / "critic" / "trainer_state.pt").exists()

    # the policy equals the reference until its first update, so KL is exactly 0 there
    assert rows[0]["actor/reward_kl"] == 0.0 and rows[1]["actor/reward_kl"] == 0.0
    assert rows[2]["actor/reward_kl"] > 0.0
    assert rows[0]["actor/kl_coef"] == 0.05
    for prev, cur in zip(rows, rows[1:]):
        error = min(max(prev["actor/reward_kl"] / 0.01 - 1, -0.2), 0.2)
        assert cur["actor/kl_coef"] == pytest.approx(prev["actor/kl_coef"] * (1 + error * 8 / 100), rel=1e-9)

    split = tmp_path / "b"
    train(load_recipe(PPO_RECIPE, common + ["train.steps=2", f"output_dir={split}"]))
    resumed = read_rows(train(load_recipe(PPO_RECIPE, common + ["train.steps=3", f"output_dir={split}", "resume=auto"])))
    for key in ("reward/mean", "critic/vf_loss", "critic/values_mean", "actor/loss", "actor/kl_coef", "actor/reward_kl"):
        assert resumed[2][key] == pytest.approx(rows[2][key], rel=1e-5, abs=1e-7), key

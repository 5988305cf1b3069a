"""CHORD and SFT: the mu schedule and phi weights against the worked numbers of the method's
reference (docs/algorithms.md, "CHORD"), the mixed loss, expert rows kept out of every statistic,
expert data loading, mini-batches that keep the expert share, and the loop with both presets."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmrl.algorithms import ADVANTAGES, LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.advantages import compute_advantages
from llmrl.algorithms.base import AdvantageInputs, LossContext
from llmrl.algorithms.chord import mu_schedule, phi, sft_token_losses
from llmrl.batch import collate, iter_mini_batches
from llmrl.data import DataConfig, build_tasks
from llmrl.data.config import DataConfigError
from llmrl.data.expert import ExpertConfig, build_expert_set
from llmrl.models import load_tokenizer
from llmrl.recipe import RecipeError, expert_rows_per_step, load_recipe, trajectories_per_step
from llmrl.stages import expert_trajectory

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def chord_cfg(**kw):
    return resolve_algorithm(AlgorithmConfig(name=kw.pop("name", "chord"), **kw))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


# ------------------------------------------------------------------------------ worked numbers


@pytest.mark.parametrize(
    "schedule, steps, expected",
    [
        ((0, 200, 0.9, 0.05), [0, 50, 100, 150, 200, 300], [0.9, 0.77552, 0.475, 0.17448, 0.05, 0.05]),  # CHORD-mu
        ((200, 400, 0.5, 0.02), [0, 100, 200, 400, 600], [0.0, 0.25, 0.5, 0.26, 0.02]),  # the authors' example yaml
        ((0, 0, 0.1, 0.1), [0, 7, 1000], [0.1, 0.1, 0.1]),  # CHORD-phi: constant
    ],
)
def test_mu_schedule_matches_the_reference_values(schedule, steps, expected):
    assert [mu_schedule(s, *schedule) for s in steps] == pytest.approx(expected, abs=5e-6)


def test_phi_and_the_two_sft_losses_on_the_worked_example():
    logp = torch.log(torch.tensor([0.5, 0.9, 0.1], dtype=torch.float64))
    assert phi(logp.exp()).tolist() == pytest.approx([0.25, 0.09, 0.09])
    weighted, _ = sft_token_losses(logp, use_phi=True, cutoff_prob=1.0)
    plain, _ = sft_token_losses(logp, use_phi=False, cutoff_prob=1.0)
    assert float(weighted.mean()) == pytest.approx(0.130001, abs=1e-6)
    assert float(plain.mean()) == pytest.approx(1.033698, abs=1e-6)


def engine_total(loss_fn, mb, out, ctx):
    """What the train engine minimises for one micro-batch that is the whole mini-batch."""
    denominators = loss_fn.denominators(mb, ctx)
    result = loss_fn(mb, out, ctx)
    total = sum(result.weights[p] * v / denominators[p] for p, v in result.sums.items())
    return total, result


def worked_batch():
    """Row 0: on-policy, one policy token with A = 0.2 at ratio 1, so its PPO-clip loss is -0.2.
    Row 1: expert, three tokens of probability 0.5, 0.9, 0.1. Position 0 is the prompt."""
    logp = torch.tensor([[0.0, -0.3, 0.0, 0.0], [0.0, *torch.log(torch.tensor([0.5, 0.9, 0.1])).tolist()]], requires_grad=True)
    mb = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "loss_mask": torch.tensor([[0.0, 1, 0, 0], [0, 1, 1, 1]]),
        "advantages": torch.tensor([[0.0, 0.2, 0, 0], [0, 0, 0, 0]]),
        "old_logprobs": logp.detach().clone(),
        "rollout_logprobs": torch.zeros(2, 4),
        "expert_mask": torch.tensor([False, True]),
    }
    return mb, {"logprobs": logp, "entropy": torch.tensor([[0.0, 2.0, 0, 0], [0, 1.0, 1.0, 4.0]])}


def test_chord_total_on_the_worked_example_and_its_metrics():
    mb, out = worked_batch()
    ctx = LossContext(step=0, cfg=chord_cfg())
    total, result = engine_total(LOSSES["chord"], mb, out, ctx)
    assert float(total.detach()) == pytest.approx(-0.167000, abs=1e-6)  # 0.9 x (-0.2) + 0.1 x 0.130001
    assert result.weights["pg"] == pytest.approx(0.9) and result.weights["sft"] == pytest.approx(0.1)
    metric = {k: s / c for k, (s, c) in result.metrics.items()}
    assert metric["chord/mu"] == pytest.approx(0.1)
    assert metric["chord/sft_loss"] == pytest.approx(0.130001, abs=1e-6)
    assert metric["chord/rl_loss"] == pytest.approx(-0.2)
    assert metric["chord/phi_mean"] == pytest.approx((0.25 + 0.09 + 0.09) / 3)
    assert metric["chord/entropy_expert"] == pytest.approx(2.0) and metric["chord/entropy_policy"] == pytest.approx(2.0)
    # CHORD-mu at its first step: mu = 0.9 on plain SFT
    total_mu, _ = engine_total(LOSSES["chord"], mb, out, LossContext(step=0, cfg=chord_cfg(name="chord_mu")))
    assert float(total_mu.detach()) == pytest.approx(0.1 * -0.2 + 0.9 * 1.033698, abs=1e-6)


def test_phi_is_a_weight_not_differentiated():
    """d/dlogp of -logp x sg[p(1-p)] is -p(1-p): the gradient sees phi only as a constant."""
    mb, out = worked_batch()
    total, _ = engine_total(LOSSES["chord"], mb, out, LossContext(step=0, cfg=chord_cfg()))
    total.backward()
    p = torch.tensor([0.5, 0.9, 0.1])
    assert out["logprobs"].grad[1, 1:].tolist() == pytest.approx((-0.1 * p * (1 - p) / 3).tolist(), abs=1e-7)
    assert out["logprobs"].grad[0, 1].item() == pytest.approx(0.9 * -0.2)  # d(-A r)/dlogp = -A r, weight 0.9


def test_cutoff_prob_stops_the_gradient_of_tokens_the_policy_already_knows():
    logp = torch.log(torch.tensor([0.5, 0.9, 0.1])).requires_grad_(True)
    loss, _ = sft_token_losses(logp, use_phi=False, cutoff_prob=0.8)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.0, -1.0])
    assert float(loss[1]) == pytest.approx(-math.log(0.8))


def test_sequence_level_sft_averages_rows_first():
    """Expert rows of 1 and 3 tokens with NLLs [2] and [1, 1, 4]: token-mean 8/4 = 2, per-row
    mean then mean over rows (2 + 2) / 2 = 2; with [2] and [1, 1, 1]: 5/4 against 1.5."""
    logp = -torch.tensor([[0.0, 2.0, 0, 0], [0, 1.0, 1.0, 1.0]])
    mb = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.tensor([[0.0, 1, 0, 0], [0, 1, 1, 1]]),
          "expert_mask": torch.tensor([True, True])}
    for mode, expected in (("token-mean", 1.25), ("seq-mean-token-mean", 1.5)):
        cfg = chord_cfg(name="sft", sft_loss_agg_mode=mode)
        total, result = engine_total(LOSSES["chord"], mb, {"logprobs": logp}, LossContext(step=0, cfg=cfg))
        assert float(total.detach()) == pytest.approx(expected) and set(result.sums) == {"sft"}


# ------------------------------------------------------------------------------ expert rows in statistics


def mixed_inputs(cfg):
    """Two on-policy groups (scores [1, 0] and [1, 1]) and two expert rows that score 5 and 3:
    if the expert rows joined a group or the batch, every statistic below would change."""
    rewards = torch.zeros(6, 3)
    rewards[:, 2] = torch.tensor([1.0, 0.0, 1.0, 1.0, 5.0, 3.0])
    mask = torch.ones(6, 3)
    groups = torch.tensor([0, 0, 1, 1, 0, 1])
    expert = torch.tensor([False, False, False, False, True, True])
    return AdvantageInputs.outcome(rewards, mask, groups, cfg, expert_mask=expert)


@pytest.mark.parametrize("name", ["grpo", "lite_ppo", "reinforce_pp", "reinforce_pp_baseline", "rloo"])
def test_expert_rows_change_no_advantage(name):
    cfg = resolve_algorithm(AlgorithmConfig(name=name))
    inputs = mixed_inputs(cfg)
    fn = ADVANTAGES[cfg.advantage]
    adv, _ = compute_advantages(fn, inputs)
    alone, _ = fn(inputs.select(torch.arange(4)))
    torch.testing.assert_close(adv[:4], alone.float())
    assert torch.equal(adv[4:], torch.zeros(2, 3))
    included, _ = fn(AdvantageInputs.outcome(inputs.token_rewards, inputs.loss_mask, inputs.group_ids, cfg))
    assert not torch.allclose(included[:4].float(), alone.float()), "the batch must be one where including expert rows matters"


def test_kl_in_reward_and_rollout_gap_skip_expert_rows():
    from llmrl.batch import on_policy_mask

    batch = {"loss_mask": torch.ones(3, 2), "expert_mask": torch.tensor([False, True, False])}
    assert on_policy_mask(batch).tolist() == [[1, 1], [0, 0], [1, 1]]


def test_a_missing_expert_file_is_a_recipe_error():
    with pytest.raises(RecipeError, match="expert.path: 'nowhere/e.jsonl' is not an existing file"):
        load_recipe(None, ["algorithm.name=sft", "expert.path=nowhere/e.jsonl"])
    load_recipe(None, ["expert.path=nowhere/e.jsonl"])  # grpo reads no expert data: not checked


def test_a_critic_is_refused_with_expert_rows():
    with pytest.raises(RecipeError, match="algorithm.advantage: 'gae' needs a critic"):
        load_recipe(None, ["algorithm.name=chord", "algorithm.advantage=gae"])


# ------------------------------------------------------------------------------ batching


def test_expert_rows_per_step_and_mini_batch_shares():
    recipe = load_recipe(None, ["algorithm.name=chord", "train.prompts_per_step=8", "rollout.n=8"])
    assert expert_rows_per_step(recipe) == 16 and trajectories_per_step(recipe) == 80  # 16 / 80 = 0.2
    sft = load_recipe(None, ["algorithm.name=sft", "train.prompts_per_step=8", "rollout.n=8"])
    assert expert_rows_per_step(sft) == 64 and trajectories_per_step(sft) == 64
    assert expert_rows_per_step(load_recipe(None, [])) == 0  # grpo draws none
    strata = torch.tensor([False] * 64 + [True] * 16)
    minis = list(iter_mini_batches(80, 16, torch.Generator().manual_seed(0), strata=strata))
    assert len(minis) == 4 and sorted(r for m in minis for r in m) == list(range(80))
    assert [sum(bool(strata[r]) for r in m) for m in minis] == [4, 4, 4, 4]
    assert [len(m) for m in minis] == [20, 20, 20, 20]


def test_expert_trajectory_trains_the_response_and_its_eos_only(tokenizer):
    tasks = build_tasks(DataConfig(type="arithmetic", num_train=4), tokenizer).tasks
    expert = build_expert_set(ExpertConfig(), DataConfig(type="arithmetic", num_train=4), tokenizer, tasks)
    example = expert.examples[0]
    assert example.task.prompt_ids == tasks[0].prompt_ids  # the RL prompt: same instruction and template
    assert example.response == tasks[0].meta["oracle_solution"] and example.response.endswith(f"#### {tasks[0].answer}")
    assert example.response_ids[-1] == tokenizer.eos_token_id
    batch = collate([expert_trajectory(example, -1)], tokenizer.pad_token_id)
    p = len(example.task.prompt_ids)
    assert batch["loss_mask"][0, :p].sum() == 0 and batch["loss_mask"][0, p:].tolist() == [1.0] * len(example.response_ids)
    assert batch["expert_mask"].tolist() == [True] and batch["rollout_logprobs"].abs().sum() == 0


# ------------------------------------------------------------------------------ expert data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_expert_file_with_prompt_response_and_messages_rows(tmp_path, tokenizer):
    rows = [{"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(38)]
    rows.append({"messages": [{"role": "user", "content": "What is 9 + 9?"}, {"role": "assistant", "content": "#### 18"}]})
    rows.append({"prompt": "What is 2 + 2?"})  # no response: skipped and counted
    data = DataConfig(type="arithmetic")
    expert = build_expert_set(ExpertConfig(path=write_jsonl(tmp_path / "e.jsonl", rows)), data, tokenizer)
    assert expert.stats == {"rows": 40, "kept": 39, "skipped": 1, "missing_field": 1}
    chat = expert.examples[-1]
    task = build_tasks(data, tokenizer).tasks[0]
    instruction = task.messages[-1]["content"].split("\n\n", 1)[1]
    assert chat.task.messages[-1]["content"] == f"What is 9 + 9?\n\n{instruction}"  # same instruction as RL prompts
    assert chat.response == "#### 18"


def test_malformed_expert_rows_fail_in_bulk_naming_the_key_and_row(tmp_path, tokenizer):
    rows = [{"prompt": "What is 1 + 1?", "response": "#### 2"}, {"prompt": "What is 2 + 2?", "response": "  "},
            {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(DataConfigError, match=r"expert.max_bad_fraction: 2 of 3 rows .* the first is row #1 \(bad.jsonl line 2\): empty_response"):
        build_expert_set(ExpertConfig(path=write_jsonl(tmp_path / "bad.jsonl", rows)), DataConfig(), tokenizer)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs the benchmark data beside the project")
def test_builtin_worked_solutions_for_gsm8k_and_math(tokenizer):
    gsm = DataConfig(type="gsm8k", path=str(SHARED_DATA), limit=3)
    expert = build_expert_set(ExpertConfig(), gsm, tokenizer, build_tasks(gsm, tokenizer).tasks)
    first = expert.examples[0].response
    assert "<<" not in first and first.endswith("#### 72") and "48/2 = 24 clips" in first
    math_data = DataConfig(type="math", path=str(SHARED_DATA), split="test", limit=3)
    expert = build_expert_set(ExpertConfig(), math_data, tokenizer, build_tasks(math_data, tokenizer, split="test").tasks)
    assert all("\\boxed" in e.response for e in expert.examples)


# ------------------------------------------------------------------------------ the loop

TINY = ["model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "rollout.max_new_tokens=8", "logging.progress=false",
        "logging.tensorboard=false", "eval.benches=[]", "checkpoint.every=0", "data.num_train=8", "train.micro_batch_size=4"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sft_preset_never_generates_and_its_loss_falls(tmp_path, monkeypatch):
    from llmrl.loop import train
    from llmrl.rollout.hf import HFRolloutEngine

    calls = []
    original = HFRolloutEngine.generate
    monkeypatch.setattr(HFRolloutEngine, "generate", lambda self, *a, **k: calls.append(len(a[0])) or original(self, *a, **k))
    recipe = load_recipe(str(REPO / "recipes" / "arith_sft.yaml"), TINY + ["train.steps=4", "train.lr=1e-3", f"output_dir={tmp_path}"])
    rows = read_metrics(train(recipe))
    assert calls == [], "an SFT step must not generate"
    assert all(r["chord/expert_rows"] == 8 and r["chord/mu"] == 1.0 and r["actor/updates"] == 1 for r in rows)
    assert "reward/mean" not in rows[0] and rows[0]["data/expert_kept"] == 8
    losses = [r["chord/sft_loss"] for r in rows]  # the same 8 demonstrations every step
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_chord_loop_logs_its_parts_and_resumes_exactly(tmp_path):
    from llmrl.loop import train

    # every row trained, so the on-policy entropy covers all samples (the default skips zero-advantage rows)
    common = TINY + ["algorithm.name=chord", "train.lr=1e-3", "checkpoint.every=2", "train.mini_batch_size=4", "train.skip_zero_advantage_rows=false"]
    straight = read_metrics(train(load_recipe(None, common + ["train.steps=3", f"output_dir={tmp_path / 'a'}"])))
    train(load_recipe(None, common + ["train.steps=2", f"output_dir={tmp_path / 'b'}"]))
    resumed = read_metrics(train(load_recipe(None, common + ["train.steps=3", f"output_dir={tmp_path / 'b'}", "resume=auto"])))
    first = straight[0]
    assert first["chord/expert_rows"] == 2 and first["chord/mu"] == pytest.approx(0.1)  # ceil(0.25 x 8 samples)
    assert first["actor/updates"] == 2  # mini-batches of 4 samples, each with one expert row
    assert 0 < first["chord/phi_mean"] <= 0.25 and first["chord/entropy_expert"] > 0 and first["chord/entropy_policy"] > 0
    # rollout logprobs are read for sampled rows only: the tiny model's bf16-rollout gap is ~0.2 a
    # token, while an expert row's zeros against its logprobs (~ -7) would add several nats
    assert first["rollout/logprob_diff"] < 1.0
    dumped = [json.loads(line) for line in (tmp_path / "a" / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert len(dumped) == 8 and not any(d["task_id"].startswith("expert") for d in dumped)
    for ra, rb in zip(straight, resumed):
        for key in ("reward/mean", "actor/loss", "actor/grad_norm", "chord/sft_loss", "chord/phi_mean"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)

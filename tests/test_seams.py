"""The seams later parts plug into: the Registry helper, reward channels and expert rows, workflows
with a context, stages, the TrainEngine protocol, and the weight-sync object."""
import inspect

import pytest
import torch

from llmrl.algorithms import ADVANTAGES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.advantages import compute_advantages
from llmrl.algorithms.base import AdvantageInputs, reward_channels, total_token_rewards
from llmrl.batch import collate
from llmrl.registry import Registry, UnknownNameError
from llmrl.stages import active_stage_names
from llmrl.types import GroupIds, RewardEntry, Span, Task, Trajectory

# ------------------------------------------------------------------------------ Registry


def test_registry_registers_once_suggests_and_lists():
    things = Registry("thing")

    @things.register("alpha")
    def alpha():
        return 1

    things.register("beta", lambda: 2, requirement=lambda: "needs the beta package")
    assert things.names() == ["alpha", "beta"] and "alpha" in things and len(things) == 2
    assert things["alpha"] is alpha
    things.register("alpha", alpha)  # the same function again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="'alpha' is already registered"):
        things.register("alpha", lambda: 3)
    with pytest.raises(UnknownNameError, match=r"unknown thing 'alpah' \(known: alpha, beta\); did you mean 'alpha'\?"):
        things["alpah"]
    with pytest.raises(KeyError):  # mapping code catching KeyError keeps working
        things["gamma"]
    assert things.get("gamma") is None
    assert things.unavailable("alpha") is None
    assert things.unavailable("beta") == "needs the beta package"
    assert things.unavailable("gamma").startswith("unknown thing 'gamma'")


def test_registry_loader_runs_once_on_first_lookup_and_again_after_a_failure():
    calls = []

    def loader():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("optional dependency missing")
        lazy.register("late", object())

    lazy = Registry("lazy part", loader=loader)
    with pytest.raises(ImportError):
        lazy.names()
    assert lazy.names() == ["late"] and lazy.names() == ["late"]
    assert len(calls) == 2


def test_two_equal_looking_instances_are_a_clash_not_a_re_registration():
    from llmrl.algorithms.presets import AlgorithmPreset

    presets = Registry("algorithm")
    presets.register("x", AlgorithmPreset("single_turn", "grpo", "ppo_clip"))
    presets.register("x", AlgorithmPreset("single_turn", "grpo", "ppo_clip"))  # equal: harmless
    with pytest.raises(ValueError, match="already registered"):
        presets.register("x", AlgorithmPreset("single_turn", "rloo", "ppo_clip"))


# ------------------------------------------------------------------------------ reward channels


def trajectory(prompt_len, response_len, group_id=0, expert=False):
    task = Task(task_id=f"t{group_id}", messages=[], prompt_ids=list(range(1, prompt_len + 1)))
    n = prompt_len + response_len
    return Trajectory(
        task=task, token_ids=list(range(1, n + 1)), spans=[Span("prompt", 0, prompt_len), Span("policy", prompt_len, n)],
        rollout_logprobs=[0.0] * n, finish_reason="stop", group_id=group_id, expert=expert,
    )


def test_collate_writes_each_reward_channel_at_its_positions():
    a, b = trajectory(2, 3), trajectory(2, 0)  # b: an empty response
    a.set_outcome(1.0, {"acc": 1.0})
    a.rewards.append(RewardEntry(position=3, channel="turn", value=0.25))
    b.reward = -1.0  # the property writes the outcome entry
    assert (a.reward, b.reward, a.reward_parts) == (1.0, -1.0, {"acc": 1.0})
    batch = collate([a, b], pad_id=0)
    assert sorted(reward_channels(batch)) == ["outcome", "turn"]
    assert batch["rewards/outcome"].tolist() == [[0, 0, 0, 0, 1.0], [0, -1.0, 0, 0, 0]]  # b's sits on its last token
    assert batch["rewards/turn"].tolist() == [[0, 0, 0, 0.25, 0], [0, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert total_token_rewards(reward_channels(batch)).tolist() == [[0, 0, 0, 0.25, 1.0], [0, -1.0, 0, 0, 0]]
    a.set_outcome(0.5)  # replacing the outcome keeps the other channels and the parts
    assert a.reward == 0.5 and len(a.rewards) == 2 and a.reward_parts == {"acc": 1.0}


def test_span_weight_scales_the_loss_mask_and_guidance_is_never_trained():
    t = trajectory(2, 2)
    t.token_ids += [7, 8]
    t.rollout_logprobs += [0.0, 0.0]
    t.spans = [Span("prompt", 0, 2), Span("guidance", 2, 4, weight=1.0), Span("policy", 4, 6, weight=0.5)]
    assert t.policy_mask == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    assert t.last_policy_position == 5 and t.prompt_len == 2


def test_expert_rows_stay_out_of_group_statistics_and_get_zero_advantage():
    """GRPO on the group [1, 0] gives +-1/sqrt(2) (unbiased std 0.7071); an expert row with score 5
    in the same group must change nothing and get advantage 0."""
    cfg = resolve_algorithm(AlgorithmConfig(name="grpo"))
    mask = torch.ones(3, 2)
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 5.0]])
    inputs = AdvantageInputs.outcome(rewards, mask, torch.tensor([0, 0, 0]), cfg, expert_mask=torch.tensor([False, False, True]))
    adv, _ = compute_advantages(ADVANTAGES["grpo"], inputs)
    expected = 0.5 / (0.5**0.5 + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([[expected] * 2, [-expected] * 2, [0.0, 0.0]]))
    only_rl, _ = ADVANTAGES["grpo"](inputs.select(torch.tensor([0, 1])))
    torch.testing.assert_close(adv[:2], only_rl)
    all_expert = AdvantageInputs.outcome(rewards, mask, torch.tensor([0, 0, 0]), cfg, expert_mask=torch.ones(3, dtype=torch.bool))
    assert torch.equal(compute_advantages(ADVANTAGES["grpo"], all_expert)[0], torch.zeros(3, 2))


# ------------------------------------------------------------------------------ workflows


def test_single_turn_workflow_returns_scored_groups_with_unique_ids(tiny_path, tokenizer):
    from llmrl.models import ModelConfig
    from llmrl.reward import RewardComputer, RewardConfig
    from llmrl.rollout.base import RolloutConfig, SamplingParams, WorkflowConfig
    from llmrl.rollout.hf import HFRolloutEngine
    from llmrl.rollout.workflows import WorkflowContext, build_workflow

    engine = HFRolloutEngine(RolloutConfig(dtype="float32"), ModelConfig(name=tiny_path), tokenizer)
    workflow = build_workflow(WorkflowConfig(name="single_turn"))
    tasks = [Task(f"t{i}", [], prompt_ids=tokenizer.encode(f"What is {i} + 1?")) for i in range(2)]
    ids = GroupIds()
    rewards = RewardComputer(RewardConfig(functions=["toy_token_fraction"], num_workers=0))
    seen = []
    for step in (1, 2):
        ctx = WorkflowContext(engine, rewards, SamplingParams(max_new_tokens=4, seed=step), tokenizer, ids, step, n=3)
        groups = workflow.run(tasks, ctx)
        assert [len(g.trajectories) for g in groups] == [3, 3] and [g.task for g in groups] == tasks
        for g in groups:
            assert {t.group_id for t in g.trajectories} == {g.group_id}
            for t in g.trajectories:
                assert [e.channel for e in t.rewards] == ["outcome"] and t.rewards[0].position == t.last_policy_position
                assert "toy_token_fraction" in t.reward_parts
        seen += [g.group_id for g in groups]
    assert seen == [0, 1, 2, 3] and ids.state_dict() == {"next_id": 4}


# ------------------------------------------------------------------------------ stages


def test_stages_come_from_the_preset_and_from_options():
    def stages(**kw):
        algo = resolve_algorithm(AlgorithmConfig(**kw))
        return active_stage_names(algo)

    assert stages(name="grpo") == []
    assert stages(name="ppo") == ["critic"]
    assert stages(name="dapo") == ["dynamic_sampling"]
    assert stages(name="reinforce_pp") == []  # KL in the reward, but kl_coef 0: nothing to subtract
    assert stages(name="reinforce_pp", kl_coef=0.01) == ["kl_in_reward"]
    assert stages(name="ppo", kl_coef=0.01, mask_truncated_completions=True) == ["truncation_mask", "kl_in_reward", "critic"]


# ------------------------------------------------------------------------------ train engine protocol


def test_engines_implement_the_train_engine_protocol_with_its_signatures():
    from llmrl.train.deepspeed_engine import DeepSpeedTrainEngine
    from llmrl.train.engine import TrainEngine
    from llmrl.train.torch_engine import TorchTrainEngine

    methods = [n for n, v in vars(TrainEngine).items() if callable(v) and not n.startswith("_")]
    assert sorted(methods) == ["forward", "load", "named_weights", "save", "save_policy", "step"]
    for engine_cls in (TorchTrainEngine, DeepSpeedTrainEngine):
        for name in methods:
            want = list(inspect.signature(getattr(TrainEngine, name)).parameters)
            got = list(inspect.signature(getattr(engine_cls, name)).parameters)
            assert got == want, (engine_cls.__name__, name, got, want)


# ------------------------------------------------------------------------------ weight sync


def test_inprocess_weight_sync_moves_every_weight_and_reports_bytes(tiny_path, tokenizer):
    from llmrl.distributed.weight_sync import build_weight_sync
    from llmrl.models import ModelConfig, load_policy
    from llmrl.rollout.base import RolloutConfig
    from llmrl.rollout.hf import HFRolloutEngine
    from llmrl.train.engine import TrainConfig
    from llmrl.train.torch_engine import TorchTrainEngine

    policy = load_policy(ModelConfig(name=tiny_path))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    trainer = TorchTrainEngine(policy, TrainConfig(precision="fp32"), total_updates=1)
    engine = HFRolloutEngine(RolloutConfig(dtype="float32"), ModelConfig(name=tiny_path), tokenizer)
    assert not torch.equal(engine.model.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    sync = build_weight_sync("inprocess", trainer, [engine], bucket_bytes=1 << 20)
    sync.setup()
    stats = sync.sync(step=1)
    # every distinct tensor once: parameters() lists the tied lm_head once, as the embedding
    expected_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    assert stats.bytes == expected_bytes and stats.seconds > 0
    synced = dict(engine.model.named_parameters())
    for name, p in policy.named_parameters():
        assert torch.equal(synced[name], p), name

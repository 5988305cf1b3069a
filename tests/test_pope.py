"""POPE's guided workflow: oracle solutions, guided prompts and their masks, hard-problem
detection three ways, the prefix search, grading with or without the prefix, and the update
moving only through the policy's continuation."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from llmrl.batch import collate
from llmrl.data import build_tasks
from llmrl.data.arithmetic import solution_steps
from llmrl.data.config import DataConfig
from llmrl.reward import RewardComputer
from llmrl.reward.config import RewardConfig
from llmrl.rollout.base import SamplingParams
from llmrl.rollout.guided import Guided, GuidedOptions
from llmrl.rollout.workflows import WorkflowContext
from llmrl.types import Completion, GroupIds


class ScriptedEngine:
    """A rollout engine whose samples are a function of the prompt: for the mask and search
    tests, which check our bookkeeping, not sampling (the loop tests below use the real hf engine)."""

    def __init__(self, reply):
        self.reply = reply  # prompt ids -> list of token ids
        self.prompts = []

    def generate(self, prompt_ids, sampling):
        self.prompts += prompt_ids
        return [Completion(list(self.reply(p)), [-0.5] * len(self.reply(p)), "stop") for p in prompt_ids]


def context(engine, tokenizer, n=2, functions=("arithmetic",)):
    rewards = RewardComputer(RewardConfig(functions=list(functions), num_workers=0), default_kind="arithmetic")
    return WorkflowContext(engine, rewards, SamplingParams(max_new_tokens=8, seed=1), tokenizer, GroupIds(), 1, n)


@pytest.fixture
def tasks(tokenizer):
    return build_tasks(DataConfig(type="arithmetic", difficulty=3, num_train=4, num_test=2), tokenizer).tasks


def test_oracle_solutions_of_the_built_in_task_types(tasks):
    assert solution_steps("37 + 4 * 6 - 12") == "4 * 6 = 24\n37 + 24 = 61\n61 - 12 = 49\n#### 49"
    assert solution_steps("5 - 3") == "5 - 3 = 2\n#### 2"
    task = tasks[0]
    assert task.meta["oracle_solution"] == solution_steps(task.meta["expression"])
    assert task.meta["oracle_solution"].endswith(f"#### {task.answer}")


def test_gsm8k_and_math_oracles_and_a_generic_field(tmp_path, tokenizer):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "Two plus two?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}) + "\n")
    task = build_tasks(DataConfig(type="gsm8k", path=str(gsm)), tokenizer).tasks[0]
    assert task.meta["oracle_solution"] == "2 + 2 = <<2+2=4>>4" and task.answer == "4"
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2"}) + "\n")
    assert build_tasks(DataConfig(type="math", path=str(math)), tokenizer).tasks[0].meta["oracle_solution"] == "It is $\\boxed{2}$."
    generic = tmp_path / "g.jsonl"
    generic.write_text(json.dumps({"q": "Say hi.", "a": "hi", "worked": "First, greet."}) + "\n")
    cfg = DataConfig(type="generic", path=str(generic), fields={"prompt": "q", "answer": "a", "oracle_solution": "worked"})
    assert build_tasks(cfg, tokenizer).tasks[0].meta["oracle_solution"] == "First, greet."


def test_a_guided_copy_trains_only_its_continuation_eos_included(tasks, tokenizer):
    eos = tokenizer.eos_token_id
    engine = ScriptedEngine(lambda prompt: [11, 12, eos])
    flow = Guided(GuidedOptions(prefix_grid=[0.25], guided_copies=1))
    ctx = context(engine, tokenizer)
    flow.hard[tasks[0].task_id] = 0.25
    groups = flow.run([tasks[0]], ctx)
    unguided, guided = groups
    assert not any(t.guided for t in unguided.trajectories) and all(t.guided for t in guided.trajectories)
    assert unguided.group_id != guided.group_id  # separate GRPO groups, separate baselines
    oracle = tokenizer.encode(tasks[0].meta["oracle_solution"], add_special_tokens=False)
    prefix = oracle[: -(-len(oracle) // 4)]  # ceil(0.25 x length)
    traj = guided.trajectories[0]
    prompt_len = traj.spans[0].end
    assert traj.token_ids[prompt_len : prompt_len + len(prefix)] == prefix
    assert engine.prompts[-1] == traj.token_ids[: prompt_len + len(prefix)]  # the engine continued the prefix
    assert tokenizer.decode(traj.token_ids[:prompt_len]).count("continue it to the final answer") == 1
    batch = collate(guided.trajectories, tokenizer.pad_token_id)
    row = batch["loss_mask"][0]
    total = prompt_len + len(prefix) + 3
    assert row[:prompt_len].sum() == 0 and row[prompt_len : prompt_len + len(prefix)].sum() == 0
    assert row[prompt_len + len(prefix) : total].tolist() == [1.0, 1.0, 1.0]  # the continuation, its EOS included
    assert batch["rollout_logprobs"][0, prompt_len + len(prefix) : total].tolist() == [-0.5] * 3
    assert traj.guidance_text == tokenizer.decode(prefix, skip_special_tokens=True)


def test_the_prefix_is_the_shortest_grid_fraction_with_a_correct_probe_else_the_longest(tasks, tokenizer):
    task = tasks[0]
    oracle = tokenizer.encode(task.meta["oracle_solution"], add_special_tokens=False)
    answer = tokenizer.encode(f"#### {task.answer}", add_special_tokens=False)

    def solves_from_half(prompt):  # correct only when at least half the oracle is already given
        shown = next((k for k in range(len(oracle), 0, -1) if prompt[-k:] == oracle[:k]), 0)
        return answer if shown >= len(oracle) / 2 else [11]

    flow = Guided(GuidedOptions(prefix_grid=[0.25, 0.5, 0.75], probe_samples=2))
    flow.hard[task.task_id] = None
    flow._search_prefixes([task], context(ScriptedEngine(solves_from_half), tokenizer))
    assert flow.hard[task.task_id] == 0.5
    never = Guided(GuidedOptions(prefix_grid=[0.25, 0.5, 0.75], probe_samples=2))
    never.hard[task.task_id] = None
    engine = ScriptedEngine(lambda prompt: [11])
    never._search_prefixes([task], context(engine, tokenizer))
    assert never.hard[task.task_id] == 0.75  # none works: the longest
    assert len(engine.prompts) == 3 * 2  # every grid entry probed with probe_samples samples


@pytest.mark.parametrize("grade_with_prefix, reward", [(False, 0.0), (True, 1.0)])
def test_grading_with_or_without_the_prefix(tasks, tokenizer, grade_with_prefix, reward):
    """A prefix that holds the whole oracle (answer line included) and a continuation that only
    stops: graded alone, the continuation earns nothing; graded with the prefix, the oracle's
    answer is credited. The default (False) keeps the reward for what the policy wrote."""
    flow = Guided(GuidedOptions(prefix_grid=[1.0], grade_with_prefix=grade_with_prefix))
    flow.hard[tasks[0].task_id] = 1.0
    groups = flow.run([tasks[0]], context(ScriptedEngine(lambda p: [tokenizer.eos_token_id]), tokenizer))
    assert [t.reward for t in groups[1].trajectories] == [reward, reward]
    assert GuidedOptions().grade_with_prefix is False


def test_hard_problems_from_an_eval_per_item_file(tmp_path, tasks, tokenizer):
    per_item = tmp_path / "per_item.jsonl"
    rows = [{"task_id": tasks[0].task_id, "num_correct": 0, "n": 8}, {"task_id": tasks[1].task_id, "num_correct": 3, "n": 8},
            {"task_id": "elsewhere", "num_correct": 0, "n": 8}]
    per_item.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flow = Guided(GuidedOptions(hard_from="offline", hard_file=str(per_item), prefix_grid=[0.25], probe_samples=1))
    flow.start(tasks, context(ScriptedEngine(lambda p: [11]), tokenizer))
    assert flow.hard == {tasks[0].task_id: 0.25} and flow.easy == {tasks[1].task_id}
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"task_id": "elsewhere", "num_correct": 0}) + "\n")
    with pytest.raises(ValueError, match="none of .*other.jsonl's 1 task ids is a training task"):
        Guided(GuidedOptions(hard_from="offline", hard_file=str(other))).start(tasks, context(ScriptedEngine(lambda p: [11]), tokenizer))


def test_hard_problems_from_a_start_of_run_probe(tasks, tokenizer):
    solved = {tasks[1].task_id}
    by_prompt = {tuple(t.prompt_ids): t for t in tasks}

    def reply(prompt):
        task = by_prompt.get(tuple(prompt))
        return tokenizer.encode(f"#### {task.answer}", add_special_tokens=False) if task and task.task_id in solved else [11]

    flow = Guided(GuidedOptions(hard_from="probe", prefix_grid=[0.25], probe_samples=3))
    flow.start(tasks, context(ScriptedEngine(reply), tokenizer))
    assert set(flow.hard) == {t.task_id for t in tasks} - solved and flow.easy == solved
    assert all(fraction == 0.25 for fraction in flow.hard.values())
    state = flow.state_dict()
    resumed = Guided(GuidedOptions(hard_from="probe", prefix_grid=[0.25], probe_samples=3))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    engine = ScriptedEngine(reply)
    resumed.start(tasks, context(engine, tokenizer))
    assert resumed.hard == flow.hard and not engine.prompts  # restored: no second probe


def test_online_a_group_with_no_correct_sample_makes_its_problem_hard(tasks, tokenizer):
    flow = Guided(GuidedOptions(prefix_grid=[0.25], probe_samples=1))
    ctx = context(ScriptedEngine(lambda p: [11]), tokenizer)
    first = flow.run(tasks[:2], ctx)
    assert len(first) == 2 and not any(t.guided for g in first for t in g.trajectories)  # nothing known yet
    assert set(flow.hard) == {tasks[0].task_id, tasks[1].task_id}
    second = flow.run(tasks[:2], replace(ctx, step=2))
    assert [any(t.guided for t in g.trajectories) for g in second] == [False, False, True, True]
    metrics = flow.metrics()
    assert metrics["pope/hard_frac"] == 1.0 and metrics["pope/prefix_frac_mean"] == 0.25
    assert metrics["pope/guided_solve_rate"] == 0.0 and metrics["pope/nonzero_adv_frac_guided"] == 0.0


def test_a_problem_without_an_oracle_is_trained_but_never_guided(tasks, tokenizer):
    bare = replace(tasks[0], meta={})
    flow = Guided(GuidedOptions(prefix_grid=[0.25]))
    flow.hard[bare.task_id] = None
    groups = flow.run([bare], context(ScriptedEngine(lambda p: [11]), tokenizer))
    assert len(groups) == 1 and flow.metrics()["pope/no_oracle"] == 1.0


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"prefix_grid fraction must be in \(0, 1\]"):
        GuidedOptions(prefix_grid=[0.0, 0.25])
    with pytest.raises(ValueError, match="hard_file is required with hard_from: offline"):
        GuidedOptions(hard_from="offline")
    assert GuidedOptions(prefix_grid=[0.25, 0.0625, 0.25]).prefix_grid == [0.0625, 0.25]


# ---------------------------------------------------------------- mechanics on the real loop

def oracle_reached(completion: str, task, trajectory) -> float:
    """Reachable only with guidance: 1 + the policy tokens' mean id mod 97, scaled into [0, 1),
    when the graded text holds the oracle's first six characters (which the random tiny model
    never writes), else 0. The fractional part varies between samples, so guided groups learn.
    (The share of even ids, used before, tied a whole group once: all four samples of 8 tokens
    had 4 even ids, a chance of about 1% per group.)"""
    if task.meta["oracle_solution"][:6] not in completion:
        return 0.0
    policy = [tok for s in trajectory.spans if s.role == "policy" for tok in trajectory.token_ids[s.start : s.end]]
    return 1.0 + sum(tok % 97 for tok in policy) / (97 * max(len(policy), 1))


@pytest.fixture
def oracle_reward():
    from llmrl.reward.registry import REWARDS, register_reward

    register_reward("oracle_reached")(oracle_reached)
    yield
    REWARDS.unregister("oracle_reached")


MECHANICS = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "logging.progress=false", "eval.benches=[]", "data.num_train=4", "rollout.workflow.probe_samples=2",
    "rollout.workflow.prefix_grid=[0.5]", "rollout.workflow.grade_with_prefix=true", "reward.functions=[oracle_reached]",
    "reward.num_workers=0", "train.lr=1e-3", "checkpoint.every=1", "logging.tensorboard=false",
]


def test_guided_groups_learn_where_unguided_ones_cannot(tmp_path, oracle_reward):
    from llmrl.loop import train
    from llmrl.recipe import load_recipe
    from test_e2e import REPO, read_metrics

    rows = read_metrics(train(load_recipe(str(REPO / "recipes" / "arith_pope.yaml"), MECHANICS + ["train.steps=2", f"output_dir={tmp_path}"])))
    for row in rows:
        assert row["pope/hard_frac"] == 1.0 and row["pope/unguided_hard_solve_rate"] == 0.0
        assert row["pope/nonzero_adv_frac_unguided"] == 0.0  # all-zero groups: nothing to learn
        assert row["pope/guided_solve_rate"] == 1.0 and row["pope/nonzero_adv_frac_guided"] == 1.0
        assert row["actor/grad_norm"] > 0 and row["pope/prefix_frac_mean"] == 0.5
    dump = [json.loads(line) for line in (tmp_path / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    guided = [d for d in dump if d.get("guided")]
    assert len(guided) == len(dump) / 2 and all(d["guidance"] and d["completion"].startswith(d["guidance"]) for d in guided)


def test_a_resumed_run_guides_with_the_same_prefixes(tmp_path, oracle_reward):
    from llmrl.loop import train
    from llmrl.recipe import load_recipe
    from test_e2e import REPO, read_metrics

    recipe = str(REPO / "recipes" / "arith_pope.yaml")
    grid = ["rollout.workflow.prefix_grid=[0.25, 0.5, 0.75]"]
    straight = read_metrics(train(load_recipe(recipe, MECHANICS + grid + ["train.steps=2", f"output_dir={tmp_path / 'a'}"])))
    train(load_recipe(recipe, MECHANICS + grid + ["train.steps=1", f"output_dir={tmp_path / 'b'}"]))
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_1" / "loop_state.json").read_text())["workflow"]
    assert set(state["hard"]) and all(f in (0.25, 0.5, 0.75) for f in state["hard"].values())
    resumed = read_metrics(train(load_recipe(recipe, MECHANICS + grid + ["train.steps=2", "resume=auto", f"output_dir={tmp_path / 'b'}"])))
    assert resumed[-1]["pope/probe_samples"] == 0.0  # no second probe: the prefixes came back
    for key in ("pope/prefix_frac_mean", "pope/hard_known", "reward/mean", "actor/loss"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], abs=1e-6), key


def test_the_prefix_adds_exactly_nothing_to_the_gradient(tasks, tokenizer, oracle_reward):
    """Guided rows sampled by the real hf engine on the tiny model. Changing anything the loss
    could read at guidance positions (advantages, old and rollout logprobs) leaves every
    gradient bit-identical; training the guidance tokens (mask 1 there) would change them."""
    from llmrl.algorithms import ADVANTAGES, LOSSES, AlgorithmConfig, resolve_algorithm
    from llmrl.algorithms.advantages import compute_advantages
    from llmrl.algorithms.base import AdvantageInputs, LossContext
    from llmrl.models import ModelConfig, load_policy
    from llmrl.rollout.base import RolloutConfig, build_rollout_engine
    from llmrl.train.engine import TrainConfig
    from llmrl.train.torch_engine import TorchTrainEngine

    engine = build_rollout_engine(RolloutConfig(dtype="float32"), ModelConfig(name="tiny"), tokenizer)
    flow = Guided(GuidedOptions(prefix_grid=[0.5], grade_with_prefix=True))
    flow.hard[tasks[0].task_id] = 0.5
    groups = flow.run([tasks[0]], context(engine, tokenizer, n=4, functions=("oracle_reached",)))
    guided = [t for g in groups for t in g.trajectories if t.guided]
    batch = collate(guided, tokenizer.pad_token_id)
    algo = resolve_algorithm(AlgorithmConfig())
    batch["advantages"], _ = compute_advantages(ADVANTAGES["grpo"], AdvantageInputs.from_batch(batch, algo))
    assert batch["advantages"].abs().sum() > 0
    guidance = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    for row, traj in enumerate(guided):
        span = next(s for s in traj.spans if s.role == "guidance")
        guidance[row, span.start : span.end] = True
    assert batch["loss_mask"][guidance].sum() == 0

    def grads(b):  # every call starts from the same built-in tiny weights
        trainer = TorchTrainEngine(load_policy(ModelConfig(name="tiny")), TrainConfig(lr=1e-3, grad_clip=0, precision="fp32"), total_updates=1)
        trainer._optimizer_step = lambda: None
        trainer.step({k: v.clone() for k, v in b.items()}, LOSSES["ppo_clip"], LossContext(0, algo))
        return [p.grad.clone() for p in trainer.params]

    base = grads(batch)
    poked = {k: v.clone() for k, v in batch.items()}
    poked["advantages"][guidance] = 1e3
    poked["rollout_logprobs"][guidance] = -7.0
    assert all(torch.equal(a, b) for a, b in zip(base, grads(poked)))
    trained = {k: v.clone() for k, v in batch.items()}
    trained["loss_mask"][guidance] = 1.0
    trained["advantages"][guidance] = 1.0
    assert any(not torch.equal(a, b) for a, b in zip(base, grads(trained)))


def test_offline_hard_problems_from_llmrl_eval_on_the_training_split(tmp_path, tasks, tokenizer):
    """`llmrl eval --split train --n K` writes per_item.jsonl with the training task ids; every
    problem with 0 correct of K is hard (the random tiny model solves none)."""
    import subprocess
    import sys

    out = tmp_path / "eval"
    done = subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "eval", "--model", "tiny", "--bench", "arithmetic", "--split", "train", "--n", "2",
         "--limit", "4", "--max-new-tokens", "4", "--data-option", "arithmetic.difficulty=3", "--reward-workers", "0",
         "--no-progress", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    per_item = next(out.rglob("per_item.jsonl"))
    rows = [json.loads(line) for line in per_item.read_text().splitlines()]
    assert sorted(r["task_id"] for r in rows) == sorted(t.task_id for t in tasks)
    flow = Guided(GuidedOptions(hard_from="offline", hard_file=str(per_item), prefix_grid=[0.25], probe_samples=1))
    flow.start(tasks, context(ScriptedEngine(lambda p: [11]), tokenizer))
    assert set(flow.hard) == {r["task_id"] for r in rows if r["num_correct"] == 0} == {t.task_id for t in tasks}


def test_no_guided_copies_is_grpo_on_the_same_pool(tasks, tokenizer):
    """guided_copies: 0 samples only the unguided groups and searches no prefix: the comparison
    baseline of bench/pope_vs_grpo.py."""
    engine = ScriptedEngine(lambda p: [11])
    flow = Guided(GuidedOptions(guided_copies=0, include_easy=False))
    flow.hard = {tasks[0].task_id: None, tasks[1].task_id: None}
    flow.easy = {tasks[2].task_id}
    groups = flow.run(tasks[:3], context(engine, tokenizer))
    assert [g.task.task_id for g in groups] == [tasks[0].task_id, tasks[1].task_id]  # the easy one dropped
    assert len(engine.prompts) == 2 * 2 and not any(t.guided for g in groups for t in g.trajectories)
    assert flow.metrics()["pope/hard_frac"] == 2 / 3

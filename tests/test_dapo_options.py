"""DAPO's batch options wired into the loop: dynamic sampling, overlong shaping, truncation masking."""
import json
from pathlib import Path

import pytest

from llmrl.algorithms import AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.dapo import GroupFilter, reward_config_with_overlong
from llmrl.loop import train
from llmrl.recipe import load_recipe
from llmrl.reward import RewardConfig
from llmrl.types import Group, Span, Task, Trajectory

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]", "checkpoint.every=0", "reward.num_workers=0",
]


def scored(group_id, rewards, acc=None):
    task = Task(task_id=f"t{group_id}", messages=[], prompt_ids=[1, 2], answer="0")
    out = []
    for i, r in enumerate(rewards):
        spans = [Span("prompt", 0, 2), Span("policy", 2, 3)]
        t = Trajectory(task=task, token_ids=[1, 2, 3], spans=spans, rollout_logprobs=[0.0] * 3, finish_reason="stop", group_id=group_id)
        t.reward = r
        t.reward_parts = {} if acc is None else {"acc": acc[i]}
        out.append(t)
    return [Group(group_id, task, out)]


def test_group_filter_keeps_varied_groups_up_to_the_wanted_count():
    f = GroupFilter(wanted_groups=2, metric="acc")
    f.add(scored(0, [1, 1], acc=[1, 1]) + scored(1, [0, 1], acc=[0, 1]))  # group 0 all equal on acc
    assert not f.full and f.kept_groups == 1
    f.add(scored(2, [0, 0.3]) + scored(3, [1, 0]))  # no acc part: falls back to the score; both vary
    assert f.full
    groups, metrics = f.result()
    trajectories = [t for g in groups for t in g.trajectories]
    assert sorted({t.group_id for t in trajectories}) == [1, 2]  # the surplus group 3 is trimmed
    assert metrics == {"sampling/rounds": 2.0, "sampling/groups_generated": 4.0, "sampling/groups_dropped": 1.0, "sampling/groups_trained": 2.0,
                       "sampling/groups_surplus": 1.0, "sampling/groups_fallback": 0.0}


def adds_up(metrics):
    return metrics["sampling/groups_generated"] == (
        metrics["sampling/groups_trained"] + metrics["sampling/groups_dropped"] + metrics["sampling/groups_surplus"]
    )


def test_group_counters_add_up_when_the_last_round_is_cut():
    # Worked example, 3 groups wanted (metric acc):
    #   round 1: g0 [1,1] same -> dropped, g1 [0,1] varies -> trained, g2 [0,0] same -> dropped
    #   round 2: g3 [1,0], g4 [0,1], g5 [0,1] vary, g6 [1,1] same -> dropped; room for 2 of the
    #            3 varied groups: g3, g4 trained, g5 cut as surplus
    #   generated 7 = trained 3 (g1 g3 g4) + dropped 3 (g0 g2 g6) + surplus 1 (g5)
    f = GroupFilter(wanted_groups=3, metric="acc")
    f.add(scored(0, [1, 1], acc=[1, 1]) + scored(1, [0, 1], acc=[0, 1]) + scored(2, [0, 0], acc=[0, 0]))
    f.add(scored(3, [1, 0], acc=[1, 0]) + scored(4, [0, 1], acc=[0, 1]) + scored(5, [0, 1], acc=[0, 1]) + scored(6, [1, 1], acc=[1, 1]))
    groups, metrics = f.result()
    assert [g.group_id for g in groups] == [1, 3, 4]
    assert metrics == {"sampling/rounds": 2.0, "sampling/groups_generated": 7.0, "sampling/groups_trained": 3.0,
                       "sampling/groups_dropped": 3.0, "sampling/groups_surplus": 1.0, "sampling/groups_fallback": 0.0}
    assert adds_up(metrics)


def test_group_filter_with_nothing_kept_returns_the_last_round():
    f = GroupFilter(wanted_groups=1, metric="acc")
    f.add(scored(0, [0, 0]))
    f.add(scored(1, [0, 0]))
    groups, metrics = f.result()
    trajectories = [t for g in groups for t in g.trajectories]
    assert {t.group_id for t in trajectories} == {1} and metrics["sampling/groups_trained"] == 0.0
    # the round cap came with nothing kept: the last round (1 group) is in the batch, counted as dropped
    assert (metrics["sampling/groups_dropped"], metrics["sampling/groups_fallback"]) == (2.0, 1.0) and adds_up(metrics)


def test_overlong_shaping_adds_the_penalty_after_the_task_reward():
    algo = resolve_algorithm(AlgorithmConfig(name="dapo"))
    cfg = reward_config_with_overlong(RewardConfig(), algo, max_new_tokens=32, data_kind="arithmetic")
    specs = cfg.function_specs()
    assert [s.fn for s in specs] == ["arithmetic", "overlong"]
    assert specs[1].kwargs == {"max_len": 32, "buffer_len": 6, "penalty_factor": 1.0}
    plain = resolve_algorithm(AlgorithmConfig(name="grpo"))
    assert reward_config_with_overlong(RewardConfig(), plain, 32, "arithmetic") == RewardConfig()
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        reward_config_with_overlong(RewardConfig(), algo.model_copy(update={"overlong_buffer_len": 64}), 32, "arithmetic")


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dynamic_sampling_trains_only_groups_whose_reward_varies(tmp_path):
    reward = f"reward.functions=[{REPO / 'tests' / 'half_constant_reward.py'}:half_constant]"
    recipe = load_recipe(QUICKSTART, TINY + [reward, "algorithm.dynamic_sampling=true", "algorithm.max_num_gen_batches=6",
                                             "train.steps=2", f"output_dir={tmp_path}"])
    rows = read_metrics(train(recipe))
    for row in rows:
        assert row["sampling/groups_trained"] == 2
        assert row["sampling/groups_generated"] == row["sampling/rounds"] * 2
        assert adds_up(row)
        step_rollouts = [json.loads(l) for l in (tmp_path / "rollouts" / f"step_{row['step']}.jsonl").read_text().splitlines()]
        assert len(step_rollouts) == 8
        assert all(int(r["task_id"].rsplit("-", 1)[-1]) % 2 == 1 for r in step_rollouts)  # no constant group trained
    assert sum(row["sampling/groups_dropped"] for row in rows) > 0


@pytest.mark.slow
def test_dynamic_sampling_stops_at_the_round_cap(tmp_path):
    # The random tiny model never solves arithmetic: every group is all-zero and is dropped.
    recipe = load_recipe(QUICKSTART, TINY + ["algorithm.dynamic_sampling=true", "algorithm.max_num_gen_batches=2",
                                             "train.steps=1", f"output_dir={tmp_path}"])
    (row,) = read_metrics(train(recipe))
    assert (row["sampling/rounds"], row["sampling/groups_trained"], row["sampling/groups_dropped"]) == (2, 0, 4)
    assert row["sampling/groups_fallback"] == 2 and adds_up(row)
    assert row["actor/rows_trained_frac"] == 0.0


@pytest.mark.slow
def test_dapo_preset_logs_overlong_penalty_and_masks_truncated_rows(tmp_path):
    recipe = load_recipe(QUICKSTART, TINY + ["algorithm.name=dapo", "algorithm.dynamic_sampling=false",
                                             "algorithm.mask_truncated_completions=true", "train.steps=1", f"output_dir={tmp_path}"])
    (row,) = read_metrics(train(recipe))
    rollouts = [json.loads(l) for l in (tmp_path / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    # max_new_tokens=8, buffer 8 // 5 = 1: a response of L tokens gets min(-(L - 7), 0).
    for r in rollouts:
        assert r["reward_parts"]["overlong"] == pytest.approx(min(-(r["response_tokens"] - 7), 0))
    truncated = sum(r["finish_reason"] == "length" for r in rollouts)
    assert row["response/truncated_frac"] == truncated / len(rollouts)
    if truncated == len(rollouts):  # every row masked: nothing to train
        assert row["actor/rows_trained_frac"] == 0.0

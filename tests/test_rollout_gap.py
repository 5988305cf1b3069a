"""rollout/logprob_diff: once a step, over every sampled token of the trained rows whatever the
mini-batching, and of the rows that skip the update (zero advantage) too when
train.logprob_diff_skipped_rows asks for their forward."""
import json
from pathlib import Path

import pytest
import torch

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.loop import train
from llmrl.models import ModelConfig, load_policy
from llmrl.recipe import load_recipe
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TorchTrainEngine
from llmrl.train.updates import add_policy_logprobs, run_updates

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
ROWS, WIDTH, PROMPT = 8, 10, 4


def engine_and_batch(tiny_path, mini_batch_size=None, skipped_rows=True):
    """The tiny policy and 8 rows of 6 policy tokens each, whose rollout logprobs are the
    trainer's minus 0.1 x (row + 1): row i's gap is 0.1 (i + 1) on each of its tokens."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        lr=1e-3, precision="fp32", micro_batch_size=2, mini_batch_size=mini_batch_size, logprob_diff_skipped_rows=skipped_rows
    )
    engine = TorchTrainEngine(load_policy(ModelConfig(name=tiny_path)), cfg, total_updates=10)
    g = torch.Generator().manual_seed(0)
    attn = torch.ones(ROWS, WIDTH, dtype=torch.long)
    loss_mask = torch.zeros(ROWS, WIDTH)
    loss_mask[:, PROMPT:] = 1
    batch = {
        "input_ids": torch.randint(1, 1000, (ROWS, WIDTH), generator=g), "attention_mask": attn,
        "position_ids": torch.arange(WIDTH).repeat(ROWS, 1), "loss_mask": loss_mask, "group_ids": torch.arange(ROWS) // 4,
        "expert_mask": torch.zeros(ROWS, dtype=torch.bool),
    }
    trainer = engine.forward(batch, {"logprobs"})["logprobs"]
    offsets = 0.1 * torch.arange(1, ROWS + 1, dtype=torch.float32)[:, None]
    batch["rollout_logprobs"] = (trainer - offsets) * loss_mask
    return engine, batch, cfg


def step_metrics(engine, batch, cfg, advantages):
    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    batch["advantages"] = advantages * batch["loss_mask"]
    add_policy_logprobs(batch, engine, algo, cfg, need_old=False)
    return run_updates(engine, batch, LOSSES["ppo_clip"], algo, cfg, seed=0, step=1, prefix="actor")


# Mean of 0.1 x (row + 1) over rows 1..8, each with the same 6 tokens: 0.1 x 4.5.
ALL_ROWS = 0.45


def test_gap_is_logged_when_every_row_skips_the_update(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path)
    metrics = step_metrics(engine, batch, cfg, torch.zeros(ROWS, 1))
    assert metrics["actor/rows_trained_frac"] == 0.0
    assert metrics["rollout/logprob_diff"] == pytest.approx(ALL_ROWS, abs=1e-5)


def test_gap_covers_the_rows_that_skip_the_update(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path)
    advantages = torch.tensor([0.0, 0, 0, 0, 1, -1, 1, -1])[:, None]  # the first group scored alike
    metrics = step_metrics(engine, batch, cfg, advantages)
    assert metrics["actor/rows_trained_frac"] == 0.5
    assert metrics["rollout/logprob_diff"] == pytest.approx(ALL_ROWS, abs=1e-5)  # not 0.65, the trained rows' mean


# By default the skipped rows get no forward of their own: the figure is the trained rows' alone.
def test_by_default_the_gap_covers_the_trained_rows(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path, skipped_rows=False)
    advantages = torch.tensor([0.0, 0, 0, 0, 1, -1, 1, -1])[:, None]
    metrics = step_metrics(engine, batch, cfg, advantages)
    assert metrics["actor/rows_trained_frac"] == 0.5
    assert metrics["rollout/logprob_diff"] == pytest.approx(0.65, abs=1e-5)  # mean of 0.5 .. 0.8


def test_by_default_a_step_that_trains_no_row_has_no_gap(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path, skipped_rows=False)
    calls = []
    original = engine._outputs
    engine._outputs = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    metrics = step_metrics(engine, batch, cfg, torch.zeros(ROWS, 1))
    assert metrics["actor/rows_trained_frac"] == 0.0
    assert "rollout/logprob_diff" not in metrics
    assert calls == []  # not one forward: that is what the default saves


def test_gap_covers_every_mini_batch_once(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path, mini_batch_size=2)
    advantages = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])[:, None]
    metrics = step_metrics(engine, batch, cfg, advantages)
    assert metrics["actor/updates"] == 4.0
    # measured before the first update: the later mini-batches' moved policy does not enter it
    assert metrics["rollout/logprob_diff"] == pytest.approx(ALL_ROWS, abs=1e-5)


def test_expert_rows_are_left_out_of_the_gap(tiny_path):
    engine, batch, cfg = engine_and_batch(tiny_path)
    batch["expert_mask"][4:] = True  # rows 5..8: not sampled, their rollout logprobs mean nothing
    batch["rollout_logprobs"][4:] = 0.0
    metrics = step_metrics(engine, batch, cfg, torch.zeros(ROWS, 1))
    assert metrics["rollout/logprob_diff"] == pytest.approx(0.25, abs=1e-5)  # mean of 0.1 .. 0.4


TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=6",
    "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]", "checkpoint.every=0", "reward.num_workers=0",
    "train.steps=2",
]


def gaps(tmp_path, *overrides):
    run_dir = train(load_recipe(QUICKSTART, TINY + list(overrides) + [f"output_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/std"] == 0.0 for r in rows)  # all rewards equal: every advantage is 0
    return [r["rollout/logprob_diff"] for r in rows], [r["actor/rows_trained_frac"] for r in rows]


@pytest.mark.parametrize("mini", ["8", "4"])
def test_every_step_logs_the_gap_when_all_rewards_are_equal(tmp_path, mini):
    # The random tiny model never solves arithmetic: every reward is 0. Skipping the rows (the
    # default) while measuring them must not change the figure: it equals the one measured with
    # every row trained.
    skip = [f"train.mini_batch_size={mini}", "train.logprob_diff_skipped_rows=true"]
    skipped, frac = gaps(tmp_path / "skip", *skip)
    assert frac == [0.0, 0.0]
    trained, frac = gaps(tmp_path / "all", f"train.mini_batch_size={mini}", "train.skip_zero_advantage_rows=false")
    assert frac == [1.0, 1.0]
    assert skipped == pytest.approx(trained, abs=1e-6) and min(skipped) > 0  # rollout copy in bf16 here (rollout.dtype auto), trainer in fp32


def test_a_critic_warm_up_step_logs_the_gap_too(tmp_path):
    # During the warm-up only the critic learns: no policy update runs to measure the gap, yet
    # the step logs it, equal to the one the first policy update measures on the same rollouts.
    def first_row(warmup, name):
        overrides = TINY[:-1] + ["train.steps=1", f"algorithm.critic_warmup_steps={warmup}", f"output_dir={tmp_path / name}"]
        run_dir = train(load_recipe(str(REPO / "recipes" / "arith_ppo.yaml"), overrides))
        (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return row

    warm, plain = first_row(1, "warm"), first_row(0, "plain")
    assert "actor/updates" not in warm and plain["actor/updates"] == 1
    assert warm["rollout/logprob_diff"] == pytest.approx(plain["rollout/logprob_diff"], abs=1e-6) and warm["rollout/logprob_diff"] > 0

"""What `llmrl train` trains on and where it may run: data.split, and several ranks without a controller."""
import json
import os
import subprocess
import sys
from pathlib import Path

from llmrl.loop import train
from llmrl.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
TINY = [
    "model.name=tiny", "rollout.n=2", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=4",
    "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]", "checkpoint.every=0", "reward.num_workers=0",
    "train.steps=1",
]


def rollout_task_ids(run_dir: Path, step: int) -> set[str]:
    lines = (run_dir / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
    return {json.loads(line)["task_id"] for line in lines}


def test_data_split_picks_the_prompts_training_draws(tmp_path):
    # Arithmetic task ids name their split (arith-<split>-<index>), and the two splits are disjoint.
    run_dir = train(load_recipe(QUICKSTART, TINY + ["data.split=test", f"output_dir={tmp_path}"]))
    ids = rollout_task_ids(run_dir, 1)
    assert ids and all(i.startswith("arith-test-") for i in ids), ids

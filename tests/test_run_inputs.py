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


def test_train_started_once_per_rank_is_refused_before_anything_runs(tmp_path):
    # What torchrun --nproc_per_node=2 gives each copy: two controllers would each sample, log and save.
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "train", QUICKSTART, *TINY, "train.backend=deepspeed", f"output_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("llmrl: error: WORLD_SIZE=2 in the environment")
    assert "cluster.backend=ray" in line and "docs/cluster.md" in line
    assert not run_dir.exists()

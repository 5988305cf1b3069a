"""Where metrics go: metrics.jsonl (the record), TensorBoard, wandb, console, rollout logs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from llmrl.fileio import write_atomically
from llmrl.types import Trajectory

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows past `last_step` so a resumed run never writes a step twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if (row := _row(line)) is not None and row.get("step", -1) <= last_step]
    write_atomically(path, "".join(line + "\n" for line in kept))


def _row(line: str) -> dict | None:
    """A metrics row, or None for a blank line or the torn last line of a crash mid-write."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class Tracker:
    def __init__(self, run_dir: Path, cfg: Any, recipe_dict: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.metrics_path = run_dir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                print("logging.wandb is on but wandb is not installed (pip install wandb); skipping wandb", file=sys.stderr)
            else:
                self._wandb = wandb.init(project=cfg.wandb_project, config=recipe_dict, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_rollouts(self, step: int, trajectories: list[Trajectory]) -> None:
        if not self.cfg.rollouts_every or step % self.cfg.rollouts_every:
            return
        out = self.run_dir / "rollouts"
        out.mkdir(exist_ok=True)
        with (out / f"step_{step}.jsonl").open("w") as f:
            for t in trajectories:
                row = {
                    "task_id": t.task.task_id,
                    "group": t.group_id,
                    "prompt": t.task.messages[-1]["content"] if t.task.messages else "",
                    "completion": t.completion_text,
                    "answer": t.task.answer,
                    "reward": t.reward,
                    "reward_parts": t.reward_parts,
                    "advantage": t.advantage,
                    "finish_reason": t.finish_reason,
                    "response_tokens": t.num_policy_tokens,
                }
                if t.guided:
                    row["guided"], row["guidance"] = True, t.guidance_text
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

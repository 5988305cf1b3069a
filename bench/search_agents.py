"""Held-out evaluation of search agents on the built-in multi-hop task, and the GRPO-vs-IGPO comparison.

Evaluate models (greedy, the multi-hop test split: 180 questions about people never seen in training):
    python bench/search_agents.py eval --model smollm2-135m --model runs/search_sft/checkpoints/step_4/policy
For each model it prints, with the search tool: F1, exact-match accuracy, answer rate, tool-use
rate, turns per episode; and without it (one turn, the question alone, told to answer in
<answer> tags): F1 and accuracy. The second column shows the questions cannot be answered from
memory; the first, whether the agent uses the tool.

Compare GRPO and IGPO from the same warm start, same seed and budget (runs one after the other):
    python bench/search_agents.py compare --steps 24 [--set key=value ...]
trains recipes/search_sft.yaml (unless its checkpoint exists), then search_grpo.yaml and
search_igpo.yaml, evaluates all three, and prints the table and the per-run training figures
(non-zero-advantage group fractions, tool use, time share of the information-gain scoring).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NO_TOOL_INSTRUCTION = "Answer the question. Write the answer as <answer>answer</answer>."


def evaluate(model: str, limit: int | None, max_turns: int, topk: int, temperature: float = 0.0, n: int = 1) -> dict[str, float]:
    """Greedy by default; with temperature > 0, n samples per question, and the share of
    questions whose samples' F1 differ (the groups GRPO's outcome reward can learn from)."""
    from llmrl.data.builtin import build_tasks
    from llmrl.data.config import DataConfig
    from llmrl.models import ModelConfig, load_tokenizer
    from llmrl.reward import RewardComputer
    from llmrl.reward.config import RewardConfig
    from llmrl.rollout.base import RolloutConfig, SamplingParams, build_rollout_engine
    from llmrl.rollout.multi_turn import MultiTurn, MultiTurnOptions
    from llmrl.rollout.workflows import SingleTurn, WorkflowContext
    from llmrl.types import GroupIds

    tokenizer = load_tokenizer(model)
    engine = build_rollout_engine(RolloutConfig(engine="hf", max_batch_size=64), ModelConfig(name=model), tokenizer)
    rewards = RewardComputer(RewardConfig(functions=["search_f1"]))
    greedy = SamplingParams(temperature=temperature, max_new_tokens=48, seed=0)
    out: dict[str, float] = {}

    tasks = build_tasks(DataConfig(type="multihop", limit=limit), tokenizer, split="test").tasks
    workflow = MultiTurn(MultiTurnOptions(tools={"search": {"corpus": "multihop", "topk": topk}}, max_turns=max_turns, max_turn_tokens=32, max_context_tokens=512))
    started = time.perf_counter()
    groups = workflow.run(tasks, WorkflowContext(engine, rewards, greedy, tokenizer, GroupIds(), 0, n))
    trajectories = [t for g in groups for t in g.trajectories]
    m = workflow.metrics()
    out.update({
        "tool/mixed_groups": m["agent/outcome_nonzero_groups"] if n > 1 else float("nan"),
        "tool/f1": mean([t.reward_parts.get("search_f1/f1", 0.0) for t in trajectories]),
        "tool/acc": mean([t.reward_parts.get("acc", 0.0) for t in trajectories]),
        "tool/answer_rate": m["agent/answer_rate"],
        "tool/tool_use_rate": m["agent/tool_use_rate"],
        "tool/turns_mean": m["agent/turns_mean"],
        "tool/seconds": time.perf_counter() - started,
    })

    bare = build_tasks(DataConfig(type="multihop", limit=limit, instruction=NO_TOOL_INSTRUCTION), tokenizer, split="test").tasks
    groups = SingleTurn().run(bare, WorkflowContext(engine, rewards, greedy, tokenizer, GroupIds(), 0, 1))
    single = [t for g in groups for t in g.trajectories]
    out.update({
        "no_tool/f1": mean([t.reward_parts.get("search_f1/f1", 0.0) for t in single]),
        "no_tool/acc": mean([t.reward_parts.get("acc", 0.0) for t in single]),
        "no_tool/answer_rate": mean([t.reward_parts.get("search_f1/answered", 0.0) for t in single]),
    })
    rewards.close()
    return out


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def train(recipe: str, overrides: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmrl.cli", "train", str(REPO / "recipes" / recipe), *overrides], check=True, cwd=REPO)
    return time.perf_counter() - started


def training_figures(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]

    def avg(key: str) -> float:
        return mean([r[key] for r in rows if key in r])

    step_time = avg("time/step")
    return {
        "reward_first5": mean([r["reward/mean"] for r in rows[:5]]),
        "reward_last5": mean([r["reward/mean"] for r in rows[-5:]]),
        "outcome_nonzero_groups": avg("agent/outcome_nonzero_groups"),
        "igpo_nonzero_groups": avg("adv/nonzero_groups") if any("igpo/ig_mean" in r for r in rows) else float("nan"),
        "tool_use_rate": avg("agent/tool_use_rate"),
        "turns_mean": avg("agent/turns_mean"),
        "info_gain_share": avg("time/info_gain") / step_time if step_time else 0.0,
        "step_s": step_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval")
    ev.add_argument("--model", action="append", required=True)
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--n", type=int, default=1, help="samples per question (with --temperature > 0)")
    cmp = sub.add_parser("compare")
    cmp.add_argument("--steps", type=int, default=24)
    cmp.add_argument("--sft-steps", type=int, default=4)
    cmp.add_argument("--out", default="runs/search_compare")
    cmp.add_argument("--set", action="append", default=[], help="extra key=value overrides for both RL runs")
    for p in (ev, cmp):
        p.add_argument("--limit", type=int, default=None, help="held-out questions (default all 180)")
        p.add_argument("--max-turns", type=int, default=4)
        p.add_argument("--topk", type=int, default=2)
    args = parser.parse_args()

    if args.command == "eval":
        for model in args.model:
            print(model, json.dumps(evaluate(model, args.limit, args.max_turns, args.topk, args.temperature, args.n), indent=1), flush=True)
        return

    out = Path(args.out)
    sft_dir = out / "sft"
    warm = sft_dir / "checkpoints" / f"step_{args.sft_steps}" / "policy"
    walls = {}
    if not warm.exists():
        walls["sft"] = train("search_sft.yaml", [f"output_dir={sft_dir}", f"train.steps={args.sft_steps}"])
    for algo in ("grpo", "igpo"):
        walls[algo] = train(f"search_{algo}.yaml", [f"output_dir={out / algo}", f"train.steps={args.steps}", f"model.name={warm}", *args.set])
    results = {"base": evaluate("smollm2-135m", args.limit, args.max_turns, args.topk), "sft": evaluate(str(warm), args.limit, args.max_turns, args.topk)}
    for algo in ("grpo", "igpo"):
        policy = out / algo / "checkpoints" / f"step_{args.steps}" / "policy"
        results[algo] = {**evaluate(str(policy), args.limit, args.max_turns, args.topk), **training_figures(out / algo), "train_wall_s": walls[algo]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    keys = ["tool/f1", "tool/acc", "tool/answer_rate", "tool/tool_use_rate", "tool/turns_mean", "no_tool/f1", "no_tool/acc"]
    print("| model | " + " | ".join(keys) + " |")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    train_keys = ["reward_first5", "reward_last5", "outcome_nonzero_groups", "igpo_nonzero_groups", "tool_use_rate", "turns_mean", "info_gain_share", "step_s", "train_wall_s"]
    print("| run | " + " | ".join(train_keys) + " |")
    for algo in ("grpo", "igpo"):
        print(f"| {algo} | " + " | ".join(f"{results[algo][k]:.3f}" for k in train_keys) + " |")
    print("wall:", {k: round(v) for k, v in walls.items()})


if __name__ == "__main__":
    main()

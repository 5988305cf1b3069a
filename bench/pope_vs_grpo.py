"""POPE against GRPO on the same hard-problem pool, side by side in one run on this machine.

    python bench/pope_vs_grpo.py [--steps 30] [--out runs/pope_vs_grpo]

1. The base model (SmolLM2) samples K=8 answers to every problem of the training pool
   (`llmrl eval --split train --n 8`); a problem with 0 of 8 correct is hard. That file is both
   runs' `hard_file`, and both train on the hard problems only (`include_easy: false`).
2. GRPO: recipes/arith_pope.yaml with `guided_copies: 0` (the guided workflow then samples only
   the unguided groups: GRPO exactly) and 8 prompts per step.
   POPE: the same recipe with `guided_copies: 1` and 4 prompts per step, so both runs draw the
   same number of samples per step (8 x 8 = 4 x (8 + 8)). Same seed, same step count.
3. Each final policy, and the base model, is evaluated on held-out problems of the same
   difficulty, unguided: greedy pass@1 and pass@8 at temperature 1, over the problems the base
   model never solved in 8 samples ("hard") and over all of them; and greedy pass@1 on the
   quickstart's easier arithmetic, to catch forgetting.

Prints a table and writes results.json under --out. Each step is resumable: finished parts are
read back from --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "arith_pope.yaml"


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        sys.exit(f"failed ({log}): {' '.join(cmd)}")
    return time.perf_counter() - started


def evaluate(model: str, out: Path, split: str, n: int, difficulty: int, limit: int, extra: list[str]) -> list[dict]:
    """per_item rows of `llmrl eval` (n samples per problem; greedy when n is 1)."""
    if not (out / "done").exists():
        cmd = [sys.executable, "-m", "llmrl.cli", "eval", "--model", model, "--bench", "arithmetic", "--split", split, "--n", str(n),
               "--limit", str(limit), "--max-new-tokens", "64", "--data-option", f"arithmetic.difficulty={difficulty}",
               "--reward-workers", "0", "--no-progress", "--output", str(out), *extra]
        out.mkdir(parents=True, exist_ok=True)
        run(cmd, out.with_suffix(".log"))
        (out / "done").write_text("")
    return [json.loads(line) for line in next(out.rglob("per_item.jsonl")).read_text().splitlines()]


def solved_share(rows: list[dict], ids: set[str] | None = None) -> float:
    chosen = [r for r in rows if ids is None or r["task_id"] in ids]
    return sum(r["num_correct"] > 0 for r in chosen) / max(len(chosen), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pool", type=int, default=64, help="training problems the base model is probed on")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--difficulty", type=int, default=2)
    parser.add_argument("--out", default="runs/pope_vs_grpo")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run (KEY=VALUE)")
    parser.add_argument("--pope", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE]",
                        help="a further POPE run named pope_NAME with these recipe overrides, e.g. "
                             "'wide=rollout.workflow.prefix_grid=[0.25, 0.5, 0.75]' (the overrides split on ';')")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = [f"--data-option=arithmetic.num_train={args.pool}", f"--data-option=arithmetic.num_test={args.held_out}"]

    base_train = evaluate("smollm2-135m", out / "base_train_k8", "train", 8, args.difficulty, args.pool, data)
    hard_file = next((out / "base_train_k8").rglob("per_item.jsonl"))
    print(f"training pool: {sum(r['num_correct'] == 0 for r in base_train)} of {len(base_train)} problems hard for the base model (0 of 8)")

    common = [f"data.difficulty={args.difficulty}", f"data.num_train={args.pool}", f"data.num_test={args.held_out}",
              f"train.steps={args.steps}", "rollout.workflow.hard_from=offline", f"rollout.workflow.hard_file={hard_file}",
              "rollout.workflow.include_easy=false", "eval.at_end=false", "logging.progress=false", "checkpoint.every=0", *args.set]
    variants = {"grpo": ["rollout.workflow.guided_copies=0", "train.prompts_per_step=8"],
                "pope": ["rollout.workflow.guided_copies=1", "train.prompts_per_step=4"]}
    for spec in args.pope:
        name, _, overrides = spec.partition("=")
        variants[f"pope_{name}"] = [*variants["pope"], *overrides.split(";")]
    models = {"base": ("smollm2-135m", None)}
    for name, overrides in variants.items():
        run_dir = out / f"train_{name}"
        policy = run_dir / "checkpoints" / f"step_{args.steps}" / "policy"
        seconds_file = run_dir / "wall_s"
        if not policy.exists():
            seconds = run([sys.executable, "-m", "llmrl.cli", "train", str(RECIPE), *common, *overrides, f"output_dir={run_dir}"],
                          out / f"train_{name}.log")
            seconds_file.write_text(f"{seconds:.0f}")
        models[name] = (str(policy), float(seconds_file.read_text()))

    base_test = evaluate("smollm2-135m", out / "base_test_k8", "test", 8, args.difficulty, args.held_out, data)
    hard_ids = {r["task_id"] for r in base_test if r["num_correct"] == 0}
    results = {}
    for name, (model, seconds) in models.items():
        k8 = base_test if name == "base" else evaluate(model, out / f"{name}_test_k8", "test", 8, args.difficulty, args.held_out, data)
        greedy = evaluate(model, out / f"{name}_test_greedy", "test", 1, args.difficulty, args.held_out, data)
        easy = evaluate(model, out / f"{name}_easy_greedy", "test", 1, 1, 200, [])
        results[name] = {
            "hard_pass@1_greedy": solved_share(greedy, hard_ids), "hard_pass@8": solved_share(k8, hard_ids),
            "all_pass@1_greedy": solved_share(greedy), "all_pass@8": solved_share(k8), "easy_pass@1_greedy": solved_share(easy),
            "train_wall_s": seconds,
        }
    (out / "results.json").write_text(json.dumps({"held_out_hard": len(hard_ids), "held_out": len(base_test), **results}, indent=1))
    print(f"held-out problems: {len(base_test)}, of which {len(hard_ids)} hard for the base model (0 of 8)")
    keys = list(next(iter(results.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join("-" if row[k] is None else f"{row[k]:.3f}" if k != "train_wall_s" else f"{row[k]:.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()

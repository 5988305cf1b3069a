"""GRPO, SFT-then-GRPO, CHORD-mu and CHORD-phi side by side on the arithmetic task, in one run on
this machine: the same model (SmolLM2-135M), seed, total steps and on-policy samples per step.

    python bench/chord_compare.py [--steps 30] [--sft-steps 10] [--out runs/chord_compare]

- grpo:           recipes/arith_chord.yaml with algorithm.name=grpo (no expert rows).
- sft_then_grpo:  recipes/arith_sft.yaml for --sft-steps steps (64 expert rows a step, no
                  rollouts), then GRPO from that policy for the remaining steps.
- chord_mu:       algorithm.name=chord_mu, mu cosine-decayed 0.9 -> 0.05 over the whole run (the
                  authors decay over 200 of their steps; a 30-step run would barely leave 0.9).
- chord_phi:      algorithm.name=chord (mu fixed at 0.1, tokens weighted by p(1-p)).
CHORD runs add 16 expert rows (expert_data_ratio 0.2) to the same 64 samples a step. Every run
trains every row (train.skip_zero_advantage_rows=false) so the on-policy entropy is measured over
all samples alike. Each run ends with the recipe's greedy evaluation on 200 held-out problems.

Prints a table, writes results.json and, when matplotlib is installed, entropy.png under --out.
A finished run is read back from --out, so the script can be re-run after an interruption.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHORD = REPO / "recipes" / "arith_chord.yaml"
SFT = REPO / "recipes" / "arith_sft.yaml"


def train(recipe: Path, run_dir: Path, overrides: list[str]) -> float:
    """Train unless run_dir holds a finished run; the wall seconds of the run."""
    seconds_file = run_dir / "wall_s"
    if not seconds_file.exists():
        started = time.perf_counter()
        log = run_dir.with_suffix(".log")
        with log.open("w") as f:
            cmd = [sys.executable, "-m", "llmrl.cli", "train", str(recipe), *overrides, f"output_dir={run_dir}"]
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode:
                sys.exit(f"failed ({log}): {' '.join(cmd)}")
        seconds_file.write_text(f"{time.perf_counter() - started:.0f}")
    return float(seconds_file.read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def policy_entropy(row: dict) -> float | None:
    """Entropy of the policy on its own samples: chord/entropy_policy when expert rows share the
    batch (actor/entropy would include them), else actor/entropy."""
    return row.get("chord/entropy_policy", row.get("actor/entropy"))


def mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--out", default="runs/chord_compare")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run (KEY=VALUE)")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["logging.progress=false", "train.skip_zero_advantage_rows=false", "checkpoint.every=0", *args.set]
    rl_steps = args.steps - args.sft_steps

    runs: dict[str, dict] = {}
    wall = train(CHORD, out / "grpo", common + ["algorithm.name=grpo", f"train.steps={args.steps}"])
    runs["grpo"] = {"rows": metrics(out / "grpo"), "wall_s": wall}
    sft_wall = train(SFT, out / "sft", common + [f"train.steps={args.sft_steps}", "eval.at_end=false"])
    sft_policy = out / "sft" / "checkpoints" / f"step_{args.sft_steps}" / "policy"
    wall = train(CHORD, out / "sft_then_grpo", common + ["algorithm.name=grpo", f"train.steps={rl_steps}", f"model.name={sft_policy}"])
    runs["sft_then_grpo"] = {"rows": metrics(out / "sft") + metrics(out / "sft_then_grpo"), "wall_s": sft_wall + wall}
    wall = train(CHORD, out / "chord_mu", common + ["algorithm.name=chord_mu", f"algorithm.mu_decay_steps={args.steps}", f"train.steps={args.steps}"])
    runs["chord_mu"] = {"rows": metrics(out / "chord_mu"), "wall_s": wall}
    wall = train(CHORD, out / "chord_phi", common + ["algorithm.name=chord", f"train.steps={args.steps}"])
    runs["chord_phi"] = {"rows": metrics(out / "chord_phi"), "wall_s": wall}

    results = {}
    for name, run in runs.items():
        rows = run["rows"]
        rl = [r for r in rows if "reward/mean" in r]
        entropy = [policy_entropy(r) for r in rl]
        results[name] = {
            "heldout_pass@1": rows[-1].get("eval/arithmetic/pass@1"),
            "train_reward_first5": mean([r["reward/mean"] for r in rl[:5]]),
            "train_reward_last5": mean([r["reward/mean"] for r in rl[-5:]]),
            "entropy_first5": mean([e for e in entropy[:5] if e is not None]),
            "entropy_last5": mean([e for e in entropy[-5:] if e is not None]),
            "wall_s": run["wall_s"],
            "entropy_curve": entropy,
            "reward_curve": [r["reward/mean"] for r in rl],
        }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in next(iter(results.values())) if not k.endswith("_curve")]
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join("-" if row[k] is None else f"{row[k]:.0f}" if k == "wall_s" else f"{row[k]:.3f}" for k in keys) + " |")
    plot(results, args.steps, out / "entropy.png")


def plot(results: dict, steps: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, row in results.items():
        offset = steps - len(row["entropy_curve"])  # SFT-then-GRPO's RL steps come after its SFT steps
        x = list(range(offset + 1, steps + 1))
        left.plot(x, row["entropy_curve"], label=name)
        right.plot(x, row["reward_curve"], label=name)
    left.set(xlabel="step", ylabel="entropy on own samples (nats/token)", title="policy entropy")
    right.set(xlabel="step", ylabel="mean reward of the step's samples", title="training reward")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

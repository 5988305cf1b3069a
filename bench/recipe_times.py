"""Time per step of shipped recipes, measured by running each one for a few steps as shipped.

Each recipe runs in its own process (`llmrl train`) with only these changes: `train.steps`,
evaluation off, a temporary output_dir, no progress bar or curves. The figure is the median of
`time/step` over steps 2..N (step 1 pays one-off costs; a PPO recipe's critic warm-up steps, which
train the critic alone, are left out too), next to the median generate and update
phases and the start-up (process wall time minus the steps). The recipe headers quote these.

    .venv/bin/python bench/recipe_times.py [--steps 3] [--data DIR] [RECIPE ...]

Recipes that need a cluster or a GPU are skipped unless named; `--set KEY=VALUE` adds overrides
to every run (for example `--set model.name=smollm2-135m` for the search agents' warm start).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["eval.every=0", "logging.progress=false", "logging.curves=false", "logging.tensorboard=false", "logging.rollouts_every=0"]
# Sized for hardware this script cannot provide by itself: a Ray cluster or GPUs.
NEEDS_MORE = {"distributed_cpu", "gsm8k_grpo_8gpu", "math_grpo", "gsm8k_grpo", "gsm8k_dapo", "gsm8k_ppo"}
DATA_TYPES = {"gsm8k", "math"}


def recipe_section(path: Path, section: str) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}).get(section) or {}


def recipe_data_type(path: Path) -> str:
    return str(recipe_section(path, "data").get("type", ""))


def first_timed_step(path: Path) -> int:
    """Step 1 pays one-off costs; a critic's warm-up steps (PPO's algorithm.critic_warmup_steps)
    train the critic alone, so they are not what the recipe's steps cost either."""
    return 1 + max(1, int(recipe_section(path, "algorithm").get("critic_warmup_steps", 0) or 0))


def time_recipe(path: Path, steps: int, extra: list[str], data_dir: str | None) -> dict[str, float]:
    """Run one recipe for `steps` steps; medians of its phases over steps 2..steps, in seconds."""
    with tempfile.TemporaryDirectory(prefix="recipe-times-") as out:
        overrides = [f"train.steps={steps}", f"output_dir={out}/run", *QUIET, *extra]
        if data_dir and recipe_data_type(path) in DATA_TYPES:
            overrides.append(f"data.path={data_dir}")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "llmrl.cli", "train", str(path), *overrides], cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{path.name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r]
    later = rows[first_timed_step(path) - 1 :] or rows

    def median(key: str) -> float:
        values = [r[key] for r in later if key in r]
        return statistics.median(values) if values else float("nan")

    return {
        "step": median("time/step"), "generate": median("time/generate"), "update": median("time/update"),
        "startup": wall - sum(r["time/step"] for r in rows), "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names or paths (default: every CPU-sized recipe)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", default=None, help="local data folder for gsm8k/math recipes (data.path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override added to every run")
    args = parser.parse_args()
    if args.recipes:
        paths = [Path(r) if r.endswith(".yaml") else REPO / "recipes" / f"{r}.yaml" for r in args.recipes]
    else:
        paths = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if p.stem not in NEEDS_MORE]
    print(f"{'recipe':<22} {'s/step':>7} {'generate':>9} {'update':>7} {'start-up':>9} {'wall':>7}   (medians of steps 2..{args.steps}, or after a critic's warm-up)", flush=True)
    for path in paths:
        try:
            t = time_recipe(path, args.steps, args.set, args.data)
        except RuntimeError as err:
            print(f"{path.stem:<22} failed: {err}", flush=True)
            continue
        first = first_timed_step(path)
        note = f"   steps {first}..{args.steps}" if first > 2 else ""
        if first > args.steps:
            note = f"   no step after the critic's warm-up: run --steps {first} or more"
        print(f"{path.stem:<22} {t['step']:>7.1f} {t['generate']:>9.1f} {t['update']:>7.1f} {t['startup']:>9.1f} {t['wall']:>7.0f}{note}", flush=True)


if __name__ == "__main__":
    main()

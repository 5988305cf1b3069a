"""Metrics regression check: re-run every shipped recipe and compare each logged metric with a
recorded baseline, so a refactor that claims "behaviour unchanged" is shown to be.

    python bench/regression_metrics.py --record            # write the baseline (before a change)
    python bench/regression_metrics.py --check             # re-run and compare (after it)
    python bench/regression_metrics.py --check --only tiny # the tiny-model runs only

Runs (each in-process, hf engine, torch backend, fixed seed):
  - every recipes/*.yaml that runs in one process, with the tiny model for 2 steps, in the small batch shape the recipe
    tests use (2 prompts x 4 samples, mini-batches of 4: two optimizer steps per RL step);
  - the quickstart on the built-in SmolLM2-135M for 2 steps, without its final evaluation.
Time and throughput metrics are excluded; every other key of the baseline must be logged again
and match within 1e-6 (relative to the value when it is larger than 1). Keys a newer version adds
are reported, not failed. In CI, tests/test_e2e.py compares the tiny runs and
tests/test_regression_metrics.py the SmolLM2 one.

Baselines are kept per kind of host (`machine.kernel_host()`: CPU vendor and precision flags).
MKL and oneDNN choose their kernels by CPU, so an AMD and an Intel host agree only to about 1e-6
in a matmul, and once a sampled token differs the runs part. A host of a kind with no baseline
is told so (the tests skip the comparison, naming the kinds recorded); `--record` there adds one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # machine.py, also when tests load this file by path
from machine import kernel_host  # noqa: E402
BASELINE = REPO / "tests" / "regression" / "metrics_baseline.json"
SHARED_DATA = REPO.parent / "shared" / "data"
TOLERANCE = 1e-6
# Wall-clock figures differ on every run; everything else is a function of the seed.
VOLATILE_PREFIXES = ("time/", "perf/")
VOLATILE_KEYS = {"reward/time_s", "agent/tool_latency_s"}

TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "train.mini_batch_size=4", "train.steps=2", "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]",
    "checkpoint.every=0",
]  # checkpoint.every=0 still saves the last step, which tests/test_e2e.py checks
# The shared prompt forward is off here: on an Intel Xeon (AMX) host its backward gave one of two
# or three grad norms per process, 1e-7 to 2.5e-5 apart (MKL picks kernels by memory alignment;
# MKL_CBWR=AVX512,STRICT made the fp32 case repeat), and step 2 samples from the updated weights,
# so a 1e-6 check of step 2 flipped between runs. The plain forward repeated in 5 of 5 processes.
# The shared path keeps its own exactness test (tests/test_train_engine.py) and the tiny runs.
QUICKSTART_SMOLLM2 = [
    "train.steps=2", "eval.at_end=false", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
    "train.shared_prompt_forward=false",
]


def runs() -> dict[str, tuple[str, list[str]]]:
    """Run name -> (recipe path, overrides)."""
    import yaml

    out: dict[str, tuple[str, list[str]]] = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if (raw.get("cluster") or {}).get("backend", "none") != "none":
            continue  # multi-process recipes have their own tests (tests/test_ray_two_nodes.py)
        data_type = (raw.get("data") or {}).get("type", "arithmetic")
        # No hub here: recipes on a benchmark's data read the local copy.
        local = [] if data_type == "arithmetic" else [f"data.path={SHARED_DATA}"]
        if data_type == "math":
            local.append("data.split=test")  # the local copy holds MATH-500 only, no training split
        out[f"tiny/{path.stem}"] = (str(path), TINY + local)
    out["smollm2/quickstart"] = (str(REPO / "recipes" / "quickstart.yaml"), QUICKSTART_SMOLLM2)
    return out


def recorded() -> dict[str, dict[str, list[dict[str, float]]]]:
    """Host kind -> run name -> metric rows, for every kind of host recorded."""
    return json.loads(BASELINE.read_text())["hosts"] if BASELINE.exists() else {}


def baseline() -> dict[str, list[dict[str, float]]] | None:
    """This kind of host's baseline, or None where none was recorded."""
    return recorded().get(kernel_host())


def missing_run_message(name: str) -> str:
    return (f"the metrics baseline of this kind of host ({kernel_host()}) has no run {name}: a change moved its "
            "metrics after it was recorded elsewhere; `bench/regression_metrics.py --record` on such a host adds it")


def no_baseline_message() -> str:
    kinds = "; ".join(recorded()) or "none"
    return (f"no metrics baseline for this kind of host ({kernel_host()}; recorded: {kinds}): "
            "run bench/regression_metrics.py --record on it to add one")


def run_metrics(recipe_path: str, overrides: list[str], output_dir: Path) -> list[dict[str, float]]:
    from llmrl.loop import train
    from llmrl.recipe import load_recipe

    run_dir = train(load_recipe(recipe_path, overrides + [f"output_dir={output_dir}"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not is_volatile(k)} for row in rows]


def is_volatile(key: str) -> bool:
    return key.startswith(VOLATILE_PREFIXES) or key in VOLATILE_KEYS


def compare(name: str, expected: list[dict[str, float]], got: list[dict[str, float]]) -> tuple[list[str], list[str]]:
    """(mismatches, keys added) between two runs' metric rows."""
    problems: list[str] = []
    added: list[str] = []
    if len(expected) != len(got):
        return [f"{name}: {len(got)} logged steps, baseline has {len(expected)}"], added
    for want, have in zip(expected, got):
        step = want.get("step")
        for key, value in want.items():
            if key not in have:
                problems.append(f"{name} step {step}: {key} missing (baseline {value})")
            elif not close(value, have[key]):
                problems.append(f"{name} step {step}: {key} = {have[key]!r}, baseline {value!r}")
        added.extend(sorted(set(have) - set(want)))
    return problems, sorted(set(added))


def close(a: float, b: float) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help="run everything and write the baseline")
    mode.add_argument("--check", action="store_true", help="run everything and compare with the baseline")
    parser.add_argument("--only", default="", help="run names starting with this (e.g. tiny, smollm2/quickstart)")
    args = parser.parse_args()

    selected = {k: v for k, v in runs().items() if k.startswith(args.only)}
    hosts = recorded()
    host = kernel_host()
    if args.check and host not in hosts:
        print(no_baseline_message())
        return 1
    baseline = hosts.get(host, {})
    print(f"host kind: {host}")
    results: dict[str, list[dict[str, float]]] = {}
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, overrides) in selected.items():
            print(f"== {name}", flush=True)
            results[name] = run_metrics(path, overrides, Path(tmp) / name.replace("/", "_"))
            if args.check:
                if name not in baseline:
                    print(f"   no baseline for {name}")
                    failures += 1
                    continue
                problems, added = compare(name, baseline[name], results[name])
                failures += bool(problems)
                keys = len(baseline[name][0]) if baseline[name] else 0
                print(f"   {'MISMATCH' if problems else 'ok'}: {keys} keys x {len(baseline[name])} steps compared")
                for line in problems:
                    print(f"   {line}")
                if added:
                    print(f"   keys added since the baseline: {', '.join(added)}")
    if args.record:
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        hosts[host] = {**baseline, **results}
        BASELINE.write_text(json.dumps({"hosts": hosts}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE} ({len(results)} runs for {host})")
        return 0
    print(f"{len(selected) - failures}/{len(selected)} runs match the baseline")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

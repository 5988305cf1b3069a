"""Reward time limits and give-up rules: finite timeouts, the per-step budget, aborting a run whose
reward always fails, and plugins that exit or crash while they are imported (caught at validate)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmrl.recipe import RecipeError, load_recipe
from llmrl.reward import RewardComputer, RewardConfig, RewardFailingError
from llmrl.types import Span, Task, Trajectory

from conftest import REPO

PLUGIN_SOURCE = textwrap.dedent(
    """
    import time

    def sleeps(completion, task):
        time.sleep(float(completion))
        return 1.0

    def always_raises(completion, task):
        raise ValueError("no gold answer for " + task.task_id)

    def fails_on_bad(completion, task):
        if completion == "bad":
            raise RuntimeError("bad input")
        return 1.0
    """
)

IMPORT_FAILURES = {
    "exits.py": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    "hard_exit.py": ("import os\nos._exit(5)\n", "ended its worker process with exit code 5"),
    "segfaults.py": ("import ctypes\nctypes.string_at(0)\n", "killed its worker process with signal SIGSEGV"),
    "raises.py": ("raise RuntimeError('broken at import')\n", "RuntimeError: broken at import"),
}


@pytest.fixture()
def plugin(tmp_path: Path) -> str:
    path = tmp_path / "limit_rewards.py"
    path.write_text(PLUGIN_SOURCE)
    return str(path)


def make_trajectory(completion: str) -> Trajectory:
    task = Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer="1")
    return Trajectory(
        task=task, token_ids=[1, 2, 3, 4], spans=[Span("prompt", 0, 2), Span("policy", 2, 4)],
        rollout_logprobs=[0.0] * 4, finish_reason="stop", group_id=0, completion_text=completion,
    )


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmrl.cli", *args], capture_output=True, text=True, cwd=cwd)


# ---------------------------------------------------------------- timeout_s


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_timeout_and_budget_must_be_finite_and_positive(value: float) -> None:
    for key in ("timeout_s", "step_budget_s"):
        with pytest.raises(ValidationError, match=key):
            RewardConfig(**{key: value})


def test_infinite_timeout_is_exit_2_at_validate() -> None:
    out = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), "reward.timeout_s=inf")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("llmrl: error:") and "reward.timeout_s" in out.stderr


# ---------------------------------------------------------------- the step budget


def test_step_budget_in_workers_kills_what_is_unfinished(plugin: str) -> None:
    # One worker, six calls of 2 s, a 5 s budget: two finish (at ~2 s and ~4 s, a second of slack
    # for a loaded machine), the third is cut mid-call at 5 s, and it and the three never started
    # score the fallback.
    config = RewardConfig(functions=[f"{plugin}:sleeps"], num_workers=1, step_budget_s=5.0, fallback=-1.0)
    with RewardComputer(config) as rewards:
        start = time.monotonic()
        results = rewards.score([make_trajectory("2.0") for _ in range(6)])
        elapsed = time.monotonic() - start
        metrics = rewards.metrics()
    assert [r.score for r in results] == [1.0, 1.0, -1.0, -1.0, -1.0, -1.0]
    assert metrics["reward/over_budget"] == 4.0 and metrics["reward/failures"] == 4.0
    assert metrics["reward/timeouts"] == 0.0
    assert 4.9 < elapsed < 7.0


def test_step_budget_in_process_is_checked_between_calls(plugin: str) -> None:
    # Calls start at 0, 0.5 and 1.0 s (all before 1.25 s), so three run; three do not.
    config = RewardConfig(functions=[f"{plugin}:sleeps"], num_workers=0, step_budget_s=1.25)
    with RewardComputer(config) as rewards:
        results = rewards.score([make_trajectory("0.5") for _ in range(6)])
        metrics = rewards.metrics()
    assert [r.score for r in results] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert metrics["reward/over_budget"] == 3.0


def test_step_budget_spans_every_scoring_round_of_a_step(plugin: str) -> None:
    # A 4 s budget: the first round takes ~1 s (3 s of slack for a loaded machine); the second
    # round's calls would end at ~6 s and ~11 s, so the budget cuts the first and skips the second.
    config = RewardConfig(functions=[f"{plugin}:sleeps"], num_workers=1, step_budget_s=4.0)
    with RewardComputer(config) as rewards:
        rewards.begin_step(1)
        first = rewards.score([make_trajectory("0.5"), make_trajectory("0.5")])
        second = rewards.score([make_trajectory("5"), make_trajectory("5")])
        over_budget = rewards.metrics()["reward/over_budget"]
        rewards.begin_step(2)  # a new step, a new budget
        third = rewards.score([make_trajectory("0.5"), make_trajectory("0.5")])
    assert [r.score for r in first] == [1.0, 1.0]
    assert [r.score for r in second] == [0.0, 0.0] and over_budget == 2.0
    assert [r.score for r in third] == [1.0, 1.0]


def test_no_budget_when_null(plugin: str) -> None:
    config = RewardConfig(functions=[f"{plugin}:sleeps"], num_workers=0, step_budget_s=None)
    with RewardComputer(config) as rewards:
        assert [r.score for r in rewards.score([make_trajectory("0.2")] * 3)] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- abort after failing steps


def steps(rewards: RewardComputer, completions_per_step: list[list[str]]) -> None:
    for step, completions in enumerate(completions_per_step, start=1):
        rewards.begin_step(step)
        rewards.score([make_trajectory(c) for c in completions])


def test_a_reward_failing_every_call_for_k_steps_ends_the_run(plugin: str) -> None:
    config = RewardConfig(functions=["gsm8k", f"{plugin}:always_raises"], num_workers=0, abort_after_failing_steps=3)
    with RewardComputer(config) as rewards:
        steps(rewards, [["a", "b"], ["c"]])  # two failing steps: not yet
        rewards.begin_step(3)
        with pytest.raises(RewardFailingError) as caught:
            rewards.score([make_trajectory("d")])
    message = str(caught.value)
    assert "'always_raises'" in message and "3 training steps in a row" in message
    assert "first error: error: ValueError: no gold answer for t0" in message
    assert "gsm8k" not in message.split("(")[0]  # the healthy component is not blamed


def test_one_success_resets_the_count_and_zero_disables(plugin: str) -> None:
    config = RewardConfig(functions=[f"{plugin}:fails_on_bad"], num_workers=0, abort_after_failing_steps=2)
    with RewardComputer(config) as rewards:
        steps(rewards, [["bad"], ["bad", "ok"], ["bad"], [], ["ok"], ["bad"]])  # never two failing steps in a row
    config = RewardConfig(functions=[f"{plugin}:always_raises"], num_workers=0, abort_after_failing_steps=0)
    with RewardComputer(config) as rewards:
        steps(rewards, [["x"]] * 5)


def test_outside_training_a_failing_reward_never_aborts(plugin: str) -> None:
    # Evaluation scores batches without steps: its failures are counted, never fatal.
    config = RewardConfig(functions=[f"{plugin}:always_raises"], num_workers=0, abort_after_failing_steps=1)
    with RewardComputer(config) as rewards:
        for _ in range(3):
            rewards.score([make_trajectory("x")])
        assert rewards.metrics()["reward/errors"] == 1.0


def test_train_with_an_always_failing_reward_exits_2_with_one_line(plugin: str, tmp_path: Path) -> None:
    out = run_cli(
        "train", str(REPO / "recipes" / "quickstart.yaml"), "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2",
        "train.micro_batch_size=4", "rollout.max_new_tokens=8", "logging.progress=false", "eval.benches=[]",
        f"reward.functions=[{plugin}:always_raises]", "reward.abort_after_failing_steps=2", "train.steps=5",
        f"output_dir={tmp_path / 'run'}",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("llmrl: error: reward 'always_raises'") and "2 training steps in a row" in last
    assert "ValueError: no gold answer for" in last
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]  # step 2 stopped at its scoring


# ---------------------------------------------------------------- plugins that fail at import


@pytest.mark.parametrize("name", sorted(IMPORT_FAILURES))
def test_plugin_that_dies_while_imported_is_a_validate_error(tmp_path: Path, name: str) -> None:
    source, expected = IMPORT_FAILURES[name]
    (tmp_path / name).write_text(source + "def fn(completion, task):\n    return 1.0\n")
    # In this very process: the plugin is imported in a throwaway worker, so its exit or crash
    # cannot end the test run.
    with pytest.raises(RecipeError) as caught:
        load_recipe(None, [f"reward.functions=[{tmp_path / name}:fn]"])
    assert "reward.functions[0]" in str(caught.value) and name in str(caught.value)
    assert expected in str(caught.value)
    # The throwaway worker is gone, and so is its private directory.
    assert not list(Path(tempfile.gettempdir()).glob(f"llmrl-reward-{os.getpid()}-*"))


def test_a_good_plugin_passes_validate_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text("def fn(completion, task):\n    return 1.0\n")
    load_recipe(None, [f"reward.functions=[{tmp_path / 'good.py'}:fn]"])
    assert not list(Path(tempfile.gettempdir()).glob(f"llmrl-reward-{os.getpid()}-*"))


def test_plugin_sys_exit_at_import_is_exit_2_not_its_own_code(tmp_path: Path) -> None:
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    out = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), f"reward.functions=[{tmp_path / 'exits.py'}:fn]")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "exits.py" in out.stderr and "SystemExit: 3" in out.stderr


def test_plugin_sys_exit_in_process_is_a_config_error(tmp_path: Path) -> None:
    # num_workers=0 or any in-process resolution: SystemExit at import becomes RewardConfigError.
    from llmrl.reward import RewardConfigError, resolve_reward

    (tmp_path / "exits_again.py").write_text("import sys\nsys.exit(4)\n")
    with pytest.raises(RewardConfigError, match="SystemExit: 4"):
        resolve_reward(f"{tmp_path / 'exits_again.py'}:fn")

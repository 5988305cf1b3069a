"""The reward API: resolving specs, the config section, and RewardComputer's isolation of user code."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmrl.reward import (
    RewardComputer,
    RewardConfig,
    RewardConfigError,
    RewardFunctionSpec,
    default_reward_for_kind,
    known_reward_names,
    resolve_reward,
)
from llmrl.reward.builtin.gsm8k import gsm8k
from llmrl.types import Span, Task, Trajectory

PLUGIN_SOURCE = textwrap.dedent(
    """
    import math
    import os
    import time


    def constant(completion, task):
        return 1.0


    def fragile(completion, task):
        if completion == "boom":
            raise RuntimeError("boom on purpose")
        return 1.0


    def slow(completion, task):
        if completion.startswith("hang"):
            time.sleep(60)
        return 1.0


    def always_hangs(completion, task):
        time.sleep(60)
        return 1.0


    def dies(completion, task):
        if completion == "die":
            os._exit(3)
        return 1.0


    def bad_values(completion, task):
        return {"nan": math.nan, "text": "yes", "noscore": {"acc": 1.0}, "inf": math.inf}.get(completion, 2.0)


    def wants_finish_reason(completion, task, finish_reason):
        return 1.0 if finish_reason == "length" else 0.0


    def wants_response(completion, task, response):
        return float(len(response))


    def wants_everything(completion, task, **kw):
        return {"score": float(len(kw)), "acc": 1.0 if kw["trajectory"].finish_reason == "stop" else 0.0}


    def with_setting(completion, task, bonus):
        return bonus
    """
)


@pytest.fixture()
def plugin(tmp_path: Path) -> str:
    """Absolute path of a plugin file holding the test reward functions."""
    path = tmp_path / "test_plugin_rewards.py"
    path.write_text(PLUGIN_SOURCE)
    return str(path)


def make_trajectory(
    completion: str,
    answer: str = "42",
    finish_reason: str = "stop",
    guided: bool = False,
    meta: dict | None = None,
) -> Trajectory:
    task = Task(task_id="t0", messages=[{"role": "user", "content": "q"}], answer=answer, meta=meta or {})
    return Trajectory(
        task=task,
        token_ids=[1, 2, 3, 4, 5, 6],
        spans=[Span("prompt", 0, 3), Span("policy", 3, 6)],
        rollout_logprobs=[0.0] * 6,
        finish_reason=finish_reason,  # type: ignore[arg-type]
        group_id=0,
        completion_text=completion,
        guided=guided,
    )


def computer(functions: list, **settings) -> RewardComputer:
    return RewardComputer(RewardConfig(functions=functions, **settings))


# ---------------------------------------------------------------- resolve_reward


def test_resolve_registered_name() -> None:
    assert resolve_reward("gsm8k") is gsm8k


def test_resolve_file_plugin_absolute_and_relative(plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    by_absolute = resolve_reward(f"{plugin}:constant")
    assert by_absolute("x", None) == 1.0
    monkeypatch.chdir(Path(plugin).parent)
    by_relative = resolve_reward("test_plugin_rewards.py:constant")
    assert by_relative is by_absolute  # one module per file, loaded once


def test_resolve_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(RewardConfigError, match="reward file not found") as error:
        resolve_reward(f"{missing}:fn")
    assert str(missing) in str(error.value)


def test_resolve_missing_function_in_file_suggests(plugin: str) -> None:
    with pytest.raises(RewardConfigError, match="no attribute 'constnt'.*'constant'"):
        resolve_reward(f"{plugin}:constnt")


def test_resolve_module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_reward("llmrl.reward.builtin.gsm8k:gsm8k") is gsm8k
    (tmp_path / "my_reward_module.py").write_text("def half(completion, task):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_reward_module:half")("", None) == 0.5
    with pytest.raises(RewardConfigError, match="no module named 'not_a_module_xyz'"):
        resolve_reward("not_a_module_xyz:fn")


def test_resolve_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake installed distribution: metadata plus one entry point in group llmrl.rewards.
    (tmp_path / "fake_bonus_module.py").write_text("def bonus(completion, task):\n    return 0.25\n")
    dist_info = tmp_path / "fake_llmrl_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-llmrl-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[llmrl.rewards]\nfake_bonus = fake_bonus_module:bonus\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fake_bonus" in known_reward_names()
    assert resolve_reward("fake_bonus")("", None) == 0.25


def test_unknown_name_suggests_a_known_one() -> None:
    with pytest.raises(RewardConfigError) as error:
        resolve_reward("gsm8")
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "unknown reward 'gsm8'" in message
    assert "Did you mean 'gsm8k'" in message
    assert "math" in message and "toy_token_fraction" in message  # lists known names


def test_default_reward_for_kind() -> None:
    assert [default_reward_for_kind(kind) for kind in ("arithmetic", "gsm8k", "math")] == ["arithmetic", "gsm8k", "math"]
    with pytest.raises(RewardConfigError, match="generic"):
        default_reward_for_kind("generic")


# ---------------------------------------------------------------- config


def test_config_accepts_strings_and_mappings() -> None:
    cfg = RewardConfig(functions=["gsm8k", {"fn": "format", "weight": 0.5, "name": "fmt"}])
    specs = cfg.function_specs()
    assert [(s.fn, s.weight, s.log_name) for s in specs] == [("gsm8k", 1.0, "gsm8k"), ("format", 0.5, "fmt")]
    assert RewardFunctionSpec(fn="rewards/example_plugin.py:brevity").log_name == "brevity"


def test_config_rejects_unknown_keys_and_reserved_kwargs() -> None:
    with pytest.raises(ValidationError, match="wieght"):
        RewardConfig(functions=[{"fn": "gsm8k", "wieght": 2.0}])
    with pytest.raises(ValidationError, match="finish_reason"):
        RewardFunctionSpec(fn="gsm8k", kwargs={"finish_reason": "stop"})
    with pytest.raises(ValidationError):
        RewardConfig(num_workers=-1)


def test_every_config_field_is_documented() -> None:
    for model in (RewardConfig, RewardFunctionSpec):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"


def test_computer_uses_the_data_default_when_no_functions() -> None:
    with RewardComputer(RewardConfig(num_workers=0), default_kind="arithmetic") as rewards:
        assert rewards.names == ["arithmetic"]
        assert rewards.score([make_trajectory("#### -17", answer="-17")])[0].score == 1.0
    with pytest.raises(RewardConfigError, match="empty"):
        RewardComputer(RewardConfig())


def test_computer_checks_signatures_and_names_up_front(plugin: str) -> None:
    with pytest.raises(RewardConfigError, match="overlong.*max_len"):
        computer(["overlong"])  # needs max_len and buffer_len kwargs
    with pytest.raises(RewardConfigError, match="constant"):
        computer([{"fn": f"{plugin}:constant", "kwargs": {"unexpected": 1}}])
    with pytest.raises(RewardConfigError, match="distinct `name`"):
        computer(["gsm8k", "gsm8k"])


# ---------------------------------------------------------------- RewardComputer


@pytest.mark.parametrize("num_workers", [0, 1])
def test_weighted_combination_logs_each_part(num_workers: int) -> None:
    trajectories = [make_trajectory("#### 42"), make_trajectory("42"), make_trajectory("#### 41")]
    with computer(["gsm8k", {"fn": "format", "weight": 0.5}], num_workers=num_workers) as rewards:
        results = rewards.score(trajectories)
        metrics = rewards.metrics()
    assert [r.score for r in results] == [1.5, 0.0, 0.5]
    assert results[0].parts == {"gsm8k": 1.0, "acc": 1.0, "format": 1.0}
    assert results[2].parts == {"gsm8k": 0.0, "acc": 0.0, "format": 1.0}
    assert [r.failed for r in results] == [0, 0, 0]
    assert metrics["reward/failures"] == 0.0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_raising_function_scores_fallback_and_run_continues(plugin: str, num_workers: int) -> None:
    with computer([f"{plugin}:fragile", "gsm8k"], fallback=-1.0, num_workers=num_workers) as rewards:
        results = rewards.score([make_trajectory("#### 42"), make_trajectory("boom"), make_trajectory("#### 42")])
        metrics = rewards.metrics()
    assert [r.parts["fragile"] for r in results] == [1.0, -1.0, 1.0]
    assert [r.score for r in results] == [2.0, -1.0, 2.0]  # boom: fallback -1 plus gsm8k 0
    assert [r.failed for r in results] == [0, 1, 0]
    assert metrics["reward/failures"] == 1.0
    assert metrics["reward/errors"] == 1.0


def test_hanging_function_times_out_and_the_computer_recovers(plugin: str) -> None:
    with computer([f"{plugin}:slow"], timeout_s=1.0, fallback=-1.0, num_workers=1) as rewards:
        start = time.monotonic()
        results = rewards.score([make_trajectory("a"), make_trajectory("hang"), make_trajectory("b")])
        elapsed = time.monotonic() - start
        metrics = rewards.metrics()
        assert [r.score for r in results] == [1.0, -1.0, 1.0]  # "b" ran on the replacement worker
        assert metrics["reward/timeouts"] == 1.0
        assert metrics["reward/failures"] == 1.0
        assert metrics["reward/worker_restarts"] == 1.0
        assert elapsed < 5.0
        later = rewards.score([make_trajectory("c"), make_trajectory("d")])
        assert [r.score for r in later] == [1.0, 1.0]
        assert rewards.metrics()["reward/timeouts"] == 0.0


def test_always_hanging_function_is_skipped_after_the_limit(plugin: str) -> None:
    with computer([f"{plugin}:always_hangs", "gsm8k"], timeout_s=0.5, skip_after_timeouts=1, num_workers=1) as rewards:
        start = time.monotonic()
        results = rewards.score([make_trajectory("#### 42") for _ in range(6)])
        elapsed = time.monotonic() - start
        metrics = rewards.metrics()
    assert [r.score for r in results] == [1.0] * 6  # gsm8k still scored; the hanging part gave 0
    assert [r.failed for r in results] == [1] * 6
    assert metrics["reward/timeouts"] == 1.0
    assert metrics["reward/skipped"] == 5.0
    assert elapsed < 4.0


def test_dead_worker_scores_fallback_and_is_replaced(plugin: str) -> None:
    with computer([f"{plugin}:dies"], fallback=-1.0, num_workers=1) as rewards:
        results = rewards.score([make_trajectory("die"), make_trajectory("ok")])
        assert [r.score for r in results] == [-1.0, 1.0]
        assert rewards.metrics()["reward/errors"] == 1.0
        assert [r.score for r in rewards.score([make_trajectory("ok")])] == [1.0]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_non_finite_or_wrong_type_scores_fallback(plugin: str, num_workers: int) -> None:
    completions = ["nan", "inf", "text", "noscore", "fine"]
    with computer([f"{plugin}:bad_values"], fallback=-1.0, num_workers=num_workers) as rewards:
        results = rewards.score([make_trajectory(c) for c in completions])
        metrics = rewards.metrics()
    assert [r.score for r in results] == [-1.0, -1.0, -1.0, -1.0, 2.0]
    assert metrics["reward/invalid"] == 4.0


def test_kwargs_are_passed_by_signature(plugin: str) -> None:
    trajectories = [
        make_trajectory("abc", finish_reason="length"),
        make_trajectory("abc", guided=True, meta={"guidance_text": "GUIDE:"}),  # POPE: prefix shown to grader
        make_trajectory("abc", guided=False, meta={"guidance_text": "GUIDE:"}),
    ]
    functions = [
        f"{plugin}:wants_finish_reason",
        f"{plugin}:constant",
        f"{plugin}:wants_response",
        {"fn": f"{plugin}:wants_everything", "weight": 0.0},
        {"fn": f"{plugin}:with_setting", "kwargs": {"bonus": 0.125}, "weight": 0.0},
    ]
    with computer(functions, num_workers=1) as rewards:
        results = rewards.score(trajectories)
    assert [r.parts["wants_finish_reason"] for r in results] == [1.0, 0.0, 0.0]
    assert [r.parts["constant"] for r in results] == [1.0, 1.0, 1.0]
    assert [r.parts["wants_response"] for r in results] == [3.0, 9.0, 3.0]  # len("GUIDE:abc") = 9
    assert [r.parts["wants_everything"] for r in results] == [3.0, 3.0, 3.0]  # trajectory, finish_reason, response
    assert [r.parts["acc"] for r in results] == [0.0, 1.0, 1.0]
    assert [r.parts["with_setting"] for r in results] == [0.125] * 3
    assert [r.score for r in results] == [5.0, 10.0, 4.0]


def test_overlong_gets_its_kwargs_and_the_trajectory() -> None:
    spec = {"fn": "overlong", "kwargs": {"max_len": 8, "buffer_len": 4}}
    with computer(["gsm8k", spec], num_workers=0) as rewards:
        result = rewards.score([make_trajectory("#### 42")])[0]  # 3 policy tokens, below 8 - 4
    assert result.parts == {"gsm8k": 1.0, "acc": 1.0, "overlong": 0.0}
    spec = {"fn": "overlong", "kwargs": {"max_len": 4, "buffer_len": 2}}
    with computer(["gsm8k", spec], num_workers=0) as rewards:
        result = rewards.score([make_trajectory("#### 42")])[0]  # 3 tokens: -(3 - 2) / 2 = -0.5
    assert result.score == 0.5


def test_sixty_four_gsm8k_trajectories_are_fast_through_one_worker() -> None:
    trajectories = [make_trajectory(f"step {i}\n#### {40 + i % 3}") for i in range(64)]
    with computer(["gsm8k"], num_workers=1) as rewards:
        rewards.score(trajectories)  # warm-up: starts the worker
        start = time.perf_counter()
        results = rewards.score(trajectories)
        elapsed = time.perf_counter() - start
    assert sum(r.score for r in results) == 21.0  # i = 2, 5, ..., 62 give 42
    assert elapsed < 0.5


def test_math_reward_in_a_pool_started_from_a_thread() -> None:
    # The worker forked from a non-main thread must still run math-verify's signal timeouts.
    outputs: list[object] = []
    rewards = computer(["math"], num_workers=1)

    def run() -> None:
        try:
            outputs.append([r.score for r in rewards.score([make_trajectory(r"\boxed{0.5}", answer=r"\frac{1}{2}")])])
            outputs.append(rewards.metrics()["reward/failures"])
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            outputs.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    rewards.close()
    assert outputs == [[1.0], 0.0]


def test_a_rewards_warm_up_runs_once_before_its_workers_fork() -> None:
    # The math reward's math-verify (sympy) is not imported with llmrl, but before the workers fork,
    # so that no worker pays for the import inside a time-limited call. A fresh interpreter, since
    # this one may have imported it already.
    code = (
        "import sys\n"
        "from llmrl.reward import RewardComputer, RewardConfig\n"
        "rewards = RewardComputer(RewardConfig(functions=['math'], num_workers=1))\n"
        "before = 'math_verify' in sys.modules\n"
        "rewards.start()\n"
        "print(before, 'math_verify' in sys.modules)\n"
        "rewards.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_close_stops_the_workers() -> None:
    rewards = computer(["gsm8k"], num_workers=2)
    rewards.score([make_trajectory("#### 42")])
    processes = [worker.process for worker in rewards._pool._workers]  # noqa: SLF001 - lifecycle check
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    rewards.close()
    assert not any(p.is_alive() for p in processes)
    assert rewards.score([]) == []  # usable again after close: the pool is recreated lazily


def test_two_workers_share_a_batch(plugin: str) -> None:
    with computer([f"{plugin}:slow"], timeout_s=1.0, num_workers=2) as rewards:
        start = time.monotonic()
        results = rewards.score([make_trajectory("hang-1"), make_trajectory("hang-2"), make_trajectory("x")])
        elapsed = time.monotonic() - start
        metrics = rewards.metrics()
    assert [r.score for r in results] == [0.0, 0.0, 1.0]
    assert metrics["reward/timeouts"] == 2.0
    assert elapsed < 4.0  # both hangs time out in parallel, not one after the other


def test_example_plugin_by_path_from_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # docs run recipes from the repo root
    spec = {"fn": "rewards/example_plugin.py:brevity", "kwargs": {"target_chars": 4}}
    with computer([spec], num_workers=1) as rewards:
        results = rewards.score([make_trajectory("abcdef"), make_trajectory("abc", finish_reason="length")])
    assert [r.parts for r in results] == [{"brevity": 0.5, "brevity/chars": 6.0}, {"brevity": 0.0, "brevity/chars": 3.0}]


def test_start_forks_the_workers_that_then_score() -> None:
    with computer(["gsm8k"], num_workers=2) as rewards:
        rewards.start()
        started = [worker.process for worker in rewards._pool._workers]  # noqa: SLF001 - lifecycle check
        assert len(started) == 2 and all(p.is_alive() for p in started)
        rewards.start()  # a second start forks nothing more
        assert [w.process for w in rewards._pool._workers] == started  # noqa: SLF001
        assert [r.score for r in rewards.score([make_trajectory("#### 42"), make_trajectory("#### 7")])] == [1.0, 0.0]
        assert [w.process for w in rewards._pool._workers] == started  # noqa: SLF001 - the same processes scored
    with computer(["gsm8k"], num_workers=0) as in_process:
        in_process.start()  # nothing to fork
        assert in_process._pool is None  # noqa: SLF001


@pytest.mark.slow
def test_the_loop_forks_reward_and_grader_workers_before_it_loads_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fork shares its parent's pages until one side writes them; a worker forked after the model
    # loaded made every later first write of the trainer's (weights, packed decode copies) a page
    # fault that copies the page: 1.2-1.4 s of re-packing in a step of SmolLM2-135M (docs/benchmarks.md).
    import multiprocessing

    import llmrl.loop as loop
    from llmrl.recipe import load_recipe

    alive_at_model_load: list[int] = []
    build_cluster = loop.build_cluster

    def recording(recipe):  # type: ignore[no-untyped-def]
        alive_at_model_load.append(sum(p.name == "llmrl-reward-worker" for p in multiprocessing.active_children()))
        return build_cluster(recipe)

    monkeypatch.setattr(loop, "build_cluster", recording)
    overrides = [
        "model.name=tiny", "rollout.n=2", "train.prompts_per_step=1", "train.micro_batch_size=2", "rollout.max_new_tokens=4",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0",
        "reward.num_workers=2", "train.steps=1", "eval.limit=2", "eval.max_new_tokens=4", "eval.progress=false",
        f"output_dir={tmp_path}",
    ]
    run = loop.train(load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"), overrides))
    assert alive_at_model_load == [3]  # two for the training reward, one for the evaluation's grader
    assert (run / "eval" / "step_1" / "results.json").exists()
    assert not [p for p in multiprocessing.active_children() if p.name == "llmrl-reward-worker"]  # all stopped

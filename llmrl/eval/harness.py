"""Run an evaluation: generate with a rollout engine, grade with the training rewards, score.

`evaluate_bench` is the one function both `llmrl eval` and evaluation during training call, so
their numbers agree. It generates through the `single_turn` workflow (`SingleTurn.sample`), grades through
`RewardComputer`, appends every graded batch to samples.jsonl (flushed, so Ctrl-C keeps it),
and computes the metrics from that file, so a resumed run scores old and new samples alike.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmrl.data.config import DataConfigError
from llmrl.eval.benchmarks import ANSWER_READERS, AnswerReader, BenchTasks, EvalError, load_bench_tasks, resolve_bench
from llmrl.eval.config import EvalConfig
from llmrl.eval.metrics import GradedSample, accuracy_metrics, breakdown, group_by_item, majority_answer, sample_metrics
from llmrl.eval.report import (
    FINGERPRINT_FILE,
    PER_ITEM_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    SampleWriter,
    read_jsonl,
    write_json,
    write_jsonl,
)
from llmrl.reward import RewardComputer, RewardConfig, RewardResult, resolve_reward
from llmrl.rollout.base import RolloutEngine, SamplingParams
from llmrl.rollout.workflows import SingleTurn, WorkflowContext
from llmrl.types import GroupIds, Task, Trajectory


def prepare_benches(cfg: EvalConfig, tokenizer: Any) -> list[BenchTasks]:
    """Load every benchmark's items and prompts (done before the model loads: data errors are fast)."""
    benches = [resolve_bench(spec, cfg.reward) for spec in cfg.benches]
    for bench in benches:
        resolve_reward(bench.reward)  # an unknown reward fails here, before any generation
    prepared = [load_bench_tasks(bench, tokenizer, cfg) for bench in benches]
    names = [p.bench.name for p in prepared]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise EvalError(f"--bench: benchmark name {duplicates[0]!r} appears twice (files are named by their stem)")
    return prepared


class EvalGraders:
    """One started `RewardComputer` per reward the prepared benchmarks grade with (`workers`
    processes each), reused by every evaluation until `close()`. Made before a model loads, so
    that their worker processes are forked from a small process: a worker forked from one holding
    a model shares its pages, and each first write of the model's process to a shared page
    afterwards is a page fault that copies it (docs/rewards.md)."""

    def __init__(self, prepared: list[BenchTasks], workers: int) -> None:
        rewards = sorted({p.bench.reward for p in prepared})
        self._computers: dict[str, RewardComputer] = {}
        try:
            for reward in rewards:
                computer = RewardComputer(RewardConfig(functions=[reward], num_workers=workers))
                self._computers[reward] = computer
                computer.start()
        except BaseException:
            self.close()
            raise

    def get(self, reward: str) -> RewardComputer | None:
        return self._computers.get(reward)

    def close(self) -> None:
        for computer in self._computers.values():
            computer.close()
        self._computers = {}


def sampling_params(bench_tasks: BenchTasks, cfg: EvalConfig) -> SamplingParams:
    return SamplingParams(
        temperature=cfg.sampling_temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens or bench_tasks.bench.max_new_tokens,
        stop=list(cfg.stop),
        seed=cfg.seed,
    )


def evaluate_bench(
    engine: RolloutEngine,
    tokenizer: Any,
    bench_tasks: BenchTasks,
    cfg: EvalConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    model: dict[str, Any] | None = None,
    graders: EvalGraders | None = None,
) -> dict[str, Any]:
    """Evaluate one benchmark into `out_dir` (samples.jsonl, per_item.jsonl) and return its
    entry of results.json: metrics, breakdowns, throughput, prompt format and data identity.
    Grades with `graders`' computer for the benchmark's reward when it has one, else with a
    computer of its own, started here and closed at the end."""
    bench = bench_tasks.bench
    sampling = sampling_params(bench_tasks, cfg)
    fingerprint = _fingerprint(bench_tasks, sampling, model)
    samples_path = out_dir / SAMPLES_FILE
    kept = _resumable_rows(out_dir, fingerprint) if resume else None
    done = {(row["task_id"], row["sample"]) for row in kept or []}
    todo = [(t, s) for t in bench_tasks.tasks for s in range(cfg.n) if (t.task_id, s) not in done]
    write_json(out_dir / FINGERPRINT_FILE, fingerprint)

    reader = ANSWER_READERS.get(bench.reward)
    total = len(bench_tasks.tasks) * cfg.n
    generated_tokens, generated, correct, failures = 0, 0, 0, 0
    start = time.perf_counter()
    shared = graders.get(bench.reward) if graders is not None else None
    rewards = shared or RewardComputer(RewardConfig(functions=[bench.reward], num_workers=cfg.reward_workers))
    progress = _progress_bar(cfg, bench.name, total, total - len(todo))
    try:
        with SampleWriter(samples_path, kept) as writer:
            for first in range(0, len(todo), cfg.batch_size):
                units = todo[first : first + cfg.batch_size]
                # A seed per (item, sample), not per batch: sample s of an item is the same whichever
                # batch it lands in, so --resume after an interruption finishes what one run would draw.
                batch_sampling = replace(sampling, row_seeds=[sample_seed(cfg.seed, t.task_id, s) for t, s in units])
                context = WorkflowContext(engine, rewards, batch_sampling, tokenizer, GroupIds(), step=0, n=1)
                trajectories = [t for g in SingleTurn().sample([t for t, _ in units], context) for t in g.trajectories]
                graded = rewards.score(trajectories)
                failures += int(rewards.metrics().get("reward/failures", 0))
                rows = [_sample_row(u, traj, res, reader, tokenizer) for u, traj, res in zip(units, trajectories, graded)]
                writer.write(rows)
                generated += len(rows)
                generated_tokens += sum(row["response_tokens"] for row in rows)
                correct += sum(row["correct"] for row in rows)
                if progress is not None:
                    progress.update(len(rows))
                    rate = generated_tokens / max(time.perf_counter() - start, 1e-9)
                    progress.set_postfix({"acc": f"{correct / generated:.3f}", "tok/s": f"{rate:.0f}"}, refresh=False)
    finally:
        if progress is not None:
            progress.close()
        if shared is None:
            rewards.close()
    seconds = time.perf_counter() - start

    entry = score_samples(bench_tasks, cfg, out_dir, reader)
    entry["reward"] = bench.reward
    entry["sampling"] = _sampling_record(sampling) | {"n": cfg.n, "seed": cfg.seed, "seeding": SEEDING}
    entry["run"] = {
        "samples_generated": generated,
        "samples_resumed": total - len(todo),
        "reward_failures": failures,
        "time_s": seconds,
        "samples_per_s": generated / seconds if generated else 0.0,
        "tokens_per_s": generated_tokens / seconds if generated else 0.0,
    }
    return entry


# How samples are seeded, in fingerprint.json: samples seeded another way (older versions seeded
# each batch) are not resumed into.
SEEDING = "per item and sample"


def sample_seed(seed: int, task_id: str, sample: int) -> int:
    """The seed of sample `sample` of item `task_id`: a stable hash (not Python's `hash`, which
    changes between processes), below 2**63."""
    digest = hashlib.sha256(f"{seed}/{task_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _sampling_record(sampling: SamplingParams) -> dict[str, Any]:
    return {k: v for k, v in asdict(sampling).items() if k != "row_seeds"}


def score_samples(bench_tasks: BenchTasks, cfg: EvalConfig, out_dir: Path, reader: AnswerReader | None) -> dict[str, Any]:
    """Metrics of samples.jsonl for the current items and n; writes per_item.jsonl."""
    wanted = {t.task_id for t in bench_tasks.tasks}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for row in read_jsonl(out_dir / SAMPLES_FILE):
        key = (row["task_id"], row["sample"])
        if row["task_id"] in wanted and row["sample"] < cfg.n:
            rows.setdefault(key, row)
    samples = [_graded(row, reader) for row in rows.values()]
    items = group_by_item(samples)
    metrics = accuracy_metrics(items) | sample_metrics(samples)
    if reader is None:  # no answer reader for this reward: nothing to vote on or count
        metrics = {k: v for k, v in metrics.items() if not k.startswith("maj@") and k != "extracted_frac"}
    metrics |= {"items": float(len(items)), "n": float(cfg.n), "samples": float(len(samples))}
    write_jsonl(out_dir / PER_ITEM_FILE, _per_item_rows(bench_tasks, items, rows))
    return {
        "metrics": metrics,
        "breakdown": {key: breakdown(items, bench_tasks.labels(key)) for key in bench_tasks.bench.breakdown},
        "prompt_format": bench_tasks.prompt_format,
        "data": {
            "source": bench_tasks.source,
            "file_sha256": bench_tasks.file_sha256,
            "items_sha256": bench_tasks.items_sha256,
            "items": len(bench_tasks.tasks),
        },
        "files": {name: str(out_dir / name) for name in (SAMPLES_FILE, PER_ITEM_FILE)},
    }


def run_evaluation(
    engine: RolloutEngine,
    tokenizer: Any,
    cfg: EvalConfig,
    output_dir: Path,
    *,
    prepared: list[BenchTasks] | None = None,
    resume: bool = False,
    model: dict[str, Any] | None = None,
    extra_recipe: dict[str, Any] | None = None,
    graders: EvalGraders | None = None,
) -> dict[str, Any]:
    """Evaluate every benchmark of `cfg` into `output_dir/<bench>/` and write results.json."""
    started = _now()
    prepared = prepared if prepared is not None else prepare_benches(cfg, tokenizer)
    benches = {
        p.bench.name: evaluate_bench(engine, tokenizer, p, cfg, output_dir / p.bench.name, resume=resume, model=model, graders=graders)
        for p in prepared
    }
    results = {
        "llmrl_version": _version(),
        "started": started,
        "finished": _now(),
        "model": model or {},
        "recipe": {**cfg.model_dump(mode="json"), "sampling_temperature": cfg.sampling_temperature, **(extra_recipe or {})},
        "benches": benches,
    }
    write_json(output_dir / RESULTS_FILE, results)
    return results


def flat_metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """`eval/<bench>/<metric>` for every benchmark metric, plus its time and throughput."""
    flat: dict[str, float] = {}
    for name, entry in results["benches"].items():
        for key, value in entry["metrics"].items():
            flat[f"{prefix}/{name}/{key}"] = float(value)
        for key, groups in entry["breakdown"].items():
            for label, values in groups.items():
                flat[f"{prefix}/{name}/{key}/{label}/pass@1"] = values["pass@1"]
        flat[f"{prefix}/{name}/time_s"] = entry["run"]["time_s"]
        flat[f"{prefix}/{name}/tokens_per_s"] = entry["run"]["tokens_per_s"]
    return flat


# ---------------------------------------------------------------- during training

_PREPARED: dict[tuple[int, str], list[BenchTasks]] = {}


def evaluates_during_training(cfg: EvalConfig) -> bool:
    """Whether `should_evaluate` says yes after any step at all."""
    return bool(cfg.benches) and cfg.every != 0 and (cfg.every is not None or cfg.at_end)


def should_evaluate(cfg: EvalConfig, step: int, last_step: int) -> bool:
    """Whether the loop evaluates after `step`: every `cfg.every` steps and, with `at_end`, after the
    last one; `every=0` turns evaluation during training off, the end included (what a user who
    writes 0 means; `at_end=false` keeps the periodic evaluations but skips the final one)."""
    if not evaluates_during_training(cfg):
        return False
    periodic = cfg.every is not None and step % cfg.every == 0
    return periodic or (cfg.at_end and step == last_step)


def _prepared_for_training(cfg: EvalConfig, tokenizer: Any) -> list[BenchTasks]:
    key = (id(tokenizer), cfg.model_dump_json(exclude={"every", "at_end", "progress"}))
    if key not in _PREPARED:
        _PREPARED[key] = prepare_benches(cfg, tokenizer)
    return _PREPARED[key]


def start_training_evaluation(cfg: EvalConfig, tokenizer: Any) -> EvalGraders | None:
    """For the training loop, before it loads a model: load the benchmarks of `cfg` (kept for
    every evaluation of the run), so that a benchmark that cannot be read fails the run before it
    trains rather than after, and start their graders. None when the run never evaluates."""
    if not evaluates_during_training(cfg):
        return None
    try:
        prepared = _prepared_for_training(cfg, tokenizer)
    except (EvalError, DataConfigError) as exc:
        raise EvalError(f"eval.benches: {exc}") from exc
    return EvalGraders(prepared, cfg.reward_workers)


def evaluate_during_training(
    rollout_engine: RolloutEngine, tokenizer: Any, cfg: EvalConfig, step: int, output_dir: Path, graders: EvalGraders | None = None
) -> dict[str, float]:
    """Evaluate the rollout engine's current weights; files go to output_dir/eval/step_<step>/.

    Returns `eval/<bench>/pass@1` and friends for the metric log. Items and prompts are built
    once per run and reused at every evaluation step.
    """
    if not cfg.benches:
        return {}
    results = run_evaluation(
        rollout_engine, tokenizer, cfg, Path(output_dir) / "eval" / f"step_{step}", prepared=_prepared_for_training(cfg, tokenizer),
        model={"step": step}, graders=graders,
    )
    return flat_metrics(results)


# ---------------------------------------------------------------- parts


def _sample_row(
    unit: tuple[Task, int], trajectory: Trajectory, result: RewardResult, reader: AnswerReader | None, tokenizer: Any
) -> dict[str, Any]:
    task, sample = unit
    return {
        "task_id": task.task_id,
        "sample": sample,
        "prompt": tokenizer.decode(task.prompt_ids),
        "completion": trajectory.completion_text,
        "answer": reader.extract(trajectory.completion_text) if reader else None,
        "gold": task.answer,
        "correct": verdict(result),
        "score": result.score,
        "finish_reason": trajectory.finish_reason,
        "response_tokens": trajectory.num_policy_tokens,
    }


def verdict(result: RewardResult) -> bool:
    """Correct when the reward's `acc` part says so; a reward without one must give full marks (>= 1)."""
    if "acc" in result.parts:
        return result.parts["acc"] >= 0.5
    return result.score >= 1.0


def _graded(row: dict[str, Any], reader: AnswerReader | None) -> GradedSample:
    answer = row.get("answer")
    return GradedSample(
        task_id=row["task_id"],
        sample=int(row["sample"]),
        correct=bool(row["correct"]),
        answer=reader.vote_key(answer) if reader is not None and answer is not None else None,
        response_tokens=int(row["response_tokens"]),
        truncated=row["finish_reason"] == "length",
    )


def _per_item_rows(
    bench_tasks: BenchTasks, items: dict[str, list[GradedSample]], rows: dict[tuple[str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    out = []
    for task in bench_tasks.tasks:
        group = items.get(task.task_id)
        if not group:
            continue
        winner = majority_answer([s.answer for s in group])
        majority = None if winner is None else rows[(task.task_id, group[winner].sample)]["answer"]
        row = {"task_id": task.task_id, "num_correct": sum(s.correct for s in group), "n": len(group), "gold": task.answer}
        row["majority_answer"] = majority
        row.update({key: task.meta[key] for key in bench_tasks.bench.breakdown if key in task.meta})
        out.append(row)
    return out


def _fingerprint(bench_tasks: BenchTasks, sampling: SamplingParams, model: dict[str, Any] | None) -> dict[str, Any]:
    """What must not change between a run and its --resume (n and limit may grow)."""
    value = {
        "model": model or {},
        "bench": bench_tasks.bench.name,
        "reward": bench_tasks.bench.reward,
        "sampling": _sampling_record(sampling) | {"seeding": SEEDING},
        "prompt_format": {k: v for k, v in bench_tasks.prompt_format.items() if k != "example"},
        "data": {"source": bench_tasks.source, "file_sha256": bench_tasks.file_sha256},
    }
    return json.loads(json.dumps(value))  # as it reads back from disk, for comparison


def _resumable_rows(out_dir: Path, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    previous_path = out_dir / FINGERPRINT_FILE
    if previous_path.exists():
        previous = json.loads(previous_path.read_text())
        changed = sorted(k for k in fingerprint.keys() | previous.keys() if fingerprint.get(k) != previous.get(k))
        if changed:
            raise EvalError(
                f"--resume: the samples in {out_dir} were made with a different {', '.join(changed)}; "
                "use another --output or drop --resume"
            )
    seen: set[tuple[str, int]] = set()
    kept = []
    for row in read_jsonl(out_dir / SAMPLES_FILE):
        key = (row.get("task_id"), row.get("sample"))
        if key not in seen and isinstance(key[0], str) and isinstance(key[1], int):
            seen.add(key)  # type: ignore[arg-type]
            kept.append(row)
    return kept


def _progress_bar(cfg: EvalConfig, name: str, total: int, initial: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"eval {name}", unit="sample", dynamic_ncols=True, leave=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    try:
        return importlib.metadata.version("llmrl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- grader self-check


def grade_texts(reward: str, tasks: list[Task], texts: list[str], num_workers: int = 0) -> list[bool]:
    """Verdicts of `reward` on each text as a completion of the matching task."""
    trajectories = [
        Trajectory(task=task, token_ids=[], spans=[], rollout_logprobs=[], finish_reason="stop", group_id=i, completion_text=text)
        for i, (task, text) in enumerate(zip(tasks, texts))
    ]
    with RewardComputer(RewardConfig(functions=[reward], num_workers=num_workers)) as computer:
        return [verdict(result) for result in computer.score(trajectories)]


def derangement(keys: list[str], seed: int = 0) -> list[int]:
    """A fixed permutation p with keys[p[i]] != keys[i] for every i: each item gets another
    item's gold answer, and never one equal to its own (GSM8K has 21 pairs of items sharing a
    gold such as "2"; handing one's gold to the other would be a correct answer, not a test)."""
    import random

    size = len(keys)
    order = list(range(size))
    rng = random.Random(seed)
    for i in range(size - 1, 0, -1):  # Sattolo's algorithm: one cycle, so no fixed point
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    for i in range(size):
        if keys[order[i]] != keys[i]:
            continue
        # Swap targets with an item where both sides end up with a different answer.
        for j in sorted(range(size), key=lambda _: rng.random()):
            if keys[order[j]] != keys[i] and keys[order[i]] != keys[j]:
                order[i], order[j] = order[j], order[i]
                break
        else:
            raise ValueError(f"no derangement avoids equal answers: {keys[i]!r} is too common")
    return order


def grader_selfcheck(bench_tasks: BenchTasks, reference_key: str = "solution", shuffled: bool = False, num_workers: int = 0) -> list[str]:
    """Grade each item's reference solution (Task.meta[reference_key]) against its own gold
    answer, or with `shuffled` against another item's gold (a fixed derangement). Returns the
    ids of the items graded correct."""
    tasks = bench_tasks.tasks
    texts = [str(task.meta[reference_key]) for task in tasks]
    if shuffled:
        reader = ANSWER_READERS.get(bench_tasks.bench.reward)
        keys = [reader.vote_key(str(t.answer)) if reader else str(t.answer) for t in tasks]
        golds = [tasks[j].answer for j in derangement(keys)]
        tasks = [Task(task_id=t.task_id, messages=t.messages, answer=g, kind=t.kind, meta=t.meta) for t, g in zip(tasks, golds)]
    verdicts = grade_texts(bench_tasks.bench.reward, tasks, texts, num_workers)
    return [task.task_id for task, ok in zip(tasks, verdicts) if ok]

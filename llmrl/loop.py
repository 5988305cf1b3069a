"""The RL loop. Every algorithm is this loop with different registry entries plugged in:

    tasks -> workflow -> groups of trajectories -> batch -> [stages] -> advantages -> update -> weight sync

What varies by algorithm lives behind seams, never in `if` branches here: the workflow (how
tasks become scored groups), the stages (dynamic sampling, KL in the reward, the PPO critic...),
the advantage estimator and the loss (registries), the train engine (torch, deepspeed) and the
weight sync. docs/architecture.md draws the seams.
"""
from __future__ import annotations

import random
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llmrl.algorithms import ADVANTAGES, LOSSES
from llmrl.algorithms.advantages import compute_advantages
from llmrl.algorithms.base import AdvantageInputs
from llmrl.algorithms.dapo import reward_config_with_overlong
from llmrl.batch import collate, num_tokens
from llmrl.checkpoint import load_checkpoint, save_checkpoint
from llmrl.data import PromptSampler, build_tasks
from llmrl.distributed.cluster import build_cluster
from llmrl.distributed.weight_sync import weight_sync_for
from llmrl.eval.harness import evaluate_during_training, should_evaluate, start_training_evaluation
from llmrl.models import load_tokenizer
from llmrl.plot import write_run_curves
from llmrl.recipe import Recipe, mini_batched_rows_per_step, resolve_recipe
from llmrl.run_dir import open_run_dir
from llmrl.reward import RewardComputer, reward_needing_answer
from llmrl.rollout.base import SamplingParams
from llmrl.rollout.workflows import Workflow, WorkflowContext, build_workflow
from llmrl.stages import Stage, StageSetup, build_stages
from llmrl.tracking import Tracker, truncate_metrics
from llmrl.train.engine import TrainEngine
from llmrl.train.updates import add_policy_logprobs, run_updates, updates_per_run
from llmrl.types import Group, GroupIds, Trajectory


def train(recipe: Recipe, overwrite: bool = False) -> Path:
    """Run the recipe; return the run directory (its last checkpoint holds the trained policy).
    Raises TrainingStopped when a signal stopped it early, after the checkpoint is saved."""
    recipe = resolve_recipe(recipe)
    # The run directory is claimed (locked, checked against an earlier run, the checkpoint to
    # resume from verified) before anything expensive starts.
    run = open_run_dir(recipe, overwrite)
    run_dir = run.path
    seed_everything(recipe.seed)
    algo = recipe.algorithm
    stopped: TrainingStopped | None = None

    # Everything started is stopped on the way out, however far start-up got (a placement that
    # times out still closes the reward pool and a local Ray).
    with ExitStack() as cleanup:
        cleanup.callback(run.release)
        # Parts: data, rewards and the evaluation's graders (their workers are forked before the
        # model is loaded, so they stay small and share no page the trainer writes later), the
        # policy's train engine, the algorithm's stages, the rollout engine, each placed by the
        # cluster backend.
        tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision)
        graded_by = reward_needing_answer([spec.fn for spec in recipe.reward.function_specs()])
        taskset = build_tasks(recipe.data, tokenizer, split=recipe.data.split, graded_by=graded_by)
        sampler = PromptSampler(taskset.tasks, recipe.train.prompts_per_step, seed=recipe.seed, shuffle=recipe.data.shuffle)
        rewards = RewardComputer(reward_config_with_overlong(recipe.reward, algo, recipe.rollout.max_new_tokens, taskset.kind), default_kind=taskset.kind)
        cleanup.callback(rewards.close)
        rewards.start()
        graders = start_training_evaluation(recipe.eval, tokenizer)  # a bad benchmark fails here, not after training
        if graders is not None:
            cleanup.callback(graders.close)
        total_updates = updates_per_run(recipe.train.steps, mini_batched_rows_per_step(recipe), algo, recipe.train.mini_batch_size)
        cluster = build_cluster(recipe)  # in this process, or Ray actors behind the same protocols
        cleanup.callback(cluster.shutdown)
        trainer = cluster.train_engine(recipe, total_updates, role="policy")
        stages = build_stages(StageSetup(recipe, algo, trainer, total_updates, cluster, tokenizer, taskset.tasks))
        rollout = cluster.rollout_engine(recipe, tokenizer)
        workflow = build_workflow(recipe.rollout.workflow)
        weight_sync = weight_sync_for(recipe.rollout, trainer, [rollout])
        advantage_fn = ADVANTAGES[algo.advantage]
        loss_fn = LOSSES[algo.loss]
        group_ids = GroupIds()

        weight_sync.setup()
        start_step = resume_from(run.checkpoint, run_dir, trainer, sampler, stages, workflow, group_ids)
        if start_step:
            weight_sync.sync(start_step)
        workflow.start(taskset.tasks, WorkflowContext(rollout, rewards, sampling_for(recipe, 0), tokenizer, group_ids, 0, recipe.rollout.n))
        tracker = Tracker(run_dir, recipe.logging, recipe.model_dump(mode="json"))
        cleanup.callback(tracker.close)
        stop = GracefulStop()
        cleanup.callback(stop.restore)
        progress = make_progress(recipe, start_step)
        cleanup.callback(progress.close)
        for step in range(start_step + 1, recipe.train.steps + 1):
            timer = StepTimer()
            rewards.begin_step(step)  # the step's reward budget and failure streaks

            # 1-3. tasks -> workflow -> scored groups (a stage may ask for more rounds: DAPO)
            context = WorkflowContext(rollout, rewards, sampling_for(recipe, step), tokenizer, group_ids, step, recipe.rollout.n, timer)
            groups = gather_groups(workflow, sampler, stages, context, recipe)
            trajectories = [t for g in groups for t in g.trajectories]
            sampled = [t for t in trajectories if not t.expert]  # expert rows (CHORD, SFT) were not generated

            # 4. batch, with the logprobs the update needs before it changes the policy
            batch = collate(trajectories, tokenizer.pad_token_id)
            for stage in stages:
                stage.prepare_batch(batch)
            with timer("logprobs"):
                add_policy_logprobs(batch, trainer, algo, recipe.train, need_old=any(s.needs_old_logprobs for s in stages))
            stage_metrics: dict[str, float] = {}
            for stage in stages:
                stage_metrics.update(stage.before_advantages(batch, timer))

            # 5. advantages (expert rows kept out of the statistics)
            batch["advantages"], adv_metrics = compute_advantages(advantage_fn, AdvantageInputs.from_batch(batch, algo))
            for stage in stages:
                stage.after_advantages(batch)
            note_advantages(trajectories, batch)

            # 6. update: the stages' own (a critic), then the policy unless a stage holds it back
            update_metrics: dict[str, float] = {}
            for stage in stages:
                update_metrics.update(stage.update(batch, step, timer))
            if all(stage.policy_learns(step) for stage in stages):
                with timer("update"):
                    update_metrics.update(run_updates(trainer, batch, loss_fn, algo, recipe.train, recipe.seed, step, prefix="actor"))

            # 7. weight sync: the rollout engine samples the next step from the new policy
            with timer("sync"):
                synced = weight_sync.sync(step)

            metrics = {
                **reward_metrics(sampled, rewards.metrics()),
                **{k: v for stage in stages for k, v in stage.metrics().items()},
                **workflow.metrics(),
                **response_metrics(sampled),
                **adv_metrics,
                **stage_metrics,
                **update_metrics,
                **timer.metrics(),
                **synced.metrics(),
                **rollout.metrics(),
                "perf/tokens_per_s": num_tokens(batch) / max(timer.total, 1e-9),
                "perf/gen_tokens_per_s": sum(t.num_policy_tokens for t in sampled) / max(timer.seconds.get("generate", 0.0), 1e-9),
            }
            if step == start_step + 1:
                metrics.update({f"data/{k}": float(v) for k, v in taskset.stats.items()})

            # 8. held-out evaluation of the synced weights, with the harness `llmrl eval` runs
            if should_evaluate(recipe.eval, step, recipe.train.steps):
                started = time.perf_counter()
                metrics.update(evaluate_during_training(rollout, tokenizer, recipe.eval, step, run_dir, graders))
                metrics["time/eval"] = time.perf_counter() - started
            tracker.log(step, metrics)
            tracker.log_rollouts(step, sampled)
            progress.update(step, metrics)

            due = recipe.checkpoint.every and step % recipe.checkpoint.every == 0
            if due or step == recipe.train.steps or stop.requested:
                save_checkpoint(
                    run_dir, step, trainer, tokenizer, loop_state(sampler, stages, workflow, group_ids), recipe.checkpoint.keep_last,
                    recipe.checkpoint.save_optimizer, stage_engines(stages),
                )
            if stop.requested:
                stopped = TrainingStopped(run_dir, step, stop.signal_name)
                break
    if recipe.logging.curves:
        try:
            write_run_curves(run_dir)
        except Exception as err:  # noqa: BLE001 - a picture must not fail a run whose checkpoint is saved
            print(f"llmrl: warning: curves.png not written: {type(err).__name__}: {err}", file=sys.stderr)
    if stopped is not None:
        raise stopped
    return run_dir


# ------------------------------------------------------------------------------ parts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_groups(workflow: Workflow, sampler: PromptSampler, stages: list[Stage], context: WorkflowContext, recipe: Recipe) -> list[Group]:
    """Generation rounds until every stage accepts the groups it has (one round unless a stage,
    like DAPO's dynamic sampling, holds out for more). Each round samples with its own seed."""
    round_index = 0
    while True:
        context.sampling = sampling_for(recipe, context.step, round_index)
        with context.timer("generate"):
            tasks = sampler.next_batch()
        groups: list[Group] | None = workflow.run(tasks, context)
        for stage in stages:
            groups = stage.gather(groups)
            if groups is None:
                break
        if groups is not None:
            return groups
        round_index += 1


def sampling_for(recipe: Recipe, step: int, round_index: int = 0) -> SamplingParams:
    r = recipe.rollout
    # A per-step (and per-round) seed makes a resumed run sample exactly what an uninterrupted one would.
    seed = recipe.seed * 1_000_003 + step + round_index * 7_919_000
    return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, list(r.stop), seed=seed, for_training=True)


def note_advantages(trajectories: list[Trajectory], batch: dict[str, torch.Tensor]) -> None:
    """Each trajectory's mean advantage over its policy tokens, for the rollout logs."""
    for i, traj in enumerate(trajectories):
        traj.advantage = float(batch["advantages"][i][batch["loss_mask"][i] > 0].mean()) if traj.num_policy_tokens else 0.0


def loop_state(sampler: PromptSampler, stages: list[Stage], workflow: Workflow, group_ids: GroupIds) -> dict[str, Any]:
    """What a checkpoint needs besides the engines to resume exactly."""
    return {"sampler": sampler.state_dict(), "group_ids": group_ids.state_dict(), "stages": {s.name: s.state_dict() for s in stages},
            "workflow": workflow.state_dict()}


def stage_engines(stages: list[Stage]) -> dict[str, TrainEngine]:
    return {name: engine for stage in stages for name, engine in stage.engines().items()}


class TrainingStopped(Exception):
    """A signal stopped the run early; its checkpoint is saved, and `--resume` continues it."""

    def __init__(self, run_dir: Path, step: int, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved in {run_dir}, continue with --resume")
        self.run_dir, self.step, self.signal_name = run_dir, step, signal_name


def resume_from(
    ckpt: Path | None, run_dir: Path, trainer: TrainEngine, sampler: PromptSampler, stages: list[Stage], workflow: Workflow,
    group_ids: GroupIds,
) -> int:
    if ckpt is None:
        return 0
    state = load_checkpoint(ckpt, trainer, stage_engines(stages))
    sampler.load_state_dict(state["sampler"])
    group_ids.load_state_dict(state.get("group_ids", {"next_id": 0}))
    for stage in stages:
        if stage.name in state.get("stages", {}):
            stage.load_state_dict(state["stages"][stage.name])
    workflow.load_state_dict(state.get("workflow", {}))
    truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    print(f"resumed from {ckpt} (step {state['step']})", file=sys.stderr)
    return int(state["step"])


# ------------------------------------------------------------------------------ metrics


def reward_metrics(trajectories: list[Trajectory], computer_metrics: dict[str, float]) -> dict[str, float]:
    if not trajectories:  # a step without rollouts (SFT)
        return dict(computer_metrics)
    scores = torch.tensor([t.reward for t in trajectories])
    out = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0}
    names = sorted({k for t in trajectories for k in t.reward_parts})
    for name in names:
        vals = [t.reward_parts[name] for t in trajectories if name in t.reward_parts]
        out[f"reward/{name}"] = float(np.mean(vals))
    out.update(computer_metrics)
    return out


def response_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    if not trajectories:
        return {}
    lengths = [t.num_policy_tokens for t in trajectories]
    return {
        "response/length_mean": float(np.mean(lengths)),
        "response/length_max": float(max(lengths)),
        "response/truncated_frac": float(np.mean([t.finish_reason == "length" for t in trajectories])),
    }


class StepTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        return {**{f"time/{k}": v for k, v in self.seconds.items()}, "time/step": self.total}


class GracefulStop:
    """SIGTERM (what schedulers send before a kill) or a first Ctrl-C: finish the step,
    checkpoint, exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing this step, then saving a checkpoint", file=sys.stderr)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class make_progress:
    """A tqdm bar over steps showing the last reward, or nothing when disabled."""

    def __init__(self, recipe: Recipe, start_step: int) -> None:
        self.bar = None
        if recipe.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=recipe.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            shown = {"reward": ("reward/mean", ".3f"), "len": ("response/length_mean", ".0f"), "sft": ("chord/sft_loss", ".3f")}
            self.bar.set_postfix({k: format(metrics[m], f) for k, (m, f) in shown.items() if m in metrics}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

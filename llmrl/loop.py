"""The RL loop. Every algorithm is this loop with different registry entries plugged in:

    tasks -> workflow -> trajectories -> rewards -> batch -> advantages -> update -> weight sync
"""
from __future__ import annotations

import random
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llmrl.algorithms import ADVANTAGES, LOSSES, get_preset, needs_reference, resolve_algorithm
from llmrl.algorithms.advantages import mask_truncated
from llmrl.algorithms.base import LossContext
from llmrl.algorithms.dapo import GroupFilter, reward_config_with_overlong
from llmrl.algorithms.kl import kl_in_reward
from llmrl.algorithms.kl_controller import KLController, build_kl_controller, mean_sequence_kl
from llmrl.batch import collate, iter_mini_batches, num_tokens, select_rows, split_micro_batches
from llmrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmrl.data import PromptSampler, build_tasks
from llmrl.distributed.weight_sync import sync_weights
from llmrl.eval.harness import evaluate_during_training, should_evaluate
from llmrl.models import load_causal_lm, load_policy, load_tokenizer
from llmrl.recipe import Recipe, dump_recipe
from llmrl.reward import RewardComputer
from llmrl.rollout.base import SamplingParams, build_rollout_engine
from llmrl.rollout.workflows import WORKFLOWS
from llmrl.tracking import Tracker, truncate_metrics
from llmrl.train.backends import build_train_backend
from llmrl.train.critic import build_critic_engine, old_values, value_targets
from llmrl.train.torch_engine import TorchTrainEngine
from llmrl.types import Trajectory


def train(recipe: Recipe) -> Path:
    """Run the recipe; return the run directory (its last checkpoint holds the trained policy)."""
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    seed_everything(recipe.seed)
    algo = resolve_algorithm(recipe.algorithm)
    if algo.loss_scale_factor is None:
        algo = algo.model_copy(update={"loss_scale_factor": recipe.rollout.max_new_tokens})
    preset = get_preset(algo.name)

    # Parts: data, rewards (their worker pool starts before the model is loaded, so forked
    # workers stay small), the policy and its train engine, the rollout engine.
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.revision)
    taskset = build_tasks(recipe.data, tokenizer, split="train")
    sampler = PromptSampler(taskset.tasks, recipe.train.prompts_per_step, seed=recipe.seed, shuffle=recipe.data.shuffle)
    reward_cfg = reward_config_with_overlong(recipe.reward, algo, recipe.rollout.max_new_tokens, taskset.kind)
    rewards = RewardComputer(reward_cfg, default_kind=taskset.kind)
    trainer = build_train_engine(recipe, algo)
    critic = build_critic_engine(recipe, algo, updates_per_run(recipe, algo)) if preset.needs_critic else None
    kl_control = build_kl_controller(algo)
    rollout = build_rollout_engine(recipe.rollout, recipe.model, tokenizer, seed=recipe.seed)
    workflow = WORKFLOWS[preset.workflow]
    advantage_fn = ADVANTAGES[algo.advantage]
    loss_fn = LOSSES[algo.loss]

    companions = {"critic": critic} if critic is not None else {}
    start_step = resume_if_asked(recipe, run_dir, trainer, sampler, companions, kl_control)
    if start_step:
        sync_weights(trainer, rollout)
    tracker = Tracker(run_dir, recipe.logging, recipe.model_dump(mode="json"))
    stop = GracefulStop()
    progress = make_progress(recipe, start_step)
    loop_state: dict[str, Any] = {}
    try:
        for step in range(start_step + 1, recipe.train.steps + 1):
            timer = StepTimer()

            # 1-3. tasks -> workflow -> trajectories -> rewards (DAPO's dynamic sampling may take
            # several rounds to collect groups whose reward varies)
            trajectories, sampling_metrics = sample_and_score(recipe, algo, step, sampler, workflow, rollout, rewards, tokenizer, timer)

            # 4. batch, with the logprobs the update needs before it changes the policy
            batch = collate(trajectories, tokenizer.pad_token_id)
            if algo.mask_truncated_completions:
                truncated = torch.tensor([t.finish_reason == "length" for t in trajectories])
                batch["loss_mask"] = mask_truncated(batch["loss_mask"], truncated)
            with timer("logprobs"):
                kl_metrics = add_reference_and_old_logprobs(batch, trainer, algo, recipe, kl_control)
            if critic is not None:
                with timer("values"):
                    batch["old_values"] = old_values(critic, batch, recipe.train.micro_batch_size or 8)

            # 5. advantages (with a critic, also the returns it is fit to)
            advantages, adv_metrics = advantage_fn(
                batch["token_rewards"], batch["loss_mask"], batch["group_ids"], batch["turn_ids"], batch.get("old_values"), algo
            )
            batch["advantages"] = advantages
            if critic is not None:
                batch["returns"] = value_targets(batch, algo)
            for i, traj in enumerate(trajectories):
                traj.advantage = float(advantages[i][batch["loss_mask"][i] > 0].mean()) if traj.num_policy_tokens else 0.0

            # 6. update: the critic, then the policy once the critic's warm-up is over
            update_metrics: dict[str, float] = {}
            if critic is not None:
                with timer("critic_update"):
                    update_metrics.update(run_updates(critic, batch, LOSSES["value"], algo, recipe, step, prefix="critic"))
            if step > algo.critic_warmup_steps or critic is None:
                with timer("update"):
                    update_metrics.update(run_updates(trainer, batch, loss_fn, algo, recipe, step, prefix="actor"))

            # 7. weight sync: the rollout engine samples the next step from the new policy
            with timer("sync"):
                sync_weights(trainer, rollout)

            metrics = {
                **reward_metrics(trajectories, rewards.metrics()),
                **sampling_metrics,
                **response_metrics(trajectories),
                **adv_metrics,
                **kl_metrics,
                **update_metrics,
                **timer.metrics(),
                "perf/tokens_per_s": num_tokens(batch) / max(timer.total, 1e-9),
                "perf/gen_tokens_per_s": sum(t.num_policy_tokens for t in trajectories) / max(timer.seconds["generate"], 1e-9),
            }
            if step == start_step + 1:
                metrics.update({f"data/{k}": float(v) for k, v in taskset.stats.items()})

            # 8. held-out evaluation of the synced weights, with the harness `llmrl eval` runs
            if should_evaluate(recipe.eval, step, recipe.train.steps):
                started = time.perf_counter()
                metrics.update(evaluate_during_training(rollout, tokenizer, recipe.eval, step, run_dir))
                metrics["time/eval"] = time.perf_counter() - started
            tracker.log(step, metrics)
            tracker.log_rollouts(step, trajectories)
            progress.update(step, metrics)

            loop_state = {"sampler": sampler.state_dict(), "kl_controller": kl_control.state_dict()}
            due = recipe.checkpoint.every and step % recipe.checkpoint.every == 0
            if due or step == recipe.train.steps or stop.requested:
                save_checkpoint(
                    run_dir, step, trainer, tokenizer, loop_state, recipe.checkpoint.keep_last, recipe.checkpoint.save_optimizer,
                    companions,
                )
            if stop.requested:
                print(f"\nstopped by {stop.signal_name} after step {step}; checkpoint saved, resume with resume=auto", file=sys.stderr)
                break
    finally:
        progress.close()
        tracker.close()
        rewards.close()
        stop.restore()
    return run_dir


# ------------------------------------------------------------------------------ parts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_train_engine(recipe: Recipe, algo: Any) -> TorchTrainEngine:
    policy = load_policy(recipe.model)
    reference = None
    if needs_reference(algo) and not recipe.model.lora.enabled:
        reference = load_causal_lm(recipe.model).eval().requires_grad_(False)
    return build_train_backend(
        recipe.train.backend, policy, recipe.train, total_updates=updates_per_run(recipe, algo),
        temperature=recipe.rollout.temperature, reference=reference,
    )


def updates_per_run(recipe: Recipe, algo: Any) -> int:
    """Optimizer steps over the run (the lr schedule's length): epochs x mini-batches x steps."""
    trajectories = recipe.train.prompts_per_step * recipe.rollout.n
    return recipe.train.steps * algo.ppo_epochs * (trajectories // (recipe.train.mini_batch_size or trajectories))


def resume_if_asked(
    recipe: Recipe, run_dir: Path, trainer: TorchTrainEngine, sampler: PromptSampler, companions: dict[str, Any], kl_control: KLController
) -> int:
    if recipe.resume == "never":
        return 0
    ckpt = latest_checkpoint(run_dir) if recipe.resume == "auto" else Path(recipe.resume)
    if ckpt is None:
        return 0  # resume=auto on a fresh run directory starts from scratch
    if not ckpt.exists():
        raise ValueError(f"resume: checkpoint directory {ckpt} does not exist")
    state = load_checkpoint(ckpt, trainer, companions)
    sampler.load_state_dict(state["sampler"])
    if "kl_controller" in state:
        kl_control.load_state_dict(state["kl_controller"])
    truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    print(f"resumed from {ckpt} (step {state['step']})", file=sys.stderr)
    return int(state["step"])


def sample_and_score(
    recipe: Recipe, algo: Any, step: int, sampler: PromptSampler, workflow: Any, rollout: Any, rewards: RewardComputer,
    tokenizer: Any, timer: "StepTimer",
) -> tuple[list[Trajectory], dict[str, float]]:
    """One step's scored trajectories, and the dynamic-sampling metrics when it is on."""
    groups = GroupFilter(recipe.train.prompts_per_step, algo.dynamic_sampling_metric)
    while True:
        with timer("generate"):
            tasks = sampler.next_batch()
            # group ids stay unique over the run: round r of step s starts at (s - 1 + r * steps) * prompts
            first_group = (step - 1 + groups.rounds * recipe.train.steps) * recipe.train.prompts_per_step
            sampling = sampling_for(recipe, step, groups.rounds)
            trajectories = workflow(tasks, rollout, sampling, recipe.rollout.n, tokenizer, first_group)
        with timer("reward"):
            for traj, result in zip(trajectories, rewards.score(trajectories)):
                traj.reward, traj.reward_parts = result.score, result.parts
        if not algo.dynamic_sampling:
            return trajectories, {}
        groups.add(trajectories)
        if groups.full or groups.rounds >= max_rounds(algo):
            return groups.result()


def sampling_for(recipe: Recipe, step: int, round_index: int = 0) -> SamplingParams:
    r = recipe.rollout
    # A per-step (and per-round) seed makes a resumed run sample exactly what an uninterrupted one would.
    seed = recipe.seed * 1_000_003 + step + round_index * 7_919_000
    return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, list(r.stop), seed=seed)


def max_rounds(algo: Any) -> int:
    """Generation rounds one step may take: 1 without dynamic sampling; <= 0 means no cap."""
    if not algo.dynamic_sampling:
        return 1
    return algo.max_num_gen_batches if algo.max_num_gen_batches > 0 else 1_000_000


def add_reference_and_old_logprobs(
    batch: dict[str, torch.Tensor], trainer: TorchTrainEngine, algo: Any, recipe: Recipe, kl_control: KLController
) -> dict[str, float]:
    """Reference logprobs when a KL term needs them; old logprobs only when the update cannot
    take them from its own first forward (several epochs or mini-batches, or KL in the reward).
    A KL in the reward is subtracted here with the controller's current weight, which then adapts."""
    micro = recipe.train.micro_batch_size or 8
    if needs_reference(algo):
        batch["ref_logprobs"] = trainer.forward(batch, {"logprobs"}, reference=True, micro_batch_size=micro)["logprobs"]
    total = batch["input_ids"].shape[0]
    several_updates = algo.ppo_epochs > 1 or (recipe.train.mini_batch_size or total) < total
    reward_kl = needs_reference(algo) and algo.kl_placement == "reward"
    if several_updates or reward_kl:
        batch["old_logprobs"] = trainer.forward(batch, {"logprobs"}, micro_batch_size=micro)["logprobs"]
    if not reward_kl:
        return {}
    batch["token_rewards"], kl = kl_in_reward(
        batch["token_rewards"], batch["old_logprobs"], batch["ref_logprobs"], batch["loss_mask"], kl_control.value, algo.kl_estimator
    )
    current_kl = mean_sequence_kl(kl, batch["loss_mask"])
    metrics = {"actor/reward_kl": current_kl, "actor/kl_coef": kl_control.value}
    kl_control.update(current_kl, batch["input_ids"].shape[0])
    return metrics


def run_updates(
    engine: TorchTrainEngine, batch: dict[str, torch.Tensor], loss_fn: Any, algo: Any, recipe: Recipe, step: int, prefix: str
) -> dict[str, float]:
    """ppo_epochs passes of mini-batch optimizer steps; the engine's actor/* metrics are renamed to `prefix`/*."""
    rows = batch["input_ids"].shape[0]
    mini = recipe.train.mini_batch_size or rows
    shuffle = torch.Generator().manual_seed(recipe.seed * 7919 + step) if mini < rows else None
    ctx = LossContext(step=step - 1, cfg=algo, generator=torch.Generator().manual_seed(recipe.seed * 104729 + step))
    sums: dict[str, float] = {}
    count = 0
    first = True
    for _ in range(algo.ppo_epochs):
        for mini_rows in iter_mini_batches(rows, mini, shuffle):
            micro = split_micro_batches(select_rows(batch, mini_rows), recipe.train.micro_batch_size, recipe.train.micro_batch_tokens)
            metrics = engine.step(micro, loss_fn, ctx, want=loss_outputs(loss_fn), track_rollout_diff=first)
            first = False
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    averaged = {k: v / count for k, v in sums.items() if not k.startswith("rollout/")}
    averaged.update({k: v for k, v in sums.items() if k.startswith("rollout/")})
    averaged["actor/updates"] = float(count)
    if prefix != "actor":
        averaged = {f"{prefix}/{k[len('actor/'):]}" if k.startswith("actor/") else k: v for k, v in averaged.items()}
    return averaged


def loss_outputs(loss_fn: Any) -> set[str]:
    """What the model must output for a loss: values for a value loss, else logprobs and entropy."""
    return set(getattr(loss_fn, "outputs", {"logprobs", "entropy"}))


# ------------------------------------------------------------------------------ metrics


def reward_metrics(trajectories: list[Trajectory], computer_metrics: dict[str, float]) -> dict[str, float]:
    scores = torch.tensor([t.reward for t in trajectories])
    out = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0}
    names = sorted({k for t in trajectories for k in t.reward_parts})
    for name in names:
        vals = [t.reward_parts[name] for t in trajectories if name in t.reward_parts]
        out[f"reward/{name}"] = float(np.mean(vals))
    out.update(computer_metrics)
    return out


def response_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
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
            self.bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['response/length_mean']:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Stages: the parts of a step an algorithm adds to the one loop, instead of `if` branches in it.

`llmrl/loop.py` calls every hook of every active stage in order; a stage overrides the hooks it
needs. A stage is active when the algorithm's preset lists it (`AlgorithmPreset.stages`, e.g.
PPO's `critic`) or when its `wanted(algo)` says the recipe's options switch it on (DAPO's
`dynamic_sampling`, a KL penalty in the reward, truncation masking).

Hooks, in the order the loop calls them within a step:
    gather(groups)                 after each generation round: the step's groups, or None for another round
    prepare_batch(batch)           before any forward pass (masks)
    before_advantages(batch, t)    after old/reference logprobs (reward channels, critic values)
    after_advantages(batch)        (critic returns)
    update(batch, step, t)         before the policy update (critic update); returns metrics
    policy_learns(step)            False skips this step's policy update (critic warm-up)
and `metrics()`, `state_dict()` / `load_state_dict()` (saved in the checkpoint's loop state),
`engines()` (further train engines the checkpoint saves and restores).

Adding one: subclass `Stage`, decorate it with `@STAGES.register("name")`, and list the name in a
preset or give it a `wanted` rule (docs/architecture.md has a worked example).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

from llmrl.algorithms import LOSSES, get_preset
from llmrl.algorithms.advantages import mask_truncated
from llmrl.algorithms.base import REWARD_PREFIX, Batch
from llmrl.algorithms.config import needs_reference
from llmrl.algorithms.dapo import GroupFilter
from llmrl.algorithms.kl import kl_reward_channel
from llmrl.algorithms.kl_controller import build_kl_controller, mean_sequence_kl
from llmrl.batch import on_policy_mask
from llmrl.registry import Registry
from llmrl.train.critic import old_values, value_targets
from llmrl.train.engine import TrainEngine
from llmrl.train.updates import rollout_gap_metric, run_updates
from llmrl.data.expert import ExpertExample, build_expert_set
from llmrl.data.sampler import PromptSampler
from llmrl.types import Group, Span, Task, Trajectory

Timer = Callable[[str], AbstractContextManager[None]]


@dataclass
class StageSetup:
    """What a stage may build itself from."""

    recipe: Any  # the resolved Recipe
    algo: Any  # the resolved AlgorithmConfig
    trainer: TrainEngine  # the policy's engine
    total_updates: int  # optimizer steps over the run (lr schedules)
    cluster: Any = None  # llmrl.distributed.cluster.Cluster: builds further engines where they run
    tokenizer: Any = None  # the policy's tokenizer (expert rows are tokenized with it)
    tasks: list[Task] | None = None  # the training tasks (their worked solutions are the default expert data)


class Stage:
    """Base class: every hook does nothing."""

    name = ""
    needs_old_logprobs = False  # reads batch["old_logprobs"] before the update

    def __init__(self, setup: StageSetup) -> None:
        self.setup = setup
        self.algo = setup.algo

    @classmethod
    def wanted(cls, algo: Any) -> bool:
        """True when the algorithm's options switch this stage on without the preset listing it."""
        return False

    def gather(self, groups: list[Group]) -> list[Group] | None:
        return groups

    def prepare_batch(self, batch: Batch) -> None:
        pass

    def before_advantages(self, batch: Batch, timer: Timer) -> dict[str, float]:
        return {}

    def after_advantages(self, batch: Batch) -> None:
        pass

    def update(self, batch: Batch, step: int, timer: Timer) -> dict[str, float]:
        return {}

    def policy_learns(self, step: int) -> bool:
        return True

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def engines(self) -> dict[str, TrainEngine]:
        return {}


STAGES: Registry[type[Stage]] = Registry("stage")


def active_stage_names(algo: Any) -> list[str]:
    """The stages a resolved algorithm runs, in registry order (the order the hooks run in): those
    its preset lists and those its options switch on."""
    listed = get_preset(algo.name).stages
    for name in listed:
        STAGES.check(name)
    return [name for name, cls in STAGES.items() if name in listed or cls.wanted(algo)]


def build_stages(setup: StageSetup) -> list[Stage]:
    return [STAGES[name](setup) for name in active_stage_names(setup.algo)]


# ------------------------------------------------------------------------------ built-in stages


@STAGES.register("dynamic_sampling")
class DynamicSampling(Stage):
    """DAPO (Yu et al. 2025, arXiv 2503.14476): drop groups whose `dynamic_sampling_metric` is the
    same for every member and generate more rounds until the step has `prompts_per_step` groups,
    at most `max_num_gen_batches` rounds."""

    name = "dynamic_sampling"

    @classmethod
    def wanted(cls, algo: Any) -> bool:
        return bool(algo.dynamic_sampling)

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self._filter = self._new_filter()
        self._metrics: dict[str, float] = {}

    def _new_filter(self) -> GroupFilter:
        return GroupFilter(self.setup.recipe.train.prompts_per_step, self.algo.dynamic_sampling_metric)

    def gather(self, groups: list[Group]) -> list[Group] | None:
        self._filter.add(groups)
        cap = self.algo.max_num_gen_batches if self.algo.max_num_gen_batches > 0 else 1_000_000
        if not (self._filter.full or self._filter.rounds >= cap):
            return None
        kept, self._metrics = self._filter.result()
        self._filter = self._new_filter()
        return kept

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)


@STAGES.register("truncation_mask")
class TruncationMask(Stage):
    """Overlong filtering (DAPO; TRL `mask_truncated_completions`): responses cut by the length
    limit get an all-zero loss mask."""

    name = "truncation_mask"

    @classmethod
    def wanted(cls, algo: Any) -> bool:
        return bool(algo.mask_truncated_completions)

    def prepare_batch(self, batch: Batch) -> None:
        batch["loss_mask"] = mask_truncated(batch["loss_mask"], batch["truncated"])


@STAGES.register("kl_in_reward")
class KLInReward(Stage):
    """A KL penalty to the reference as reward channel `kl` (kl_placement=reward), with its
    fixed or adaptive weight (Ziegler et al. 2019), which adapts after each step."""

    name = "kl_in_reward"
    needs_old_logprobs = True

    @classmethod
    def wanted(cls, algo: Any) -> bool:
        return needs_reference(algo) and algo.kl_placement == "reward"

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self.controller = build_kl_controller(self.algo)

    def before_advantages(self, batch: Batch, timer: Timer) -> dict[str, float]:
        mask = on_policy_mask(batch)  # expert rows were not sampled: no KL penalty, no share of the mean
        channel, kl = kl_reward_channel(batch["old_logprobs"], batch["ref_logprobs"], mask, self.controller.value, self.algo.kl_estimator)
        batch[REWARD_PREFIX + "kl"] = channel
        current_kl = mean_sequence_kl(kl, mask)
        metrics = {"actor/reward_kl": current_kl, "actor/kl_coef": self.controller.value}
        self.controller.update(current_kl, batch["input_ids"].shape[0])
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


@STAGES.register("critic")
class Critic(Stage):
    """PPO's critic (Schulman et al. 2017; Ouyang et al. 2022): values before the update, GAE
    returns as its targets, its own optimizer step before the policy's, and a warm-up in which
    only the critic learns."""

    name = "critic"

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        self.engine = setup.cluster.train_engine(setup.recipe, setup.total_updates, role="critic")

    def before_advantages(self, batch: Batch, timer: Timer) -> dict[str, float]:
        with timer("values"):
            batch["old_values"] = old_values(self.engine, batch)
        return {}

    def after_advantages(self, batch: Batch) -> None:
        batch["returns"] = value_targets(batch, self.algo)

    def update(self, batch: Batch, step: int, timer: Timer) -> dict[str, float]:
        recipe = self.setup.recipe
        with timer("critic_update"):
            metrics = run_updates(self.engine, batch, LOSSES["value"], self.algo, recipe.train, recipe.seed, step, prefix="critic")
        if not self.policy_learns(step):  # no policy update measures the rollout gap this step
            metrics.update(rollout_gap_metric(batch, self.setup.trainer))
        return metrics

    def policy_learns(self, step: int) -> bool:
        return step > self.algo.critic_warmup_steps

    def engines(self) -> dict[str, TrainEngine]:
        return {"critic": self.engine}


@STAGES.register("expert_mix")
class ExpertMix(Stage):
    """CHORD and SFT (Zhang et al. 2025, arXiv 2508.11408): each step's groups are joined by
    `expert_rows_per_step` rows of expert data (the `expert` recipe section), drawn in a seeded
    order that a resumed run continues. An expert row is the prompt plus the expert's response as
    its policy span; it has no rollout logprobs (zeros, never read), no reward, a group of its own
    (negative id) and `expert=True`, which keeps it out of every advantage statistic."""

    name = "expert_mix"

    def __init__(self, setup: StageSetup) -> None:
        super().__init__(setup)
        from llmrl.recipe import expert_rows_per_step  # the recipe module imports this one's registry

        recipe = setup.recipe
        self.expert = build_expert_set(recipe.expert, recipe.data, setup.tokenizer, setup.tasks)
        self.rows = expert_rows_per_step(recipe)
        self.sampler = PromptSampler(self.expert.examples, max(self.rows, 1), seed=recipe.seed, shuffle=recipe.data.shuffle)
        self.first_step = True

    def gather(self, groups: list[Group]) -> list[Group] | None:
        drawn = self.sampler.next_batch()[: self.rows]
        return groups + [Group(-1 - i, ex.task, [expert_trajectory(ex, -1 - i)]) for i, ex in enumerate(drawn)]

    def metrics(self) -> dict[str, float]:
        out = {"chord/expert_rows": float(self.rows)}
        if self.first_step:  # like the data/* figures: where the expert rows came from, once
            out.update({f"data/expert_{k}": float(v) for k, v in self.expert.stats.items()})
            self.first_step = False
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def expert_trajectory(example: ExpertExample, group_id: int) -> Trajectory:
    p, total = len(example.task.prompt_ids), len(example.task.prompt_ids) + len(example.response_ids)
    spans, turn_ends = [Span("prompt", 0, p)], []
    for role, length in example.segments or [("policy", total - p)]:
        start = spans[-1].end
        spans.append(Span(role, start, start + length))  # type: ignore[arg-type]
        if role == "policy" and length:
            turn_ends.append(start + length - 1)
    return Trajectory(
        task=example.task, token_ids=list(example.task.prompt_ids) + example.response_ids,
        spans=spans, rollout_logprobs=[0.0] * total, finish_reason="stop",
        group_id=group_id, completion_text=example.response, turn_ends=turn_ends, expert=True,
    )

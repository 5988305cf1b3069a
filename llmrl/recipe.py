"""The typed recipe: YAML + dotted overrides -> a validated `Recipe`, or an error naming the key.

Every section is a pydantic model whose fields carry descriptions; `llmrl validate` prints the
resolved recipe with every default filled in. Sections are owned by the package that uses them
(model, data, rollout, algorithm, reward, train); this module only composes and checks them.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from llmrl.algorithms.config import AlgorithmConfig
from llmrl.config_base import Section
from llmrl.data.config import DataConfig
from llmrl.data.expert import ExpertConfig
from llmrl.data.sources import looks_like_hub_id
from llmrl.distributed.cluster import ClusterConfig
from llmrl.eval.config import EvalConfig
from llmrl.models import ModelConfig
from llmrl.overrides import DuplicateKeyError, OverrideError, Overrides, strict_load
from llmrl.overrides import apply_overrides, parse_override  # noqa: F401 - re-exported: callers import them from here
from llmrl.reward import RewardConfig
from llmrl.rollout.base import RolloutConfig
from llmrl.train.engine import TrainConfig


class RecipeError(ValueError):
    """A bad recipe: the message names the key and the file."""


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save a checkpoint every N steps (0 = only at the end). The last step is always saved.")
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints; older ones are deleted.")
    save_optimizer: bool = Field(True, description="Include optimizer/scheduler/RNG state, needed to resume exactly.")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under output_dir/tensorboard.")
    wandb: bool = Field(False, description="Log to Weights & Biases when the wandb package is installed.")
    wandb_project: str = Field("llmrl", description="wandb project name.")
    rollouts_every: int = Field(1, ge=0, description="Write output_dir/rollouts/step_N.jsonl every K steps (0 = never).")
    progress: bool = Field(True, description="Show a progress bar with ETA and the last reward.")
    curves: bool = Field(True, description="Draw output_dir/curves.png (as `llmrl plot` does) when the run ends; needs matplotlib.")


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training tasks.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout engine and sampling.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="RL algorithm and its options.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward functions.")
    expert: ExpertConfig = Field(
        default_factory=ExpertConfig, description="Expert data that CHORD and SFT train on (algorithms chord, chord_mu, sft)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and batch sizes.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and rollout logs.")
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Held-out evaluation during training, with the same harness and settings as `llmrl eval`.",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="Where the engines run: in this process (default) or as Ray actors (docs/cluster.md)."
    )
    seed: int = Field(0, description="Seed for sampling, shuffling and initialisation.")
    output_dir: str = Field("runs/llmrl", description="Run directory: recipe, metrics, TensorBoard, rollouts, checkpoints.")
    resume: Literal["never", "auto"] | str = Field(
        "never", description="'auto' continues from the newest checkpoint in output_dir; or a checkpoint directory path."
    )


# ------------------------------------------------------------------------------ loading


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that owns location `loc` (for did-you-mean)."""
    model: Any = Recipe
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, source: str, overrides: Overrides | None = None) -> str:
    """One line per error, each naming its key and where the bad value came from: the override
    that set it (`override 'train.steps=abc'`) or else `source`, the recipe file."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union"))))
        key = ".".join(str(p) for p in loc) or "(recipe)"
        unknown = e["type"] == "extra_forbidden"
        override = overrides.source_of(loc, inside=unknown) if overrides else None
        where = f"override '{override}'" if override else source
        if unknown:
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            lines.append(f"unknown key '{key}' in {where}{hint}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg}{shown} in {where}")
    return "\n".join(lines)


def load_recipe(path: str | None, overrides: list[str] | None = None) -> Recipe:
    source = path or "(defaults)"
    data = read_recipe_file(path) if path is not None else {}
    applied = Overrides(overrides or [])
    try:
        data = applied.apply(data)
    except OverrideError as err:
        raise RecipeError(str(err)) from None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, applied)) from None
    try:
        recipe = resolve_recipe(recipe)
        check_recipe(recipe, source)
    except RecipeError as err:
        raise RecipeError(_with_overrides(str(err), source, applied)) from None
    except ValueError as err:
        raise RecipeError(_with_overrides(f"{err} in {source}", source, applied)) from None
    return recipe


def read_recipe_file(path: str) -> dict[str, Any]:
    """The recipe file as a mapping; a missing, unreadable or malformed file is a RecipeError."""
    file = Path(path)
    if not file.exists():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe: {err.strerror or err}") from None
    try:
        data = strict_load(text) or {}
    except DuplicateKeyError as err:
        raise RecipeError(f"{path}: {err}; a key may appear once per section") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _with_overrides(message: str, source: str, overrides: Overrides) -> str:
    """A cross-key error ends "in <file>"; when overrides set keys it names, say so."""
    suffix = f" in {source}"
    named = overrides.keys_in(message.removesuffix(suffix))
    if not named:
        return message
    quoted = " and ".join(f"override '{item}'" for item in named)
    if message.endswith(suffix):
        return f"{message.removesuffix(suffix)} in {quoted} (over {source})"
    return f"{message} (set by {quoted})"


def resolve_recipe(recipe: Recipe) -> Recipe:
    """The recipe that runs, with every choice the algorithm preset makes written in: the preset's
    defaults in each `algorithm` field the user left unset, `advantage` and `loss`, the
    `loss_scale_factor` (rollout.max_new_tokens), and `rollout.workflow.name`. The one place
    algorithms are resolved; idempotent, so a run re-started from its saved recipe.yaml resolves
    to the same settings."""
    from llmrl.algorithms import get_preset, resolve_algorithm
    from llmrl.rollout.base import WorkflowConfig, check_workflow_options

    algo = resolve_algorithm(recipe.algorithm)
    if algo.loss_scale_factor is None:
        algo = algo.model_copy(update={"loss_scale_factor": recipe.rollout.max_new_tokens})
    workflow = recipe.rollout.workflow
    preset = get_preset(algo.name)
    if workflow.name is None or (workflow.name == preset.workflow and preset.workflow_options):
        name = workflow.name or preset.workflow
        options = {**preset.workflow_options, **workflow.options()}
        try:
            check_workflow_options(name, options)
        except ValueError as err:
            raise ValueError(f"rollout.workflow: {err}") from None
        workflow = WorkflowConfig(name=name, **options)
    rollout = recipe.rollout.model_copy(update={"workflow": workflow})
    update: dict[str, Any] = {"algorithm": algo, "rollout": rollout}
    if "chat_template" not in recipe.eval.model_fields_set and recipe.eval.chat_template != recipe.data.chat_template:
        # A model trained on one prompt format is evaluated in it, unless the recipe says otherwise.
        update["eval"] = recipe.eval.model_copy(update={"chat_template": recipe.data.chat_template})
    return recipe.model_copy(update=update)


def on_policy_rows_per_step(recipe: Recipe) -> int:
    """Samples the workflow draws a step (POPE's guided copies aside): prompts x rollout.n, or 0
    for a workflow that does not generate."""
    from llmrl.rollout.base import WORKFLOWS

    generates = WORKFLOWS[recipe.rollout.workflow.name].generates if recipe.rollout.workflow.name else True
    return recipe.train.prompts_per_step * recipe.rollout.n if generates else 0


def expert_rows_per_step(recipe: Recipe) -> int:
    """Expert rows a step adds when the algorithm mixes them in (CHORD, SFT), else 0: the share
    expert.expert_data_ratio of all the step's rows, or prompts x rollout.n without rollouts."""
    from llmrl.stages import active_stage_names

    if "expert_mix" not in active_stage_names(recipe.algorithm):
        return 0
    on_policy = on_policy_rows_per_step(recipe)
    if on_policy == 0:
        return recipe.train.prompts_per_step * recipe.rollout.n  # the rows an RL step would train on
    ratio = recipe.expert.expert_data_ratio
    return math.ceil(round(ratio / (1.0 - ratio) * on_policy, 9))


def trajectories_per_step(recipe: Recipe) -> int:
    return on_policy_rows_per_step(recipe) + expert_rows_per_step(recipe)


def mini_batched_rows_per_step(recipe: Recipe) -> int:
    """The rows train.mini_batch_size counts: the on-policy samples (expert rows are dealt to the
    mini-batches in proportion), or the expert rows of a step without rollouts."""
    return on_policy_rows_per_step(recipe) or expert_rows_per_step(recipe)


def check_recipe(recipe: Recipe, source: str) -> None:
    """Cross-section checks on the resolved recipe: batch sizes divide, and referenced names and files exist."""
    from llmrl.reward import check_reward_imports

    total = mini_batched_rows_per_step(recipe)
    mini = recipe.train.mini_batch_size or total
    if total % mini:
        raise RecipeError(
            f"train.mini_batch_size={mini} must divide the trajectories per step "
            f"(train.prompts_per_step x rollout.n = {recipe.train.prompts_per_step} x {recipe.rollout.n} = {total}) in {source}"
        )
    micro = recipe.train.micro_batch_size
    if recipe.train.micro_batch_tokens is None and micro and mini % micro:
        raise RecipeError(f"train.micro_batch_size={micro} must divide train.mini_batch_size={mini} in {source}")
    from llmrl.distributed.cluster import CLUSTERS
    from llmrl.rollout.base import ROLLOUT_ENGINES
    from llmrl.train.backends import TRAIN_BACKENDS

    for key, registry, name in (
        ("rollout.engine", ROLLOUT_ENGINES, recipe.rollout.engine), ("train.backend", TRAIN_BACKENDS, recipe.train.backend),
        ("cluster.backend", CLUSTERS, recipe.cluster.backend),
    ):
        reason = registry.unavailable(name)
        if reason:
            raise RecipeError(f"{key}: '{name}': {reason} in {source}")
    if recipe.rollout.engine == "vllm":
        from llmrl.rollout.vllm_engine import vllm_model_unsupported

        reason = vllm_model_unsupported(recipe.model)
        if reason:
            raise RecipeError(f"rollout.engine: 'vllm': {reason} in {source}")
    check_cluster(recipe, source)
    algo = recipe.algorithm  # resolved: the preset's values are in
    if algo.kl_controller == "adaptive" and not (algo.kl_placement == "reward" and algo.kl_coef > 0):
        raise RecipeError(
            f"algorithm.kl_controller: 'adaptive' steers a KL penalty in the reward; it needs algorithm.kl_placement=reward "
            f"and algorithm.kl_coef > 0 (the starting coefficient), got {algo.kl_placement!r} and {algo.kl_coef} in {source}"
        )
    from llmrl.stages import active_stage_names

    if expert_rows_per_step(recipe) and (algo.advantage == "gae" or "critic" in active_stage_names(algo)):
        raise RecipeError(
            f"algorithm.advantage: '{algo.advantage}' needs a critic, and expert rows (no rollout, no reward) cannot feed one; "
            f"CHORD takes any critic-free estimator (grpo, rloo, lite, reinforce_pp, ...) in {source}"
        )
    check_algorithm_combination(recipe, source)
    if not recipe.data.chat_template and recipe.rollout.workflow.name in PLAIN_PROMPT_UNSUPPORTED:
        raise RecipeError(
            f"data.chat_template: false (plain-text prompts) is not supported by rollout.workflow "
            f"'{recipe.rollout.workflow.name}', which builds its turns with the chat template, in {source}"
        )
    expert_path = recipe.expert.path
    if expert_rows_per_step(recipe) and expert_path and not Path(expert_path).expanduser().exists() and not looks_like_hub_id(expert_path):
        raise RecipeError(f"expert.path: {expert_path!r} is not an existing file or directory, nor a hub id in {source}")
    for i, err in check_reward_imports(recipe.reward):  # plugins are imported in a sandboxed worker
        raise RecipeError(f"reward.functions[{i}]: {err} in {source}")


# Workflows that extend a prompt through the chat template (POPE's guidance turn, tool turns).
PLAIN_PROMPT_UNSUPPORTED = ("guided", "multi_turn")


def check_algorithm_combination(recipe: Recipe, source: str) -> None:
    """Choices that validate one by one but cannot run together, refused here rather than after
    the first step's rollouts: an option the loss has no place for, an advantage whose stage the
    algorithm does not run, an overlong buffer longer than the generation limit."""
    from llmrl.algorithms import ADVANTAGES
    from llmrl.algorithms.dapo import overlong_buffer_len
    from llmrl.algorithms.losses import loss_options_problem
    from llmrl.stages import active_stage_names

    algo = recipe.algorithm
    problem = loss_options_problem(algo.loss, algo)
    if problem:
        raise RecipeError(f"{problem} in {source}")
    stages = active_stage_names(algo)
    for stage in getattr(ADVANTAGES[algo.advantage], "required_stages", ()):
        if stage not in stages:
            raise RecipeError(
                f"algorithm.advantage: '{algo.advantage}' needs the {stage} stage, which algorithm '{algo.name}' does not run "
                f"(stages: {', '.join(stages) or 'none'}); use an algorithm that runs it (ppo) or a {stage}-free estimator "
                f"(grpo, rloo, lite, reinforce_pp, ...) in {source}"
            )
    if algo.overlong_shaping:
        try:
            overlong_buffer_len(algo, recipe.rollout.max_new_tokens)
        except ValueError as err:
            raise RecipeError(f"{err} in {source}") from None


def check_cluster(recipe: Recipe, source: str) -> None:
    """Engines in other processes need a weight sync that crosses processes, and several train
    ranks need a data-parallel backend."""
    ray = recipe.cluster.backend == "ray"
    if ray and recipe.rollout.weight_sync == "inprocess":
        raise RecipeError(f"rollout.weight_sync: 'inprocess' cannot reach engines in Ray actors; use broadcast with cluster.backend: ray in {source}")
    if not ray and recipe.rollout.weight_sync == "broadcast":
        raise RecipeError(f"rollout.weight_sync: 'broadcast' needs cluster.backend: ray (in one process, use inprocess) in {source}")
    engines = recipe.cluster.rollout_engines
    if ray and 0 < engines.num_gpus < recipe.rollout.tensor_parallel_size:
        raise RecipeError(
            f"cluster.rollout_engines.num_gpus: {engines.num_gpus} is fewer than rollout.tensor_parallel_size "
            f"({recipe.rollout.tensor_parallel_size}) GPUs one engine shards over in {source}"
        )
    if recipe.train.backend == "deepspeed" and recipe.train.zero_stage == 3 and recipe.model.lora.enabled:
        raise RecipeError(f"train.zero_stage: 3 with model.lora is not supported (LoRA weights are small: use zero_stage 2) in {source}")
    if ray and recipe.cluster.train_workers.count > 1 and recipe.train.backend != "deepspeed":
        raise RecipeError(
            f"cluster.train_workers.count: {recipe.cluster.train_workers.count} data-parallel ranks need train.backend: deepspeed "
            f"(got {recipe.train.backend!r}) in {source}"
        )


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)

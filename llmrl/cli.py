"""`llmrl train | validate | eval`: user mistakes exit 2 with one message naming the key; no traceback."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def user_errors() -> tuple[type[BaseException], ...]:
    from llmrl.data.config import DataConfigError
    from llmrl.models import ModelError
    from llmrl.recipe import RecipeError
    from llmrl.reward import RewardConfigError

    return (RecipeError, ModelError, DataConfigError, RewardConfigError)


def cmd_train(args: argparse.Namespace) -> int:
    from llmrl.loop import train
    from llmrl.recipe import load_recipe
    from llmrl.distributed.ray_calls import ClusterError
    from llmrl.train.engine import NonFiniteUpdateError

    overrides = list(args.overrides) + (["resume=auto"] if args.resume else [])
    recipe = load_recipe(args.recipe, overrides)
    try:
        run_dir = train(recipe)
    except NonFiniteUpdateError as err:
        print(f"llmrl: training aborted: {err}", file=sys.stderr)
        return 1
    except ClusterError as err:
        print(f"llmrl: training stopped: {err}; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        return 1
    print(f"done: {run_dir} (metrics.jsonl, checkpoints/)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from llmrl.recipe import dump_recipe, load_recipe
    from llmrl.stages import active_stage_names

    recipe = load_recipe(args.recipe, args.overrides)  # resolved: the preset's choices written in
    print(dump_recipe(recipe), end="")
    stages = active_stage_names(recipe.algorithm)
    print(f"# stages this algorithm runs (llmrl/stages.py): {', '.join(stages) or 'none'}")
    if recipe.cluster.backend != "none":
        from llmrl.distributed.memory import placement_report

        for line in placement_report(recipe):
            print(f"# {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrl", description="RL post-training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help="recipe YAML")
    # default=[]: argparse counts a '*' positional without a default as required, and then names it
    # beside `recipe` when the recipe is missing
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.steps=2 model.name=tiny")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and print it with every default filled in")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    p.set_defaults(fn=cmd_validate)

    from llmrl.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except user_errors() as err:
        print(f"llmrl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

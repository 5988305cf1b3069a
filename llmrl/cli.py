"""`llmrl train | validate | eval`: user mistakes exit 2 with one message naming the key; no traceback."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class LaunchError(RuntimeError):
    """`llmrl train` started in a way it cannot run (several copies of the controller)."""


def user_errors() -> tuple[type[BaseException], ...]:
    from llmrl.data.config import DataConfigError
    from llmrl.eval.benchmarks import EvalError
    from llmrl.models import ModelError
    from llmrl.plot import PlotError
    from llmrl.recipe import RecipeError
    from llmrl.reward import RewardConfigError
    from llmrl.run_dir import RunDirError

    return (RecipeError, ModelError, DataConfigError, EvalError, RewardConfigError, RunDirError, PlotError, LaunchError)


# A run stopped by SIGTERM or Ctrl-C after saving its checkpoint: sysexits.h's EX_TEMPFAIL ("try
# again later"), so a scheduler or script can tell "stopped early, resumable" from "finished" (0),
# "failed" (1) and "bad input" (2).
EXIT_STOPPED = 75


def refuse_per_rank_launch(environ: Mapping[str, str]) -> None:
    """`llmrl train` is the one controller of a run: it samples, scores, logs and saves. A launcher
    that starts it once per rank (torchrun, the deepspeed launcher, accelerate: they set WORLD_SIZE)
    gets independent controllers that duplicate every rollout and metric row and collide on the
    checkpoint files, so it is refused before anything starts. Data-parallel ranks are Ray actors
    that the one controller starts (docs/cluster.md)."""
    raw = environ.get("WORLD_SIZE", "1").strip()
    world = int(raw) if raw.isdigit() else 1
    if world > 1:
        raise LaunchError(
            f"WORLD_SIZE={world} in the environment: `llmrl train` is one controller process and must be started once, "
            "not once per rank (torchrun and the deepspeed launcher would duplicate every rollout and metric row). "
            "For N DeepSpeed train ranks, start it once with cluster.backend=ray cluster.train_workers.count=N "
            "train.backend=deepspeed rollout.weight_sync=broadcast (recipes/distributed_cpu.yaml, docs/cluster.md)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from llmrl.loop import TrainingStopped, train
    from llmrl.recipe import load_recipe
    from llmrl.distributed.ray_calls import ClusterError
    from llmrl.train.engine import NonFiniteUpdateError

    refuse_per_rank_launch(os.environ)
    overrides = list(args.overrides) + (["resume=auto"] if args.resume else [])
    recipe = load_recipe(args.recipe, overrides)
    try:
        run_dir = train(recipe, overwrite=args.overwrite)
    except TrainingStopped as stopped:
        print(f"\nllmrl: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
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

    from llmrl.preflight import check_training_data, resource_warnings

    recipe = load_recipe(args.recipe, args.overrides)  # resolved: the preset's choices written in
    check_training_data(recipe)
    print(dump_recipe(recipe), end="")
    for line in resource_warnings(recipe):
        print(f"# {line}")
        print(f"llmrl: {line}", file=sys.stderr)
    stages = active_stage_names(recipe.algorithm)
    print(f"# stages this algorithm runs (llmrl/stages.py): {', '.join(stages) or 'none'}")
    if recipe.cluster.backend != "none":
        from llmrl.distributed.memory import placement_report

        for line in placement_report(recipe):
            print(f"# {line}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        from llmrl.plot import save_plot
    except ImportError:
        print("llmrl: error: llmrl plot needs matplotlib: pip install 'llmrl[plot]'", file=sys.stderr)
        return 2
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    print(f"wrote {save_plot(runs, out, metrics)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from llmrl.model_catalog import as_json, catalog, format_catalog, prepare

    if args.prepare:
        entry = prepare(args.prepare)
        print(f"prepared {entry.name}: {entry.path} ({entry.params / 1e6:.1f}M parameters)")
        return 0
    entries = catalog()
    print(as_json(entries) if args.json else "\n".join(format_catalog(entries)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrl", description="RL post-training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help="recipe YAML")
    # default=[]: argparse counts a '*' positional without a default as required, and then names it
    # beside `recipe` when the recipe is missing
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.steps=2 model.name=tiny")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in output_dir")
    start.add_argument("--overwrite", action="store_true", help="delete the run already in output_dir (its checkpoints too) and start afresh")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and print it with every default filled in")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plot", help="draw training curves of one or more runs into a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of `llmrl train`)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)")
    p.add_argument("--metrics", help="comma-separated metric names or globs, one panel each (default: reward, accuracy, "
                   "length, truncation, entropy, KL, clip fraction, eval pass@1, time per phase)")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("models", help="list the built-in models (size, source, cached or not); --prepare one ahead of time")
    p.add_argument("--prepare", metavar="NAME", help="convert and cache this built-in model now (for offline nodes)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(fn=cmd_models)

    from llmrl.eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # The console command (callers in Python pass argv and are never replaced): start again
        # with MKL's tuned kernels where the CPU is AMD's, before torch loads (llmrl/mkl_on_amd.py).
        from llmrl.mkl_on_amd import reexec_with_preload

        try:
            reexec_with_preload()
        except ValueError as err:
            print(f"llmrl: error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except user_errors() as err:
        print(f"llmrl: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk or a vanished mount mid-run is no bug of ours or the user's input: one line
        # that says which file, and what is safe (checkpoints are written atomically).
        where = f" ({err.filename})" if err.filename else ""
        print(f"llmrl: error: {err.strerror or err}{where}; files written before it are intact", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

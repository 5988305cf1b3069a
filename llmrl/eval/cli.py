"""`llmrl eval`: evaluate a model (built-in, hub id, HF directory, or `llmrl train` output).

    llmrl eval --model runs/quickstart --bench arithmetic
    llmrl eval --model smollm2-135m --bench gsm8k,math500 --data ../shared/data --limit 200
    llmrl eval --model my/hub-model --bench my_set.jsonl --reward math --n 8

Mistakes (an unknown benchmark, n > 1 at temperature 0, a missing engine) exit 2 with one line
naming the flag. Ctrl-C keeps the samples written so far; `--resume` continues them.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmrl.eval.benchmarks import EvalError
from llmrl.eval.config import EvalConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# EvalConfig field -> the flag that sets it, for error messages.
FLAG_FOR_FIELD = {
    "benches": "--bench",
    "data_dir": "--data",
    "fields": "--field",
    "data_options": "--data-option",
    "chat_template": "--no-chat-template",
    "progress": "--no-progress",
}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="built-in name (smollm2-135m, tiny), hub id, HF directory, "
                        "checkpoint directory (.../checkpoints/step_N) or run directory (its newest checkpoint)")
    parser.add_argument("--bench", required=True, help="comma-separated: gsm8k, math500, arithmetic, or .jsonl/.json/.parquet files")
    parser.add_argument("--n", type=int, default=1, help="samples per item (default 1)")
    parser.add_argument("--temperature", type=float, default=None, help="default 0 (greedy) for n=1, else 1.0")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each benchmark")
    parser.add_argument("--split", default=None, help="dataset split (default: the benchmark's held-out one; train for POPE's hard_file)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: per benchmark (gsm8k 256, math500 1024, arithmetic 64)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string, repeatable; '\\n' in TEXT is a newline (default: none, EOS only)")
    parser.add_argument("--engine", default="hf", help="rollout engine (default hf)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights dtype of the engine (default auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per engine call and per flush of samples.jsonl (default 32)")
    parser.add_argument("--data", default=None, help="local data root with gsm8k/test.jsonl, math500/test.jsonl (default: load from the hub)")
    parser.add_argument("--reward", default=None, help="reward that grades file benchmarks (also overrides built-in ones)")
    parser.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN", help="file benchmarks: column for prompt/answer/id")
    parser.add_argument("--data-option", action="append", default=[], metavar="BENCH.KEY=VALUE",
                        help="data setting of one benchmark, e.g. arithmetic.difficulty=2")
    parser.add_argument("--instruction", default=None, help="instruction added to each problem ({problem} placeholder or appended; '' = none)")
    parser.add_argument("--system-prompt", default=None, help="system message before the problem")
    parser.add_argument(
        "--chat-template", action=argparse.BooleanOptionalAction, default=None,
        help="--no-chat-template: plain-text prompts (base models). Default: the chat template, or for a training run "
        "(--model RUN_DIR or a checkpoint) the format it trained with (data.chat_template in its recipe.yaml)",
    )
    parser.add_argument("--few-shot", type=int, default=None, help="worked examples before each problem (default: gsm8k 2, others 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--reward-workers", type=int, default=1, help="reward worker processes (0 = in this process)")
    parser.add_argument("--output", default=None, help="output directory (default runs/eval/<model>)")
    parser.add_argument("--resume", action="store_true", help="keep the samples already in the output directory; generate the rest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `eval` on an argparse subparsers object; `args.fn(args)` runs it and returns the exit code."""
    parser = subparsers.add_parser("eval", help="evaluate a model on gsm8k, math500, arithmetic or a file", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    parser.set_defaults(fn=cmd_eval)
    return parser


def main_eval(argv: list[str] | None = None) -> int:
    """`llmrl eval` on its own: parse `argv` and run; returns the exit code."""
    parser = argparse.ArgumentParser(prog="llmrl eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage line
        return int(exit_.code or 0)
    return cmd_eval(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from llmrl.data.config import DataConfigError
    from llmrl.models import ModelError
    from llmrl.reward import RewardConfigError

    try:
        return _run(args)
    except (EvalError, ModelError, DataConfigError, RewardConfigError) as err:
        print(f"llmrl eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from llmrl.eval.harness import EvalGraders, prepare_benches, run_evaluation
    from llmrl.eval.report import RESULTS_FILE, summary_table
    from llmrl.models import ModelConfig, load_tokenizer
    from llmrl.rollout.base import RolloutConfig, build_rollout_engine

    cfg = config_from_args(args)
    check_engine(args.engine)
    model = resolve_eval_model(args.model)
    trained_with = model.pop("chat_template", None)
    if args.chat_template is None and trained_with is False:
        cfg = cfg.model_copy(update={"chat_template": False})
        print("llmrl eval: plain-text prompts, as the run trained with (data.chat_template: false in its recipe.yaml; "
              "--chat-template overrides)", file=sys.stderr)
    output = Path(args.output) if args.output else Path("runs") / "eval" / model["label"]
    tokenizer = load_tokenizer(model["path"])
    prepared = prepare_benches(cfg, tokenizer)  # data errors surface before the model loads
    with closing(EvalGraders(prepared, cfg.reward_workers)) as graders:  # their workers forked before the model loads (docs/rewards.md)
        rollout_cfg = RolloutConfig(engine=args.engine, dtype=args.dtype, max_batch_size=cfg.batch_size)
        engine = build_rollout_engine(rollout_cfg, ModelConfig(name=model["path"]), tokenizer, seed=args.seed)
        model["sha256"] = model_sha256(model["path"])
        try:
            results = run_evaluation(
                engine, tokenizer, cfg, output, prepared=prepared, resume=args.resume, model=model,
                extra_recipe={"engine": args.engine, "dtype": args.dtype}, graders=graders,
            )
        except KeyboardInterrupt:
            print(f"\ninterrupted: the samples generated so far are in {output}/<bench>/samples.jsonl; "
                  "run the same command with --resume to finish", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(summary_table(results["benches"]))
    print(f"results: {output / RESULTS_FILE}")
    return 0


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An EvalConfig from the flags; a bad value raises EvalError naming its flag."""
    values = {
        "benches": [b.strip() for b in args.bench.split(",") if b.strip()],
        "n": args.n,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "limit": args.limit,
        "split": args.split,
        "max_new_tokens": args.max_new_tokens,
        "stop": [text.replace("\\n", "\n") for text in args.stop],
        "data_dir": args.data,
        "reward": args.reward,
        "fields": dict(_key_value("--field", item, "KEY=COLUMN") for item in args.field),
        "data_options": _data_options(args.data_option),
        "instruction": args.instruction,
        "system_prompt": args.system_prompt,
        "chat_template": args.chat_template is not False,
        "few_shot": args.few_shot,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "reward_workers": args.reward_workers,
        "progress": not args.no_progress,
    }
    if not values["benches"]:
        raise EvalError("--bench: name at least one benchmark")
    try:
        return EvalConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        flag = FLAG_FOR_FIELD.get(field, "--" + field.replace("_", "-"))
        message = re.sub(r"^(Value|Assertion) error, ", "", first["msg"])
        raise EvalError(f"{flag}: {message}") from None


def _key_value(flag: str, item: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise EvalError(f"{flag} {item!r}: expected {form}")
    return key.strip(), value


def _data_options(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        dotted, value = _key_value("--data-option", item, "BENCH.KEY=VALUE")
        bench, sep, key = dotted.partition(".")
        if not sep or not key:
            raise EvalError(f"--data-option {item!r}: expected BENCH.KEY=VALUE, e.g. arithmetic.difficulty=2")
        options.setdefault(bench, {})[key] = yaml.safe_load(value)  # "2" -> 2, "true" -> True
    return options


def check_engine(name: str) -> None:
    """Fail with one line when the rollout engine `name` cannot run in this install."""
    from llmrl.rollout.base import engine_unavailable

    reason = engine_unavailable(name)
    if reason:
        raise EvalError(f"--engine {name}: {reason}")


def resolve_eval_model(name: str) -> dict[str, Any]:
    """Where the weights are: `path` for from_pretrained, `label` for the default output name,
    and the checkpoint it came from when `name` is a training run or checkpoint directory."""
    from llmrl.checkpoint import STEP_DIR, latest_checkpoint
    from llmrl.models import resolve_model_path

    local = Path(name).expanduser()
    checkpoint: Path | None = None
    if local.is_dir() and (local / "policy" / "config.json").exists():
        checkpoint = local
    elif local.is_dir() and (local / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(local)
        if checkpoint is None:
            raise EvalError(f"--model {name}: run directory has no finished checkpoint under checkpoints/")
    if checkpoint is not None:
        step = STEP_DIR.match(checkpoint.name)
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        return {
            "name": name,
            "path": resolve_model_path(str(checkpoint / "policy")),
            "checkpoint": str(checkpoint),
            "step": int(step.group(1)) if step else None,
            "label": f"{run.name}-{checkpoint.name}",
            "chat_template": _trained_prompt_format(run),
        }
    path = resolve_model_path(name)
    return {"name": name, "path": path, "checkpoint": None, "step": None, "label": re.sub(r"[^\w.-]+", "_", Path(name).name or name)}


def _trained_prompt_format(run: Path) -> bool | None:
    """data.chat_template of the run's recipe.yaml; None when there is none to read."""
    import yaml

    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        return bool(recipe["data"].get("chat_template", True))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None


def model_sha256(path: str) -> str | None:
    """sha256 over config.json and the weight files of a local model directory (None for a hub
    id that is not in the local cache)."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached locally: no hash to report
            return None
    files = sorted(p for p in directory.iterdir() if p.name == "config.json" or p.suffix in {".safetensors", ".bin"})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main_eval())

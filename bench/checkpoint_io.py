"""Checkpoint cost of the torch engine: bytes on disk, and seconds to save, verify and load.

Two layouts, alternated in rounds on one engine after one real optimizer step (so AdamW's
moments exist):
  once    what `llmrl train` writes: the trainer state points at the policy export for the
          weights (they are stored once).
  copied  the trainer state holds its own copy of the weights, as every checkpoint did before,
          and as a LoRA policy's or a critic's still does.
save = `save_checkpoint` (policy export, tokenizer, trainer state, RNG, manifest with SHA-256);
verify = `verify_checkpoint` (every file re-hashed, as resume does); load = `load_checkpoint`.

    .venv/bin/python bench/checkpoint_io.py [--model smollm2-135m] [--rounds 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import transformers

from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import LossContext
from llmrl.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from llmrl.models import ModelConfig, load_policy, load_tokenizer
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TorchTrainEngine
from machine import machine_header
from mfu import grpo_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    print(machine_header())

    engine = TorchTrainEngine(load_policy(ModelConfig(name=args.model)), TrainConfig(lr=1e-6, precision="fp32"), total_updates=10)
    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    engine.step(grpo_batch(args.model, 2, 4, 8, 16, seed=0), LOSSES[algo.loss], LossContext(step=0, cfg=algo))
    tokenizer = load_tokenizer(args.model)
    pointed = TorchTrainEngine._current_export_inside
    layouts = {"once": pointed, "copied": lambda self, directory, trainable: None}
    times: dict[str, dict[str, list[float]]] = {name: {"save": [], "verify": [], "load": []} for name in layouts}
    sizes: dict[str, int] = {}
    root = Path(tempfile.mkdtemp(prefix="llmrl-ckpt-bench-"))
    try:
        for round_index in range(args.rounds):
            for name, choose in layouts.items():
                TorchTrainEngine._current_export_inside = choose
                start = time.perf_counter()
                path = save_checkpoint(root, 1, engine, tokenizer, {"bench": name}, keep_last=1)
                saved = time.perf_counter()
                verify_checkpoint(path)
                verified = time.perf_counter()
                load_checkpoint(path, engine)
                loaded = time.perf_counter()
                for part, seconds in (("save", saved - start), ("verify", verified - saved), ("load", loaded - verified)):
                    times[name][part].append(seconds)
                sizes[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            print(f"  round {round_index + 1} of {args.rounds} done", flush=True)
    finally:
        TorchTrainEngine._current_export_inside = pointed
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'layout':<8} {'GiB':>6} {'save s':>8} {'verify s':>9} {'load s':>8}   (medians of {args.rounds} rounds)")
    for name in layouts:
        medians = {part: statistics.median(values) for part, values in times[name].items()}
        print(f"{name:<8} {sizes[name] / 2**30:>6.2f} {medians['save']:>8.2f} {medians['verify']:>9.2f} {medians['load']:>8.2f}")
    print(f"size: once/copied = {sizes['once'] / sizes['copied']:.2f}")


if __name__ == "__main__":
    main()

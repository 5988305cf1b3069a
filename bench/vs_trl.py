"""GRPO steps side by side: llmrl (recipes/gsm8k_grpo.yaml) against TRL's `GRPOTrainer`, same work.

Both trainers run the same step: SmolLM2-135M-Instruct, the same GSM8K train prompts in the same
order (llmrl's gsm8k prompt builder makes the chat messages; TRL gets those messages and renders
them with the same chat template, checked token for token), 4 prompts x 8 samples, 128 new tokens,
temperature 1, lr 1e-6 constant, no KL, one optimizer step per RL step over all 32 rows in
micro-batches of 16, and the same GSM8K answer check (llmrl's `gsm8k` reward, wrapped for TRL).

Runs, each in its own process (so start-up and peak RSS are per run), per precision:
  llmrl-hf       hf engine, train.skip_zero_advantage_rows=false: the same update work as TRL
  llmrl-hf-skip  hf engine, zero-advantage rows skipped (llmrl's default)
  llmrl-vllm     rollout.engine=vllm (only when `import vllm` works and vLLM serves the model)
  trl            GRPOTrainer, transformers `generate`, use_cpu=True, gradient checkpointing off;
                 torch's default 4 KiB pages (THP_MEM_ALLOC_ENABLE=0), and MKL's own kernel
                 choice, as TRL runs out of the box
  trl-mkl        the same with llmrl's MKL preload (llmrl/mkl_on_amd.py: on an AMD CPU, MKL's
                 tuned GEMM kernels), which the llmrl runs and the matmul peak have
  trl-thp        the same with THP_MEM_ALLOC_ENABLE=1, the huge-page setting llmrl turns on when
                 imported (llmrl/__init__.py): TRL given llmrl's allocator setting
fp32, plus bf16 where the CPU has native bf16 (avx512_bf16 / amx_bf16). llmrl bf16: autocast
training over fp32 weights and a bf16 rollout copy; TRL bf16: `bf16=True` (autocast over fp32).

Reported per run: start-up (process launch to the first step's start), the median over steps
2..N of the step's wall time (end of the previous step to the end of this one, logging
included), its generation and update parts, generated tokens/s, peak RSS, the compute floor
and step / floor. The floor: FLOPs / measured matmul peak at that precision, with generation
2 x params x (generated tokens + each prompt's tokens once) and update 6 x params x (prompt +
response tokens of the rows trained); neither trainer runs a separate old-logprob forward here
(one optimizer step per batch), so none is added. Attention FLOPs are left out (short contexts).
A last line per precision compares the 4x target's step with the floor counting each group's
prompt once in the update (the least work the step can be done with): a target step below that
floor is out of reach for any trainer at this machine's matmul peak.
Each run must change its weights (a parameter checksum before and after): a run that had a
learning signal and did not is a failure (exit 1); one with no signal at all (every group
scored alike, so the gradient is exactly zero) cannot be verified (exit 3).

    pip install -e '.[bench]'      # trl==1.16.0
    python bench/vs_trl.py --data DIR              # DIR holds gsm8k/train.jsonl; or set LLMRL_BENCH_DATA
    python bench/vs_trl.py --data DIR --reward closeness   # partial credit (bench/closeness_reward.py): groups differ, weights move
    python bench/vs_trl.py --data DIR --quick      # smoke run: tiny model, 2 steps, every trainer
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Measure the llmrl of this checkout, not whichever one is pip-installed (a worktree's or a
# branch's llmrl is what a benchmark is run to judge).
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from llmrl.mkl_on_amd import reexec_with_preload, with_preload, without_preload  # noqa: E402

# llmrl is measured as `llmrl` runs, with MKL's tuned kernels on AMD CPUs, and the matmul peak
# with them; TRL runs without them unless asked (trl-mkl).
reexec_with_preload()

from machine import machine_header, matmul_peak_gflops  # noqa: E402  (bench/machine.py)

RECIPE = REPO / "recipes" / "gsm8k_grpo.yaml"
DATA_ENV = "LLMRL_BENCH_DATA"
VARIANTS = ("llmrl-hf", "llmrl-hf-skip", "llmrl-vllm", "trl", "trl-thp", "trl-mkl")
# TRL imports llmrl here (model loading, the reward), which would switch huge pages on for it too.
THP_SETTING = {"trl": "0", "trl-thp": "1", "trl-mkl": "0"}
# Which runs get llmrl's MKL preload (llmrl/mkl_on_amd.py; it does anything only on AMD CPUs).
MKL_PRELOAD = {"trl": False, "trl-thp": False, "trl-mkl": True}
# --reward: what llmrl's reward.functions gets; TRL wraps the same function.
REWARDS = {"gsm8k": "gsm8k", "closeness": f"{REPO / 'bench' / 'closeness_reward.py'}:closeness"}
LABELS = {"llmrl-hf": "llmrl hf, skip off", "llmrl-hf-skip": "llmrl hf, skip on", "llmrl-vllm": "llmrl vllm"}


# ------------------------------------------------------------------------------ shared helpers


def load_tasks(spec: dict[str, Any], tokenizer: Any) -> list[Any]:
    """The run's GSM8K tasks, exactly as the llmrl run builds them (same rows, order, prompt ids)."""
    from llmrl.data import build_tasks
    from llmrl.data.config import DataConfig

    cfg = DataConfig(type="gsm8k", path=spec["data"], limit=spec["prompts"] * spec["steps"], shuffle=False)
    return build_tasks(cfg, tokenizer, split="train", graded_by="gsm8k").tasks


def fingerprint(named: Any) -> dict[str, tuple[float, float]]:
    """Per tensor (sum, sum of squares) in float64, computed in 1M-element chunks so the check
    adds no memory worth mentioning to the run's peak RSS. An lr 1e-6 Adam step moves every
    weight it touches by ~1e-6, far above fp32 rounding of these sums."""
    import torch

    out = {}
    for name, tensor in named:
        total = squares = 0.0
        for chunk in tensor.detach().reshape(-1).split(1 << 20):
            c = chunk.to(torch.float64)
            total += float(c.sum())
            squares += float(c.square().sum())
        out[name] = (total, squares)
    return out


def changed_tensors(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> tuple[int, int]:
    common = sorted(set(before) & set(after))
    return sum(before[k] != after[k] for k in common), len(common)


def peak_rss_mib() -> float:
    """This process's peak RSS, or a descendant's if larger (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


# ------------------------------------------------------------------------------ child: llmrl


def llmrl_overrides(spec: dict[str, Any], run_dir: Path) -> list[str]:
    from llmrl.data.config import DataConfig

    bf16 = spec["precision"] == "bf16"
    return [
        f"model.name={spec['model']}", f"data.path={spec['data']}", f"data.limit={spec['prompts'] * spec['steps']}",
        "data.shuffle=false",  # the dataset's order, which TRL follows with shuffle_dataset=False
        f"train.steps={spec['steps']}", f"train.prompts_per_step={spec['prompts']}", f"rollout.n={spec['n']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", f"train.lr={spec['lr']}", "algorithm.kl_coef=0.0",
        f"train.micro_batch_size={spec['micro_batch']}", "rollout.temperature=1.0",
        f"train.skip_zero_advantage_rows={'true' if spec['variant'] == 'llmrl-hf-skip' else 'false'}",
        f"rollout.engine={'vllm' if spec['variant'] == 'llmrl-vllm' else 'hf'}",
        f"train.precision={spec['precision']}", f"rollout.dtype={'bfloat16' if bf16 else 'float32'}",
        # vLLM sizes its KV cache for the longest sequence: the longest prompt build_tasks keeps plus the reply
        f"rollout.max_model_len={DataConfig().max_prompt_tokens + spec['max_new_tokens']}",
        # Off: evaluation, periodic checkpoints, optimizer state, progress bar, TensorBoard, curves and
        # rollout logs, none of which TRL does here (TRL: save_strategy=no, report_to=none).
        "eval.every=0", "checkpoint.every=0", "checkpoint.save_optimizer=false", "logging.progress=false",
        "logging.tensorboard=false", "logging.curves=false", "logging.rollouts_every=0", f"seed={spec['seed']}",
        f"output_dir={run_dir}", f"reward.functions=[{REWARDS[spec['reward']]}]",
    ]


def child_llmrl(spec: dict[str, Any]) -> dict[str, Any]:
    """`llmrl train` on the shipped recipe, with each step's start and end stamped: the loop makes
    a fresh StepTimer as a step starts and calls Tracker.log as it ends."""
    import llmrl.loop as loop
    import llmrl.tracking as tracking
    from llmrl.cli import main as llmrl_main
    from llmrl.models import resolve_model_path

    begins: list[float] = []
    ends: list[float] = []
    rows: list[dict[str, float]] = []

    class StampedTimer(loop.StepTimer):
        def __init__(self) -> None:
            super().__init__()
            begins.append(time.time())

    original_log = tracking.Tracker.log

    def stamped_log(self: Any, step: int, metrics: dict[str, float]) -> None:
        ends.append(time.time())
        rows.append(dict(metrics))
        original_log(self, step, metrics)

    loop.StepTimer = StampedTimer  # type: ignore[misc]
    tracking.Tracker.log = stamped_log  # type: ignore[method-assign]
    run_dir = Path(spec["work"]) / "run"
    rc = llmrl_main(["train", str(RECIPE), *llmrl_overrides(spec, run_dir), "--overwrite"])
    if rc != 0:
        raise SystemExit(f"llmrl train exited {rc}")
    rss = peak_rss_mib()  # before the checksum reads anything

    from safetensors import safe_open

    def file_fingerprint(path: Path) -> dict[str, tuple[float, float]]:
        with safe_open(str(path), "pt") as f:  # one tensor in memory at a time
            return fingerprint((k, f.get_tensor(k)) for k in f.keys())

    base = file_fingerprint(Path(resolve_model_path(spec["model"])) / "model.safetensors")
    final = file_fingerprint(run_dir / "checkpoints" / f"step_{spec['steps']}" / "policy" / "model.safetensors")
    rows_per_step = spec["prompts"] * spec["n"]
    steps = [
        {
            "begin": b, "end": e, "gen": r.get("time/generate", 0.0), "update": r.get("time/update", 0.0),
            "gen_tokens": r.get("response/length_mean", 0.0) * rows_per_step,
            "trained_frac": r.get("actor/rows_trained_frac", 1.0),
            "signal": r.get("adv/zero_std_groups", 1.0) < 1.0,  # some group's rewards differed
        }
        for b, e, r in zip(begins, ends, rows)
    ]
    changed, total = changed_tensors(base, final)
    shutil.rmtree(run_dir, ignore_errors=True)  # a policy checkpoint per run; nothing reads it later
    return {"steps": steps, "peak_rss_mib": rss, "changed": changed, "tensors": total}


# ------------------------------------------------------------------------------ child: TRL


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmrl.models import ModelConfig, load_causal_lm, load_tokenizer
    from llmrl.reward.builtin.gsm8k import gsm8k
    from llmrl.types import Task

    tokenizer = load_tokenizer(spec["model"])
    tasks = load_tasks(spec, tokenizer)
    dataset = Dataset.from_list([{"prompt": t.messages, "answer": t.answer} for t in tasks])

    from closeness_reward import closeness

    score = {"gsm8k": lambda text, task: gsm8k(text, task)["score"], "closeness": closeness}[spec["reward"]]

    def gsm8k_reward(prompts: list[Any], completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        """The reward llmrl's run uses (the built-in gsm8k check, or bench/closeness_reward.py) on each completion's text."""
        return [
            float(score(c[0]["content"] if isinstance(c, list) else c, Task(task_id="trl", messages=p, answer=a, kind="gsm8k")))
            for p, c, a in zip(prompts, completions, answer)
        ]

    rows = spec["prompts"] * spec["n"]
    config = GRPOConfig(
        output_dir=str(Path(spec["work"]) / "trl"),
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=rows // spec["micro_batch"],  # one optimizer step = prompts x n rows
        num_generations=spec["n"],
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant",  # llmrl's default schedule; HF's is linear decay
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",  # token-mean, z-score: llmrl grpo
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL turns it on by default; llmrl's recipe does not recompute activations
        bf16=spec["precision"] == "bf16", fp16=False, use_cpu=True,
        shuffle_dataset=False,  # the dataset's order, as llmrl's data.shuffle=false
        max_steps=spec["steps"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=spec["seed"],
    )
    model = load_causal_lm(ModelConfig(name=spec["model"]), torch.float32)
    checks_started = time.perf_counter()
    before = fingerprint(model.named_parameters())
    overhead = time.perf_counter() - checks_started  # the bench's own work before step 1, kept out of start-up

    begins: list[float] = []
    ends: list[float] = []
    logged: list[dict[str, float]] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            begins.append(time.time())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.time())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "completions/mean_length" in logs:  # a step's row, not the end-of-training summary
                logged.append(dict(logs))

    trainer = GRPOTrainer(model=model, reward_funcs=[gsm8k_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()])
    checks_started = time.perf_counter()
    rendered = trainer._tokenize_prompts([t.messages for t in tasks])[0]
    same_prompts = [list(map(int, ids)) for ids in rendered] == [list(t.prompt_ids) for t in tasks]
    overhead += time.perf_counter() - checks_started

    # Generation time: TRL's own sampling call (HF generate). Rollout time: generation plus
    # decoding, rewards and advantages; the rest of the optimizer step is the update.
    phases: dict[str, list[float]] = {"gen": [], "rollout": []}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name].append(time.perf_counter() - start)
        return wrapper

    trainer._generate_single_turn = timed("gen", trainer._generate_single_turn)
    trainer._generate_and_score_completions = timed("rollout", trainer._generate_and_score_completions)
    trainer.train()
    rss = peak_rss_mib()
    after = fingerprint(trainer.model.named_parameters())
    steps = [
        {
            "begin": b, "end": e, "gen": g, "update": (e - b) - r, "gen_tokens": log["completions/mean_length"] * rows,
            "trained_frac": 1.0, "signal": log.get("frac_reward_zero_std", 1.0) < 1.0,
        }
        for b, e, g, r, log in zip(begins, ends, phases["gen"], phases["rollout"], logged)
    ]
    changed, total = changed_tensors(before, after)
    return {"steps": steps, "peak_rss_mib": rss, "changed": changed, "tensors": total, "same_prompt_ids": same_prompts,
            "overhead_s": overhead}


def run_child(spec: dict[str, Any]) -> None:
    """Child entry: train, then write the report where the parent asked."""
    report = child_trl(spec) if spec["variant"].startswith("trl") else child_llmrl(spec)
    Path(spec["report"]).write_text(json.dumps(report))


# ------------------------------------------------------------------------------ parent


def count_params(model_dir: Path) -> int:
    """Parameters in the model's safetensors (a tied lm_head is stored, and counted, once: its
    matmul costs what the embedding's row count says)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def vllm_status(model: str) -> str | None:
    """Why the vLLM variant cannot run here; None when it can. The import is tried in a throwaway
    process: it takes seconds and memory this process should not keep."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    from llmrl.models import ModelConfig
    from llmrl.rollout.vllm_engine import vllm_model_unsupported

    reason = vllm_model_unsupported(ModelConfig(name=model))
    if reason:
        return reason
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return None if probe.returncode == 0 else f"import vllm failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"


def launch(spec: dict[str, Any], log_path: Path) -> dict[str, Any]:
    """One run in its own process; its report plus the launch time (start-up is measured from it)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    env = with_preload(env) if MKL_PRELOAD.get(spec["variant"], True) else without_preload(env)
    if spec["variant"] in THP_SETTING:
        env["THP_MEM_ALLOC_ENABLE"] = THP_SETTING[spec["variant"]]
    launched = time.time()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not Path(spec["report"]).exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{spec['variant']} {spec['precision']} failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    report = json.loads(Path(spec["report"]).read_text())
    if len(report["steps"]) != spec["steps"]:
        raise RuntimeError(f"{spec['variant']} {spec['precision']}: {len(report['steps'])} steps timed, {spec['steps']} run; see {log_path}")
    report["launched"] = launched
    return report


def summarize(report: dict[str, Any], prompt_tokens: list[int], n: int, params: int, peak: float) -> dict[str, Any]:
    """Medians over steps 2..N (step 1 too when it is the only one), and the compute floor."""
    steps = report["steps"]
    walls = [steps[0]["end"] - steps[0]["begin"]] + [s["end"] - p["end"] for p, s in zip(steps, steps[1:])]
    timed = list(range(1, len(steps))) or [0]
    floors, floors_once = [], []
    for i, s in enumerate(steps):
        gen_flops = 2 * params * (s["gen_tokens"] + prompt_tokens[i])
        update_flops = 6 * params * s["trained_frac"] * (n * prompt_tokens[i] + s["gen_tokens"])
        floors.append((gen_flops + update_flops) / peak)
        # The least any trainer can do: a group's n rows share their prompt, and its forward and
        # backward are exact when run once for the group (llmrl's shared-prompt update does so).
        once_flops = 6 * params * s["trained_frac"] * (prompt_tokens[i] + s["gen_tokens"])
        floors_once.append((gen_flops + once_flops) / peak)
    med = lambda xs: statistics.median([xs[i] for i in timed])  # noqa: E731
    return {
        "startup_s": steps[0]["begin"] - report["launched"] - report.get("overhead_s", 0.0),
        "step_s": med(walls), "gen_s": med([s["gen"] for s in steps]), "update_s": med([s["update"] for s in steps]),
        "gen_tok_s": med([s["gen_tokens"] / max(s["gen"], 1e-9) for s in steps]),
        "floor_s": med(floors), "over_floor": med([w / f for w, f in zip(walls, floors)]), "floor_once_s": med(floors_once),
        "peak_rss_mib": report["peak_rss_mib"], "signal_steps": sum(s["signal"] for s in steps),
        "changed": report["changed"], "tensors": report["tensors"], "steps": len(steps),
    }


def reach_line(trl_step_s: float, floor_once_s: float, precision: str, label: str, target: float = 4.0) -> str:
    """Whether a step `target` times faster than TRL's fits above the compute floor at all, with
    each group's prompt counted once (the least work the step can be done with)."""
    needed = trl_step_s / target
    verdict = "reachable in principle" if needed >= floor_once_s else "below the compute floor: no trainer can reach it on this machine"
    return (f"{target:g}x {label} {precision}: a {needed:.2f} s step; the floor with each prompt computed once "
            f"is {floor_once_s:.2f} s ({needed / floor_once_s:.0%} of it): {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=os.environ.get(DATA_ENV), help=f"directory holding gsm8k/train.jsonl (or ${DATA_ENV})")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward, both trainers")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reward", choices=sorted(REWARDS), default="gsm8k",
                        help="gsm8k: exact answer (SmolLM2 rarely scores, so the weights may never move); "
                             "closeness: partial credit by distance from the gold number (bench/closeness_reward.py)")
    parser.add_argument("--precision", default="auto", help="comma list of fp32,bf16; auto = both where bf16 is native, else fp32")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in ("trl-thp", "trl-mkl")),
                        help=f"comma list of {', '.join(VARIANTS)} (default: all but trl-thp and trl-mkl)")
    parser.add_argument("--out", help="work directory for run logs (default: a temporary one, removed at the end)")
    parser.add_argument("--json", help="write every run's summary here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes: tiny model, 2 prompts x 4 samples, 8 new tokens, 2 steps, fp32 (flags given still win)")
    if "--quick" in sys.argv[1:]:
        parser.set_defaults(model="tiny", prompts=2, n=4, max_new_tokens=8, micro_batch=8, steps=2, precision="fp32")
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return 0

    if importlib.util.find_spec("trl") is None:
        print("vs_trl: TRL is not installed; pip install -e '.[bench]' (trl==1.16.0)", file=sys.stderr)
        return 2
    if not args.data:
        parser.error(f"--data DIR (holding gsm8k/train.jsonl) is required, or set {DATA_ENV}")
    rows = args.prompts * args.n
    if args.n < 2 or rows % args.micro_batch:
        parser.error(f"need --n >= 2 and --micro-batch dividing prompts x n = {rows}")
    from llmrl.precision import cpu_has_native_bf16

    precisions = (["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]) if args.precision == "auto" else args.precision.split(",")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants + precisions if v not in VARIANTS + ("fp32", "bf16")]
    if unknown:
        parser.error(f"unknown variant or precision: {', '.join(unknown)}")

    from llmrl.models import load_tokenizer, resolve_model_path

    print(machine_header())
    model_dir = Path(resolve_model_path(args.model))  # converted and cached now, so no run's start-up pays for it
    params = count_params(model_dir)
    base_spec = {"model": args.model, "data": str(Path(args.data).resolve()), "prompts": args.prompts, "n": args.n,
                 "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch, "steps": args.steps,
                 "lr": args.lr, "seed": args.seed, "reward": args.reward}
    tasks = load_tasks(base_spec, load_tokenizer(args.model))
    if len(tasks) < args.prompts * args.steps:
        raise SystemExit(f"vs_trl: {args.data} gave {len(tasks)} GSM8K prompts, the run needs {args.prompts * args.steps}")
    prompt_tokens = [sum(len(t.prompt_ids) for t in tasks[i * args.prompts:(i + 1) * args.prompts]) for i in range(args.steps)]
    print(f"work: {args.model} ({params / 1e6:.1f}M params), {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps (medians over steps 2..{args.steps}), micro-batch {args.micro_batch}, lr {args.lr:g}, no KL, reward {args.reward}, "
          f"{sum(prompt_tokens) / len(prompt_tokens) / args.prompts:.0f} prompt tokens per prompt")

    import torch

    peaks = {p: matmul_peak_gflops(torch.bfloat16 if p == "bf16" else torch.float32) * 1e9 for p in precisions}
    for p, peak in peaks.items():
        print(f"matmul peak {p}: {peak / 1e9:.1f} GFLOP/s (2048^3, best of 5)")
    if "llmrl-vllm" in variants:
        reason = vllm_status(args.model)
        if reason:
            print(f"skipping llmrl-vllm: {reason}")
            variants.remove("llmrl-vllm")

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    same_prompts: list[bool] = []
    crashed: list[str] = []
    try:
        for precision in precisions:
            for variant in variants:
                name = f"{variant}-{precision}"
                spec = {**base_spec, "variant": variant, "precision": precision, "work": str(work / name),
                        "report": str(work / f"{name}.json")}
                Path(spec["work"]).mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                try:
                    report = launch(spec, work / f"{name}.log")
                except RuntimeError as err:  # one broken run should not cost the others' numbers
                    print(f"  {err}", flush=True)
                    crashed.append(name)
                    continue
                if "same_prompt_ids" in report:
                    same_prompts.append(report["same_prompt_ids"])
                results[(variant, precision)] = summarize(report, prompt_tokens, args.n, params, peaks[precision])
                print(f"  ran {name} in {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    if same_prompts:
        print(f"TRL's prompt token ids identical to llmrl's: {'yes' if all(same_prompts) else 'NO'}")
    header = (f"{'run':<20} {'startup_s':>9} {'step_s':>8} {'gen_s':>8} {'update_s':>8} {'other_s':>8} {'gen_tok/s':>9} "
              f"{'floor_s':>8} {'step/floor':>10} {'rss_MiB':>8}  weights changed")
    print(header)
    failed = unverified = False
    for (variant, precision), r in results.items():
        other = r["step_s"] - r["gen_s"] - r["update_s"]
        if r["changed"]:
            verdict = f"yes ({r['changed']}/{r['tensors']} tensors)"
        elif r["signal_steps"]:
            verdict, failed = f"NO, with learning signal in {r['signal_steps']} steps: FAILED", True
        else:
            verdict, unverified = "no: every group scored alike in every step (zero gradient); UNVERIFIED", True
        print(f"{variant + ' ' + precision:<20} {r['startup_s']:>9.1f} {r['step_s']:>8.2f} {r['gen_s']:>8.2f} {r['update_s']:>8.2f} "
              f"{other:>8.2f} {r['gen_tok_s']:>9.1f} {r['floor_s']:>8.2f} {r['over_floor']:>9.1f}x {r['peak_rss_mib']:>8.0f}  {verdict}")
    print("step_s: wall time of a step, logging included; gen_s: sampling; update_s: forward/backward/optimizer "
          "(TRL: the optimizer step less its generate-and-score call); other_s: rewards, advantages, weight sync, logging")
    for precision in precisions:
        for baseline, label in (("trl", "TRL"), ("trl-thp", "TRL with huge pages"), ("trl-mkl", "TRL with llmrl's MKL preload")):
            trl = results.get((baseline, precision))
            for variant in ("llmrl-hf", "llmrl-hf-skip", "llmrl-vllm"):
                mine = results.get((variant, precision))
                if trl and mine:
                    print(f"speedup ({LABELS[variant]}, vs {label}) {precision}: {trl['step_s'] / mine['step_s']:.2f}x")
            same_work = results.get(("llmrl-hf", precision))
            if trl and same_work:
                print(reach_line(trl["step_s"], same_work["floor_once_s"], precision, label))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{v}-{p}": r for (v, p), r in results.items()}, indent=1))
    if crashed:
        print(f"vs_trl: FAILED: {', '.join(crashed)} did not finish (their logs are printed above)", file=sys.stderr)
    if failed:
        print("vs_trl: FAILED: a run had a learning signal and its weights did not change", file=sys.stderr)
    if failed or crashed:
        return 1
    if unverified:
        print("vs_trl: WARNING: a run's weights did not change and it had no learning signal to change them; "
              "its training is unverified (more --steps give more chances of a correct answer)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation throughput: llmrl's vLLM engine against raw vLLM, and llmrl's hf engine.

Every engine gets the same token-id prompts and the same sampling: the built-in arithmetic
prompts (no data files) through the model's chat template, --prompts distinct prompts x --n
samples each, each prompt repeated n times in a row as the training loop sends a GRPO group
(default 8 x 8 = 64 sequences), temperature 1, top-p 1, no top-k, --max-new-tokens new tokens
(EOS still stops a sequence unless --ignore-eos), fp32 weights unless --dtype bfloat16.

Engines (--engines, comma-separated):
  vllm-llmrl          llmrl.rollout.build_rollout_engine with engine="vllm": what training uses.
  vllm-raw            vllm.LLM(...).generate on the same model directory, dtype, max_model_len,
                      max_num_seqs, KV-cache size (VLLM_CPU_KVCACHE_SPACE), seed and
                      enforce_eager as llmrl passes, and SamplingParams(temperature, top_p, top_k,
                      max_tokens, logprobs=0): the sampled token's logprob, which llmrl asks for
                      too. What llmrl adds on top is what this compares: logprobs_mode=
                      "processed_logprobs", max_logprobs=-1, the weight-reload worker extension,
                      and its own prompt/Completion conversion inside the timed call.
  hf                  llmrl's transformers engine (llmrl/rollout/hf.py), max_batch_size =
                      --max-num-seqs so all sequences decode as one batch, as in vLLM.
  hf-sdpa             (optional) the hf engine with transformers' SDPA attention instead of
                      llmrl/grouped_attention.py: the before/after of that change.
  hf-unpacked         (optional) the hf engine with rollout.packed_linears=false: what the
                      packed linears give where `auto` packs (llmrl/rollout/packed_linears.py),
                      together with the fused decode step, which needs grouped linears.
  hf-unfused          (optional) the hf engine with rollout.fused_decode=false: transformers'
                      modules for each decode step instead of llmrl/rollout/fused_decode.py.
  hf-no-panels        (optional) the hf engine without llmrl's panel products (llmrl/rollout/
                      packed_copies.py): fp32 weights in MKL's packed form and bf16 weights in
                      oneDNN's, where `auto` would take the panels: the before/after of the
                      panel products. (Named hf-mkl-packed before the bf16 panels.)
  vllm-raw-compiled   (optional, not in the default list) raw vLLM with vLLM's own default
                      enforce_eager=False, which on the CPU build compiles the model with
                      torch inductor (vllm/platforms/cpu.py); start-up takes minutes longer.
  vllm-raw-settings   (optional) raw vLLM with llmrl's two logprob settings (logprobs_mode=
                      "processed_logprobs", max_logprobs=-1) and nothing else of llmrl's.

Fairness choices:
- One worker process per engine, started one after another and kept alive for all rounds:
  vLLM is comfortable with one LLM per process, and paying its 30-60 s start-up once per
  engine (not once per round) keeps the whole run short. Start-up and one short warm-up call
  are timed and printed separately, never mixed into throughput.
- Only one engine computes at a time: the parent sends a request to one worker and waits for
  its reply, so the others sit idle (blocked on a pipe) and the engines never share cores.
- Rounds interleave the engines (vllm-llmrl, vllm-raw, hf, vllm-llmrl, ...) so slow drift of
  the machine (heat, other load) falls on all of them alike.
- Every vLLM worker runs with VLLM_ENABLE_V1_MULTIPROCESSING=0, as llmrl sets it: the engine
  core in-process. vLLM's default on the CPU build would move the model to a separate process
  and reserve a core for the scheduler, half of a 2-core machine; comparing that would measure
  the setting, not llmrl.
- vLLM's prefix cache is on (its default, in both vLLM engines): the n samples of a prompt
  share its prefill, as the hf engine shares it too. Later rounds repeat the prompts and so
  also hit the cache, which training (new prompts every step) would not; with ~60-token
  prompts against up to 128 new tokens per sample, prefill is a small part of a round.
- Timed: the generate call alone (llmrl's includes its conversion of the outputs, which is
  part of what it costs). Tokens: the exact sum of the completions' lengths, the sampled EOS
  included.

Decode floor: each generated token needs one forward position, 2 FLOPs per matmul weight (the
tied lm_head counted as a matmul: sharing the embedding saves memory, not the multiply) plus
attention, 4 x layers x heads x head_dim FLOPs per key attended (QK^T and AV). Divided into the
fp32 matmul peak measured here, that gives the most tokens/s any engine could reach; prompt
prefill is left out, so the floor is generous. Each engine's % of floor is reported, and also
its % of a decode-shaped floor: the same FLOPs at the throughput this machine's matmul reaches on
the model's own linear shapes with one row per sequence (64 x 576 against 576 x 1536, ...), which
is lower than the square peak and is what a decode at this batch could reach at best.

With --ignore-eos every sequence decodes --max-new-tokens tokens, so every engine does the same
work in every round and the comparison does not depend on how long its samples came out. For
vllm-llmrl the worker also times vLLM's own LLM.generate inside llmrl's call: the difference is
what llmrl's code adds, read off the same call rather than across rounds.

    .venv/bin/python bench/rollout.py                                   # the real run
    .venv/bin/python bench/rollout.py --model tiny --engines hf --prompts 2 --n 2 --max-new-tokens 8 --rounds 2
    .venv/bin/python bench/rollout.py --prompts 2 --n 2 --max-new-tokens 8 --rounds 2 --max-model-len 256   # vLLM smoke, ~2 min
(vLLM-CPU cannot serve `tiny`: head_dim 16 has no attention kernel, so its engines are skipped there.)
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llmrl.mkl_on_amd import reexec_with_preload

reexec_with_preload()  # measured as `llmrl` runs: MKL's tuned kernels on AMD CPUs

import torch

from machine import linear_shapes_gflops, machine_header, matmul_peak_gflops, matmul_weights

ENGINES = ("vllm-llmrl", "vllm-raw", "hf", "hf-sdpa", "hf-unpacked", "hf-unfused", "hf-no-panels", "vllm-raw-compiled", "vllm-raw-settings")
DEFAULT_ENGINES = "vllm-llmrl,vllm-raw,hf"
# How long the parent waits for one reply (start-up or one generate call) before giving up.
REPLY_TIMEOUT_S = 3600.0


# ---------------------------------------------------------------------------- prompts and FLOPs


def build_prompts(model: str, prompts: int, n: int) -> list[list[int]]:
    """The arithmetic task's prompt ids (chat template applied by the data layer), each
    repeated n times in a row, as the loop asks for a group."""
    from llmrl.data import build_tasks
    from llmrl.data.config import DataConfig
    from llmrl.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    tasks = build_tasks(DataConfig(type="arithmetic", num_train=prompts, num_test=1), tokenizer, split="train").tasks
    if len(tasks) < prompts:
        raise SystemExit(f"the arithmetic task gave {len(tasks)} prompts, fewer than --prompts {prompts}")
    return [list(task.prompt_ids) for task in tasks[:prompts] for _ in range(n)]


class DecodeFlops:
    """FLOPs of generating tokens with the model, from its config built on the meta device (no weights)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from llmrl.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(model))
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        self.meta = meta
        self.params = sum(p.numel() for p in meta.parameters())  # shared tensors counted once
        self.matmul = matmul_weights(meta)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # QK^T and AV each cost 2 FLOPs per head dimension per key; grouped KV heads share
        # keys and values (memory), not the multiplies.
        self.per_key = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim

    def of_sequences(self, prompt_lengths: list[int], completion_lengths: list[int]) -> float:
        """Total FLOPs of generating the completions: token j of a completion after a P-token
        prompt is computed at a position that attends to P + j keys."""
        total = 0.0
        for p, c in zip(prompt_lengths, completion_lengths):
            keys = c * p + c * (c - 1) / 2  # sum over j < c of (p + j)
            total += 2.0 * self.matmul * c + self.per_key * keys
        return total


# ---------------------------------------------------------------------------- workers


def _make_generate(name: str, spec: dict[str, Any]) -> Callable[[list[list[int]], int, int], Callable[[], list[int]]]:
    """Build engine `name`; return prepare(prompts, max_new_tokens, seed) -> run, where run()
    is the call to time and returns the completion lengths. Building the request objects
    outside run() would hide llmrl's share of that work, so run() does it for every engine.
    For vllm-llmrl, INNER_SECONDS collects the time spent inside vLLM's own LLM.generate."""
    if name in ("vllm-llmrl", "hf", "hf-sdpa", "hf-unpacked", "hf-unfused", "hf-no-panels"):
        from llmrl.models import ModelConfig, load_tokenizer
        from llmrl.rollout.base import RolloutConfig, SamplingParams, build_rollout_engine

        cfg = RolloutConfig(
            engine="vllm" if name == "vllm-llmrl" else "hf",
            dtype=spec["dtype"],
            temperature=spec["temperature"],
            max_num_seqs=spec["max_num_seqs"],
            max_batch_size=spec["max_num_seqs"],
            max_model_len=spec["max_model_len"],
            vllm_cpu_kvcache_gib=spec["kvcache_gib"],
            packed_linears=False if name == "hf-unpacked" else "auto",
            fused_decode=False if name in ("hf-unfused", "hf-sdpa") else "auto",
        )
        if name == "hf-no-panels":  # this worker process only
            from llmrl.rollout import packed_linears

            packed_linears.panels_pay = lambda: False
            packed_linears.bf16_panels_pay = lambda: False
        engine = build_rollout_engine(cfg, ModelConfig(name=spec["model"]), load_tokenizer(spec["model"]), seed=spec["seed"])
        if name == "hf-sdpa":
            engine.model.set_attn_implementation("sdpa")
        if name == "vllm-llmrl":
            _time_inner_generate(engine.llm)

        def prepare_llmrl(prompts: list[list[int]], max_new_tokens: int, seed: int) -> Callable[[], list[int]]:
            # seed: the hf engine draws from a generator seeded per call; vLLM ignores it and
            # continues the engine-wide generator seeded at start-up (see vllm_engine.py).
            sampling = SamplingParams(temperature=spec["temperature"], max_new_tokens=max_new_tokens, seed=seed, ignore_eos=spec["ignore_eos"])
            return lambda: [len(c.token_ids) for c in engine.generate(prompts, sampling)]

        return prepare_llmrl

    import vllm
    from vllm.inputs import TokensPrompt

    from llmrl.models import resolve_model_path

    path = resolve_model_path(spec["model"])
    llm = vllm.LLM(
        model=path,
        tokenizer=path,
        dtype=spec["dtype"],
        gpu_memory_utilization=0.5,  # RolloutConfig's default, which llmrl passes
        max_num_seqs=spec["max_num_seqs"],
        max_model_len=spec["max_model_len"],
        seed=spec["seed"],
        **({} if name == "vllm-raw-compiled" else {"enforce_eager": True}),
        # llmrl's logprob settings on an otherwise raw engine: splits llmrl's overhead into what
        # these settings cost inside vLLM and what llmrl's own code adds around the call.
        **({"logprobs_mode": "processed_logprobs", "max_logprobs": -1} if name == "vllm-raw-settings" else {}),
    )

    def prepare_raw(prompts: list[list[int]], max_new_tokens: int, seed: int) -> Callable[[], list[int]]:
        params = vllm.SamplingParams(
            temperature=spec["temperature"], top_p=1.0, top_k=0, max_tokens=max_new_tokens, logprobs=0, ignore_eos=spec["ignore_eos"]
        )

        def run() -> list[int]:
            outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
            return [len(out.outputs[0].token_ids) for out in outputs]

        return run

    return prepare_raw


INNER_SECONDS: list[float] = []


def _time_inner_generate(llm: Any) -> None:
    """Time every call of this LLM's generate, so llmrl's own work around it (request and
    output conversion) can be read off the same call: fixed work, no run-to-run noise."""
    inner = llm.generate

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            INNER_SECONDS.append(time.perf_counter() - start)

    llm.generate = timed


def worker_main(name: str, spec: dict[str, Any], reply_fd: int) -> None:
    """The worker's loop: build the engine, say how long it took, then answer generate
    requests read from stdin (one JSON line each) until told to quit."""
    replies = os.fdopen(reply_fd, "w", buffering=1)
    start = time.perf_counter()
    prepare = _make_generate(name, spec)
    # vLLM-CPU asks torch for 1 thread "for serving" and also blocks torch.set_num_threads
    # (vllm/v1/worker/cpu_worker.py); report what the engine really computes with.
    replies.write(json.dumps({"startup_s": time.perf_counter() - start, "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        run = prepare(request["prompts"], request["max_new_tokens"], request["seed"])
        INNER_SECONDS.clear()
        start = time.perf_counter()
        lengths = run()
        seconds = time.perf_counter() - start
        reply = {"seconds": seconds, "lengths": lengths}
        if INNER_SECONDS:
            reply["inner_seconds"] = sum(INNER_SECONDS)
        replies.write(json.dumps(reply) + "\n")


class Worker:
    """One engine in its own process, driven over a pipe; its output goes to a log file."""

    def __init__(self, name: str, spec: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        # The worker imports the same llmrl as this process (a worktree run without PYTHONPATH
        # would otherwise pick up the editable install's copy in the child only).
        import llmrl

        root = str(Path(llmrl.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as llmrl's engine sets it; see the docstring
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec["kvcache_gib"]))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", name, "--worker-spec", json.dumps(spec), "--worker-fd", str(write_fd)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, text=True, pass_fds=(write_fd,),
            )
        os.close(write_fd)  # the child holds the only write end: its exit reads as EOF here
        self.replies = os.fdopen(read_fd, "r")

    def reply(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.replies], [], [], REPLY_TIMEOUT_S)
        line = self.replies.readline() if ready else ""
        if not line:
            self.proc.kill()
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise RuntimeError(f"worker {self.name} gave no reply (exit code {self.proc.poll()}); log {self.log}:\n{tail}")
        return json.loads(line)

    def cpu_seconds(self) -> float:
        """CPU time the worker has used so far, all its threads (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def unavailable(name: str, model: str) -> str | None:
    """Why engine `name` cannot run this model here; None when it can."""
    if not name.startswith("vllm"):
        return None
    from llmrl.models import ModelConfig
    from llmrl.rollout.vllm_engine import vllm_missing, vllm_model_unsupported

    return vllm_missing() or vllm_model_unsupported(ModelConfig(name=model))


# ---------------------------------------------------------------------------- report


def _spread(values: list[float]) -> float:
    """Half the range relative to the median: the +-band one round's figure fell in."""
    median = statistics.median(values)
    return (max(values) - min(values)) / 2 / median if median else 0.0


def report(results: dict[str, list[dict[str, Any]]], prompt_lengths: list[int], flops: DecodeFlops, peak: float, skinny: float) -> None:
    print("\nthroughput (generated tokens / s of the generate call)")
    rates: dict[str, list[float]] = {}
    for name, rounds in results.items():
        rates[name] = [sum(r["lengths"]) / r["seconds"] for r in rounds]
        per_round = " ".join(f"{x:8.1f}" for x in rates[name])
        mean_len = statistics.mean(statistics.mean(r["lengths"]) for r in rounds)
        tokens = [sum(r["lengths"]) for r in rounds]
        print(
            f"  {name:<18} rounds [{per_round} ] median {statistics.median(rates[name]):8.1f}  "
            f"min-max {min(rates[name]):.1f}-{max(rates[name]):.1f} (+-{100 * _spread(rates[name]):.1f}%)  "
            f"tokens/round {tokens}  mean completion {mean_len:.1f}"
        )

    if "vllm-llmrl" in rates and "vllm-raw" in rates:
        ours, raw = rates["vllm-llmrl"], rates["vllm-raw"]
        # Per round, paired (the two ran back to back): how much longer llmrl took per token.
        paired = [r / o - 1 for o, r in zip(ours, raw)]
        overhead = statistics.median(paired)
        noise = max(_spread(ours), _spread(raw))
        if len(paired) < 2:
            verdict = "one round: no spread to judge by"
        elif abs(overhead) > noise:
            verdict = "llmrl slower" if overhead > 0 else "llmrl faster"
        else:
            verdict = "within noise"
        print(
            f"\noverhead llmrl-vllm vs raw vllm: {100 * overhead:+.1f}% (spread +-{100 * noise:.1f}%): {verdict}  "
            f"[per round: {' '.join(f'{100 * p:+.1f}%' for p in paired)}; positive = llmrl takes longer per token]"
        )
        same = [sum(a["lengths"]) == sum(b["lengths"]) for a, b in zip(results["vllm-llmrl"], results["vllm-raw"])]
        print(f"  same seed, same sampler: identical token counts per round: {same}")
    wrapped = [r for r in results.get("vllm-llmrl", []) if "inner_seconds" in r]
    if wrapped:
        # The same call, timed outside and inside vLLM's LLM.generate: what llmrl's code adds at
        # fixed work. What differs between the two engines' vLLM settings is in the paired line above.
        added = [r["seconds"] - r["inner_seconds"] for r in wrapped]
        shares = [a / r["inner_seconds"] for a, r in zip(added, wrapped)]
        print(
            f"llmrl's code around LLM.generate (same call, fixed work): median {100 * statistics.median(shares):.2f}% of the "
            f"vLLM call [per round: {' '.join(f'{1000 * a:.1f} ms' for a in added)}]"
        )
    for other in ("hf", "hf-sdpa", "hf-unpacked", "hf-unfused", "hf-no-panels", "vllm-raw-compiled", "vllm-raw-settings"):
        if other in rates and "vllm-raw" in rates:
            paired = [a / b for a, b in zip(rates[other], rates["vllm-raw"])]
            noise = max(_spread(rates[other]), _spread(rates["vllm-raw"]))
            ratio = statistics.median(rates[other]) / statistics.median(rates["vllm-raw"])
            if len(paired) < 2:
                verdict = "one round: no spread to judge by"
            elif min(paired) > 1 or max(paired) < 1:
                verdict = f"{'faster' if ratio > 1 else 'slower'} in every round"
            else:
                verdict = "within noise" if abs(ratio - 1) <= noise else "faster" if ratio > 1 else "slower"
            print(
                f"{other} vs raw vllm: {ratio:.2f}x (medians; spread +-{100 * noise:.1f}%): {verdict}  "
                f"[per round: {' '.join(f'{p:.2f}x' for p in paired)}]"
            )
    for other, what in (
        ("hf-sdpa", "grouped decode attention"),
        ("hf-unpacked", "packed linears where auto packs, and the fused step"),
        ("hf-unfused", "fused decode step"),
        ("hf-no-panels", "panel products"),
    ):
        if "hf" in rates and other in rates:
            paired = [a / b for a, b in zip(rates["hf"], rates[other])]
            print(f"speedup hf ({what}) vs {other}: median {statistics.median(paired):.2f}x  "
                  f"[per round: {' '.join(f'{p:.2f}x' for p in paired)}]")

    print(
        f"\ndecode floor at the matmul peak {peak:.1f} GFLOP/s: {flops.matmul / 1e6:.1f}M matmul weights "
        f"({flops.params / 1e6:.1f}M parameters), 2 FLOPs each per token + {flops.per_key} FLOPs per key attended; prefill not counted"
    )
    for name, rounds in results.items():
        tokens = sum(sum(r["lengths"]) for r in rounds)
        total = sum(flops.of_sequences(prompt_lengths, r["lengths"]) for r in rounds)
        per_token = total / tokens
        floor = peak * 1e9 / per_token
        median = statistics.median(rates[name])
        print(
            f"  {name:<18} {per_token / 1e6:7.1f} MFLOP/token  floor {floor:8.1f} tok/s  measured {median:8.1f} tok/s = "
            f"{100 * median / floor:5.1f}% of floor; {100 * median / (floor * skinny / peak):5.1f}% of the decode-shaped floor"
        )
    print(
        f"  (decode-shaped floor: the same FLOPs at {skinny:.1f} GFLOP/s, what this machine's matmul reaches on the model's own "
        f"linear shapes at batch {len(prompt_lengths)} = {100 * skinny / peak:.0f}% of the square peak)"
    )


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="distinct arithmetic prompts")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (a GRPO group)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM: longest prompt + completion")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="vLLM max_num_seqs and the hf engine's max_batch_size")
    parser.add_argument("--kvcache-gib", type=int, default=2, help="vLLM-CPU KV cache (rollout.vllm_cpu_kvcache_gib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations of every engine; the floor uses the matmul peak of this dtype")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="decode past EOS: every sequence runs --max-new-tokens, so every engine does the same work")
    parser.add_argument("--log-dir", type=Path, default=None, help="worker logs (default: a new temporary directory)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, json.loads(args.worker_spec), args.worker_fd)
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    print(machine_header())
    # The peak first, while nothing else of ours runs.
    peak = matmul_peak_gflops(getattr(torch, args.dtype))
    print(f"matmul peak {args.dtype}: {peak:.1f} GFLOP/s (2048^2, best of 5)")

    prompts = build_prompts(args.model, args.prompts, args.n)
    prompt_lengths = [len(p) for p in prompts]
    flops = DecodeFlops(args.model)
    skinny = linear_shapes_gflops(flops.meta, len(prompts), getattr(torch, args.dtype))
    print(f"matmul on the model's linear shapes at batch {len(prompts)}, {args.dtype}: {skinny:.1f} GFLOP/s")
    print(
        f"model {args.model}: {args.prompts} prompts x {args.n} samples = {len(prompts)} sequences, prompt "
        f"{min(prompt_lengths)}-{max(prompt_lengths)} tokens, up to {args.max_new_tokens} new tokens, temperature "
        f"{args.temperature}, {args.dtype}{', EOS ignored' if args.ignore_eos else ''}; {args.rounds} rounds; max_model_len {args.max_model_len}, max_num_seqs "
        f"{args.max_num_seqs}, KV cache {args.kvcache_gib} GiB"
    )
    if max(prompt_lengths) + args.max_new_tokens > args.max_model_len:
        parser.error(f"--max-model-len {args.max_model_len} < longest prompt + --max-new-tokens")

    skipped = {e: why for e in engines if (why := unavailable(e, args.model))}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    engines = [e for e in engines if e not in skipped]
    if not engines:
        raise SystemExit("no engine can run here")

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llmrl-bench-rollout-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": args.model, "temperature": args.temperature, "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len, "kvcache_gib": args.kvcache_gib, "seed": args.seed, "dtype": args.dtype,
        "ignore_eos": args.ignore_eos,
    }
    workers: dict[str, Worker] = {}
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    try:
        print(f"\nstart-up (one at a time; worker logs in {log_dir})")
        for name in engines:
            begun = time.perf_counter()
            workers[name] = Worker(name, spec, log_dir)
            ready = workers[name].reply()
            process_s = time.perf_counter() - begun
            # One short call outside the rounds: first-call costs (allocations, kernel choice,
            # lazy imports) belong to start-up, not to round 1.
            warm = workers[name].generate(prompts, min(8, args.max_new_tokens), seed=10_000)["seconds"]
            print(
                f"  {name:<18} process {process_s:6.1f} s (engine build {ready['startup_s']:6.1f} s), "
                f"warm-up call {warm:5.1f} s, torch threads {ready['threads']}", flush=True,
            )

        # CPU the idle workers burn while another one is timed (OpenMP spin-waits, background
        # threads): it would be taken from the engine being measured, so it is reported.
        idle_cpu = 0.0
        timed = 0.0
        for index in range(args.rounds):
            line = []
            for name in engines:
                others = [w for other, w in workers.items() if other != name]
                before = sum(w.cpu_seconds() for w in others)
                result = workers[name].generate(prompts, args.max_new_tokens, seed=args.seed + index)
                idle_cpu += sum(w.cpu_seconds() for w in others) - before
                timed += result["seconds"]
                results[name].append(result)
                line.append(f"{name} {sum(result['lengths']) / result['seconds']:.1f} tok/s ({result['seconds']:.1f} s)")
            print(f"round {index + 1}: " + ", ".join(line), flush=True)
        print(f"idle workers used {idle_cpu:.1f} CPU-s during {timed:.1f} s of timed calls (should be ~0)")
    finally:
        for worker in workers.values():
            worker.close()

    # Measured again with the workers gone: the floor takes the higher of the two, so a slow
    # moment of the machine at start-up cannot flatter the engines' share of it.
    after = matmul_peak_gflops(getattr(torch, args.dtype))
    print(f"matmul peak {args.dtype} after the rounds: {after:.1f} GFLOP/s (before: {peak:.1f}); the floor uses {max(peak, after):.1f}")
    report(results, prompt_lengths, flops, max(peak, after), skinny)


if __name__ == "__main__":
    main()

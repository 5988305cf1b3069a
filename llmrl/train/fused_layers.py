"""The RMSNorms, SiLU-gated MLPs and rotary embeddings of Llama-family models, trained through
llmrl's fused CPU kernels (`llmrl/kernels/training_ops.cpp`).

transformers' RMSNorm runs seven small ops forward and about ten backward, each a full pass over
[tokens, width]; its MLP runs SiLU, a product and their backwards as separate passes. At the
sizes of a SmolLM2-135M GRPO update (1,900 tokens a micro-batch) one norm's forward and backward
took 16.4 ms standalone and the SiLU-gated product 12.1 ms. Here each is one pass forward and one
backward, with the same rounding as transformers' forward; gradients agree with autograd's to fp32
rounding (tests/test_fused_layers.py). The update went from 22.61 to 21.99 s (docs/benchmarks.md,
"Fused norms and SiLU in training"). The rotary embedding, q * cos + rotate_half(q) * sin and the
same for k, is six operators forward and about eight backward per tensor, and 5.2 ms of a fp32
layer's forward and backward at 2,300 tokens; here it is one pass each way, bit for bit what
transformers' ops and autograd give.

Which modules qualify is a registry keyed by the module's class name. A module is switched by
replacing its `forward` on the instance; inputs the kernels do not take (another device, mixed
dtypes) go to the original forward.
"""
from __future__ import annotations

import logging
import sys
import threading
import types
from typing import Any, Callable

import torch
from torch import nn

from llmrl import kernels
from llmrl.registry import Registry

logger = logging.getLogger("llmrl.train")

DTYPES = (torch.float32, torch.bfloat16)

# class name -> a function that switches one such module to the fused kernels (False: left as is)
FUSED_TRAINING_MODULES: Registry[Callable[[nn.Module], bool]] = Registry("fused training module")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width] with unit stride along the width, as the kernels read it."""
    rows = t.reshape(-1, t.shape[-1])
    if rows.numel() == 0:
        return t.new_empty(0, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows(x)
        out, inverse = torch.ops.llmrl_kernels.rms_norm_train(rows, weight, eps)
        ctx.save_for_backward(rows, weight, inverse)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, inverse = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.llmrl_kernels.rms_norm_backward(_rows(grad), rows, weight, inverse, ctx.needs_input_grad[1])
        return grad_x.view(ctx.shape), grad_weight if ctx.needs_input_grad[1] else None, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate_rows, up_rows = _rows(gate), _rows(up)
        ctx.save_for_backward(gate_rows, up_rows)
        ctx.shape = gate.shape
        return torch.ops.llmrl_kernels.silu_mul_train(gate_rows, up_rows).view(gate.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_rows, up_rows = ctx.saved_tensors
        grad_gate, grad_up = torch.ops.llmrl_kernels.silu_mul_backward(_rows(grad), gate_rows, up_rows)
        return grad_gate.view(ctx.shape), grad_up.view(ctx.shape)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.ops.llmrl_kernels.rotary_train(x, cos, sin, False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        return torch.ops.llmrl_kernels.rotary_train(grad, cos, sin, True), None, None


def _kernels_take(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return first.device.type == "cpu" and first.dtype in DTYPES and all(t.dtype == first.dtype and t.device == first.device for t in tensors)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, rounded as transformers' LlamaRMSNorm."""
    return _RMSNorm.apply(x, weight, eps)


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, rounded as transformers' act_fn(gate) * up."""
    return _SiluMul.apply(gate, up)


def _rotary_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """The shapes transformers' Llama-family attention hands apply_rotary_pos_emb: q and k [B, heads,
    T, D] with unit stride along D, cos and sin [B, T, D] as constants, all of one dtype."""
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or not _kernels_take(q, k, cos, sin):
        return False
    expected = (q.shape[0], q.shape[2], q.shape[3])
    return (
        tuple(cos.shape) == expected and tuple(sin.shape) == expected and (k.shape[0], k.shape[2], k.shape[3]) == expected
        and q.shape[3] % 2 == 0 and q.stride(3) == 1 and k.stride(3) == 1 and not (cos.requires_grad or sin.requires_grad)
    )


# Set while a switched attention module's forward runs on this thread: the modeling module's
# apply_rotary_pos_emb is shared by every model of the family, switched or not.
_IN_SWITCHED_ATTENTION = threading.local()


def _fused_rotary(original: Callable[..., Any]) -> Callable[..., Any]:
    """apply_rotary_pos_emb through the fused kernel inside a switched attention's forward where
    `_rotary_takes`, else `original`."""

    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        if not getattr(_IN_SWITCHED_ATTENTION, "on", False) or not _rotary_takes(q, k, cos, sin, unsqueeze_dim):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.contiguous(), sin.contiguous()
        return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)

    apply_rotary_pos_emb.llmrl_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _kernels_take(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return fused_rms_norm(hidden_states, self.weight, float(self.variance_epsilon))


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not _kernels_take(gate, up) or gate.shape != up.shape:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(fused_silu_mul(gate, up))


def _fuse_rms_norm(module: nn.Module) -> bool:
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or not hasattr(module, "variance_epsilon"):
        return False
    module.forward = types.MethodType(_norm_forward, module)
    return True


def _is_silu(act: Any) -> bool:
    """torch's SiLU module, or transformers' (its ACT2FN["silu"], a module of its own class)."""
    from transformers.activations import ACT2FN

    return isinstance(act, (nn.SiLU, type(ACT2FN["silu"])))


def _fuse_silu_mlp(module: nn.Module) -> bool:
    if not _is_silu(getattr(module, "act_fn", None)) or not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    module.forward = types.MethodType(_mlp_forward, module)
    return True


def _attention_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    outer = getattr(_IN_SWITCHED_ATTENTION, "on", False)
    _IN_SWITCHED_ATTENTION.on = True
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_SWITCHED_ATTENTION.on = outer


def _fuse_rotary(module: nn.Module) -> bool:
    """The attention's rotary embedding. Its forward calls its modeling module's
    `apply_rotary_pos_emb`, so that name is replaced (once per modeling module) by one that takes
    the fused kernel while a switched attention runs and transformers' function otherwise; both
    give the same bits (tests/test_fused_layers.py)."""
    modeling = sys.modules.get(type(module).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if not hasattr(original, "llmrl_original"):
        modeling.apply_rotary_pos_emb = _fused_rotary(original)  # type: ignore[union-attr]
    module.forward = types.MethodType(_attention_forward, module)
    return True


# transformers' classes that compute weight * normed.to(input_dtype) (not Gemma's 1 + weight),
# the MLPs that compute down(act(gate(x)) * up(x)), and the attentions that rotate q and k by
# x * cos + rotate_half(x) * sin
for _family in ("Llama", "Qwen2", "Qwen3", "Mistral"):
    FUSED_TRAINING_MODULES.register(f"{_family}RMSNorm", _fuse_rms_norm)
    FUSED_TRAINING_MODULES.register(f"{_family}MLP", _fuse_silu_mlp)
    FUSED_TRAINING_MODULES.register(f"{_family}Attention", _fuse_rotary)


def fuse_training_layers(model: nn.Module) -> int:
    """Switch the model's qualifying modules to the fused kernels where they can run (CPU
    weights, kernels that build here); returns how many were switched."""
    weights = next(model.parameters(), None)
    if weights is None or weights.device.type != "cpu":
        return 0
    if not kernels.load(kernels.DECODE):
        logger.info("fused training layers off: llmrl's kernels do not build here (%s)", kernels.failure(kernels.DECODE))
        return 0
    return sum(FUSED_TRAINING_MODULES[type(m).__name__](m) for m in model.modules() if type(m).__name__ in FUSED_TRAINING_MODULES)

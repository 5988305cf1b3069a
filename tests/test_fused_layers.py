"""Training's fused RMSNorm and SiLU-gated product: transformers' forward, autograd's gradients."""
import math

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from llmrl import kernels
from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import LossContext
from llmrl.models import ModelConfig, load_policy
from llmrl.train.engine import TrainConfig
from llmrl.train.fused_layers import _attention_forward, _fused_rotary, fuse_training_layers, fused_rms_norm, fused_silu_mul
from llmrl.train.torch_engine import TorchTrainEngine

pytestmark = pytest.mark.skipif(not kernels.load(kernels.DECODE), reason="llmrl's kernels do not build here")

GRAD_TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=2e-2)}


def test_rms_norm_worked_example():
    """x = [3, 4], w = [1, 2], eps = 0: r = 1/sqrt(12.5); y = w x r; for g = [1, 1]
    dx = r (g w - x r mean(g w x r)) and dw = g x r."""
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    y = fused_rms_norm(x, w, 0.0)
    r = 1 / math.sqrt(12.5)
    torch.testing.assert_close(y, torch.tensor([[3 * r, 8 * r]]))
    y.backward(torch.ones(1, 2))
    mean = (1 * 3 * r + 2 * 4 * r) / 2
    torch.testing.assert_close(x.grad, torch.tensor([[r * (1 - 3 * r * mean), r * (2 - 4 * r * mean)]]))
    torch.testing.assert_close(w.grad, torch.tensor([3 * r, 4 * r]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_forward_and_autograd(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(3, 41, 96, dtype=dtype)
    x[1, 7] = 0  # an all-zero row: r = eps^-1/2, still finite
    grad = torch.randn(3, 41, 96, dtype=dtype)
    want_x = x.clone().requires_grad_()
    want = norm(want_x)
    want.backward(grad)
    want_weight_grad = norm.weight.grad.clone()
    norm.weight.grad = None
    got_x = x.clone().requires_grad_()
    got = fused_rms_norm(got_x, norm.weight, 1e-6)
    got.backward(grad)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    else:  # the sum of squares in another order can move a bf16 rounding by one step
        assert (got.float() - want.float()).abs().le(want.float().abs() * 2**-7 + 1e-6).all()
    torch.testing.assert_close(got_x.grad, want_x.grad, **GRAD_TOLERANCE[dtype])
    torch.testing.assert_close(norm.weight.grad, want_weight_grad, **GRAD_TOLERANCE[dtype], msg="weight grad")
    assert torch.isfinite(got_x.grad[1, 7]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_transformers_forward_and_autograd(dtype):
    torch.manual_seed(1)
    gate, up, grad = (torch.randn(2, 33, 80, dtype=dtype) * 4 for _ in range(3))
    want_gate, want_up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want = torch.nn.functional.silu(want_gate) * want_up
    want.backward(grad)
    got_gate, got_up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    got = fused_silu_mul(got_gate, got_up)
    got.backward(grad)
    torch.testing.assert_close(got, want, **GRAD_TOLERANCE[dtype])
    torch.testing.assert_close(got_gate.grad, want_gate.grad, **GRAD_TOLERANCE[dtype])
    torch.testing.assert_close(got_up.grad, want_up.grad, **GRAD_TOLERANCE[dtype])


def _in_switched_attention(fused):  # type: ignore[no-untyped-def]
    """`fused` (a switched apply_rotary_pos_emb) called from inside a switched attention's forward."""

    class Attention(torch.nn.Module):
        def forward(self, *args):  # type: ignore[no-untyped-def]
            return fused(*args)

    attention = Attention()
    return lambda *args: _attention_forward(attention, *args)


def _rotary_case(dtype: torch.dtype, tokens: int = 37, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """q and k as LlamaAttention makes them (transposed views of the projections), cos and sin as
    its rotary embedding does, and upstream gradients."""
    torch.manual_seed(4)
    q_proj, k_proj = torch.randn(batch, tokens, 4 * 16, dtype=dtype), torch.randn(batch, tokens, 2 * 16, dtype=dtype)
    angles = torch.arange(tokens, dtype=torch.float32)[:, None] * (0.3 ** torch.arange(8, dtype=torch.float32))
    angles = torch.cat([angles, angles], dim=-1).expand(batch, tokens, 16)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grad_q, grad_k = torch.randn(batch, 4, tokens, 16, dtype=dtype), torch.randn(batch, 2, tokens, 16, dtype=dtype)
    return q_proj, k_proj, cos, sin, grad_q, grad_k


def _rotated(apply, q_proj, k_proj, cos, sin, grad_q, grad_k):  # type: ignore[no-untyped-def]
    q_in, k_in = q_proj.clone().requires_grad_(), k_proj.clone().requires_grad_()
    batch, tokens = q_in.shape[:2]
    q = q_in.view(batch, tokens, -1, 16).transpose(1, 2)
    k = k_in.view(batch, tokens, -1, 16).transpose(1, 2)
    q_out, k_out = apply(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [grad_q, grad_k])
    return q_out, k_out, q_in.grad, k_in.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_gives_transformers_bits_forward_and_backward(dtype):
    case = _rotary_case(dtype)
    current = modeling_llama.apply_rotary_pos_emb  # switched already if an earlier test fused a Llama
    want = _rotated(getattr(current, "llmrl_original", current), *case)
    switched = _in_switched_attention(_fused_rotary(lambda *a: pytest.fail("the fused path should have taken these")))
    got = _rotated(switched, *case)
    for g, w, name in zip(got, want, ("q", "k", "q grad", "k grad")):
        assert g.shape == w.shape and (g.stride() == w.stride() or name.endswith("grad")), name  # the layout torch's ops give
        assert torch.equal(g, w), name  # bit for bit


def test_rotary_worked_example_and_what_goes_to_transformers():
    """One head of size 4 at angle t: (x1, x2 | x3, x4) -> x1 c - x3 s, x2 c - x4 s | x3 c + x1 s, x4 c + x2 s;
    the gradient is the transpose: g1 c + g3 s, g2 c + g4 s | g3 c - g1 s, g4 c - g2 s."""
    c, s = math.cos(0.5), math.sin(0.5)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).requires_grad_()
    cos, sin = torch.full((1, 1, 4), c), torch.full((1, 1, 4), s)
    calls = []
    fused = _fused_rotary(lambda *a: calls.append(a) or (a[0], a[1]))
    switched = _in_switched_attention(fused)
    q, _ = switched(x, x, cos, sin)
    torch.testing.assert_close(q.view(4), torch.tensor([1 * c - 3 * s, 2 * c - 4 * s, 3 * c + 1 * s, 4 * c + 2 * s]))
    g = torch.tensor([1.0, -1.0, 2.0, 0.5])
    q.backward(g.view(1, 1, 1, 4))
    torch.testing.assert_close(x.grad.view(4), torch.tensor([1 * c + 2 * s, -1 * c + 0.5 * s, 2 * c - 1 * s, 0.5 * c + 1 * s]))
    assert not calls
    fused(x, x, cos, sin)  # outside a switched attention's forward: transformers' function
    switched(x, x, cos, sin, 2)  # unsqueeze_dim 2: another layout
    switched(x.double(), x.double(), cos.double(), sin.double())  # fp64
    switched(x, x, cos.requires_grad_(), sin)  # cos to be trained
    switched(x, x, cos[..., :2].detach(), sin[..., :2])  # a partial rotary
    assert len(calls) == 5


def test_empty_input_and_a_frozen_weight():
    weight = torch.ones(8)  # no grad wanted, as LoRA leaves the norms
    x = torch.zeros(0, 8, requires_grad=True)
    fused_rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad.shape == (0, 8) and weight.grad is None
    gate, up = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4, requires_grad=True)
    fused_silu_mul(gate, up).sum().backward()
    assert gate.grad.shape == (0, 4)


def test_modules_switch_and_inputs_the_kernels_do_not_take_go_to_transformers():
    torch.manual_seed(2)
    norm, mlp = LlamaRMSNorm(16), LlamaMLP(type("C", (), {"hidden_size": 16, "intermediate_size": 24, "hidden_act": "silu", "mlp_bias": False})())
    holder = torch.nn.ModuleDict({"norm": norm, "mlp": mlp})
    x = torch.randn(4, 16)
    want_norm, want_mlp = norm(x), mlp(x)
    assert fuse_training_layers(holder) == 2
    torch.testing.assert_close(norm(x), want_norm)
    torch.testing.assert_close(mlp(x), want_mlp)
    gelu = LlamaMLP(type("C", (), {"hidden_size": 16, "intermediate_size": 24, "hidden_act": "gelu", "mlp_bias": False})())
    assert fuse_training_layers(torch.nn.ModuleDict({"mlp": gelu})) == 0  # not SiLU: left as it is
    mixed = x.to(torch.bfloat16)  # a bf16 input against fp32 weights: transformers' module, which upcasts
    torch.testing.assert_close(norm(mixed), LlamaRMSNorm.forward(norm, mixed))


def test_the_engine_trains_the_same_with_and_without_the_fused_layers(tiny_path):
    """One GRPO micro-batch on the tiny model: same loss, and gradients equal up to fp32 rounding."""
    torch.manual_seed(3)
    rows, length = 4, 12
    batch = {
        "input_ids": torch.randint(0, 100, (rows, length)),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "position_ids": torch.arange(length).expand(rows, length).contiguous(),
        "loss_mask": torch.cat([torch.zeros(rows, 5), torch.ones(rows, length - 5)], dim=1),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(rows, length).contiguous(),
    }
    algo = resolve_algorithm(AlgorithmConfig(name="grpo"))
    grads, losses = {}, {}
    for fused in (False, True):
        model = load_policy(ModelConfig(name=tiny_path))
        engine = TorchTrainEngine(model, TrainConfig(lr=0.0, precision="fp32", micro_batch_size=4, fused_layers=fused), total_updates=1)
        switched = sum(m.forward.__func__.__module__ == "llmrl.train.fused_layers" for m in model.modules() if "forward" in vars(m))
        assert switched == (2 * model.config.num_hidden_layers + 1 + 2 * model.config.num_hidden_layers if fused else 0)
        metrics = engine.step(dict(batch), LOSSES[algo.loss], LossContext(step=0, cfg=algo))
        losses[fused] = metrics["actor/loss"]
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_subnormal_results_flush_to_zero_inside_the_kernel_only():
    """silu(-87) * 1e-3 is about -1.4e-39, a subnormal: the kernels flush it (elementwise.h,
    FlushDenormals) and leave the threads' floating-point mode as it was, so torch's own ops keep
    their subnormals."""
    gate, up = torch.full((64, 256), -87.0), torch.full((64, 256), 1e-3)
    assert (fused_silu_mul(gate, up) == 0).all()
    assert (torch.nn.functional.silu(gate) * up != 0).all()  # torch's, for comparison
    tiny = torch.full((1 << 20,), 1e-38) * 0.5  # spread over torch's threads, which ran the kernel
    assert (tiny != 0).all()

"""The hf engine's grouped, pre-packed linears: same products, same parameters, fresh after writes."""
from pathlib import Path

import pytest
import torch
from torch import nn

from llmrl.models import ModelConfig, load_causal_lm
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.hf import HFRolloutEngine
from llmrl.precision import cpu_field
from llmrl.rollout import packed_linears
from llmrl.rollout.packed_copies import MklPackedCopy, bf16_panel_ops_here, mkl_packing_ops_here, panel_ops_here
from llmrl.rollout.packed_linears import GroupedLinear, LinearGroup, pack_linears

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


class Block(nn.Module):
    """The shapes of a decoder layer's linears: q/k/v and gate/up read one input each."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 12, bias=bias), nn.Linear(16, 4, bias=bias), nn.Linear(16, 4, bias=bias)
        self.o_proj = nn.Linear(12, 16, bias=bias)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 24, bias=bias), nn.Linear(16, 24, bias=bias), nn.Linear(24, 16, bias=bias)


def reference(linear: nn.Linear, weights: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    bias = weights.get(f"{name}.bias")
    return nn.functional.linear(x, weights[f"{name}.weight"], bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_every_member_gives_its_own_linear_product(dtype, bias):
    torch.manual_seed(0)
    block = Block(bias).to(dtype)
    weights = {k: v.clone() for k, v in block.state_dict().items()}
    names = list(block.state_dict())
    assert pack_linears(block) == 4  # q/k/v, gate/up, and o and down alone
    assert list(block.state_dict()) == names  # same parameters under the same names...
    for key, value in block.state_dict().items():
        assert torch.equal(value, weights[key])  # ...with the same values
    q, k = block.q_proj.weight, block.k_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()  # views into one weight
    x = torch.randn(3, 5, 16, dtype=dtype)  # [rows, positions, in]: the product flattens and restores
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        got = getattr(block, name)(x)
        assert got.shape == (3, 5, getattr(block, name).out_features)
        torch.testing.assert_close(got, reference(getattr(block, name), weights, name, x), **TOLERANCE[dtype])
    h = torch.randn(3, 5, 12, dtype=dtype)
    torch.testing.assert_close(block.o_proj(h), reference(block.o_proj, weights, "o_proj", h), **TOLERANCE[dtype])


def test_siblings_share_one_product_for_the_same_input(monkeypatch):
    block = Block(bias=False)
    pack_linears(block)
    products = []
    group = block.q_proj.group
    original = LinearGroup._current_product

    def counting(self: LinearGroup):
        product = original(self)
        return lambda x: products.append(self) or product(x)

    monkeypatch.setattr(LinearGroup, "_current_product", counting)
    x = torch.randn(2, 16)
    block.q_proj(x), block.k_proj(x), block.v_proj(x)
    assert products == [group]
    block.gate_proj(x), block.up_proj(x)
    assert len(products) == 2 and products[1] is block.gate_proj.group


def test_a_different_or_changed_input_is_never_served_a_pending_output():
    torch.manual_seed(1)
    block = Block(bias=True)
    weights = {k: v.clone() for k, v in block.state_dict().items()}
    pack_linears(block)
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    block.q_proj(x)  # leaves k and v of x pending
    torch.testing.assert_close(block.k_proj(y), reference(block.k_proj, weights, "k_proj", y))  # another tensor
    block.q_proj(x)
    x.mul_(2)  # the same tensor, written in place after the product
    torch.testing.assert_close(block.v_proj(x), reference(block.v_proj, weights, "v_proj", x))
    block.q_proj(x)
    torch.testing.assert_close(block.q_proj(x), reference(block.q_proj, weights, "q_proj", x))  # q twice: computed again


def test_a_written_weight_is_packed_again_before_the_next_product():
    torch.manual_seed(2)
    block = Block(bias=True)
    pack_linears(block)
    x = torch.randn(4, 16)
    block.up_proj(x)  # packs
    with torch.no_grad():
        block.up_proj.weight.copy_(torch.randn(24, 16))  # as the engine's load_weights writes
        block.up_proj.bias.add_(1.0)
    want = nn.functional.linear(x, block.up_proj.weight, block.up_proj.bias)
    torch.testing.assert_close(block.up_proj(x), want)
    torch.testing.assert_close(block.gate_proj(x), nn.functional.linear(x, block.gate_proj.weight, block.gate_proj.bias))


def test_unequal_inputs_or_partial_biases_are_left_alone():
    block = Block(bias=False)
    block.k_proj = nn.Linear(16, 4, bias=True)  # a bias on one sibling only
    pack_linears(block)
    assert not isinstance(block.q_proj, GroupedLinear) and not isinstance(block.k_proj, GroupedLinear)
    assert isinstance(block.gate_proj, GroupedLinear) and isinstance(block.o_proj, GroupedLinear)


def test_the_tiny_model_gives_the_same_logits_packed_and_plain(tiny_path):
    plain = load_causal_lm(ModelConfig(name=tiny_path), torch.float32).eval()
    packed = load_causal_lm(ModelConfig(name=tiny_path), torch.float32).eval()
    assert pack_linears(packed) == 4 * plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("maker", ["torch's op", "llmrl's mapping"])
def test_mkls_packed_copy_serves_every_row_count(bias, maker):
    """MKL's packed B does not depend on the row count given when packing, so each product passes
    its input's own count (torch's op hands the packed copy only to inputs of the count it is
    told). The weight is zeroed after packing: a product that fell back to it would give the bias
    alone. Both makers: llmrl's own (llmrl/rollout/packed_copies.py) and torch's, its fallback."""
    if not torch.backends.mkl.is_available() or (maker == "llmrl's mapping" and not mkl_packing_ops_here()):
        pytest.skip("this torch has no MKL packed GEMM, or llmrl's kernels do not build here")
    torch.manual_seed(3)
    weight, b = torch.randn(48, 40), (torch.randn(48) if bias else None)
    want_weight = weight.double().clone()
    if maker == "torch's op":
        product = packed_linears._mkl_packed_product(weight, b, rows_hint=32)
    else:
        product = MklPackedCopy(rows_hint=32).product(weight, b)
    assert product is not None
    weight.zero_()
    for rows in (1, 5, 31, 32, 33, 100):
        x = torch.randn(rows, 40)
        want = x.double() @ want_weight.T + (b.double() if bias else 0)
        torch.testing.assert_close(product(x).double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("form", ["onednn", "mkl", "panels", "bf16-onednn", "bf16-panels"])
def test_the_engine_samples_the_same_tokens_packed_and_plain(tiny_path, tokenizer, monkeypatch, form):
    """Packed for oneDNN, in MKL's form (fp32 where MKL runs its Intel kernels) or as panels (fp32
    on an AVX2 CPU without AVX-512, bf16 with AVX512-BF16)."""
    dtype = "bfloat16" if form.startswith("bf16") else "float32"
    if form == "mkl" and not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL")
    if form == "panels" and not panel_ops_here():
        pytest.skip("llmrl's kernels have no panel product here")
    if form == "bf16-panels" and not bf16_panel_ops_here():
        pytest.skip("llmrl's kernels have no bf16 panel product here (no AVX512-BF16)")
    if form == "bf16-onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16 matmuls for oneDNN")
    monkeypatch.setattr(packed_linears, "mkl_takes_intel_kernels", lambda: form == "mkl")
    monkeypatch.setattr(packed_linears, "panels_pay", lambda: form == "panels")
    monkeypatch.setattr(packed_linears, "bf16_panels_pay", lambda: form == "bf16-panels")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)["input_ids"]
               for t in ("What is 2 + 3?", "Name a colour.")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    outs = {}
    for packed in (False, True):
        engine = HFRolloutEngine(RolloutConfig(dtype=dtype, packed_linears=packed), ModelConfig(name=tiny_path), tokenizer)
        assert isinstance(engine.model.model.layers[0].self_attn.q_proj, GroupedLinear) == packed
        outs[packed] = engine.generate(prompts * 3, sampling)
        if packed:  # the form asked for is the one that multiplied
            group = engine.model.model.layers[0].self_attn.q_proj.group
            for name, copy in (("mkl", group._mkl_copy), ("panels", group._panel_copy), ("bf16-panels", group._bf16_panel_copy)):
                assert (copy.buffer is not None) == (name == form), name
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "threads, dtype, vendor, packs",
    [
        (2, torch.bfloat16, "GenuineIntel", True),
        (8, torch.bfloat16, "AuthenticAMD", False),
        (2, torch.float32, "GenuineIntel", False),
        (2, torch.float32, "AuthenticAMD", True),
        (8, torch.float32, "AuthenticAMD", False),
        (2, torch.float32, "", False),
    ],
)
def test_auto_packs_bf16_and_amd_fp32_on_a_few_threads_only(monkeypatch, tiny_path, tokenizer, threads, dtype, vendor, packs):
    if packs and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16 matmuls for oneDNN")
    if packs and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(packed_linears, "cpu_field", lambda name: vendor if name == "vendor_id" else "")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
        engine = HFRolloutEngine(RolloutConfig(dtype=name), ModelConfig(name=tiny_path), tokenizer)
    finally:
        torch.set_num_threads(before)
    assert RolloutConfig().packed_linears == "auto"
    gate = engine.model.model.layers[0].mlp.gate_proj
    # grouped either way (the fused decode step multiplies groups); packed only where it pays
    assert isinstance(gate, GroupedLinear) and gate.group.pack == packs


def test_cpu_field_reads_proc_cpuinfo_and_is_empty_for_a_missing_field():
    assert cpu_field("no such field") == ""
    if Path("/proc/cpuinfo").exists() and "vendor_id" in Path("/proc/cpuinfo").read_text():
        assert cpu_field("vendor_id") in Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (True, True), (False, False)])
def test_packed_linears_takes_auto_true_or_false(value, parsed):
    assert RolloutConfig(packed_linears=value).packed_linears == parsed
    with pytest.raises(ValueError, match="packed_linears"):
        RolloutConfig(packed_linears="sometimes")

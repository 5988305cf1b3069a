"""Attention with its scores materialised: equal to SDPA in fp64 (forward and backward, boolean,
additive and per-head masks), as close to exact as the fused kernel in bf16, zero for a query
that sees no key, dtype-correct under autocast, and the fused kernel above its size bound and
outside the trainer's block."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llmrl.materialized_attention as materialized
from llmrl.grouped_attention import grouped_attention
from llmrl.materialized_attention import materialized_attention, materialized_scores


def inputs(dtype=torch.float64, batch=3, heads=2, queries=7, keys=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, 16, generator=g, dtype=torch.float64) for n in (queries, keys, keys))
    # causal over a left-padded row: query i sees keys up to keys - queries + i, after the pad
    attend = torch.ones(batch, 1, queries, keys, dtype=torch.bool).tril(keys - queries)
    for row, pad in enumerate((0, 2, 4)[:batch]):
        attend[row, ..., :pad] = False
    return [t.to(dtype) for t in (q, k, 2 * v)], attend


def forward_backward(fn, tensors, mask, weights):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, mask, 0.3)
    (out.double() * weights).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def sdpa(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def test_equals_sdpa_in_fp64_forward_and_backward():
    (q, k, v), attend = inputs()
    per_head = attend.expand(3, 2, 7, 12).clone()
    per_head[:, 1, :, -2] = False
    additive = torch.zeros(attend.shape, dtype=torch.float64).masked_fill(~attend, -1e9)
    weights = torch.linspace(-1, 1, q.numel(), dtype=torch.float64).view(q.shape)
    for mask in (attend, additive, per_head, None):
        got = forward_backward(materialized_attention, (q, k, v), mask, weights)
        want = forward_backward(sdpa, (q, k, v), mask, weights)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_bf16_is_as_close_to_exact_as_the_fused_kernel():
    (q, k, v), attend = inputs(queries=40, keys=60, seed=1)
    k = 3 * k  # scores of a few units, where rounding them would show
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = forward_backward(sdpa, (q, k, v), attend, weights)
    low = [t.to(torch.bfloat16) for t in (q, k, v)]
    ours = forward_backward(materialized_attention, low, attend, weights)
    fused = forward_backward(sdpa, low, attend, weights)
    for name, a, b, x in zip(("out", "dq", "dk", "dv"), ours, fused, exact):
        ours_error = ((a - x).abs().mean() / x.abs().mean()).item()
        fused_error = ((b - x).abs().mean() / x.abs().mean()).item()
        assert ours_error <= 1.25 * fused_error, (name, ours_error, fused_error)
        assert a.dtype == torch.float64 and ours_error < 2e-2


def test_a_query_that_sees_no_key_gets_zero_output_and_gradients():
    (q, k, v), attend = inputs()
    attend[1, :, 0] = False  # row 1's first query sees nothing
    out, dq, dk, dv = forward_backward(materialized_attention, (q, k, v), attend, torch.ones(q.shape, dtype=torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert out[1, :, 0].abs().max() == 0 and dq[1, :, 0].abs().max() == 0
    torch.testing.assert_close(out[1, :, 1:], sdpa(q, k, v, attend, 0.3)[1, :, 1:], atol=1e-12, rtol=1e-10)


def test_autocast_inputs_of_mixed_dtypes_compute_in_bf16_with_matching_gradients():
    (q, k, v), attend = inputs(torch.float32)
    q, k = q.requires_grad_(), k.requires_grad_()
    v = v.to(torch.bfloat16).requires_grad_()  # RoPE leaves q and k in fp32, v stays in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = materialized_attention(q, k, v, attend, 0.3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    want = sdpa(*(t.detach().to(torch.bfloat16) for t in (q, k, v)), attend, 0.3)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


class _KernelCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.fused += "flash_attention" in func.__name__
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "queries,bound,switched_on,fused", [(4, 1 << 25, True, False), (4, 10, True, True), (1, 1 << 25, True, True), (4, 1 << 25, False, True)]
)
def test_grouped_attention_materialises_several_queries_within_the_bound(monkeypatch, queries, bound, switched_on, fused):
    # 9 query heads over 3 KV heads, as SmolLM2. Decode (one query) keeps the fused kernel, and so
    # does every call outside the trainer's block (the rollout engine's prefill).
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 9, queries, 16, generator=g)
    key, value = torch.randn(2, 3, 6, 16, generator=g), torch.randn(2, 3, 6, 16, generator=g)
    mask = torch.ones(2, 1, queries, 6, dtype=torch.bool).tril(6 - queries)
    monkeypatch.setattr(materialized, "MAX_SCORE_ELEMENTS", bound)
    with _KernelCalls() as calls, (materialized_scores() if switched_on else contextlib.nullcontext()):
        out = grouped_attention(query, key, value, mask, 0.25)
    assert (calls.fused > 0) == fused
    want = sdpa(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), mask, 0.25).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


def kernel_probabilities(q, k, v, mask, scale, row_period=0):
    probs, _, spans = torch.ops.llmrl_kernels.attention_tiles_forward(q, k, v, materialized._expanded(q, k, mask), scale, row_period)
    return probs, spans


@pytest.mark.parametrize("dtype, out_tol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)])
def test_the_fused_softmax_and_its_gradient_match_torchs_ops(monkeypatch, dtype, out_tol):
    """llmrl's kernels (MKL's products, the masked softmax and its gradient, a tile of query rows
    at a time) against the module's path through torch's ops (fp32 copies of bf16 inputs, batched
    products, a masked fill and torch's softmax): the same arithmetic up to the order of sums, on
    transposed-head views of the kind the packed pass hands over, with a per-row mask, a row that
    sees nothing, and no mask."""
    if not materialized._softmax_products(dtype):
        pytest.skip(f"llmrl's kernels make no {dtype} products here (bf16 needs a CPU with native bf16)")
    g = torch.Generator().manual_seed(3)
    q = (3 * torch.randn(2, 37, 3, 64, generator=g)).to(dtype).transpose(1, 2)  # rows contiguous, heads strided
    k, v = (torch.randn(2, 3, 29, 64, generator=g).to(dtype) for _ in range(2))
    attend = torch.rand(2, 1, 37, 29, generator=g) < 0.7
    attend[1, 0, 5] = False  # a query that sees no key
    weights = torch.randn(2, 3, 37, 64, generator=g, dtype=torch.float64)
    for mask in (attend, None):
        assert materialized._fused_softmax(q, k, v, mask)
        fused = forward_backward(materialized_attention, (q, k, v), mask, weights)
        probs, _ = kernel_probabilities(q, k, v, mask, 0.3)
        monkeypatch.setattr(materialized, "_softmax_products", lambda dtype: False)
        assert not materialized._fused_softmax(q, k, v, mask)
        reference = forward_backward(materialized_attention, (q, k, v), mask, weights)
        want_probs = materialized._probabilities(q, k, mask, 0.3)
        monkeypatch.undo()
        torch.testing.assert_close(probs, want_probs, atol=2e-6, rtol=1e-5)  # fp32 probabilities
        for name, a, b in zip(("out", "dq", "dk", "dv"), fused, reference):
            # a last-bit difference in a sum moves a result by an ulp (bf16: 2^-8 relative)
            assert (a - b).abs().max() <= out_tol * b.abs().max(), name
    blind, _ = kernel_probabilities(q, k, v, attend, 0.3)
    assert (blind[1, :, 5] == 0).all() and torch.allclose(blind.sum(-1)[0], torch.ones(3, 37))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_kernels_tiles_skip_the_keys_no_row_sees_and_match_exact_attention(dtype, tol):
    """The packed pass's layout, two query heads per KV head stacked as runs of 200 rows: a row of a
    shared start (sees only its own 20 tokens, which sit after 40 prompt slots), rows that see the
    start, a prompt of 25 real tokens out of 40 slots and themselves causally, and a row whose
    queries see nothing. Each tile's keys stop at its last row's causal edge and start where its
    first key is; outputs and gradients match SDPA in fp64."""
    if not materialized._softmax_products(dtype):
        pytest.skip(f"llmrl's kernels make no {dtype} products here (bf16 needs a CPU with native bf16)")
    root, width, own, groups = 20, 40, 200, 2
    keys = root + width + own
    attend = torch.zeros(4, 1, own, keys, dtype=torch.bool)
    causal = torch.ones(own, own, dtype=torch.bool).tril()
    attend[0, 0, :, root + width :] = causal & (torch.arange(own) < root)[None]  # the shared start's row
    for row in (1, 2):
        attend[row, 0, :, :root] = True
        attend[row, 0, :, root : root + 25] = True
        attend[row, 0, :, root + width :] = causal
    grouped_mask = attend.repeat(1, 1, groups, 1)  # row g * own + q is query q of head g
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 3, groups * own, 32, generator=g, dtype=torch.float64)
    k, v = (torch.randn(4, 3, keys, 32, generator=g, dtype=torch.float64) for _ in range(2))
    weights = torch.randn(q.shape, generator=g, dtype=torch.float64)
    low = [t.to(dtype) for t in (q, k, v)]
    assert materialized._fused_softmax(*low, grouped_mask)

    got = forward_backward(lambda *a: materialized_attention(*a, row_period=own), low, grouped_mask, weights)
    exact = forward_backward(sdpa, [t.to(dtype).double() for t in (q, k, v)], grouped_mask, weights)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, exact):
        real = b.abs().max()
        assert (a - b).abs().max() <= tol * real, name
    assert got[0][3].abs().max() == 0 and got[1][3].abs().max() == 0  # the row that sees nothing

    _, spans = kernel_probabilities(*low, grouped_mask, 0.3, row_period=own)
    # each head's run of rows is split into near-equal tiles, the same for both heads
    per_run = spans.shape[1] // groups
    assert spans.shape[1] == groups * per_run and per_run >= 2
    starts = [t * own // per_run for t in range(per_run)] + [own]
    for head_run in range(groups):
        for t in range(per_run):
            last = starts[t + 1] - 1
            assert spans[1 * 3, head_run * per_run + t].tolist() == [0, root + width + last + 1]
            assert spans[0, head_run * per_run + t].tolist() == [root + width, root + width + min(last + 1, root)]
    assert (spans[3 * 3 : 4 * 3] == 0).all()


def test_the_fused_softmax_is_not_taken_for_mixed_dtypes_or_fp64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert not materialized._fused_softmax(q.double(), k.double(), v.double(), mask)
    assert not materialized._fused_softmax(q, k.bfloat16(), v, mask)
    assert not materialized._fused_softmax(q, k, v, torch.zeros(1, 1, 5, 5))  # an additive mask

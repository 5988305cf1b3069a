"""The hf engine's decode attention: the grouped single-query product equals SDPA over repeated
KV heads, with boolean and additive masks, and the engine decodes the same tokens with it."""
import pytest
import torch

from llmrl.models import ModelConfig
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.decode_attention import grouped_decode_attention
from llmrl.rollout.hf import HFRolloutEngine


def reference(query, key, value, mask, scaling):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(4, 9, 1, 64, generator=g).to(dtype)
    key = torch.randn(4, 3, 11, 64, generator=g).to(dtype)
    value = torch.randn(4, 3, 11, 64, generator=g).to(dtype)
    # left padding of 0, 3, 10 and 5 slots: row 2 attends to its last slot only
    attend = torch.ones(4, 1, 1, 11, dtype=torch.bool)
    for row, pad in enumerate((0, 3, 10, 5)):
        attend[row, ..., :pad] = False
    return query, key, value, attend


# bf16: the same kernel on the same bf16 inputs (scores and softmax in fp32 inside it), so only
# the last bit of an output may differ; against exact arithmetic both are off by ~5e-3.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_grouped_product_equals_sdpa_over_repeated_heads(dtype, tol):
    query, key, value, attend = inputs(dtype)
    additive = torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, torch.finfo(dtype).min)
    want = reference(query, key, value, attend, 0.125).float()
    for mask in (attend, additive):
        got = grouped_decode_attention(query, key, value, mask, 0.125)
        assert got.shape == (4, 1, 9, 64) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # the row that sees one slot returns that slot's value, for each of the group's query heads
    torch.testing.assert_close(got[2, 0].float(), value[2, :, -1].float().repeat_interleave(3, dim=0), atol=tol, rtol=0)


def test_no_mask_attends_everywhere():
    query, key, value, _ = inputs(torch.float32, seed=1)
    torch.testing.assert_close(grouped_decode_attention(query, key, value, None, 0.1), reference(query, key, value, None, 0.1))


def test_engine_decodes_the_same_tokens_as_with_sdpa(tiny_path, tokenizer):
    engine = HFRolloutEngine(RolloutConfig(dtype="float32", max_batch_size=8), ModelConfig(name=tiny_path), tokenizer)
    assert engine.model.config._attn_implementation == "llmrl_decode"
    prompts = [tokenizer.encode(text) for text in ("What is 2 + 3?", "Name a colour.", "Count: 1, 2,")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    grouped = engine.generate(prompts * 2, sampling)
    engine.model.set_attn_implementation("sdpa")
    plain = engine.generate(prompts * 2, sampling)
    for a, b in zip(grouped, plain):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)

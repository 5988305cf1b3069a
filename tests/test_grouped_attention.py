"""llmrl_grouped attention: query heads grouped onto their KV head equal SDPA over repeated KV
heads, for one query (decode) and several (prefill, training), with boolean, additive and
per-head masks, in the forward and the backward; the hf engine decodes and the trainer computes
logprobs and gradients the same with it as with transformers' SDPA."""
import pytest
import torch
from test_train_engine import grouped_batch  # two prompts of 3 samples, ragged rows

from llmrl.grouped_attention import grouped_attention, grouped_attention_forward
from llmrl.models import GROUPED_ATTENTION, ModelConfig, load_policy
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.hf import HFRolloutEngine
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TorchTrainEngine


def reference(query, key, value, mask, scaling, is_causal=False):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, is_causal=is_causal)
    return out.transpose(1, 2)


def inputs(dtype, queries=1, seed=0, pads=(0, 3, 10, 5)):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(4, 9, queries, 64, generator=g).to(dtype)
    key = torch.randn(4, 3, 11, 64, generator=g).to(dtype)
    value = torch.randn(4, 3, 11, 64, generator=g).to(dtype)
    # left padding of 0, 3, 10 and 5 slots; the queries are the last `queries` slots, causal
    attend = torch.ones(4, 1, queries, 11, dtype=torch.bool).tril(11 - queries)
    for row, pad in enumerate(pads):
        attend[row, ..., :pad] = False
    return query, key, value, attend


def additive(attend, dtype):
    return torch.zeros(attend.shape, dtype=dtype).masked_fill(~attend, torch.finfo(dtype).min)


# bf16: the same kernel on the same bf16 inputs (scores and softmax in fp32 inside it), so only
# the last bit of an output may differ; against exact arithmetic both are off by ~5e-3.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_one_query_equals_sdpa_over_repeated_heads(dtype, tol):
    query, key, value, attend = inputs(dtype)
    want = reference(query, key, value, attend, 0.125).float()
    for mask in (attend, additive(attend, dtype)):
        got = grouped_attention(query, key, value, mask, 0.125)
        assert got.shape == (4, 1, 9, 64) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    # the row that sees one slot returns that slot's value, for each of the group's query heads
    torch.testing.assert_close(got[2, 0].float(), value[2, :, -1].float().repeat_interleave(3, dim=0), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_several_queries_equal_sdpa_forward_and_backward(dtype, tol):
    # Every query sees a slot: a query with none (a padding position) gets 0 from a boolean mask
    # but an arbitrary average from an additive one, in either layout; the model discards it.
    query, key, value, attend = inputs(dtype, queries=5, seed=1, pads=(0, 3, 6, 5))
    per_head = attend.expand(4, 9, 5, 11).clone()
    per_head[:, 4, :, -1] = False  # one query head may not see the newest slot: the mask differs per head
    cases = [(attend, attend), (additive(attend, dtype), attend), (per_head, per_head)]
    for mask, reference_mask in cases:
        results = []
        for fn, m in ((grouped_attention, mask), (reference, reference_mask)):
            q, k, v = (t.detach().clone().requires_grad_() for t in (query, key, value))
            out = fn(q, k, v, m, 0.125)
            (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
            results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_one_mask_row_for_every_query_broadcasts():
    query, key, value, _ = inputs(torch.float32, queries=3, seed=2)
    row = torch.ones(4, 1, 1, 11, dtype=torch.bool)
    row[1, ..., :6] = False
    torch.testing.assert_close(grouped_attention(query, key, value, row, 0.1), reference(query, key, value, row, 0.1))
    torch.testing.assert_close(grouped_attention(query, key, value, None, 0.1), reference(query, key, value, None, 0.1))


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_several_queries_without_a_mask_stay_causal():
    query, key, value, _ = inputs(torch.float32, queries=11, seed=3)
    out, _ = grouped_attention_forward(_Module(), query, key, value, None, scaling=0.125)
    torch.testing.assert_close(out, reference(query, key, value, None, 0.125, is_causal=True))


def test_engine_decodes_the_same_tokens_as_with_sdpa(tiny_path, tokenizer):
    engine = HFRolloutEngine(RolloutConfig(dtype="float32", max_batch_size=8), ModelConfig(name=tiny_path), tokenizer)
    assert engine.model.config._attn_implementation == GROUPED_ATTENTION
    prompts = [tokenizer.encode(text) for text in ("What is 2 + 3?", "Name a colour.", "Count: 1, 2,")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    grouped = engine.generate(prompts * 2, sampling)
    engine.model.set_attn_implementation("sdpa")
    plain = engine.generate(prompts * 2, sampling)
    for a, b in zip(grouped, plain):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def _trainer_outputs(tiny_path, implementation, dtype, shared_prompt):
    batch = grouped_batch(seed=4)
    torch.manual_seed(0)
    model = load_policy(ModelConfig(name=tiny_path, attn_implementation=implementation))
    assert model.config._attn_implementation == implementation
    cfg = TrainConfig(precision="fp32", micro_batch_size=6, shared_prompt_forward=shared_prompt)
    engine = TorchTrainEngine(model, cfg, total_updates=1)
    model.to(dtype)  # after the engine's fp32 master-weight check: fp64 is the exactness reference
    out = engine._outputs(model, batch, {"logprobs"})
    (-(out["logprobs"] * batch["loss_mask"]).sum()).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out["logprobs"].detach().double(), grads


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_trainer_logprobs_and_gradients_equal_sdpa(tiny_path, shared_prompt):
    # fp64: the same function, so equal to rounding. fp32: the kernels round differently (the
    # grouped path materialises the scores), so each is compared with the fp64 result and the
    # grouped one may not be further from it than SDPA is.
    exact, exact_grads = _trainer_outputs(tiny_path, "sdpa", torch.float64, shared_prompt)
    got, got_grads = _trainer_outputs(tiny_path, GROUPED_ATTENTION, torch.float64, shared_prompt)
    torch.testing.assert_close(got, exact, atol=1e-10, rtol=1e-10)
    assert got_grads.keys() == exact_grads.keys() and got_grads
    for name, grad in exact_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-10, rtol=1e-8)
    ours, ours_grads = _trainer_outputs(tiny_path, GROUPED_ATTENTION, torch.float32, shared_prompt)
    sdpa, sdpa_grads = _trainer_outputs(tiny_path, "sdpa", torch.float32, shared_prompt)
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=1e-5)
    for name, grad in exact_grads.items():
        ours_error = (ours_grads[name] - grad).abs().max()
        sdpa_error = (sdpa_grads[name] - grad).abs().max()
        assert ours_error <= 2 * sdpa_error + 1e-6 * grad.abs().max(), (name, ours_error, sdpa_error)

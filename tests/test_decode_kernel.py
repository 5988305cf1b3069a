"""llmrl's CPU decode-attention kernel (llmrl/kernels/shared_prefix_decode.cpp) against attention
over each row's concatenated prompt and own keys, computed in fp64; and its build, fallback and
use by the hf engine."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmrl import kernels
from llmrl.models import ModelConfig
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.hf import HFRolloutEngine
from llmrl.rollout.shared_prefix_cache import KERNEL

pytestmark = pytest.mark.skipif(not kernels.load(KERNEL), reason=f"the kernel does not build here: {kernels.failure(KERNEL)}")


def reference(query, prefix_keys, prefix_values, valid, row_prompt, suffix_keys, suffix_values, scale):
    """fp64 softmax attention of row b's queries [Hkv, G, D] over its prompt's unmasked keys, then its own."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    for b in range(query.shape[0]):
        p = int(row_prompt[b])
        seen = valid[p] if valid is not None else torch.ones(prefix_keys.shape[2], dtype=torch.bool)
        keys = torch.cat([prefix_keys[p][:, seen], suffix_keys[b]], dim=1).double()
        values = torch.cat([prefix_values[p][:, seen], suffix_values[b]], dim=1).double()
        if keys.shape[1] == 0:
            continue  # no key at all: zeros, as torch's attention gives
        scores = query[b].double() @ keys.transpose(-1, -2) * scale
        out[b] = torch.softmax(scores, dim=-1) @ values
    return out


def case(dtype, dim, prompts=3, rows=7, kv_heads=2, groups=3, width=9, length=5, seed=0):
    """Inputs laid out as the engine hands them over: the prefill's keys as a transposed view, the
    own keys as the filled part of a longer buffer, rows in no particular order, uneven groups."""
    g = torch.Generator().manual_seed(seed)
    prefix_keys = torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    prefix_values = torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    valid = torch.ones(prompts, width, dtype=torch.bool)
    for p in range(prompts):
        valid[p, : 2 * p] = False  # left padding of 0, 2, 4 slots
    suffix_keys = torch.randn(rows, kv_heads, length + 4, dim, generator=g).to(dtype)[:, :, :length]
    suffix_values = torch.randn(rows, kv_heads, length + 4, dim, generator=g).to(dtype)[:, :, :length]
    query = (3 * torch.randn(rows, kv_heads, groups, dim, generator=g)).to(dtype)  # peaked softmaxes too
    row_prompt = torch.tensor([2, 0, 1, 0, 2, 2, 1][:rows]) % prompts
    return query, prefix_keys, prefix_values, valid, row_prompt, suffix_keys, suffix_values, dim**-0.5


def run(*args):
    return torch.ops.llmrl_kernels.shared_prefix_decode(*args)


# Sizes that fill whole vectors (8 lanes on AVX2, 16 on AVX-512) take the vector path: all but
# 20 on both. 20, and every size on other CPUs, takes the portable one.
@pytest.mark.parametrize("dim", [64, 32, 48, 16, 20])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
def test_kernel_equals_attention_over_the_concatenated_keys(dim, dtype, atol):
    args = case(dtype, dim)
    got = run(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    want = reference(*args)
    # bf16: the output is rounded once, so it is within one bf16 step (2^-7 near 1) of fp64's
    assert (got.double() - want).abs().max().item() <= atol


@pytest.mark.parametrize("length", [0, 1, 40])
def test_own_keys_none_one_or_many(length):
    args = case(torch.float32, 64, length=length)
    assert (run(*args).double() - reference(*args)).abs().max().item() <= 2e-6


def test_no_padding_needs_no_mask_and_matches_an_all_true_one():
    query, pk, pv, _, row_prompt, sk, sv, scale = case(torch.float32, 64)
    everything = torch.ones(pk.shape[0], pk.shape[2], dtype=torch.bool)
    assert torch.equal(run(query, pk, pv, None, row_prompt, sk, sv, scale), run(query, pk, pv, everything, row_prompt, sk, sv, scale))


def test_a_row_that_sees_no_key_gets_zeros_and_others_are_unaffected():
    query, pk, pv, valid, row_prompt, sk, sv, scale = case(torch.float32, 64, length=0)
    valid[1] = False  # prompt 1 all padding, and no own keys: rows 2 and 6 see nothing
    got = run(query, pk, pv, valid, row_prompt, sk, sv, scale)
    assert torch.equal(got[2], torch.zeros_like(got[2])) and torch.equal(got[6], torch.zeros_like(got[6]))
    assert not torch.isnan(got).any()
    assert (got.double() - reference(query, pk, pv, valid, row_prompt, sk, sv, scale)).abs().max().item() <= 2e-6


def test_a_single_row_and_a_single_key():
    query, pk, pv, valid, row_prompt, sk, sv, scale = case(torch.float32, 64, prompts=1, rows=1, width=1, length=0)
    valid[:] = True
    got = run(query, pk, pv, valid, row_prompt, sk, sv, scale)
    # one key: its softmax weight is 1, so every query's output is that key's value
    torch.testing.assert_close(got[0], pv[0].expand(-1, query.shape[2], -1), atol=0, rtol=0)


def test_equal_scores_weigh_keys_equally():
    query, pk, pv, valid, row_prompt, sk, sv, scale = case(torch.float32, 64)
    query = torch.zeros_like(query)
    got = run(query, pk, pv, valid, row_prompt, sk, sv, scale)
    p = int(row_prompt[0])
    mean = torch.cat([pv[p][:, valid[p]], sv[0]], dim=1).mean(dim=1)  # [Hkv, D]
    torch.testing.assert_close(got[0], mean[:, None, :].expand_as(got[0]), atol=1e-6, rtol=1e-6)


def test_bad_inputs_are_refused_with_the_name_of_what_is_wrong():
    query, pk, pv, valid, row_prompt, sk, sv, scale = case(torch.float32, 64)
    with pytest.raises(RuntimeError, match="keys and values must have the query's dtype"):
        run(query, pk.double(), pv, valid, row_prompt, sk, sv, scale)
    with pytest.raises(RuntimeError, match="row_prompt"):
        run(query, pk, pv, valid, row_prompt.int(), sk, sv, scale)
    with pytest.raises(RuntimeError, match="prefix_valid"):
        run(query, pk, pv, valid[:, :-1], row_prompt, sk, sv, scale)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        run(*(t.double() for t in (query, pk, pv)), valid, row_prompt, sk.double(), sv.double(), scale)


def prompts_of(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)["input_ids"]
            for t in ("What is 2 + 3?", "Name a colour.", "Count to four, please.")]


def test_the_engine_samples_the_same_with_and_without_the_kernel(tiny_path, tokenizer):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    prompts = [p for p in prompts_of(tokenizer) for _ in range(4)]  # groups of 4: the shared-prompt decode
    outs = {}
    for kernel in (False, True):
        engine = HFRolloutEngine(RolloutConfig(dtype="float32", decode_kernel=kernel), ModelConfig(name=tiny_path), tokenizer)
        assert engine.decode_kernel == kernel
        outs[kernel] = engine.generate(prompts, sampling)
    # Both are fp32 with sums in different orders, so neither is exact: each is held to a float64
    # scoring of the same tokens. Measured worst gaps to it: 4.6e-5 without the kernel and 4.1e-5
    # with it on an AVX2 host (where the kernel takes its portable path), under 1e-5 on an
    # AVX-512 one; a wrong attention or sampler is off by 1e-2 and more.
    reference = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float64).eval()
    for prompt, a, b in zip(prompts, outs[False], outs[True]):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        ids = torch.tensor([list(prompt) + list(a.token_ids)])
        with torch.no_grad():
            exact = torch.log_softmax(reference(ids).logits[0, len(prompt) - 1 : -1], dim=-1)
        exact = exact.gather(1, torch.tensor(a.token_ids)[:, None])[:, 0]
        for out in (a, b):
            torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float64), exact, atol=1e-4, rtol=0)


def test_without_a_compiler_auto_falls_back_and_true_refuses(tiny_path, tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_LOADED", {})  # forget this process's loaded library for the test
    monkeypatch.setattr(kernels, "_FAILURES", {})
    with caplog.at_level(logging.WARNING, logger="llmrl.kernels"):
        engine = HFRolloutEngine(RolloutConfig(dtype="float32"), ModelConfig(name=tiny_path), tokenizer)
    assert not engine.decode_kernel
    assert "falling back to torch's operators" in caplog.text and "no-such-compiler" in caplog.text
    out = engine.generate(prompts_of(tokenizer) * 2, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    assert all(len(c.token_ids) > 0 for c in out)
    assert not list((tmp_path / "cache").glob("*.so"))  # a failed build leaves no library behind
    with pytest.raises(RuntimeError, match="decode_kernel=true.*no-such-compiler"):
        HFRolloutEngine(RolloutConfig(dtype="float32", decode_kernel=True), ModelConfig(name=tiny_path), tokenizer)


def test_the_library_is_cached_under_a_name_that_changes_with_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    first = kernels._library_path(KERNEL)
    assert first.parent == tmp_path and first.name.startswith(KERNEL)
    monkeypatch.setenv("CXX", "another-compiler")  # the compile command is part of the name
    assert kernels._library_path(KERNEL) != first


def test_an_edit_to_a_source_another_one_includes_changes_the_name(tmp_path, monkeypatch):
    """elementwise_ops.cpp compiles decode_ops.cpp by #include: its edits must rebuild too."""
    import shutil

    sources = tmp_path / "sources"
    shutil.copytree(kernels.SOURCES, sources, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.setattr(kernels, "SOURCES", sources)
    assert "decode_ops.cpp" not in kernels.LIBRARIES[KERNEL] and '#include "decode_ops.cpp"' in (sources / "elementwise_ops.cpp").read_text()
    first = kernels._library_path(KERNEL)
    (sources / "decode_ops.cpp").write_text((sources / "decode_ops.cpp").read_text() + "\n// an edit\n")
    assert kernels._library_path(KERNEL) != first


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (True, True), (False, False)])
def test_decode_kernel_takes_auto_true_or_false(value, parsed):
    assert RolloutConfig(decode_kernel=value).decode_kernel == parsed
    with pytest.raises(ValueError, match="decode_kernel"):
        RolloutConfig(decode_kernel="sometimes")


def test_a_cache_of_a_dtype_the_kernel_lacks_decodes_with_torch(tiny_path):
    """fp64 is not a kernel dtype: the cache decides at `share` and keeps torch's path whole."""
    from llmrl.models import load_causal_lm
    from llmrl.rollout.shared_prefix_cache import SharedPrefixCache

    model = load_causal_lm(ModelConfig(name=tiny_path), torch.float64).eval()
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    attention = torch.ones(2, 5, dtype=torch.long)
    attention[1, :2] = 0
    outs = []
    for kernel in (False, True):
        cache = SharedPrefixCache(room=4, kernel=kernel)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0), past_key_values=cache, use_cache=True)
            cache.share(torch.tensor([0, 0, 1]), attention)
            assert not cache.kernel
            with cache.decoding():
                outs.append(model(input_ids=ids[[0, 0, 1], -1:], position_ids=torch.tensor([[5], [5], [3]]), past_key_values=cache, use_cache=True).logits)
    assert torch.equal(outs[0], outs[1])

"""Decode over one cache copy per prompt (the hf engine's shared-prefix decode) computes what
decode over a cache copied to every row computes: the split of attention into prompt and
generated tokens, merged by log-sum-exp, is exact in fp64 and within rounding in fp32 and bf16."""
import pytest
import torch

from llmrl import kernels
from llmrl.models import ModelConfig, load_causal_lm
from llmrl.rollout.kv_cache import PreallocatedCache
from llmrl.rollout.shared_prefix_cache import KERNEL, SharedPrefixCache


def decode(model, cache, row_prompt, drops, steps=6):
    """Prefill 3 left-padded prompts of different lengths, hand them to the rows `row_prompt`
    names, and decode `steps` tokens; before step s the rows `drops[s]` (positions among the live
    rows) leave. Returns the logits of every step."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=g)
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[1, :3] = 0
    attention[2, :1] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    first = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
    expand = torch.tensor(row_prompt)
    cache.share(expand, attention)
    out = [first[expand]]
    attention, next_pos = attention[expand], positions[expand, -1] + 1
    token = torch.randint(3, model.config.vocab_size, (len(row_prompt), 1), generator=g)
    shared = isinstance(cache, SharedPrefixCache)
    for step in range(steps):
        if step in drops:
            keep = torch.tensor([j for j in range(len(token)) if j not in drops[step]])
            cache.batch_select_indices(keep)
            attention, next_pos, token = attention[keep], next_pos[keep], token[keep]
        attention = torch.cat([attention, torch.ones(len(token), 1, dtype=torch.long)], dim=1)
        with cache.decoding():
            logits = model(
                input_ids=token, attention_mask=None if shared else attention, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
        out.append(logits)
        token = logits.argmax(-1, keepdim=True)
        next_pos = next_pos + 1
    return out


LAYOUTS = {
    # rows grouped by prompt, as many per prompt: the prefix call needs no scatter
    "in order": ([0, 0, 1, 1, 2, 2], {}),
    # interleaved rows and unequal counts; later prompt 1 loses all its rows and is dropped
    "mixed": ([2, 0, 1, 0, 2, 2, 1], {2: [2], 4: [1]}),
    # rows leave until a single prompt with one row is left
    "draining": ([0, 1, 2, 0, 1, 2], {1: [0, 1], 3: [0, 2], 5: [1]}),
    # the last row leaves: the rows left are still numbered like their slots, but a slot is empty
    "last row leaves": ([0, 0, 1, 1, 2, 2], {2: [5]}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,tol,kernel", [(torch.float64, 1e-10, False), (torch.float32, 2e-5, False), (torch.float32, 2e-5, True)])
def test_shared_prefix_decode_equals_decode_over_copied_rows(tiny_path, layout, dtype, tol, kernel):
    model = load_causal_lm(ModelConfig(name=tiny_path), dtype).eval()
    assert model.config._attn_implementation == "llmrl_grouped"
    row_prompt, drops = LAYOUTS[layout]
    with torch.no_grad():
        want = decode(model, PreallocatedCache(room=4), row_prompt, drops)
        shared = SharedPrefixCache(room=4, kernel=kernel)  # room 4 < 6 steps: the suffix grows
        assert shared.kernel == kernel or not kernels.load(KERNEL)
        got = decode(model, shared, row_prompt, drops)
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max()
        assert ((a - b).abs().max() / scale).item() <= tol, f"step {step}"


@pytest.mark.parametrize("kernel", [False, True])
def test_bf16_shared_prefix_decode_stays_within_bf16_rounding(tiny_path, kernel):
    """torch's path rounds the two partial outputs to bf16 before the fp32 merge: one extra
    rounding. The kernel rounds once, after one softmax over both parts."""
    model = load_causal_lm(ModelConfig(name=tiny_path), torch.bfloat16).eval()
    exact = load_causal_lm(ModelConfig(name=tiny_path), torch.float64).eval()
    row_prompt, drops = LAYOUTS["mixed"]
    with torch.no_grad():
        reference = decode(exact, PreallocatedCache(room=8), row_prompt, drops)
        copied = decode(model, PreallocatedCache(room=8), row_prompt, drops)
        shared = decode(model, SharedPrefixCache(room=8, kernel=kernel), row_prompt, drops)
    for step in range(1, len(reference)):  # the decode steps; step 0 is the common prefill
        # greedy tokens can part ways between the bf16 runs; compare only while both follow fp64's
        if not torch.equal(copied[step].argmax(-1), reference[step].argmax(-1)):
            break
        err_copied = (copied[step].double() - reference[step]).abs().mean()
        err_shared = (shared[step].double() - reference[step]).abs().mean()
        assert err_shared <= 1.5 * err_copied + 1e-3, f"step {step}: {err_shared} against {err_copied}"


def test_shared_prefix_cache_refuses_a_decode_outside_its_block(tiny_path):
    model = load_causal_lm(ModelConfig(name=tiny_path), torch.float32).eval()
    cache = SharedPrefixCache(room=4)
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.share(torch.tensor([0, 0]), torch.ones(1, 5, dtype=torch.long))
        with pytest.raises(RuntimeError, match="decoding"):
            model(input_ids=ids[:, :1].repeat(2, 1), position_ids=torch.full((2, 1), 5), past_key_values=cache, use_cache=True)

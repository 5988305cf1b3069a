"""The decode step's one-call attention (`rotary_attend_` in llmrl/kernels/shared_prefix_decode.cpp,
`SharedPrefixCache.rotary_attend`): the same bits as the three calls it stands for (rotary_, the
cache write, shared_prefix_decode), the new keys and values in their slot and nowhere else, and
growth of the cache past its room."""
import pytest
import torch

from llmrl import kernels
from llmrl.rollout.shared_prefix_cache import KERNEL, SharedPrefixCache

pytestmark = pytest.mark.skipif(not kernels.load(KERNEL), reason=f"the kernel does not build here: {kernels.failure(KERNEL)}")


def ops():
    return torch.ops.llmrl_kernels


def step_inputs(dtype, dim, rows=7, heads=6, kv_heads=2, prompts=3, width=9, room=12, slot=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g)).to(dtype)
    angles = torch.rand(rows, dim // 2, generator=g) * 6.0
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    key_buffer = torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)
    value_buffer = torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)
    prefix_keys = torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    prefix_values = torch.randn(prompts, width, kv_heads, dim, generator=g).to(dtype).transpose(1, 2)
    valid = torch.ones(prompts, width, dtype=torch.bool)
    valid[1, :3] = False  # one prompt left-padded
    row_prompt = torch.tensor([2, 0, 1, 0, 2, 1, 1][:rows]) % prompts
    return dict(qkv=qkv, heads=heads, kv_heads=kv_heads, cos=cos, sin=sin, key_buffer=key_buffer, value_buffer=value_buffer,
                slot=slot, prefix_keys=prefix_keys, prefix_values=prefix_values, valid=valid, row_prompt=row_prompt, scale=dim**-0.5)


def call(a):
    return ops().rotary_attend_(a["qkv"], a["heads"], a["kv_heads"], a["cos"], a["sin"], a["key_buffer"], a["value_buffer"], a["slot"],
                                a["prefix_keys"], a["prefix_values"], a["valid"], a["row_prompt"], a["scale"])


def three_calls(a):
    """What the one call replaces: rotary_ on q and k, the slot write, attention over slots [0, slot]."""
    rows, heads, kv_heads, dim, slot = len(a["qkv"]), a["heads"], a["kv_heads"], a["cos"].shape[1], a["slot"]
    ops().rotary_(a["qkv"], heads + kv_heads, a["cos"], a["sin"])
    keys = a["qkv"][:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, dim)
    values = a["qkv"][:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    a["key_buffer"][:, :, slot] = keys
    a["value_buffer"][:, :, slot] = values
    query = a["qkv"][:, : heads * dim].view(rows, kv_heads, heads // kv_heads, dim)
    out = ops().shared_prefix_decode(query, a["prefix_keys"], a["prefix_values"], a["valid"], a["row_prompt"],
                                     a["key_buffer"][:, :, : slot + 1], a["value_buffer"][:, :, : slot + 1], a["scale"])
    return out.reshape(rows, heads * dim)


def cloned(a):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}


# 64 and 32 fill whole vectors (the kernel's vector path); 20 takes the portable one.
@pytest.mark.parametrize("dim", [64, 32, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot", [0, 5, 11])
def test_one_call_gives_the_bits_of_the_three_it_replaces(dtype, dim, slot):
    a = step_inputs(dtype, dim, slot=slot)
    b = cloned(a)
    got = call(a)
    want = three_calls(b)
    assert got.shape == (7, 6 * dim)
    assert torch.equal(got, want)
    assert torch.equal(a["qkv"], b["qkv"])  # q and k rotated in place alike, v untouched
    assert torch.equal(a["key_buffer"], b["key_buffer"]) and torch.equal(a["value_buffer"], b["value_buffer"])


def test_the_new_key_and_value_land_in_their_slot_only():
    a = step_inputs(torch.float32, 64, slot=4)
    before_keys, before_values = a["key_buffer"].clone(), a["value_buffer"].clone()
    rotated = a["qkv"].clone()
    ops().rotary_(rotated, a["heads"] + a["kv_heads"], a["cos"], a["sin"])
    call(a)
    others = [s for s in range(a["key_buffer"].shape[2]) if s != 4]
    assert torch.equal(a["key_buffer"][:, :, others], before_keys[:, :, others])
    assert torch.equal(a["value_buffer"][:, :, others], before_values[:, :, others])
    q_width, kv_width = 6 * 64, 2 * 64
    assert torch.equal(a["key_buffer"][:, :, 4].reshape(7, kv_width), rotated[:, q_width : q_width + kv_width])
    assert torch.equal(a["value_buffer"][:, :, 4].reshape(7, kv_width), rotated[:, q_width + kv_width :])
    # the value part is copied as it was: no rotation
    assert torch.equal(rotated[:, q_width + kv_width :], a["qkv"][:, q_width + kv_width :])


def test_a_quarter_turn_rotates_q_and_k_as_worked_by_hand():
    # dim 4, one head each of q, k and v; angle pi/2: (x0, x1, x2, x3) -> (-x2, -x3, x0, x1)
    qkv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]])
    cos, sin = torch.zeros(1, 4), torch.ones(1, 4)
    key_buffer, value_buffer = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    prefix = torch.zeros(1, 1, 0, 4)  # an empty prompt: the row attends its one token
    out = ops().rotary_attend_(qkv, 1, 1, cos, sin, key_buffer, value_buffer, 0, prefix, prefix, None, torch.tensor([0]), 0.5)
    assert qkv[0, :8].tolist() == [-3.0, -4.0, 1.0, 2.0, -7.0, -8.0, 5.0, 6.0]
    assert key_buffer[0, 0, 0].tolist() == [-7.0, -8.0, 5.0, 6.0]
    assert value_buffer[0, 0, 0].tolist() == [9.0, 10.0, 11.0, 12.0]
    assert out.tolist() == [[9.0, 10.0, 11.0, 12.0]]  # one key: all its weight on its value


def shared_cache(room, dtype, rows=4, prompts=2, kv_heads=2, width=5, dim=32):
    g = torch.Generator().manual_seed(1)
    cache = SharedPrefixCache(room=room, kernel=True)
    for layer in range(2):
        keys = torch.randn(prompts, kv_heads, width, dim, generator=g).to(dtype)
        cache.update(keys, torch.randn(keys.shape, generator=g).to(dtype), layer)
    attention = torch.ones(prompts, width, dtype=torch.long)
    attention[0, :2] = 0
    cache.share(torch.tensor([0, 1, 0, 1][:rows]), attention)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cache_grows_past_its_room_and_matches_update_then_attend(dtype):
    # room 2: the suffix buffers are made at the first step and doubled twice over 6 steps
    one, three = shared_cache(2, dtype), shared_cache(2, dtype)
    rows, heads, kv_heads, dim = 4, 6, 2, 32
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
        angles = torch.rand(rows, dim // 2, generator=g)
        cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
        for layer in range(2):
            got = one.rotary_attend(layer, qkv.clone(), heads, kv_heads, cos, sin, 0.125)
            q = qkv.clone()
            ops().rotary_(q, heads + kv_heads, cos, sin)
            keys = q[:, heads * dim : (heads + kv_heads) * dim].view(rows, kv_heads, 1, dim)
            values = q[:, (heads + kv_heads) * dim :].view(rows, kv_heads, 1, dim)
            all_keys, all_values = three.layers[layer].suffix.update(keys, values)
            want = three.attend(layer, q[:, : heads * dim].view(rows, heads, 1, dim), all_keys, all_values, 0.125)
            assert torch.equal(got, want.reshape(rows, heads * dim)), (step, layer)
            mine, theirs = one.layers[layer].suffix, three.layers[layer].suffix
            assert mine.length == theirs.length == step + 1
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert one.get_seq_length(0) == 5 + 6


def test_a_cache_without_the_kernel_refuses_the_one_call():
    cache = SharedPrefixCache(room=4, kernel=False)
    with pytest.raises(RuntimeError, match="does not use"):
        cache.rotary_attend(0, torch.zeros(1, 12), 1, 1, torch.zeros(1, 4), torch.zeros(1, 4), 1.0)


def test_bad_inputs_are_refused_with_the_name_of_what_is_wrong():
    a = step_inputs(torch.float32, 64)
    with pytest.raises(RuntimeError, match="slot 12 is outside the buffers' room of 12"):
        call({**a, "slot": 12})
    with pytest.raises(RuntimeError, match="qkv must be"):
        call({**a, "qkv": a["qkv"][:, :-64]})
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        call({**a, "heads": 5})
    with pytest.raises(RuntimeError, match="key_buffer must be"):
        call({**a, "key_buffer": a["key_buffer"].transpose(2, 3).contiguous().transpose(2, 3)})
    with pytest.raises(RuntimeError, match="qkv's dtype"):
        call({**a, "cos": a["cos"].double()})
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        call({k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in a.items()})

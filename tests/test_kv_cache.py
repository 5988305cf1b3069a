"""The hf engine's preallocated KV cache: a model decoding over it computes exactly what it
computes over transformers' DynamicCache, through room running out, rows leaving and rows
being copied (the engine's shared prefill)."""
import torch
from transformers import DynamicCache

from llmrl.models import ModelConfig, load_causal_lm
from llmrl.rollout.kv_cache import PreallocatedCache, PreallocatedLayer


def decode(model, cache, steps=7, drop_at=3):
    """Prefill 2 distinct left-padded prompts, copy them to 4 rows, decode `steps` tokens and
    drop rows 0 and 2 after step `drop_at`; the logits of every step, in order."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=g)
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, :2] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = [model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]]
    expand = torch.tensor([0, 0, 1, 1])
    cache.batch_select_indices(expand)
    attention, next_pos = attention[expand], positions[expand, -1] + 1
    token = torch.randint(3, model.config.vocab_size, (4, 1), generator=g)
    for step in range(steps):
        if step == drop_at:
            keep = torch.tensor([1, 3])
            cache.batch_select_indices(keep)
            attention, next_pos, token = attention[keep], next_pos[keep], token[keep]
        attention = torch.cat([attention, torch.ones(len(token), 1, dtype=torch.long)], dim=1)
        logits = model(input_ids=token, attention_mask=attention, position_ids=next_pos[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
        out.append(logits)
        token = logits.argmax(-1, keepdim=True)
        next_pos = next_pos + 1
    return out


def test_decoding_over_the_preallocated_cache_equals_dynamic_cache(tiny_path):
    model = load_causal_lm(ModelConfig(name=tiny_path), torch.float32).eval()
    with torch.no_grad():
        want = decode(model, DynamicCache())
        for room in (0, 2, 16):  # 0 and 2 run out of room and grow while decoding
            got = decode(model, PreallocatedCache(room=room))
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert torch.equal(a, b), f"room {room}: logits differ"


def test_layer_keeps_room_and_filled_slots_through_selection():
    layer = PreallocatedLayer(room=4)
    first = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, values = layer.update(first, -first)
    assert keys.shape == (2, 1, 3, 2) and torch.equal(keys, first) and torch.equal(values, -first)
    assert layer._key_buffer.shape[2] == 7  # 3 filled + 4 of room, allocated once
    step = torch.full((2, 1, 1, 2), 100.0)
    keys, _ = layer.update(step, step)
    assert layer.get_seq_length() == 4 and torch.equal(keys[:, :, 3], step[:, :, 0])
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert layer.keys.shape == (3, 1, 4, 2) and layer._key_buffer.shape[2] == 7
    assert torch.equal(layer.keys[0, :, :3], first[1]) and torch.equal(layer.keys[2, :, :3], first[0])
    for _ in range(4):  # 3 more fit; the 4th doubles the buffer
        keys, _ = layer.update(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))
    assert layer.get_seq_length() == 8 and layer._key_buffer.shape[2] == 14
    assert torch.equal(keys[1, :, :3], first[1]) and torch.equal(keys[:, :, 3], torch.full((3, 1, 2), 100.0))

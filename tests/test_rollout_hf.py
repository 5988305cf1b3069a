"""The hf rollout engine: logprob meaning, finish reasons, and span-based loss masks."""
import pytest
import torch

from llmrl.batch import collate
from llmrl.models import ModelConfig
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.hf import HFRolloutEngine, draw_uniform, filter_logits, sample_from
from llmrl.rollout.workflows import SingleTurn, WorkflowContext
from llmrl.types import GroupIds
from llmrl.types import Task


@pytest.fixture(scope="module")
def engine(tiny_path, tokenizer):
    return HFRolloutEngine(RolloutConfig(dtype="float32", max_batch_size=4), ModelConfig(name=tiny_path), tokenizer)


def prompt(tokenizer, text="What is 2 + 3?"):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sampled_logprobs_equal_teacher_forced_scores(engine, tokenizer, temperature):
    prompts = [prompt(tokenizer), prompt(tokenizer, "Name a colour.")] * 3  # 6 rows: two engine batches
    outs = engine.generate(prompts, SamplingParams(temperature=temperature, max_new_tokens=12, seed=3))
    assert all(len(o.token_ids) == len(o.logprobs) > 0 for o in outs)
    scored = engine.score(prompts, [o.token_ids for o in outs], temperature=temperature or 1.0)
    for o, s in zip(outs, scored):
        torch.testing.assert_close(torch.tensor(s), torch.tensor(o.logprobs), atol=2e-4, rtol=1e-4)


def test_shared_prefill_of_repeated_prompts_matches_separate_runs(engine, tokenizer):
    a, b = prompt(tokenizer), prompt(tokenizer, "Name a colour, then explain why.")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    together = engine.generate([a, a, b, b], greedy)  # one batch: two prefills, copied to four rows
    alone = engine.generate([a], greedy) + engine.generate([b], greedy)
    for got, want in zip(together, [alone[0], alone[0], alone[1], alone[1]]):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=1e-4)


def test_the_start_all_prompts_share_is_prefilled_once(engine, tokenizer):
    """Distinct prompts through the chat template share its header: the prefill runs it once,
    then each prompt's own tokens (left-padded to the longest) over a copy of its cache."""
    from llmrl.common_prefix import shared_start

    a, b = prompt(tokenizer), prompt(tokenizer, "Name a colour, then explain why.")
    root = shared_start([a, b])
    assert root > 10 and engine.decode_kernel  # the kernel's cache is the one that shares
    seen = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(tuple(hidden.shape[:2]))

    hook = engine.model.get_decoder().layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = engine.generate([a, b], SamplingParams(temperature=0.0, max_new_tokens=1))
    finally:
        hook.remove()
    assert seen == [(1, root), (2, max(len(a), len(b)) - root)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=1)
    assert [c.token_ids for c in together] == [engine.generate([p], greedy)[0].token_ids for p in (a, b)]


def test_the_lm_head_is_only_handed_contiguous_hidden_states(engine, tokenizer):
    """The prefill's last position reaches the lm_head as a copy: a strided [B, 1, H] view of the
    prompt's hidden states made torch's CPU bf16 matmul 75-450x slower (docs/benchmarks.md)."""
    seen = []
    hook = engine.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    try:
        engine.generate([prompt(tokenizer), prompt(tokenizer, "Name a colour.")], SamplingParams(temperature=0.0, max_new_tokens=3))
    finally:
        hook.remove()
    # the prefill, then the forwards for tokens 2 and 3 (none after); the fused decode step
    # multiplies its own packed copy of the head, so only the prefill's call reaches the module
    assert len(seen) == (1 if engine.fused_decode is not None else 3) and all(seen)


def test_seeded_sampling_is_reproducible(engine, tokenizer):
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    a = engine.generate([prompt(tokenizer)] * 2, sp)
    b = engine.generate([prompt(tokenizer)] * 2, sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_finish_reasons_length_eos_and_stop_string(engine, tokenizer):
    p = prompt(tokenizer)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    base = engine.generate([p], greedy)[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 6
    # Treat the greedy second token as EOS: generation must stop right there, EOS included.
    saved = engine.eos_ids
    engine.eos_ids = torch.tensor([base.token_ids[1]])
    try:
        stopped = engine.generate([p], greedy)[0]
        past_eos = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))[0]
    finally:
        engine.eos_ids = saved
    # ignore_eos decodes through the EOS: the full budget, the same greedy tokens.
    assert past_eos.finish_reason == "length" and past_eos.token_ids == base.token_ids
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[1]) + 1]
    text = tokenizer.decode(base.token_ids[:3])
    by_string = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=6, stop=[text[-2:]]))[0]
    assert by_string.finish_reason == "stop" and len(by_string.token_ids) <= 3


def test_cdf_sampling_takes_the_token_whose_step_holds_the_uniform():
    # Binary fractions make every CDF value exact: steps end at 0.125, 0.625 and 1.0.
    probs = torch.tensor([0.125, 0.0, 0.5, 0.375, 0.0])
    uniforms = torch.tensor([1e-9, 0.125, 0.125 + 1e-9, 0.625, 0.625 + 1e-9, 1.0], dtype=torch.float64)
    expected = [0, 0, 2, 2, 3, 3]
    assert sample_from(probs.expand(6, 5), uniforms).tolist() == expected
    # unnormalised rows scale their own total
    assert sample_from(3 * probs.expand(6, 5), uniforms).tolist() == expected


def test_cdf_sampling_matches_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.1, 0.0, 0.3, 0.05, 0.55, 0.0])
    draws = sample_from(probs.expand(200_000, 6), draw_uniform(200_000, torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=6).double() / 200_000
    assert freq[1] == 0 and freq[5] == 0
    # binomial sd of a frequency near 0.5 over 200k draws is 0.0011; 0.006 is over 5 sd
    assert torch.allclose(freq, probs.double(), atol=0.006)


def test_two_level_cdf_takes_the_same_token_as_one_running_sum_across_blocks():
    # Blocks of 2 split the steps above across blocks, with empty tokens at block edges.
    probs = torch.tensor([0.125, 0.0, 0.5, 0.375, 0.0])
    uniforms = torch.tensor([1e-9, 0.125, 0.125 + 1e-9, 0.625, 0.625 + 1e-9, 1.0], dtype=torch.float64)
    assert sample_from(probs.expand(6, 5), uniforms, block=2).tolist() == [0, 0, 2, 2, 3, 3]
    # Multiples of 2^-12 keep every partial sum exact, so both CDFs agree token for token.
    g = torch.Generator().manual_seed(0)
    weights = torch.randint(0, 4, (500, 37), generator=g).float() / 4096
    weights[:, 0] += 1 / 4096  # no row without mass
    uniform = draw_uniform(500, g)
    one_sum = torch.searchsorted(weights.double().cumsum(-1), (uniform * weights.double().sum(-1))[:, None]).squeeze(-1)
    for block in (1, 4, 16, 256):
        assert torch.equal(sample_from(weights, uniform, block=block), one_sum)


def test_two_level_cdf_never_lands_past_a_block_whose_running_sum_rounds_low():
    # 1 + 2^-53 + 2^-53 + ... summed one at a time stays 1.0; the vectorised block sum can pair
    # the small terms first and come out above it. u = 1 then targets past the block's running
    # sum, and the empty tail of the block must not be drawn.
    probs = torch.zeros(1, 16)
    probs[0, 0] = 1.0
    probs[0, 1:8] = 2.0**-53
    drawn = sample_from(probs, torch.ones(1, dtype=torch.float64), block=16)
    assert probs[0, drawn].item() > 0


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    probs = torch.softmax(logits, -1)[0]  # [0.644, 0.237, 0.087, 0.032]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]] and probs[0] < 0.8 <= probs[0] + probs[1]


def test_sampled_eos_is_in_the_loss_mask_although_pad_is_eos(engine, tokenizer):
    """SmolLM2 pads with its EOS id; masks come from spans, so a sampled EOS stays a policy token."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    task = Task(task_id="t", messages=[], prompt_ids=prompt(tokenizer))
    saved = engine.eos_ids
    seeded = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    first = engine.generate([task.prompt_ids], seeded)[0]
    fresh = [t for i, t in enumerate(first.token_ids) if i > 0 and t not in first.token_ids[:i]]
    engine.eos_ids = torch.tensor(fresh[:1])  # a token the greedy reply reaches after >= 1 other token
    try:
        group_ids = GroupIds()
        trajs = []
        for sampling in (seeded, SamplingParams(temperature=0.0, max_new_tokens=1)):
            context = WorkflowContext(engine, None, sampling, tokenizer, group_ids, step=1, n=1)
            trajs += SingleTurn().sample([task], context)[0].trajectories
    finally:
        engine.eos_ids = saved
    # Make the first row end in the real EOS id, as SmolLM2's would.
    trajs[0].token_ids[-1] = tokenizer.eos_token_id
    batch = collate(trajs, tokenizer.pad_token_id)
    p = len(task.prompt_ids)
    n0 = len(trajs[0].response_ids)
    assert trajs[0].finish_reason == "stop" and n0 >= 2
    assert batch["input_ids"][0, p + n0 - 1] == tokenizer.eos_token_id
    assert batch["loss_mask"][0].tolist() == [0.0] * p + [1.0] * n0  # the sampled EOS is trained on
    pad = n0 - 1
    assert batch["input_ids"][1, p + 1 :].tolist() == [tokenizer.pad_token_id] * pad  # padding, same id...
    assert batch["loss_mask"][1].tolist() == [0.0] * p + [1.0] + [0.0] * pad  # ...but not in the loss
    assert batch["rewards/outcome"].shape == batch["loss_mask"].shape
    assert [t.group_id for t in trajs] == [0, 1]


def test_load_weights_changes_outputs(engine, tokenizer, tiny_path):
    p = [prompt(tokenizer)]
    before = engine.score(p, [[5, 6, 7]])[0]
    state = {n: t.clone() for n, t in engine.model.state_dict().items()}
    engine.load_weights([(n, t * 1.5 if t.dim() == 2 else t) for n, t in state.items()])
    after = engine.score(p, [[5, 6, 7]])[0]
    engine.load_weights(state.items())
    restored = engine.score(p, [[5, 6, 7]])[0]
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3
    assert restored == pytest.approx(before, abs=1e-6)

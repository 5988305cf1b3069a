"""llmrl's fused decode step (llmrl/rollout/fused_decode.py) and its elementwise kernels
(llmrl/kernels/decode_ops.cpp): each op against transformers' Llama modules and hand-computed
values, and the step against transformers' forward inside the hf engine."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from llmrl import kernels
from llmrl.models import ModelConfig
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.fused_decode import FusedDecode
from llmrl.rollout.hf import HFRolloutEngine

pytestmark = pytest.mark.skipif(not kernels.load(kernels.DECODE), reason=f"the kernels do not build here: {kernels.failure(kernels.DECODE)}")

DTYPES = [torch.float32, torch.bfloat16]


def ops():
    return torch.ops.llmrl_kernels


def hf_norm(weight: torch.Tensor, eps: float) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


# ------------------------------------------------------------------ the ops, by hand
def test_rms_norm_worked_example():
    # mean of squares of [1, -1, 1, -1] is 1, so the row is unchanged and only the weight applies
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = ops().rms_norm(x, w, 0.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0, 3.0, -4.0], [1.0, 2.0, 3.0, 4.0]]))


def test_rms_norm_of_a_zero_row_is_zero_not_nan():
    got = ops().rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5)
    assert torch.equal(got, torch.zeros(2, 8))


def test_rotary_worked_example_is_a_quarter_turn():
    # head size 2, cos 0 and sin 1: (a, b) -> (a cos - b sin, b cos + a sin) = (-b, a)
    x = torch.tensor([[1.0, 2.0, 5.0, 7.0]])  # one row: a rotated head, then an untouched one
    ops().rotary_(x, 1, torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert torch.equal(x, torch.tensor([[-2.0, 1.0, 5.0, 7.0]]))


def test_silu_mul_worked_example_and_extremes():
    gate = torch.tensor([[0.0, 1.0, -100.0, 100.0]])
    up = torch.tensor([[5.0, 2.0, 3.0, 0.5]])
    got = ops().silu_mul(torch.cat([gate, up], dim=1))
    # silu(1) = 1 / (1 + e^-1) = 0.7310586; silu(-100) ~ -3.7e-42 (0 at fp32's normal range); silu(100) = 100
    want = torch.tensor([[0.0, 2 * 0.7310586, 0.0, 50.0]])
    torch.testing.assert_close(got, want, atol=1e-30, rtol=1e-6)
    assert torch.isfinite(got).all()


# ------------------------------------------------------------------ the ops against transformers
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_match_transformers_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(32, 576, generator=g)).to(dtype)
    delta = torch.randn(32, 576, generator=g).to(dtype)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    norm = hf_norm(w, 1e-5)
    # only the order of one fp32 sum differs; bf16's rounding of the result hides it
    exact = dtype == torch.bfloat16
    tolerance = {"atol": 0, "rtol": 0} if exact else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(ops().rms_norm(x, w, 1e-5), norm(x), **tolerance)
    residual = x.clone()
    out = ops().add_rms_norm(residual, delta, w, 1e-5)
    assert torch.equal(residual, x + delta)  # the residual stream is updated in place, rounded as torch rounds
    torch.testing.assert_close(out, norm(x + delta), **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 16])
def test_rotary_matches_transformers_on_q_and_k_and_leaves_v(dtype, dim):
    rows, heads, kv_heads = 5, 4, 2
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    positions = torch.tensor([0, 3, 17, 250, 1999])
    inverse = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = positions[:, None].float() * inverse
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    q = qkv[:, : heads * dim].view(rows, 1, heads, dim).transpose(1, 2)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(rows, 1, kv_heads, dim).transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[:, None], sin[:, None])
    got = qkv.clone()
    ops().rotary_(got, heads + kv_heads, cos, sin)
    assert torch.equal(got[:, : heads * dim], want_q.transpose(1, 2).reshape(rows, -1))
    assert torch.equal(got[:, heads * dim : (heads + kv_heads) * dim], want_k.transpose(1, 2).reshape(rows, -1))
    assert torch.equal(got[:, (heads + kv_heads) * dim :], qkv[:, (heads + kv_heads) * dim :])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (4 * torch.randn(33, 2 * 1536, generator=g)).to(dtype)  # 33 rows: an uneven split over threads
    gate, up = gate_up.split(1536, dim=1)
    want = torch.nn.functional.silu(gate) * up
    # the exp differs from torch's in the last bits of fp32, which bf16's rounding almost always hides
    torch.testing.assert_close(ops().silu_mul(gate_up), want, atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 8e-3)


def test_ops_take_zero_rows():
    assert ops().rms_norm(torch.zeros(0, 8), torch.ones(8), 1e-5).shape == (0, 8)
    assert ops().silu_mul(torch.zeros(0, 8)).shape == (0, 4)


def test_ops_name_what_is_wrong_with_their_inputs():
    with pytest.raises(RuntimeError, match="even width"):
        ops().silu_mul(torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        ops().rms_norm(torch.zeros(8, 2).t(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be \\[8\\]"):
        ops().rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops().rms_norm(torch.zeros(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="fewer than 3 heads"):
        ops().rotary_(torch.zeros(2, 8), 3, torch.zeros(2, 4), torch.zeros(2, 4))


# ------------------------------------------------------------------ the step inside the engine
def save_tiny(kind: str, directory, tokenizer) -> str:
    """A random 2-layer model of transformers' `kind` with SmolLM2's tokenizer, saved to `directory`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        kind, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, initializer_range=0.3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory, tokenizer):
    return save_tiny("qwen2", tmp_path_factory.mktemp("qwen2"), tokenizer)  # Llama's layout with biases on q/k/v


def prompts_of(tokenizer) -> list[list[int]]:
    texts = ["Two plus two is", "The capital of France, a country in Europe, is", "Count: one, two,"]
    return [tokenizer.encode(t) for t in texts]


def engine(path: str, tokenizer, dtype: str, fused: bool | str) -> HFRolloutEngine:
    return HFRolloutEngine(RolloutConfig(dtype=dtype, fused_decode=fused), ModelConfig(name=path), tokenizer)


def counted_steps(engine: HFRolloutEngine, monkeypatch) -> list[int]:
    calls: list[int] = []
    step = engine.fused_decode.step

    def counting(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.fused_decode, "step", counting)
    return calls


@pytest.mark.parametrize("model", ["tiny", "qwen2"])
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 0.05)])
def test_fused_steps_give_transformers_tokens_and_logprobs(model, dtype, atol, tiny_path, qwen2_path, tokenizer, monkeypatch):
    path = tiny_path if model == "tiny" else qwen2_path
    fused, plain = engine(path, tokenizer, dtype, True), engine(path, tokenizer, dtype, False)
    assert plain.fused_decode is None
    calls = counted_steps(fused, monkeypatch)
    # shared prompts (3 x 3 rows) and a left-padded batch; greedy, so a rounding difference can
    # only change a token at a near-tie
    prompts = [p for p in prompts_of(tokenizer) for _ in range(3)]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    a, b = fused.generate(prompts, sampling), plain.generate(prompts, sampling)
    assert len(calls) == 9  # every step after the first token went through the fused step
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]), torch.tensor([c.logprobs for c in b]), atol=atol, rtol=0)


def test_fused_steps_over_torchs_attention_match_transformers(tiny_path, tokenizer, monkeypatch):
    # decode_kernel false: the shared cache merges torch's two attention calls instead
    def build(fused: bool) -> HFRolloutEngine:
        return HFRolloutEngine(RolloutConfig(dtype="float32", decode_kernel=False, fused_decode=fused), ModelConfig(name=tiny_path), tokenizer)

    fused, plain = build(True), build(False)
    calls = counted_steps(fused, monkeypatch)
    prompts = [p for p in prompts_of(tokenizer) for _ in range(3)]  # repeated prompts: the shared cache
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    a, b = fused.generate(prompts, sampling), plain.generate(prompts, sampling)
    assert len(calls) == 5
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]), torch.tensor([c.logprobs for c in b]), atol=1e-4, rtol=0)


def test_fused_steps_drop_finished_rows_as_transformers_does(tiny_path, tokenizer):
    fused, plain = engine(tiny_path, tokenizer, "float32", True), engine(tiny_path, tokenizer, "float32", False)
    prompts = [p for p in prompts_of(tokenizer) for _ in range(4)]
    # rows stop at different steps on a stop string; sampled, seeded per row
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, stop=["e"], row_seeds=list(range(len(prompts))))
    a, b = fused.generate(prompts, sampling), plain.generate(prompts, sampling)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({len(c.token_ids) for c in a}) > 1, "no row finished early: the test does not exercise leaving rows"
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


def test_fused_steps_use_weights_loaded_after_start(tiny_path, tokenizer):
    fused, plain = engine(tiny_path, tokenizer, "bfloat16", True), engine(tiny_path, tokenizer, "bfloat16", False)
    g = torch.Generator().manual_seed(3)
    moved = [(n, p.float() + 0.2 * torch.randn(p.shape, generator=g)) for n, p in plain.model.named_parameters()]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    before = fused.generate(prompts_of(tokenizer) * 2, sampling)
    fused.load_weights(moved)
    plain.load_weights(moved)
    after, want = fused.generate(prompts_of(tokenizer) * 2, sampling), plain.generate(prompts_of(tokenizer) * 2, sampling)
    assert [c.token_ids for c in after] == [c.token_ids for c in want]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in after]), torch.tensor([c.logprobs for c in want]), atol=0.05, rtol=0)


def test_an_unregistered_architecture_falls_back_under_auto_and_is_refused_under_true(tmp_path, tokenizer):
    path = save_tiny("qwen3", tmp_path, tokenizer)  # q/k norms: not Llama's layout
    auto = engine(path, tokenizer, "float32", "auto")
    assert auto.fused_decode is None
    out = auto.generate(prompts_of(tokenizer), SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    assert all(len(c.token_ids) == 3 for c in out)
    with pytest.raises(RuntimeError, match="fused_decode=true.*'qwen3' has none \\(registered: llama, qwen2\\)"):
        engine(path, tokenizer, "float32", True)


def test_fused_decode_needs_grouped_linears(tiny_path, tokenizer):
    cfg = RolloutConfig(dtype="float32", fused_decode=True, packed_linears=False)
    with pytest.raises(RuntimeError, match="packed_linears is false"):
        HFRolloutEngine(cfg, ModelConfig(name=tiny_path), tokenizer)
    auto = HFRolloutEngine(cfg.model_copy(update={"fused_decode": "auto"}), ModelConfig(name=tiny_path), tokenizer)
    assert auto.fused_decode is None
    with pytest.raises(ValueError, match="q/k/v are not one linear group"):
        FusedDecode(auto.model)


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (True, True), (False, False)])
def test_fused_decode_takes_auto_true_or_false(value, parsed):
    assert RolloutConfig(fused_decode=value).fused_decode == parsed
    with pytest.raises(ValueError, match="fused_decode"):
        RolloutConfig(fused_decode="sometimes")

"""The hf engine's sampler kernel (llmrl/kernels/sampling.cpp) against torch's route through
`sample_from`, hand-computed draws, and the distribution it must sample."""
import math

import pytest
import torch

from llmrl import kernels
from llmrl.rollout.hf import sample_from

pytestmark = pytest.mark.skipif(not kernels.load(kernels.DECODE), reason=f"the kernels do not build here: {kernels.failure(kernels.DECODE)}")


def sample_rows(logits: torch.Tensor, temperature: float, uniform: torch.Tensor):
    return torch.ops.llmrl_kernels.sample_rows(logits, temperature, uniform)


def test_worked_example_one_quarter_three_quarters():
    # weights 1/3 and 1 (max-shifted), total 4/3: the first token holds u in (0, 0.25]
    logits = torch.tensor([[0.0, math.log(3.0)]] * 4)
    chosen, logprob = sample_rows(logits, 1.0, torch.tensor([0.2, 0.3, 0.9, 1.0], dtype=torch.float64))
    assert chosen.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(logprob, torch.tensor([math.log(0.25)] + [math.log(0.75)] * 3), atol=1e-6, rtol=0)


def test_temperature_divides_the_logits():
    # at T = 0.5 the logits [0, ln 3] become [0, 2 ln 3]: probabilities 1/10 and 9/10
    logits = torch.tensor([[0.0, math.log(3.0)]] * 2)
    chosen, logprob = sample_rows(logits, 0.5, torch.tensor([0.09, 0.11], dtype=torch.float64))
    assert chosen.tolist() == [0, 1]
    torch.testing.assert_close(logprob, torch.tensor([math.log(0.1), math.log(0.9)]), atol=1e-6, rtol=0)


def test_a_token_at_minus_infinity_is_never_drawn():
    logits = torch.full((3, 700), float("-inf"))
    logits[:, 500] = 0.0  # the only token with weight, in the second block of 256
    chosen, logprob = sample_rows(logits, 1.0, torch.tensor([1e-300, 0.5, 1.0], dtype=torch.float64))
    assert chosen.tolist() == [500, 500, 500]
    assert torch.equal(logprob, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_same_draws_as_torchs_route(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2000, 1000, generator=g)).to(dtype)  # 1000: a last block of 232
    uniform = 1.0 - torch.rand(2000, generator=g, dtype=torch.float64)
    chosen, logprob = sample_rows(logits, temperature, uniform)
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    want = sample_from(logp_all.exp(), uniform)
    # the same token for the same uniform, but where u lands within rounding of a CDF step
    assert (chosen == want).float().mean() >= 0.999
    torch.testing.assert_close(logprob, logp_all.gather(1, chosen[:, None]).squeeze(1), atol=1e-5, rtol=0)


def test_draws_follow_the_softmax():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(600, generator=g)
    row[::7] = float("-inf")
    draws = 40_000
    chosen, _ = sample_rows(row.expand(draws, -1).contiguous(), 1.0, 1.0 - torch.rand(draws, generator=g, dtype=torch.float64))
    frequency = torch.bincount(chosen, minlength=600).double() / draws
    probability = torch.softmax(row.double(), dim=0)
    assert frequency[::7].sum() == 0
    # binomial standard error at p <= 0.05 and 40k draws is below 1.1e-3; 5 of them
    assert (frequency - probability).abs().max() < 5.5e-3


def test_inputs_it_refuses_are_named():
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        sample_rows(torch.zeros(1, 4), 0.0, torch.ones(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="uniform must be float64"):
        sample_rows(torch.zeros(2, 4), 1.0, torch.ones(2))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        sample_rows(torch.zeros(4, 2).t(), 1.0, torch.ones(2, dtype=torch.float64))

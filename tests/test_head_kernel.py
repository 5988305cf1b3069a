"""llmrl's head-pass kernels (llmrl/kernels/head_ops.cpp): log-sum-exp, the target's logprob and
the entropy of fp32 logits, and their gradient in place, against hand-computed values, torch's
ops, and the edge cases (no tokens, a one-word vocabulary, logits far apart, a bad target)."""
import math

import pytest
import torch

from llmrl import kernels

pytestmark = pytest.mark.skipif(not kernels.load(kernels.DECODE), reason=f"the kernels do not build here: {kernels.failure(kernels.DECODE)}")


def ops():
    return torch.ops.llmrl_kernels


def test_worked_example_forward_and_both_gradients():
    # p = softmax([0, ln 3]) = [1/4, 3/4]: lse = ln 4, log p(target 1) = ln 3/4,
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446
    z = torch.tensor([[0.0, math.log(3.0)]])
    target = torch.tensor([1])
    lse, logp, entropy = ops().head_logsumexp(z, target, True)
    torch.testing.assert_close(lse, torch.tensor([math.log(4.0)]))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(entropy, torch.tensor([0.5623351446]))
    # d log p_1 / dz = onehot(1) - p = [-1/4, 1/4]
    grad = z.clone()
    ops().head_grad_(grad, lse, target, torch.tensor([1.0]), None, None)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.25]]))
    # dH / dz_i = -p_i (log p_i + H): [-1/4 (ln 1/4 + H), -3/4 (ln 3/4 + H)] = [0.2059900, -0.2059900]
    grad = z.clone()
    ops().head_grad_(grad, lse, target, torch.tensor([0.0]), entropy, torch.tensor([1.0]))
    torch.testing.assert_close(grad, torch.tensor([[0.2059900, -0.2059900]]))


def test_without_entropy_the_entropy_is_zero_and_the_rest_unchanged():
    z = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 299, 7, 7, 150])
    with_h = ops().head_logsumexp(z, target, True)
    without = ops().head_logsumexp(z, target, False)
    assert torch.equal(with_h[0], without[0]) and torch.equal(with_h[1], without[1]) and torch.equal(without[2], torch.zeros(5))


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_matches_torchs_ops_on_random_logits(entropy_grad):
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(37, 5000, generator=g)
    target = torch.randint(0, 5000, (37,), generator=g)
    lse, logp, entropy = ops().head_logsumexp(z, target, True)
    log_p = torch.log_softmax(z.double(), -1)
    want_entropy = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.double(), -1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(logp.double(), log_p.gather(-1, target[:, None]).squeeze(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-6)

    grad_logp = torch.randn(37, generator=g)
    grad_h = torch.randn(37, generator=g) if entropy_grad else None
    got = z.clone()
    ops().head_grad_(got, lse, target, grad_logp, entropy if entropy_grad else None, grad_h)
    leaf = z.double().requires_grad_()
    lp = torch.log_softmax(leaf, -1)
    loss = (lp.gather(-1, target[:, None]).squeeze(-1) * grad_logp.double()).sum()
    if entropy_grad:
        loss = loss + (-(lp.exp() * lp).sum(-1) * grad_h.double()).sum()
    loss.backward()
    torch.testing.assert_close(got.double(), leaf.grad, atol=1e-6, rtol=1e-5)


def test_edge_cases_no_tokens_one_word_and_logits_far_apart():
    empty = ops().head_logsumexp(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), True)
    assert all(t.shape == (0,) for t in empty)
    # one word: it has probability 1, so log p = 0, H = 0 and the gradient vanishes
    lse, logp, entropy = ops().head_logsumexp(torch.tensor([[3.5]]), torch.tensor([0]), True)
    assert (lse.item(), logp.item(), entropy.item()) == (3.5, 0.0, 0.0)
    grad = torch.tensor([[3.5]])
    ops().head_grad_(grad, lse, torch.tensor([0]), torch.tensor([2.0]), entropy, torch.tensor([1.0]))
    assert grad.item() == 0.0
    # logits 1e4 apart: the far one's probability underflows to 0, nothing is NaN
    z = torch.tensor([[0.0, -1e4, 5.0]])
    lse, logp, entropy = ops().head_logsumexp(z, torch.tensor([1]), True)
    want = torch.logsumexp(torch.tensor([0.0, 5.0]).double(), 0).item()
    assert abs(lse.item() - want) < 1e-5 and abs(logp.item() - (-1e4 - want)) < 1e-2 and torch.isfinite(entropy).all()
    grad = z.clone()
    ops().head_grad_(grad, lse, torch.tensor([1]), torch.tensor([1.0]), entropy, torch.tensor([1.0]))
    assert torch.isfinite(grad).all() and abs(grad[0, 1].item() - 1.0) < 1e-6


def test_a_target_outside_the_vocabulary_is_named():
    with pytest.raises(RuntimeError, match="target 10 of token 1 is outside the vocabulary of 10"):
        ops().head_logsumexp(torch.zeros(2, 10), torch.tensor([3, 10]), False)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops().head_logsumexp(torch.zeros(2, 10, dtype=torch.float64), torch.tensor([3, 1]), False)

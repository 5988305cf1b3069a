"""The head pass keeps its logits for its backward within a budget, and recomputes the rest:
the same gradients to the bit either way, and no lm_head product in the backward for a kept chunk."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmrl.train.logprobs import token_logprobs

VOCAB, WIDTH = 50, 16
ROW_BYTES = VOCAB * 4  # an fp32 logits row


class _MatmulShapes(TorchDispatchMode):
    """Counts matrix products by their output's width: VOCAB wide is an lm_head forward product."""

    def __init__(self):
        super().__init__()
        self.widths = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
            self.widths[out.shape[-1]] += 1
        return out


def _pass(keep_bytes, entropy_in_loss=True, temperature=0.7):
    """Gradients of a loss over logprobs (and entropies) of 3 x 7 tokens in chunks of 4 (6 chunks
    of the 18 predicted positions, the last one short), and the lm_head products its backward ran."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, WIDTH, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, requires_grad=True)
    ids = torch.randint(0, VOCAB, (3, 7))
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    logp, ent = token_logprobs(hidden, weight, ids, temperature, want_entropy=True, chunk_tokens=4, keep_logits_bytes=keep_bytes)
    loss = (a * logp).sum() + ((b * ent).sum() if entropy_in_loss else 0.0)
    with _MatmulShapes() as seen:
        grads = torch.autograd.grad(loss, (hidden, weight))
    return grads, seen.widths[VOCAB]


@pytest.mark.parametrize("entropy_in_loss", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_partly_kept_and_recomputed_logits_give_the_same_gradients_to_the_bit(entropy_in_loss, temperature):
    # 18 positions: 0 bytes keeps none, 9 rows' worth keeps the first two chunks (8 rows), 18 rows' all
    results = {keep: _pass(keep * ROW_BYTES, entropy_in_loss, temperature) for keep in (0, 9, 18)}
    assert [results[k][1] for k in (0, 9, 18)] == [5, 3, 0]  # recomputed head products: 5 chunks, 3, none
    for keep in (9, 18):
        for got, want in zip(results[keep][0], results[0][0]):
            assert torch.equal(got, want)


def test_no_grad_passes_keep_nothing():
    hidden, weight = torch.randn(2, 5, WIDTH), torch.randn(VOCAB, WIDTH)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        token_logprobs(hidden, weight, ids, keep_logits_bytes=1 << 30)
    grads, recomputed = _pass(1 << 30)  # the buffer is free for the next pass that has a backward
    assert recomputed == 0


def test_a_second_pass_before_the_first_backward_recomputes_and_both_are_right():
    torch.manual_seed(1)
    weight = torch.randn(VOCAB, WIDTH, dtype=torch.float64, requires_grad=True)
    hidden = [torch.randn(2, 5, WIDTH, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ids = [torch.randint(0, VOCAB, (2, 5)) for _ in range(2)]
    # two losses in one graph: the second forward finds the buffer taken
    logps = [token_logprobs(h, weight, i, chunk_tokens=3, keep_logits_bytes=1 << 30)[0] for h, i in zip(hidden, ids)]
    with _MatmulShapes() as seen:
        got = torch.autograd.grad(logps[0].sum() + 2 * logps[1].sum(), (weight, *hidden))
    assert seen.widths[VOCAB] == 3  # the second pass's 8 positions in chunks of 3, recomputed; the first kept
    logps = [token_logprobs(h, weight, i, chunk_tokens=3, keep_logits_bytes=0)[0] for h, i in zip(hidden, ids)]
    want = torch.autograd.grad(logps[0].sum() + 2 * logps[1].sum(), (weight, *hidden))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_a_dropped_graph_gives_the_buffer_back():
    hidden, weight = torch.randn(2, 5, WIDTH, requires_grad=True), torch.randn(VOCAB, WIDTH, requires_grad=True)
    logp, _ = token_logprobs(hidden, weight, torch.randint(0, VOCAB, (2, 5)), keep_logits_bytes=1 << 30)
    del logp  # no backward: the claim lapses with the graph
    assert _pass(1 << 30)[1] == 0


def test_a_retained_graph_backs_up_twice_with_the_same_gradients():
    torch.manual_seed(2)
    hidden, weight = torch.randn(2, 6, WIDTH, requires_grad=True), torch.randn(VOCAB, WIDTH, requires_grad=True)
    logp, ent = token_logprobs(hidden, weight, torch.randint(0, VOCAB, (2, 6)), want_entropy=True, chunk_tokens=4)
    loss = logp.sum() + ent.sum()
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))  # the kept logits were consumed: recomputed
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _in_fresh_thread(fn):
    """fn() in a new thread, whose workspace and kept-logits claim start empty; its result."""
    import threading

    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("value", fn()))
    worker.start()
    worker.join()
    return out["value"]


class _Ctx:
    """Stands in for an autograd context: the claim holds it weakly."""


def _claim(n, chunk, budget_rows):
    from llmrl.train.logprobs import _KEPT

    ctx = _Ctx()
    buf = _KEPT.claim(ctx, n, chunk, VOCAB, torch.float32, torch.device("cpu"), budget_rows * ROW_BYTES)
    _KEPT.release(ctx)
    return buf


def test_the_kept_buffer_has_room_for_whole_chunks_within_the_budget():
    def passes():
        first = _claim(5, 4, 100)  # 5 rows: room for 8, two whole chunks
        longer = _claim(8, 4, 100)  # a longer pass within that room takes the same memory
        capped = _claim(9, 4, 10)  # room for 12 rows would pass the budget of 10: the budget holds
        return first, longer, capped

    first, longer, capped = _in_fresh_thread(passes)
    assert first.shape == (5, VOCAB) and longer.shape == (8, VOCAB) and capped.shape == (9, VOCAB)
    assert longer.data_ptr() == first.data_ptr()
    assert capped.untyped_storage().nbytes() == 10 * ROW_BYTES


def test_a_workspace_buffer_grows_by_an_eighth_more_than_asked():
    from llmrl.workspace import workspace

    def requests():
        ws = workspace()
        small = ws.get("t", (16,), torch.float32, torch.device("cpu"))  # the first request: exactly its size
        grown = ws.get("t", (17, 2), torch.float32, torch.device("cpu"))  # 34 elements: room for 38
        within = ws.get("t", (38,), torch.float32, torch.device("cpu"))
        return small, grown, within

    small, grown, within = _in_fresh_thread(requests)
    assert small.untyped_storage().nbytes() == 16 * 4 and grown.untyped_storage().nbytes() == 38 * 4
    assert grown.shape == (17, 2) and within.data_ptr() == grown.data_ptr()

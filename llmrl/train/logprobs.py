"""Token logprobs and entropy without materialising full-vocabulary fp32 logits for a batch.

The lm_head projection, log-softmax and entropy run over chunks of tokens inside one autograd
function with a closed-form backward (`_HeadPass`). Writing the gradient out by hand, rather than
checkpointing the chunk and letting autograd differentiate log_softmax, gather and the entropy,
saves several full passes over the vocabulary per chunk.

The backward needs each chunk's logits again. The forward keeps them for it while the pass's
logits fit `keep_logits_bytes` (TrainConfig.logprob_keep_logits_mb), in one buffer that is
reused from call to call; the chunks beyond it are recomputed in the backward from the saved
hidden states and lm_head weight, which costs the head's forward product again (at SmolLM2's
vs_trl shape, 1.2 s of a 25 s update) but bounds the memory to a few chunks' worth of logits
(chunk_tokens x vocab) in scratch buffers (`llmrl.workspace`). Kept or recomputed, the logits
are the same product of the same operands, so the gradients are the same to the bit.

On a CPU the rest of the work on fp32 logits (log-sum-exp, the target's logprob, the entropy, and
in the backward the gradient in place) is llmrl's kernel (`llmrl/kernels/head_ops.cpp`), one
token's row of logits at a time while it is in cache, where torch's ops passed over the chunk's
logits in memory once per step (docs/benchmarks.md).

Under ZeRO-3 the lm_head weight is partitioned over ranks and only whole inside a module's
forward or backward. The chunks read it outside lm_head's own forward, so a ZeRO-3 engine
attaches a `TokenLogprobs` module to the model and registers the weight as its external
parameter: DeepSpeed then gathers it once around the whole chunked pass, and again around its
backward, where each chunk's logits are recomputed.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Iterator

import torch

from llmrl.workspace import workspace

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_KEEP_LOGITS_BYTES = 1024 << 20
# Workspace names the head pass uses: `logits` [rows, V] in the logits' dtype, `low` [rows, V]
# in the matmul's when that differs, `spare` [rows, V] for a second vocabulary-sized value, and
# `weight_grad` [V, H] in the matmul's dtype. Chunks run one after another, forward and backward
# alike, and no buffer outlives the call that fills it, so one set serves every chunk.


class _HeadPass(torch.autograd.Function):
    """Logprobs of `targets` and entropies under z = hidden @ weight.T / temperature, over
    chunks of `chunk` tokens.

    With p = softmax(z), m = max z, e = exp(z - m), s = sum e, lse = m + log s:
      logp_t = z_t - lse          d logp_t / dz = onehot(t) - p
      H = log s - sum_i e_i (z_i - m) / s
                                  dH / dz_i = -p_i (log p_i + H)
    so one recomputed chunk of logits, one exp and a scatter give the gradient of any mix of the
    two outputs. Logits are fp32 (fp64 stays fp64), whatever dtype the matmul ran in.
    """

    @staticmethod
    def forward(ctx, hidden, weight, matmul_weight, targets, temperature, want_entropy, entropy_grad, chunk, keep_bytes, supplied=None):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no work
        logits_dtype = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        targets = targets.contiguous()  # each chunk's slice is then contiguous, as llmrl's kernels read it
        logp = hidden.new_empty(n, dtype=logits_dtype)
        lse = torch.empty_like(logp)
        entropy = torch.zeros_like(logp)
        ws = workspace()
        ctx.kept = _KEPT.claim(ctx, n, chunk, matmul_weight.shape[0], logits_dtype, hidden.device, keep_bytes)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            kept = ctx.kept is not None and rows.stop <= ctx.kept.shape[0]
            z = _chunk_logits(hidden[rows], matmul_weight, temperature, out=ctx.kept[rows] if kept else None, supplied=_chunk_of(supplied, rows))
            if _row_kernels(z):
                lse[rows], logp[rows], chunk_entropy = torch.ops.llmrl_kernels.head_logsumexp(z, targets[rows], want_entropy)
                if want_entropy:
                    entropy[rows] = chunk_entropy
                continue
            m = z.amax(-1, keepdim=True)
            target_z = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            # z - m: in place, unless z is kept for the backward
            shifted = torch.sub(z, m, out=ws.get("logits", z.shape, z.dtype, z.device)) if kept else z.sub_(m)
            if want_entropy:  # e and z - m are both needed: e goes to the spare buffer
                e = torch.exp(shifted, out=ws.get("spare", shifted.shape, shifted.dtype, shifted.device))
            else:
                e = shifted.exp_()
            s = e.sum(-1)
            log_s = s.log()
            lse[rows] = m.squeeze(-1) + log_s
            logp[rows] = target_z - lse[rows]
            if want_entropy:
                entropy[rows] = log_s - e.mul_(shifted).sum(-1) / s
        if not (want_entropy and entropy_grad):
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, matmul_weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk, ctx.supplied = temperature, chunk, supplied
        ctx.weight_dtype = weight.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None  # one gradient for the whole pass, in the weight's dtype (fp32 sums under autocast)
        ws = workspace()
        # The kept logits are consumed below (written in place): a second backward through this
        # graph (retain_graph) recomputes them.
        kept, ctx.kept = ctx.kept, None
        _KEPT.release(ctx)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, min(start + chunk, hidden.shape[0]))
            # The 1/temperature of z's chain rule is folded into the per-token coefficients.
            g = grad_logp[rows].unsqueeze(-1) / temperature
            if kept is not None and rows.stop <= kept.shape[0]:
                z = kept[rows]
            else:
                z = _chunk_logits(hidden[rows], weight, temperature, supplied=_chunk_of(ctx.supplied, rows))
            if _row_kernels(z):
                h = None if grad_entropy is None else grad_entropy[rows] / temperature
                torch.ops.llmrl_kernels.head_grad_(z, lse[rows], targets[rows], g.squeeze(-1), None if h is None else entropy[rows], h)
                grad_z = z
            else:
                log_p = z.sub_(lse[rows].unsqueeze(-1))
                if grad_entropy is None:
                    grad_z = log_p.exp_().mul_(g.neg())  # log p is not needed again: softmax in place
                else:
                    p = torch.exp(log_p, out=ws.get("spare", log_p.shape, log_p.dtype, log_p.device))
                    coef = log_p.add_(entropy[rows].unsqueeze(-1)).mul_(grad_entropy[rows].unsqueeze(-1) / temperature).add_(g)
                    grad_z = p.mul_(coef).neg_()
                grad_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            if grad_z.dtype != hidden.dtype:
                grad_z = ws.get("low", grad_z.shape, hidden.dtype, hidden.device).copy_(grad_z)
            if grad_hidden is not None:
                torch.mm(grad_z, weight, out=grad_hidden[rows])
            if ctx.needs_input_grad[1]:
                if ctx.weight_dtype == hidden.dtype:
                    grad_weight = grad_z.t() @ hidden[rows] if grad_weight is None else grad_weight.addmm_(grad_z.t(), hidden[rows])
                else:
                    part = torch.mm(grad_z.t(), hidden[rows], out=ws.get("weight_grad", weight.shape, hidden.dtype, hidden.device))
                    grad_weight = part.to(ctx.weight_dtype) if grad_weight is None else grad_weight.add_(part)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


class _KeptLogits:
    """The one buffer (per thread) in which a head pass keeps its logits for its backward.

    A pass claims it in its forward and gives it back in its backward. A second pass whose
    forward comes before the first one's backward (two losses in one graph) finds it taken and
    recomputes instead; a claim whose graph was dropped without a backward lapses with the
    graph (the claim holds its autograd context weakly)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def claim(self, ctx: object, n: int, chunk: int, vocab: int, dtype: torch.dtype, device: torch.device, budget: int) -> torch.Tensor | None:
        """A [rows, vocab] buffer for the first `rows` logits of an n-row pass (all n, or whole
        chunks, as many as fit `budget` bytes), or None: nothing fits, or the buffer is taken."""
        row_bytes = vocab * torch.finfo(dtype).bits // 8
        rows = n if n * row_bytes <= budget else (budget // row_bytes) // chunk * chunk
        owner = getattr(self.local, "owner", None)
        if rows == 0 or (owner is not None and owner() is not None):
            return None
        self.local.owner = weakref.ref(ctx)
        # Room for whole chunks (within the budget): the next pass, a few rows longer, then finds
        # the buffer big enough. A buffer made anew is faulted in page by page, 0.25 s a 200 MB
        # chunk on a 2-core VM, which steps 2-5 of bench/vs_trl.py paid each time a micro-batch
        # outgrew every earlier one (docs/benchmarks.md).
        room = min(-(-rows // chunk) * chunk, max(rows, budget // row_bytes))
        return workspace().get("kept_logits", (room, vocab), dtype, device, exact=True)[:rows]

    def release(self, ctx: object) -> None:
        owner = getattr(self.local, "owner", None)
        if owner is not None and owner() is ctx:
            self.local.owner = None


_KEPT = _KeptLogits()


def _row_kernels(z: torch.Tensor) -> bool:
    """Whether llmrl's kernels do the head pass's elementwise work on these logits: contiguous
    fp32 on a CPU, where the kernels build (fp64 stays with torch's ops)."""
    return z.dtype == torch.float32 and z.device.type == "cpu" and z.is_contiguous() and _head_kernels_here()


@functools.cache
def _head_kernels_here() -> bool:
    from llmrl import kernels

    return kernels.load(kernels.DECODE)


def _chunk_of(supplied: tuple[torch.Tensor, torch.Tensor] | None, rows: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if supplied is None else (supplied[0], supplied[1][rows])


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, temperature: float, out: torch.Tensor | None = None,
    supplied: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """hidden @ weight.T / temperature in `out`, or else a workspace buffer, in fp32 (fp64 stays
    fp64). `supplied` (logits [*, vocab], each row's index there or -1) gives the product of the
    rows it indexes, as the rollout's decode computed it (llmrl/train/supplied_linears.py)."""
    ws = workspace()
    rows, vocab = hidden.shape[0], weight.shape[0]
    logits_dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = ws.get("logits", (rows, vocab), logits_dtype, hidden.device) if out is None else out
    if supplied is not None and hidden.dtype == logits_dtype == supplied[0].dtype and bool((supplied[1] >= 0).any()):
        source, index = supplied
        torch.index_select(source, 0, index.clamp(min=0), out=z)
        missing = (index < 0).nonzero().flatten()
        if len(missing):
            z.index_copy_(0, missing, torch.mm(hidden.index_select(0, missing), weight.t()))
    elif hidden.dtype == logits_dtype:
        torch.mm(hidden, weight.t(), out=z)
    else:
        z.copy_(torch.mm(hidden, weight.t(), out=ws.get("low", (rows, vocab), hidden.dtype, hidden.device)))
    return z.div_(temperature) if temperature != 1.0 else z


_STEADY = threading.local()


@contextlib.contextmanager
def steady_weights() -> Iterator[None]:
    """Declares that no weight changes inside the block (one optimizer step's micro-batches, or a
    no-grad pass over a batch). The lm_head weight's cast to the matmul's dtype is then made once
    and shared by every head pass in the block, not made again per micro-batch: for SmolLM2 that
    is a fresh 57 MB bf16 copy of a 113 MB fp32 weight each time."""
    outer = getattr(_STEADY, "casts", None)
    if outer is None:
        _STEADY.casts = {}
    try:
        yield
    finally:
        if outer is None:
            _STEADY.casts = None


def _matmul_copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` cast to `dtype`, outside autograd; inside `steady_weights`, the block's one cast."""
    casts = getattr(_STEADY, "casts", None)
    if casts is None:
        return weight.detach().to(dtype)
    # One entry per weight, checked against its storage: a ZeRO-3 weight is gathered anew each time.
    kept = casts.get(id(weight))
    if kept is None or kept[0] != (weight.data_ptr(), dtype):
        kept = casts[id(weight)] = ((weight.data_ptr(), dtype), weight.detach().to(dtype))
    return kept[1]


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmul runs in: autocast's where it is on, as F.linear would."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    only: torch.Tensor | None = None,
    entropy_grad: bool = True,
    keep_logits_bytes: int = DEFAULT_KEEP_LOGITS_BYTES,
    supplied_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-aligned logprobs (and entropies) for `input_ids` [B,T] from decoder states [B,T,H].

    Position t holds log p(x_t | x_<t) under logits / temperature; position 0 has no
    prediction and is 0. The entropy at t is that of the distribution that sampled x_t.
    `only` ([B,T] mask) limits the work to those positions (others are 0): the lm_head is a
    large share of a small model's FLOPs, and prompt positions need no logprob. With
    `entropy_grad` False the entropy comes back detached, for logging. Up to `keep_logits_bytes` of
    the logits are kept for the backward instead of recomputed there. `supplied_logits`
    (logits [*, vocab] from the rollout's decode, and [B,T] the row there of each position's
    logits, -1 for none) stands in for the head's product where it has a row.
    """
    B, T, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)
    targets = input_ids[:, 1:].reshape(-1)
    selected = None
    supplied_rows = None if supplied_logits is None else supplied_logits[1][:, :-1].reshape(-1)
    if only is not None:
        selected = only[:, 1:].reshape(-1).nonzero().flatten()
        h, targets = h.index_select(0, selected), targets.index_select(0, selected)
        supplied_rows = None if supplied_rows is None else supplied_rows.index_select(0, selected)
    # A weight in another dtype is cast once for every chunk's forward and backward, outside
    # autograd: its gradient flows to lm_head_weight itself. A weight already in the compute dtype
    # is used as it is, since under ZeRO-3 its storage is valid only while DeepSpeed gathers it
    # (around this pass and again around its backward).
    dtype = _compute_dtype(hidden, lm_head_weight)
    h = h.to(dtype)
    matmul_weight = lm_head_weight if lm_head_weight.dtype == dtype else _matmul_copy(lm_head_weight, dtype)
    backward_comes = torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad)
    logp, entropy = _HeadPass.apply(
        h, lm_head_weight, matmul_weight, targets, temperature, want_entropy, entropy_grad, chunk_tokens,
        keep_logits_bytes if backward_comes else 0, None if supplied_logits is None else (supplied_logits[0], supplied_rows),
    )
    return _token_aligned(logp, selected, B, T), (_token_aligned(entropy, selected, B, T) if want_entropy else None)


def _token_aligned(flat: torch.Tensor, selected: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    """Per-position values back to [B, T]: unselected positions and position 0 hold 0."""
    if selected is not None:
        flat = flat.new_zeros(B * (T - 1)).index_copy(0, selected, flat)
    return torch.cat([flat.new_zeros(B, 1), flat.view(B, T - 1)], dim=1)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor]:
    """The decoder stack and the lm_head weight of a causal LM (peft-wrapped or not)."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head with a bias is not supported by the chunked logprob path")
    return decoder, head.weight


LOGPROB_MODULE = "llmrl_token_logprobs"


class TokenLogprobs(torch.nn.Module):
    """`token_logprobs` as one module call, for engines (ZeRO-3) that gather weights per module.
    It holds the head without registering it as a submodule, so the model's parameters and
    state_dict keys stay as they were."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, temperature: float, want_entropy: bool, chunk_tokens: int,
                only: torch.Tensor | None, entropy_grad: bool = True, keep_logits_bytes: int = DEFAULT_KEEP_LOGITS_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(hidden, self.head.weight, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad, keep_logits_bytes)


def attach_token_logprobs(model: torch.nn.Module) -> TokenLogprobs:
    """Give `model` a TokenLogprobs submodule that `head_logprobs` routes through; returns it so
    the caller can register the head weight with its engine."""
    decoder_and_head(model)  # refuses a head the chunked path cannot compute
    module = TokenLogprobs(model.get_output_embeddings())
    model.add_module(LOGPROB_MODULE, module)
    return module


def head_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    only: torch.Tensor | None = None,
    entropy_grad: bool = True,
    keep_logits_bytes: int = DEFAULT_KEEP_LOGITS_BYTES,
    supplied_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` through the model's lm_head, via its TokenLogprobs module when it has one
    (a ZeRO-3 engine's, which takes no supplied logits)."""
    module = getattr(model, LOGPROB_MODULE, None)
    if module is not None:
        return module(hidden, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad, keep_logits_bytes)
    _, weight = decoder_and_head(model)
    return token_logprobs(
        hidden, weight, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad, keep_logits_bytes, supplied_logits
    )


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    want_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    only: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Run the decoder once; return token-aligned logprobs, entropies and the hidden states."""
    decoder = model.get_decoder()
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    logp, entropy = head_logprobs(model, hidden, input_ids, temperature, want_entropy, chunk_tokens, only)
    return logp, entropy, hidden

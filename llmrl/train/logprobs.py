"""Token logprobs and entropy without materialising full-vocabulary fp32 logits for a batch.

The lm_head projection, log-softmax and entropy run over chunks of tokens. Under autograd each
chunk is checkpointed, so backward recomputes that chunk's logits instead of keeping them: peak
extra memory is one chunk of logits (chunk_tokens x vocab), not the whole batch's.

Under ZeRO-3 the lm_head weight is partitioned over ranks and only whole inside a module's
forward or backward. The chunks read it outside lm_head's own forward, so a ZeRO-3 engine
attaches a `TokenLogprobs` module to the model and registers the weight as its external
parameter: DeepSpeed then gathers it once around the whole chunked pass (and once around its
backward, where the checkpointed chunks are recomputed) and releases it after.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024


def _chunk_stats(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, want_entropy: bool, entropy_grad: bool
):
    logits = F.linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return logp, torch.zeros_like(logp)
    # A logged entropy gets no graph. It comes after the gather, so a checkpoint's recomputation
    # (which stops once the tensors backward saved are back) never redoes its vocabulary pass.
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, -(logp_all.exp() * logp_all).sum(-1)


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
    want_entropy: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    only: torch.Tensor | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-aligned logprobs (and entropies) for `input_ids` [B,T] from decoder states [B,T,H].

    Position t holds log p(x_t | x_<t) under logits / temperature; position 0 has no
    prediction and is 0. The entropy at t is that of the distribution that sampled x_t.
    `only` ([B,T] mask) limits the work to those positions (others are 0): the lm_head is a
    large share of a small model's FLOPs, and prompt positions need no logprob. With
    `entropy_grad` False the entropy comes back detached, at the cost of one vocabulary pass
    instead of three (forward, recomputation, backward).
    """
    B, T, H = hidden.shape
    h = hidden[:, :-1].reshape(-1, H)
    targets = input_ids[:, 1:].reshape(-1)
    selected = None
    if only is not None:
        selected = only[:, 1:].reshape(-1).nonzero().flatten()
        h, targets = h.index_select(0, selected), targets.index_select(0, selected)
    use_ckpt = torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad)
    logps, ents = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start : start + chunk_tokens], lm_head_weight, targets[start : start + chunk_tokens], temperature, want_entropy,
                entropy_grad)
        if use_ckpt:
            lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(*args)
        logps.append(lp)
        ents.append(ent)
    flat_logp = torch.cat(logps) if logps else h.new_zeros(0, dtype=torch.float32)
    flat_ent = torch.cat(ents) if ents else flat_logp
    if selected is not None:
        flat_logp = flat_logp.new_zeros(B * (T - 1)).index_copy(0, selected, flat_logp)
        flat_ent = flat_ent.new_zeros(B * (T - 1)).index_copy(0, selected, flat_ent)
    zero = torch.zeros(B, 1, dtype=torch.float32, device=hidden.device)
    logp = torch.cat([zero, flat_logp.view(B, T - 1)], dim=1)
    entropy = torch.cat([zero, flat_ent.view(B, T - 1)], dim=1) if want_entropy else None
    return logp, entropy


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

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, temperature: float, want_entropy: bool,
                chunk_tokens: int, only: torch.Tensor | None, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(hidden, self.head.weight, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` through the model's lm_head, via its TokenLogprobs module when it has one."""
    module = getattr(model, LOGPROB_MODULE, None)
    if module is not None:
        return module(hidden, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad)
    _, weight = decoder_and_head(model)
    return token_logprobs(hidden, weight, input_ids, temperature, want_entropy, chunk_tokens, only, entropy_grad)


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

"""The embedded rollout engine: transformers models with our own KV-cache sampling loop.

We sample ourselves rather than call `generate` because we need, per sampled token, the logprob
under logits / temperature (what the trainer computes), and exact finish reasons: SmolLM2 pads
with its EOS id, so after `generate` a padded row cannot be told from one that sampled EOS.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from transformers import DynamicCache

from llmrl import kernels
from llmrl.common_prefix import shared_start
from llmrl.models import GROUPED_ATTENTION, ModelConfig, load_causal_lm
from llmrl.precision import resolve_dtype
from llmrl.rollout.base import RolloutConfig, SamplingParams, register_rollout_engine
from llmrl.rollout.decode_outputs import DecodeOutputs
from llmrl.rollout.fused_decode import FusedDecode, fused_decode_problem
from llmrl.rollout.kv_cache import PreallocatedCache
from llmrl.rollout.packed_linears import pack_linears, packing_pays
from llmrl.rollout.shared_prefix_cache import KERNEL as SHARED_PREFIX_KERNEL
from llmrl.rollout.shared_prefix_cache import SharedPrefixCache
from llmrl.train.logprobs import sequence_logprobs
from llmrl.types import Completion
from llmrl.workspace import workspace


logger = logging.getLogger("llmrl.rollout.hf")

SAMPLING_BLOCK = 256  # vocabulary entries per block of the two-level CDF in `sample_from`


def draw_uniform(rows: int, generator: torch.Generator | None) -> torch.Tensor:
    """Uniforms in (0, 1]: zero is excluded so the CDF search can never land on a token of probability 0."""
    return 1.0 - torch.rand(rows, generator=generator, dtype=torch.float64)


def sample_from(probs: torch.Tensor, uniform: torch.Tensor, block: int = SAMPLING_BLOCK) -> torch.Tensor:
    """Draw one token per row by inverting the CDF with one uniform per row.

    `torch.multinomial` draws an exponential variate per vocabulary entry (49k per row for
    SmolLM2), which profiled at a fifth of decode time; one uniform and a sorted search is exact
    categorical sampling for a fraction of that. Rows need not be normalised. Token k is chosen
    when cdf[k-1] < u * total <= cdf[k], so a zero-probability token (cdf[k-1] == cdf[k]) never is.

    The CDF is built in two levels, in float64: the vocabulary's blocks of `block` tokens are
    summed (a vectorised reduction) and only the chosen block gets a running sum. A running sum
    over the whole vocabulary is sequential and cost 1-3 ms a decode step for 32 rows, more than
    the rest of the sampling together.
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // block)
    if blocks * block != vocab:
        probs = torch.nn.functional.pad(probs, (0, blocks * block - vocab))  # zeros are never drawn
    tiled = probs.reshape(rows, blocks, block)
    # The float64 copy goes into a buffer kept across steps: `sum(dtype=float64)` allocated a fresh
    # rows x vocabulary one each step, and faulting it in took 5 ms a decode step at 32 rows.
    wide = workspace().get("sampler_float64", tiled.shape, torch.float64, tiled.device).copy_(tiled)
    block_cdf = wide.sum(-1).cumsum(-1)
    target = uniform * block_cdf[:, -1]
    chosen_block = torch.searchsorted(block_cdf, target[:, None]).squeeze(-1).clamp(max=blocks - 1)
    # mass before the chosen block; the search guarantees it is below the target
    before = block_cdf.gather(1, (chosen_block - 1).clamp(min=0)[:, None]).squeeze(-1).masked_fill(chosen_block == 0, 0.0)
    inner = tiled[torch.arange(rows), chosen_block].double()
    inner_cdf = inner.cumsum(-1).add_(before[:, None])
    within = torch.searchsorted(inner_cdf, target[:, None]).squeeze(-1)
    # The block's own running sum can round just below its total: then the target is past every
    # step, and the block's last token with mass holds it.
    last_with_mass = ((inner > 0) * torch.arange(block)).amax(-1)
    return chosen_block * block + torch.minimum(within, last_with_mass)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and outside the top-p nucleus."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFRolloutEngine:
    def __init__(self, cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        load = {"gradient_checkpointing": False}
        self.model = load_causal_lm(model_cfg.model_copy(update=load), resolve_dtype(cfg.dtype)).eval()
        self.model.requires_grad_(False)
        weights = next(self.model.parameters())
        pack = cfg.packed_linears is True or (cfg.packed_linears == "auto" and packing_pays(weights.dtype, weights.device))
        if pack or (cfg.packed_linears == "auto" and cfg.fused_decode):  # the fused step multiplies grouped linears
            pack_linears(self.model, pack=pack, rows_hint=min(cfg.max_batch_size, 64))
        # Build (once per machine) and load the decode kernel now, not inside the first rollout.
        on_cpu = weights.device.type == "cpu"
        self.decode_kernel = bool(cfg.decode_kernel) and on_cpu and kernels.load(SHARED_PREFIX_KERNEL)
        if cfg.decode_kernel is True and not self.decode_kernel:
            why = "the model is not on the CPU" if not on_cpu else kernels.failure(SHARED_PREFIX_KERNEL)
            raise RuntimeError(f"rollout.decode_kernel=true, but the kernel cannot run: {why}")
        self.fused_decode = self._fused_decode(cfg)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(sorted(i for i in eos_ids if i is not None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # set by link_decode_outputs when a torch trainer in this process trains on these rollouts
        self.decode_outputs: DecodeOutputs | None = None

    def _fused_decode(self, cfg: RolloutConfig) -> FusedDecode | None:
        if cfg.fused_decode is False:
            return None
        if cfg.packed_linears is False:
            problem: str | None = "rollout.packed_linears is false, and the fused step multiplies grouped linears"
        else:
            problem = fused_decode_problem(self.model)
        if problem is None:
            return FusedDecode(self.model)
        if cfg.fused_decode is True:
            raise RuntimeError(f"rollout.fused_decode=true, but this model cannot take it: {problem}")
        logger.info("decode runs transformers' forward: no fused decode step (%s)", problem)
        return None

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        generator: torch.Generator | list[torch.Generator] | None = None
        if sampling.row_seeds is not None:
            if len(sampling.row_seeds) != len(prompt_ids):
                raise ValueError(f"{len(sampling.row_seeds)} row seeds for {len(prompt_ids)} prompts")
            generator = [torch.Generator().manual_seed(seed) for seed in sampling.row_seeds]
        elif sampling.seed is not None:
            generator = torch.Generator().manual_seed(sampling.seed)
        out: list[Completion] = []
        size = self.cfg.max_batch_size
        for start in range(0, len(prompt_ids), size):
            chunk = generator[start : start + size] if isinstance(generator, list) else generator
            out.extend(self._generate_batch(prompt_ids[start : start + size], sampling, chunk))
        return out

    def _generate_batch(
        self, all_prompts: list[list[int]], sp: SamplingParams, generator: torch.Generator | list[torch.Generator] | None
    ) -> list[Completion]:
        # n samples of a prompt share its prefill: run each distinct prompt once, then copy its
        # cache rows. With n=8 that removes 7/8 of the prefill, most of a short rollout's cost.
        first_row: dict[tuple[int, ...], int] = {}
        prompts: list[list[int]] = []
        source = []
        for p in all_prompts:
            key = tuple(p)
            if key not in first_row:
                first_row[key] = len(prompts)
                prompts.append(p)
            source.append(first_row[key])
        B = len(all_prompts)
        # Several samples of a prompt decode over one copy of its cache; otherwise each row gets its
        # own, with room reserved up front (no torch.cat of the whole cache per token). The decode
        # kernel reads a prompt once per row either way and skips its padding, so with it even
        # distinct prompts take the split cache.
        grouped = self.model.config._attn_implementation == GROUPED_ATTENTION
        shared = grouped and (len(prompts) < B or self.decode_kernel)
        cache = SharedPrefixCache(room=sp.max_new_tokens, kernel=self.decode_kernel) if shared else PreallocatedCache(room=sp.max_new_tokens)
        logits, attention, positions = self._prefill(prompts, cache, root=shared_start(prompts) if shared and len(prompts) > 1 else 0)
        if len(prompts) < B or shared:
            expand = torch.tensor(source)
            cache.share(expand, attention)
            if len(prompts) < B:
                logits, attention, positions = logits[expand], attention[expand], positions[expand]
        next_pos = positions[:, -1] + 1
        fused = self.fused_decode is not None and shared
        record = self.decode_outputs.begin(all_prompts, sp.max_new_tokens) if fused and sp.for_training and self.decode_outputs else None
        rows = list(range(B))  # original row of each live cache row; finished rows are dropped
        reasons = ["length"] * B
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        for step in range(sp.max_new_tokens):
            chosen, chosen_logp_t = self._choose(logits, sp, generator, rows)
            chosen_logp = chosen_logp_t.tolist()
            chosen_ids = chosen.tolist()
            done = [False] * len(rows) if sp.ignore_eos else torch.isin(chosen, self.eos_ids).tolist()
            for j, i in enumerate(rows):
                tokens[i].append(chosen_ids[j])
                logps[i].append(chosen_logp[j])
                if not done[j] and sp.stop and self._hits_stop_string(tokens[i], sp.stop):
                    done[j] = True
                if done[j]:
                    reasons[i] = "stop"
            if all(done) or step == sp.max_new_tokens - 1:  # no forward for a token never sampled
                break
            if any(done):
                # Drop finished rows from the cache: the remaining steps cost only live rows.
                keep = torch.tensor([j for j, d in enumerate(done) if not d])
                cache.batch_select_indices(keep)
                rows = [rows[j] for j in keep.tolist()]
                chosen, attention, next_pos = chosen[keep], attention[keep], next_pos[keep]
            if not shared:  # the shared cache holds its prompts' padding itself and its suffixes have none
                attention = torch.cat([attention, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            if fused:
                if record is not None:
                    record.at_step(rows, step)
                logits = self.fused_decode.step(cache, chosen, next_pos, record)
            else:
                with cache.decoding():
                    logits = self.model(
                        input_ids=chosen[:, None], attention_mask=None if shared else attention, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True,
                    ).logits[:, -1]
            next_pos = next_pos + 1
        if record is not None:
            record.finish(tokens)
        return [Completion(token_ids=tokens[i], logprobs=logps[i], finish_reason=reasons[i]) for i in range(B)]

    def _prefill(
        self, prompts: list[list[int]], cache: SharedPrefixCache | PreallocatedCache, root: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the prompts into `cache`: the last position's logits [P, V], and the cache's padding
        mask and positions [P, W]. The first `root` tokens, which every prompt shares (a shared
        cache only), run once and are copied to each prompt's rows: with the quickstart's chat
        template that is 27 of the 56 tokens of an evaluation prompt."""
        rest = [p[root:] for p in prompts]
        width = max(len(p) for p in rest)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), root + width), dtype=torch.long)
        attention[:, :root] = 1
        for i, p in enumerate(rest):  # left padding keeps every row's next token in the last column
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, root + width - len(p) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        prefill_cache: Any = cache
        if root:
            prefill_cache = DynamicCache()
            self.model.get_decoder()(
                input_ids=torch.tensor([prompts[0][:root]]), position_ids=positions[:1, :root], past_key_values=prefill_cache, use_cache=True
            )
            for layer in prefill_cache.layers:  # views: the prompts' own tokens are appended by copy
                layer.keys, layer.values = layer.keys.expand(len(prompts), -1, -1, -1), layer.values.expand(len(prompts), -1, -1, -1)
        # The last position as an index tensor, not logits_to_keep=1: the int form hands the
        # lm_head a strided view [B, 1, H] of the hidden states, which torch's CPU matmul ran
        # 75-450x slower than a contiguous copy in bf16 (64 prompts: 3.7 s against 8 ms), longer
        # than all the rest of the prefill. Indexing with a tensor copies the rows out first.
        logits = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions[:, root:], past_key_values=prefill_cache,
            use_cache=True, logits_to_keep=torch.tensor([width - 1]),
        ).logits[:, -1]
        if root:  # the shared cache takes the whole prompts, root included, as its prefill
            for index, layer in enumerate(prefill_cache.layers):
                cache.update(layer.keys, layer.values, index)
        return logits, attention, positions

    def _choose(
        self, logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | list[torch.Generator] | None, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per live row from its logits [rows, vocab], with its logprob under logits / T."""
        if sp.greedy:
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            chosen = logp_all.argmax(-1)
            return chosen, logp_all.gather(-1, chosen[:, None]).squeeze(-1)
        if isinstance(generator, list):  # each live row from its own stream
            uniform = torch.cat([draw_uniform(1, generator[i]) for i in rows])
        else:
            uniform = draw_uniform(len(rows), generator)
        unfiltered = sp.top_k == 0 and sp.top_p >= 1.0
        if unfiltered and self.decode_kernel:
            # The same draw as `sample_from`, in two passes over the logits (llmrl/kernels/sampling.cpp).
            # It sits in the decode kernels' library, so their switch; they only load for a CPU model,
            # whose dtype (rollout.dtype) is float32 or bfloat16, the two the kernel takes.
            return torch.ops.llmrl_kernels.sample_rows(logits.contiguous(), sp.temperature, uniform)
        logits = logits.float()
        scaled = logits if sp.temperature == 1.0 else logits / sp.temperature  # x / 1 == x: one vocab pass fewer
        logp_all = torch.log_softmax(scaled, dim=-1)
        if unfiltered:
            probs = logp_all.exp()  # reuse the log-softmax, one vocab pass fewer
        else:
            probs = torch.softmax(filter_logits(scaled, sp.top_k, sp.top_p), dim=-1)
        chosen = sample_from(probs, uniform)
        return chosen, logp_all.gather(-1, chosen[:, None]).squeeze(-1)

    def _hits_stop_string(self, ids: list[int], stops: list[str]) -> bool:
        # Stop strings can straddle token boundaries, so look at a short decoded tail.
        longest = max(len(s) for s in stops)
        tail = self.tokenizer.decode(ids[-(longest + 8) :], skip_special_tokens=False)
        return any(s in tail for s in stops)

    # ------------------------------------------------------------------ score
    @torch.no_grad()
    def score(self, prefix_ids: list[list[int]], continuation_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        results: list[list[float]] = []
        size = self.cfg.max_batch_size
        for start in range(0, len(prefix_ids), size):
            prefixes = prefix_ids[start : start + size]
            conts = continuation_ids[start : start + size]
            seqs = [p + c for p, c in zip(prefixes, conts)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            wanted = torch.zeros_like(ids, dtype=torch.bool)
            for i, (s, p) in enumerate(zip(seqs, prefixes)):
                ids[i, : len(s)] = torch.tensor(s)
                attn[i, : len(s)] = 1
                wanted[i, len(p) : len(s)] = True
            logp, _, _ = sequence_logprobs(self.model, ids, attn, temperature=temperature, only=wanted)
            for i, (p, c) in enumerate(zip(prefixes, conts)):
                results.append(logp[i, len(p) : len(p) + len(c)].tolist())
        return results

    # ------------------------------------------------------------------ weights
    def metrics(self) -> dict[str, float]:
        return {}  # nothing to report beyond the loop's own timings

    def begin_weight_update(self) -> None:
        pass  # weights are copied in place bucket by bucket; nothing to prepare

    def finish_weight_update(self) -> None:
        pass  # every bucket is in effect as soon as it is copied

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for name, tensor in named_tensors:
            target = params.get(name, buffers.get(name))
            if target is None:
                if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                    continue  # tied: arrives as embed_tokens.weight
                raise KeyError(f"rollout engine has no weight named {name}")
            target.copy_(tensor.to(target.dtype))


@register_rollout_engine("hf")
def _build_hf(cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer: Any, seed: int = 0) -> HFRolloutEngine:
    return HFRolloutEngine(cfg, model_cfg, tokenizer)

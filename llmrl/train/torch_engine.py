"""Single-process train engine: plain torch, fp32 master weights, optional bf16 autocast."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from llmrl.algorithms.base import Batch, LossContext, LossFn
from llmrl.batch import ROLLOUT_GAP, rollout_gap_sums, select_rows, split_micro_batches
from llmrl.host_memory import keep_freed_memory
from llmrl.models import GROUPED_ATTENTION, export_policy, is_lora, merged_state_dict
from llmrl.materialized_attention import materialized_scores
from llmrl.precision import resolve_precision
from llmrl.stored_weights import SAFETENSORS_DTYPES, load_stored_tensors, stored_tensor_specs
from llmrl.train.engine import NonFiniteUpdateError, TrainConfig, each_tensor_once, storage_key
from llmrl.train.fused_layers import fuse_training_layers
from llmrl.train.logprobs import head_logprobs, steady_weights
from llmrl.train.optimizer_state import allocate_adam_state
from llmrl.rollout.decode_outputs import DecodeOutputs
from llmrl.train.shared_prefix import PrefixPlan, plan_shared_prefix
from llmrl.train.supplied_linears import SupplyPlan, supply_plan, supplying_linears

TRAINER_STATE = "trainer_state.pt"
# The trainer state's key for "the trainable weights are the export at this relative path".
WEIGHTS_IN = "model_in"


def lr_lambda(cfg: TrainConfig, total_updates: int):
    def factor(update: int) -> float:
        if cfg.warmup_steps and update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(total_updates - cfg.warmup_steps, 1)
        progress = min((update - cfg.warmup_steps) / span, 1.0)
        if cfg.lr_schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1.0 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return factor


class TorchTrainEngine:
    """Owns a model and its optimizer; runs micro-batches with mini-batch-global normalisation.

    `model` must expose `get_decoder()` and, for logprobs, `get_output_embeddings()`; a
    `value_head` attribute (hidden -> 1) makes it a critic whose outputs include `values`.
    """

    # On a CPU, keep freed memory in the process (llmrl/host_memory.py). Subclasses whose
    # allocations vary in size from step to step (DeepSpeed's ZeRO gathers) turn it off.
    keeps_freed_memory = True

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        total_updates: int,
        temperature: float = 1.0,
        reference: torch.nn.Module | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.precision = resolve_precision(cfg.precision)
        self.temperature = temperature if temperature > 0 else 1.0
        self.reference = reference
        self.device = next(model.parameters()).device
        if self.device.type == "cpu" and self.keeps_freed_memory:
            keep_freed_memory()  # each step's large buffers reuse the last step's pages
        if cfg.fused_layers:
            for module in (model, reference):
                if module is not None:
                    fuse_training_layers(module)
        params = [p for p in model.parameters() if p.requires_grad]
        bad = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if bad:
            raise ValueError(
                f"trainable parameters must be fp32 master weights (pure-bf16 parameters lose small updates to rounding); got {bad[0]} as {dict(model.named_parameters())[bad[0]].dtype}"
            )
        self.params = params
        # The fused kernel is one pass over all tensors: 0.08 s against 0.48 s per SmolLM2-135M
        # step on 2 CPU cores (best of 3); other devices keep the default loop.
        fused = True if self.device.type in ("cpu", "cuda") else None
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused
        )
        # The moments now, below every activation, rather than in the holes the first update
        # leaves (llmrl/train/optimizer_state.py)
        allocate_adam_state(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_updates))
        self.nonfinite_streak = 0
        self.skipped_updates = 0
        self.updates = 0
        # A rollout engine in this process may keep its decode outputs for the update
        # (llmrl/rollout/decode_outputs.py); [token-layers supplied, token-layers run] this step.
        self.decode_outputs: DecodeOutputs | None = None
        self._reused = [0, 0]
        self._exported: tuple[Path, int] | None = None  # where save_policy last wrote, at which update

    # ------------------------------------------------------------------ forward
    def _autocast(self, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _fixed_weights(self) -> contextlib.ExitStack:
        """A block in which no weight changes (a step's micro-batches, a no-grad pass over a
        batch): the head pass's lm_head cast and autocast's casts of the other weights are each
        made once for the whole block. Autocast keeps its copies until its outermost block ends."""
        block = contextlib.ExitStack()
        block.enter_context(steady_weights())
        block.enter_context(self._autocast())
        return block

    def _outputs(self, model: torch.nn.Module, mb: Batch, want: set[str], entropy_grad: bool = True) -> dict[str, torch.Tensor]:
        # Every trainer pass (with or without grad, policy or reference) attends the same way, so
        # old, reference and new logprobs of a row agree to the bit before any update.
        with materialized_scores():
            return self._model_outputs(model, mb, want, entropy_grad)

    def _model_outputs(self, model: torch.nn.Module, mb: Batch, want: set[str], entropy_grad: bool) -> dict[str, torch.Tensor]:
        plan = self._shared_prefix_plan(model, mb, want)
        if plan is not None:
            return self._shared_prefix_outputs(model, plan, want, entropy_grad)
        decoder = model.get_decoder()
        self._reused[1] += int(mb["attention_mask"].sum()) * model.config.num_hidden_layers
        with self._autocast():
            hidden = decoder(
                input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"], use_cache=False
            ).last_hidden_state
            out: dict[str, torch.Tensor] = {}
            if want & {"logprobs", "entropy"}:
                logp, ent = head_logprobs(
                    model, hidden, mb["input_ids"], self.temperature, "entropy" in want, self.cfg.logprob_chunk_tokens,
                    only=mb["loss_mask"] > 0 if "loss_mask" in mb else None, entropy_grad=entropy_grad,
                    keep_logits_bytes=self.cfg.logprob_keep_logits_mb << 20,
                )
                out["logprobs"] = logp
                if ent is not None:
                    out["entropy"] = ent
            if "values" in want:
                v = model.value_head(hidden).squeeze(-1).float()
                # token-aligned: the value of the state that token t is sampled from
                out["values"] = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
        return out

    def _shared_prefix_plan(self, model: torch.nn.Module, mb: Batch, want: set[str]) -> PrefixPlan | None:
        # Values need every position's hidden state, and HF turns the KV cache off under
        # gradient checkpointing: both take the plain path.
        if not self.cfg.shared_prompt_forward or "values" in want or "loss_mask" not in mb:
            return None
        if getattr(model, "is_gradient_checkpointing", False):
            return None
        return plan_shared_prefix(mb)

    def _packs_responses(self, model: torch.nn.Module) -> bool:
        # the packed pass relies on llmrl_grouped seeing every attention call
        return self.cfg.packed_responses and getattr(model.config, "_attn_implementation", None) == GROUPED_ATTENTION

    def _shared_prefix_outputs(
        self, model: torch.nn.Module, plan: PrefixPlan, want: set[str], entropy_grad: bool
    ) -> dict[str, torch.Tensor]:
        with self._autocast():
            hidden, supply = self._run_decoder(model, plan)
            # a supply comes from decode_outputs, which may hold the head's logits too
            kept = self.decode_outputs.logits if supply is not None else None
            logp, ent = head_logprobs(
                model, hidden, plan.suffix_ids, self.temperature, "entropy" in want, self.cfg.logprob_chunk_tokens,
                only=plan.suffix_loss_mask > 0, entropy_grad=entropy_grad, keep_logits_bytes=self.cfg.logprob_keep_logits_mb << 20,
                supplied_logits=None if kept is None else (kept, supply.suffix_rows),
            )
        out = {"logprobs": plan.to_rows(logp)}
        if ent is not None:
            out["entropy"] = plan.to_rows(ent)
        return out

    def _run_decoder(self, model: torch.nn.Module, plan: PrefixPlan) -> tuple[torch.Tensor, SupplyPlan | None]:
        """The plan's decoder pass, its linears taking the rollout's kept decode outputs where
        there are current ones (llmrl/train/supplied_linears.py), and which tokens did."""
        packed = self._packs_responses(model)
        decoder = model.get_decoder()
        tokens = len(plan.root_ids) + int(plan.prefix_mask.sum()) + int(plan.suffix_mask.sum())
        store = self.decode_outputs
        supply = supply_plan(plan, store.current_entries(model)) if store is not None and packed else None
        layers = model.config.num_hidden_layers
        self._reused[1] += tokens * layers
        if supply is None:
            return plan.run_decoder(decoder, packed=packed), None
        with supplying_linears(decoder, store, supply) as supplied_layers:
            self._reused[0] += supply.supplied * supplied_layers
            return plan.run_decoder(decoder, packed=True), supply

    @torch.no_grad()
    def forward(self, batch: Batch, want: set[str], reference: bool = False, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """No-grad outputs for all rows, `micro_batch_size` rows at a time (default
        train.micro_batch_size, else 8); `reference=True` uses the frozen reference policy.

        With LoRA the reference is the base model with the adapter disabled, not a second copy.
        """
        micro_batch_size = micro_batch_size or self.cfg.micro_batch_size or 8
        model = self.model
        ctx: Any = contextlib.nullcontext()
        if reference:
            if self.reference is not None:
                model = self.reference
            elif is_lora(self.model):
                ctx = self.model.disable_adapter()
            else:
                raise ValueError("reference logprobs requested but no reference model is loaded")
        was_training = model.training
        model.eval()
        B, T = batch["input_ids"].shape
        results: dict[str, torch.Tensor] = {}
        with ctx, self._fixed_weights():
            for start in range(0, B, micro_batch_size):
                rows = list(range(start, min(start + micro_batch_size, B)))
                mb = {k: v[rows] for k, v in batch.items()}
                for key, value in self._outputs(model, mb, want).items():
                    full = results.setdefault(key, torch.zeros(B, T, dtype=torch.float32))
                    full[rows, : value.shape[1]] = value.float()
        model.train(was_training)
        return results

    # ------------------------------------------------------------------ update
    def all_reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Data-parallel hook: named numbers summed over ranks (loss denominators, metric sums).
        One process has nothing to reduce."""
        return values

    def local_rows(self, mini_batch: Batch) -> Batch:
        """The rows of a mini-batch this engine computes: all of them in one process; a
        data-parallel engine takes its rank's share here."""
        return mini_batch

    def _micro_batches(self, rows: Batch) -> list[Batch]:
        return split_micro_batches(rows, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)

    def step(self, mini_batch: Batch, loss_fn: LossFn, ctx: LossContext) -> dict[str, float]:
        """One optimizer step over a mini-batch, split here into micro-batches by
        train.micro_batch_size or train.micro_batch_tokens. Without `old_logprobs` the update
        is on-policy and takes them from its own forward (detached), saving a separate forward
        pass. `ctx.measure_rollout_gap` logs mean |rollout logprob - trainer logprob| over the
        sampled policy tokens of the trained rows, and of the skipped ones too under
        train.logprob_diff_skipped_rows."""
        micro_batches = self._micro_batches(self.local_rows(mini_batch))
        want = set(getattr(loss_fn, "outputs", ("logprobs", "entropy")))
        differentiated = getattr(loss_fn, "gradient_outputs", None)
        entropy_grad = "entropy" in (differentiated(ctx.cfg) if differentiated else want)
        track_rollout_diff = ctx.measure_rollout_gap
        denominators: dict[str, float] = {}
        for mb in micro_batches:
            for part, d in loss_fn.denominators(mb, ctx).items():
                denominators[part] = denominators.get(part, 0.0) + float(d)
        denominators = self.all_reduce_sums(denominators)

        self.model.train()
        self._discard_grads()
        self._reused = [0, 0]
        metric_sums: dict[str, float] = {}
        metric_counts: dict[str, float] = {}
        total_loss = 0.0
        rows_total = rows_trained = 0
        # The weights hold still until the optimizer step: casts made for one micro-batch serve all.
        # The backward runs with autocast off, as torch advises.
        with self._fixed_weights():
            for index, mb in enumerate(micro_batches):
                rows_total += mb["input_ids"].shape[0]
                keep = self._rows_with_gradient(mb, loss_fn, ctx)
                if keep is not None:
                    skipped = select_rows(mb, (~keep).nonzero().flatten())
                    skipped_metrics = getattr(loss_fn, "skipped_row_metrics", None)
                    for name, value in (skipped_metrics(skipped, ctx) if skipped_metrics else {}).items():
                        self._add_sums(metric_sums, metric_counts, name, value)
                    if track_rollout_diff and self.cfg.logprob_diff_skipped_rows:
                        self._add_sums(metric_sums, metric_counts, ROLLOUT_GAP, self._rollout_gap_without_update(skipped))
                    if not bool(keep.any()):
                        continue
                    mb = select_rows(mb, keep.nonzero().flatten())
                rows_trained += mb["input_ids"].shape[0]
                self._start_micro_batch()
                out = self._outputs(self.model, mb, want, entropy_grad)
                if "old_logprobs" not in mb and "logprobs" in out:
                    mb = {**mb, "old_logprobs": out["logprobs"].detach()}
                if track_rollout_diff and "logprobs" in out:
                    self._add_sums(metric_sums, metric_counts, ROLLOUT_GAP, rollout_gap_sums(mb, mb["old_logprobs"]))
                result = loss_fn(mb, out, ctx)
                loss = None
                for part, value in result.sums.items():
                    denom = denominators.get(part, 0.0)
                    if denom <= 0:
                        continue  # e.g. no expert rows in this mini-batch: the part is absent
                    term = result.weights.get(part, 1.0) * value / denom
                    loss = term if loss is None else loss + term
                if loss is not None and loss.requires_grad:
                    with self._autocast(enabled=False):
                        self._backward(loss, last=index == len(micro_batches) - 1)
                    total_loss += float(loss.detach())
                for name, (s, c) in result.metrics.items():
                    metric_sums[name] = metric_sums.get(name, 0.0) + float(s)
                    metric_counts[name] = metric_counts.get(name, 0.0) + float(c)

        grad_norm = self._clip_gradients()
        # Data-parallel ranks each saw a share of the mini-batch: make the figures the whole one's.
        totals = self.all_reduce_sums(
            {**{f"sum:{k}": v for k, v in metric_sums.items()}, **{f"count:{k}": v for k, v in metric_counts.items()},
             "loss": total_loss, "rows_total": float(rows_total), "rows_trained": float(rows_trained)}
        )
        metric_sums = {k[4:]: v for k, v in totals.items() if k.startswith("sum:")}
        metric_counts = {k[6:]: v for k, v in totals.items() if k.startswith("count:")}
        total_loss, rows_total, rows_trained = totals["loss"], totals["rows_total"], totals["rows_trained"]
        metrics = {name: metric_sums[name] / metric_counts[name] for name in metric_sums if metric_counts[name] > 0}
        metrics["actor/rows_trained_frac"] = rows_trained / max(rows_total, 1)
        if self.decode_outputs is not None:
            metrics["actor/reused_decode_frac"] = self._reused[0] / max(self._reused[1], 1)
        metrics.update({"actor/loss": total_loss, "actor/grad_norm": grad_norm, "actor/lr": self.scheduler.get_last_lr()[0]})
        if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
            self._discard_grads()
            self.nonfinite_streak += 1
            self.skipped_updates += 1
            metrics["actor/skipped_updates"] = float(self.skipped_updates)
            if self.nonfinite_streak >= self.cfg.max_nonfinite_updates:
                raise NonFiniteUpdateError(
                    f"{self.nonfinite_streak} consecutive updates had a non-finite loss or grad norm "
                    f"(loss={total_loss}, grad_norm={grad_norm}); lower train.lr or check the reward scale"
                )
            return metrics
        stepped_norm = self._optimizer_step()
        if stepped_norm is not None:
            metrics["actor/grad_norm"] = stepped_norm
        self.nonfinite_streak = 0
        self.updates += 1
        metrics["actor/skipped_updates"] = float(self.skipped_updates)
        return metrics

    # Backend hooks: how gradients are made, clipped and applied (DeepSpeed overrides them).
    def _start_micro_batch(self) -> None:
        pass

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _clip_gradients(self) -> float:
        """Clip to train.grad_clip; return the pre-clip global norm."""
        for p in self.params:
            if p.grad is None:  # nothing ran backward: Adam still steps, as it would on zero grads
                p.grad = torch.zeros_like(p)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def _optimizer_step(self) -> float | None:
        """Apply the update; return the grad norm when the backend only knows it now."""
        self.optimizer.step()
        self.scheduler.step()
        return None

    def _discard_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _add_sums(sums: dict[str, float], counts: dict[str, float], name: str, value: tuple[float, float]) -> None:
        sums[name] = sums.get(name, 0.0) + value[0]
        counts[name] = counts.get(name, 0.0) + value[1]

    def _rollout_gap_without_update(self, skipped: Batch) -> tuple[float, float]:
        """rollout_gap_sums of rows that skip the update (zero advantage): they run no forward
        there, so their trainer logprobs come from a no-grad one here (train.logprob_diff_skipped_rows),
        and the step's rollout/logprob_diff covers every sampled token."""
        logprobs = skipped.get("old_logprobs")
        if logprobs is None:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                logprobs = self._outputs(self.model, skipped, {"logprobs"})["logprobs"].float()
            self.model.train(was_training)
        return rollout_gap_sums(skipped, logprobs)

    def _rows_with_gradient(self, mb: Batch, loss_fn: LossFn, ctx: LossContext) -> torch.Tensor | None:
        """[B] bool: the rows of `mb` the loss says carry a gradient, or None when all do, so the
        others cost no forward or backward. Off with train.skip_zero_advantage_rows=false."""
        select = getattr(loss_fn, "rows_with_gradient", None)
        if not self.cfg.skip_zero_advantage_rows or select is None:
            return None
        keep = select(mb, ctx)
        if keep is None or bool(keep.all()):
            return None
        return keep

    # ------------------------------------------------------------------ weights
    # Whether every data-parallel rank must iterate named_weights (and save_policy) together, as
    # under ZeRO-3 where each bucket is gathered from all ranks' partitions.
    weights_need_every_rank = False

    def named_weights(self, bucket_bytes: int = 256 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in each_tensor_once(merged_state_dict(self.model).items(), storage_key):
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    # ------------------------------------------------------------------ persistence
    def save_policy(self, directory: Path) -> None:
        """The policy as an HF directory `from_pretrained` loads (LoRA merged, adapter beside it)."""
        export_policy(self.model, Path(directory))
        # A plain model's export holds every trainable weight bit for bit (fp32, the model's own
        # names), so `save` into the same checkpoint can point at it instead of writing it again.
        self._exported = None if is_lora(self.model) else (Path(directory).resolve(), self.updates)

    def save(self, directory: Path) -> None:
        """Optimizer, scheduler and counters, plus the trainable weights (exact fp32). Where
        `save_policy` has just written these weights inside `directory`, the state names that
        export instead of holding a second copy (SmolLM2-135M: 513 MiB less a checkpoint)."""
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
            "skipped_updates": self.skipped_updates,
            "updates": self.updates,
        }
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        export = self._current_export_inside(Path(directory), trainable)
        if export is not None:
            state[WEIGHTS_IN] = export
        else:
            state["model"] = {n: p.detach().clone() for n, p in trainable.items()}
        torch.save(state, Path(directory) / TRAINER_STATE)

    def _current_export_inside(self, directory: Path, trainable: dict[str, torch.Tensor]) -> str | None:
        """The export's path relative to `directory`, if it holds the current trainable weights."""
        if self._exported is None or self._exported[1] != self.updates:
            return None
        export_dir, root = self._exported[0], directory.resolve()
        if not export_dir.is_relative_to(root):
            return None
        stored = stored_tensor_specs(export_dir)
        if any(stored.get(n) != (tuple(p.shape), SAFETENSORS_DTYPES.get(p.dtype)) for n, p in trainable.items()):
            return None  # a model whose export renames or recasts weights keeps its own copy
        return export_dir.relative_to(root).as_posix()

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=False)
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if WEIGHTS_IN in state:
            weights = load_stored_tensors(Path(directory) / state[WEIGHTS_IN])
            missing = [n for n in trainable if n not in weights]
            if missing:
                raise ValueError(f"checkpoint {directory}: {state[WEIGHTS_IN]}/ lacks the trainable weight {missing[0]}")
        else:
            weights = state["model"]
        with torch.no_grad():
            for name, param in trainable.items():
                if name in weights:
                    param.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.nonfinite_streak = state["nonfinite_streak"]
        self.skipped_updates = state["skipped_updates"]
        self.updates = state["updates"]
        self._exported = None

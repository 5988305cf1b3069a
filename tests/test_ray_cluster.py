"""`cluster.backend: ray`: the same loop with its train ranks and rollout engine in Ray actors,
weights moved by a gloo broadcast. Runs on a local Ray with more logical CPUs than cores (two
cores would not schedule three actors)."""
import math

import pytest
import torch

from llmrl.distributed.ray_cluster import balance_by_tokens, engine_sampling
from llmrl.loop import train
from llmrl.recipe import load_recipe

from test_e2e import QUICKSTART, TINY, read_metrics


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_prompts_are_balanced_by_tokens_not_count():
    # lengths 10, 1, 1, 1, 9. Longest first to the lighter engine (ties to the lower index):
    # 10 -> e0, 9 -> e1, 1 -> e1 (10:10), 1 -> e0 (11:10), 1 -> e1: 11 tokens each. Splitting
    # by count (first three, last two) would give 12 and 10.
    assert balance_by_tokens([10, 1, 1, 1, 9], 2) == [[0, 2], [1, 3, 4]]
    assert balance_by_tokens([3, 3, 3], 1) == [[0, 1, 2]]
    assert balance_by_tokens([5], 3) == [[0], [], []]


def test_each_engine_samples_with_a_seed_of_its_own():
    from llmrl.rollout.base import SamplingParams

    sampling = SamplingParams(seed=11)
    assert engine_sampling(sampling, 0) is sampling  # one engine: exactly the in-process samples
    seeds = [engine_sampling(sampling, k).seed for k in range(4)]
    assert seeds == [11, 11 + 104_729, 11 + 2 * 104_729, 11 + 3 * 104_729] and sampling.seed == 11
    assert engine_sampling(SamplingParams(seed=None), 2).seed is None


def two_steps(tmp_path, name, extra):
    common = TINY + [
        "reward.functions=[arithmetic, toy_token_fraction]", "train.steps=2", "train.lr=1e-4", "train.mini_batch_size=4",
        "logging.tensorboard=false", "checkpoint.every=0", "reward.num_workers=0",
        # fp32: DeepSpeed's bf16 mode keeps bf16 weights (fp32 only in the optimizer) where the
        # torch engine autocasts over fp32 weights, so only fp32 can match to 1e-5.
        "train.precision=fp32",
        # The shared-prompt forward is a different (equal in exact arithmetic) computation; several
        # DeepSpeed ranks turn it off, so all three runs use the plain forward.
        "train.shared_prompt_forward=false",
        # Adam moves a weight by lr * g / (|g| + eps): near |g| ~ eps, float-order noise in g
        # becomes up to lr / eps of weight change. ZeRO-3 adds the tied embedding's two gradient
        # parts in another order than autograd; at eps=1e-8 one clipped gradient of 4.5e-9 came
        # out as 1.9e-9, moving that weight 1.5e-5 apart after one update. eps=1e-6 bounds the
        # amplification 100x lower.
        "train.adam_eps=1e-6",
    ]
    return read_metrics(train(load_recipe(QUICKSTART, common + extra + [f"output_dir={tmp_path / name}"])))


TINY_RAY = [
    "train.backend=deepspeed", "train.zero_stage=3", "train.precision=fp32", "cluster.backend=ray", "cluster.train_workers.count=2",
    "rollout.weight_sync=broadcast",
]


@pytest.fixture(scope="module")
def ray_two_steps(tmp_path_factory, local_ray) -> list[dict]:
    """Two steps on Ray: 2 DeepSpeed ZeRO-3 ranks and 1 engine actor synced by broadcast. The
    reference of the equivalence test and of the engine-restart test (one run serves both)."""
    return two_steps(tmp_path_factory.mktemp("ray"), "ray", TINY_RAY)


@pytest.mark.slow
def test_same_numbers_in_process_on_deepspeed_and_on_ray(tmp_path, ray_two_steps):
    """2 steps three ways: torch in-process, DeepSpeed (ZeRO-2) in-process, and Ray with 2
    DeepSpeed ZeRO-3 ranks plus 1 engine actor synced by broadcast. The same samples (rewards)
    and the same updates (losses, grad norms within 1e-5) show the loop was not forked."""
    plain = two_steps(tmp_path, "torch", ["train.backend=torch"])
    deepspeed = two_steps(tmp_path, "deepspeed", ["train.backend=deepspeed", "train.zero_stage=2"])
    on_ray = ray_two_steps
    for rows in (deepspeed, on_ray):
        for want, got in zip(plain, rows):
            assert got["reward/mean"] == want["reward/mean"] and got["response/length_mean"] == want["response/length_mean"]
            for key in ("actor/loss", "actor/grad_norm", "actor/pg_loss"):
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (key, want["step"])
    assert plain[1]["reward/mean"] != plain[0]["reward/mean"] or plain[1]["actor/loss"] != plain[0]["actor/loss"]
    # the broadcast moved every weight: the tiny model's full state dict, in fp32
    assert on_ray[0]["sync/bytes"] == plain[0]["sync/bytes"] > 0
    assert all(math.isfinite(r["time/sync"]) for r in on_ray)


def padded_batch(rows: list[list[int]], prompt_lens: list[int], advantages: list[float]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width)
    for i, (row, p) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        loss_mask[i, p : len(row)] = 1
    return {
        "input_ids": ids, "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "loss_mask": loss_mask, "advantages": torch.tensor(advantages)[:, None] * loss_mask, "rollout_logprobs": torch.zeros(len(rows), width),
    }


@pytest.mark.slow
def test_broadcast_sync_gathers_two_zero3_ranks_weights_into_an_engine_actor(local_ray, tmp_path):
    """The tiny model (tied embeddings) in fp32: 2 DeepSpeed ZeRO-3 ranks take one update, then
    the gloo broadcast carries the weights, gathered from both ranks' partitions 4 MiB at a time,
    into an engine actor. After the sync the engine's teacher-forced logprobs match the trainer's;
    before it they are at least 10x further apart. (The vLLM engine takes the same path in the
    2-node test, which starts the session's one vLLM actor.)"""
    from llmrl.algorithms import LOSSES, AlgorithmConfig, resolve_algorithm
    from llmrl.algorithms.base import LossContext
    from llmrl.distributed.cluster import build_cluster
    from llmrl.distributed.weight_sync import build_weight_sync
    from llmrl.models import ModelConfig, load_causal_lm, load_tokenizer

    recipe = load_recipe(QUICKSTART, [
        "model.name=tiny", "rollout.dtype=float32", "train.backend=deepspeed", "train.zero_stage=3", "train.precision=fp32",
        "train.lr=1e-3", "train.micro_batch_size=2", "cluster.backend=ray", "cluster.train_workers.count=2",
        "rollout.weight_sync=broadcast", f"output_dir={tmp_path}",
    ])
    tokenizer = load_tokenizer("tiny")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in ("What is 7 * 6?", "Spell cat.", "Name a colour.", "What is 2 + 2?")]
    conts = [tokenizer.encode(t, add_special_tokens=False) for t in ("7 * 6 = 42.", "C, A, T.", "Blue.", "2 + 2 = 4.")]
    batch = padded_batch([p + c for p, c in zip(prompts, conts)], [len(p) for p in prompts], [1.0, -1.0, 1.0, -1.0])
    cluster = build_cluster(recipe)
    try:
        trainer = cluster.train_engine(recipe, total_updates=1, role="policy")
        rollout = cluster.rollout_engine(recipe, tokenizer)
        sync = build_weight_sync("broadcast", trainer, [rollout], bucket_bytes=4 << 20)
        sync.setup()
        nodes = {h.node_id for h in trainer.ranks + rollout.engines}
        assert len(trainer.ranks) == 2 and len(rollout.engines) == 1 and len(nodes) == 1  # one node here

        metrics = trainer.step(batch, LOSSES["ppo_clip"], LossContext(0, resolve_algorithm(AlgorithmConfig())))
        assert metrics["actor/grad_norm"] > 0
        logp = trainer.forward(batch, {"logprobs"})["logprobs"]  # data-parallel: 2 rows per rank
        want = torch.cat([logp[i, len(p) : len(p) + len(c)] for i, (p, c) in enumerate(zip(prompts, conts))])

        # The trainer's logprobs are of logits / the recipe's sampling temperature; score alike.
        temperature = recipe.rollout.temperature
        before = torch.cat([torch.tensor(r) for r in rollout.score(prompts, conts, temperature=temperature)])
        stats = sync.sync(step=1)
        after = torch.cat([torch.tensor(r) for r in rollout.score(prompts, conts, temperature=temperature)])
        gap_before, gap_after = (before - want).abs().mean(), (after - want).abs().mean()
        assert gap_after <= 1e-4, gap_after
        assert gap_before >= 10 * 1e-4, gap_before
        model = load_causal_lm(ModelConfig(name="tiny"))
        # every tensor once, fp32: tiny ties its lm_head to the embedding, which the engine re-ties
        assert model.config.tie_word_embeddings
        state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
        assert stats.bytes == sum(t.numel() * t.element_size() for t in state.values())
        # the same gathered weights through the object store (export, tools): what the engine got
        gathered = {n: t for bucket in trainer.named_weights(4 << 20) for n, t in bucket}
        assert sorted(gathered) == sorted(state) and all(t.shape == state[n].shape for n, t in gathered.items())
        assert any((gathered[n] - state[n]).abs().max() > 1e-4 for n in state)  # updated, not the initial weights
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_a_stuck_rollout_engine_ends_the_run_with_its_name_not_a_hang(tmp_path, local_ray, monkeypatch):
    import time

    from llmrl.distributed.ray_calls import ClusterError

    monkeypatch.setenv("LLMRL_TEST_FAULT", "rollout:0:generate:sleep=300:1")  # hangs in its first generate
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"rollout engine 0 on \S+: generate did not answer within 5 s"):
        two_steps(tmp_path, "stuck", TINY_RAY + ["cluster.timeouts.call_s=5"])
    assert time.monotonic() - started < 150  # start-up (under a minute in CI) plus 5 s, never the 300 s stall


def test_a_failure_caused_by_a_peer_dying_names_the_dead_peer(local_ray):
    """Rank 0 fails at once (as a gloo collective does when its peer's socket closes) while Ray
    reports rank 1's death a moment later: the error names the death, not the symptom. With no
    death behind it, the failure itself is reported after the grace period, not the deadline."""
    import os
    import time

    from llmrl.distributed.ray_calls import DEATH_GRACE_S, ActorHandle, ClusterError, gather

    @local_ray.remote(num_cpus=0.1)
    class Worker:
        def fail(self) -> None:
            raise RuntimeError("Connection closed by peer")

        def exit_after(self, seconds: float) -> None:
            time.sleep(seconds)
            os._exit(1)

        def sleep(self, seconds: float) -> None:
            time.sleep(seconds)

    ranks = [ActorHandle(Worker.remote(), f"train rank {k}", host="here") for k in range(2)]
    local_ray.get([r.actor.sleep.remote(0) for r in ranks])  # both started before the clock runs
    with pytest.raises(ClusterError, match=r"train rank 1 on here died during exit_after") as caught:
        gather([(ranks[0], "fail", (), {}), (ranks[1], "exit_after", (1.0,), {})], timeout=60)
    assert caught.value.kind == "died" and caught.value.handle is ranks[1]

    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"train rank 0 on here failed in fail: RuntimeError: Connection closed") as caught:
        gather([(ranks[0], "fail", (), {}), (ranks[0], "sleep", (30.0,), {})], timeout=60)
    assert caught.value.kind == "failed"
    assert DEATH_GRACE_S <= time.monotonic() - started < DEATH_GRACE_S + 10


def test_answers_gives_none_for_a_stuck_or_dead_actor_within_one_wait(local_ray):
    """The shutdown's peak-memory report (`ray_calls.answers`): every actor asked at once, one
    bounded wait in all; the stuck and the dead ones give None, and nothing raises."""
    import os
    import time

    from llmrl.distributed.ray_calls import ActorHandle, answers

    @local_ray.remote(num_cpus=0.1)
    class Worker:
        def value(self, x: int) -> int:
            return x

        def sleep(self, seconds: float) -> None:
            time.sleep(seconds)

        def exit(self) -> None:
            os._exit(1)

    stuck, dead, fine = (ActorHandle(Worker.remote(), f"engine {k}") for k in range(3))
    local_ray.get([h.actor.value.remote(0) for h in (stuck, dead, fine)])
    stuck.actor.sleep.remote(60)
    dead.actor.exit.remote()
    started = time.monotonic()
    got = answers([(stuck, "value", (1,), {}), (dead, "value", (2,), {}), (fine, "value", (3,), {})], timeout=3)
    assert got == [None, None, 3]
    assert time.monotonic() - started < 3 + 2


@pytest.mark.slow
def test_a_dead_train_rank_ends_the_run_naming_it_and_resume_continues(tmp_path, local_ray, monkeypatch):
    import json
    import time

    from llmrl.distributed.ray_calls import ClusterError

    run = ["train.steps=3", "checkpoint.every=1"]
    # 2 optimizer steps per RL step: the 3rd call is step 2's first update, mid-step
    monkeypatch.setenv("LLMRL_TEST_FAULT", "train:1:step:exit:3")
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"train rank \(policy\) 1 on \S+ died during step"):
        two_steps(tmp_path, "dead", TINY_RAY + run)
    assert time.monotonic() - started < 180  # start-up plus one step, never a collective timeout
    checkpoints = tmp_path / "dead" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1"]
    assert json.loads((checkpoints / "step_1" / "loop_state.json").read_text())["step"] == 1
    monkeypatch.delenv("LLMRL_TEST_FAULT")
    rows = two_steps(tmp_path, "dead", TINY_RAY + run + ["resume=auto"])
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_a_dead_rollout_engine_is_restarted_resynced_and_a_second_death_stops_the_run(tmp_path, local_ray, monkeypatch, ray_two_steps):
    """The engine dies in step 2's generate: a replacement starts, the broadcast group is formed
    again and the step-1 weights are sent before the prompts are resubmitted, so step 2 samples
    exactly what an uninterrupted run samples. The replacement dies too (its own 2nd generate,
    in step 3): past cluster.rollout_engines.max_restarts=1 that ends the run, naming it."""
    from llmrl.distributed.ray_calls import ClusterError

    monkeypatch.setenv("LLMRL_TEST_FAULT", "rollout:0:generate:exit:2")
    with pytest.raises(ClusterError, match=r"rollout engine 0 on \S+ died during generate.*after 1 restart\(s\)"):
        two_steps(tmp_path, "restarted", TINY_RAY + ["train.steps=3"])
    rows = read_metrics(tmp_path / "restarted")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["rollout/restarts"] for r in rows] == [0.0, 1.0]
    clean = ray_two_steps
    assert clean[1]["rollout/restarts"] == 0.0
    for key in ("reward/mean", "response/length_mean"):
        assert rows[1][key] == clean[1][key], key
    assert rows[1]["actor/loss"] == pytest.approx(clean[1]["actor/loss"], rel=1e-5, abs=1e-5)
    # The replacement served the synced step-1 weights, not the initial ones it loaded. (Without
    # the re-sync this run's step-2 reward was 0.078 against 0.0625: the test sees it.)
    assert rows[1]["rollout/logprob_diff"] == pytest.approx(clean[1]["rollout/logprob_diff"], rel=1e-6)


@pytest.mark.slow
def test_row_seeds_travel_with_their_prompts_to_two_engines(tmp_path, local_ray):
    """Evaluation seeds each sample (SamplingParams.row_seeds); spread over two engine actors,
    every prompt must still be drawn with its own seed: the same samples as one in-process engine."""
    from llmrl.distributed.ray_cluster import RayCluster
    from llmrl.models import load_tokenizer
    from llmrl.rollout.base import SamplingParams, build_rollout_engine

    recipe = load_recipe(QUICKSTART, TINY + [
        "cluster.backend=ray", "rollout.weight_sync=broadcast", "cluster.rollout_engines.count=2", f"output_dir={tmp_path}",
    ])
    tokenizer = load_tokenizer("tiny")
    prompts = [tokenizer.encode(text) for text in ("1 + 1 =", "a much longer prompt about 2 + 2 =", "3 + 3 =", "4 + 4 =")]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5, row_seeds=[101, 202, 303, 404])
    local = build_rollout_engine(recipe.rollout, recipe.model, tokenizer, seed=recipe.seed).generate(prompts, sampling)
    cluster = RayCluster(recipe)
    try:
        spread = cluster.rollout_engine(recipe, tokenizer).generate(prompts, sampling)
    finally:
        cluster.shutdown()
    assert [c.token_ids for c in spread] == [c.token_ids for c in local]
    assert len({tuple(c.token_ids) for c in local}) == 4

"""DeepSpeed ZeRO on gloo, for real: 2 data-parallel ranks, each on half a mini-batch, must make
the same update as 1 rank (and as the plain torch engine) on the whole mini-batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed not installed (pip install -e '.[deepspeed]')")

pytestmark = pytest.mark.slow
RANK_SCRIPT = str(Path(__file__).with_name("deepspeed_rank.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(backend: str, stage: int, world: int, out: Path, *extra: str) -> dict:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, RANK_SCRIPT, backend, str(stage), str(out), *extra], env=env, stderr=subprocess.PIPE, text=True))
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"rank {rank} of {world} ({backend}, ZeRO-{stage}) exited with {p.returncode}:\n{err[-3000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def torch_update(tmp_path_factory) -> dict:
    """The plain torch engine's update on the whole mini-batch, the reference of every test
    below without options (the torch engine has no ZeRO stage, so one run serves all)."""
    return run_ranks("torch", 2, 1, tmp_path_factory.mktemp("torch") / "torch.pt")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_make_the_same_update_as_one(tmp_path, stage, torch_update):
    plain = torch_update
    one = run_ranks("deepspeed", stage, 1, tmp_path / "one.pt")
    two = run_ranks("deepspeed", stage, 2, tmp_path / "two.pt")
    moved = [n for n, w in plain["weights"].items() if (w - plain["initial"][n]).abs().max() > 1e-4]
    for name, value in plain["weights"].items():
        # AdamW's first step moves every weight by about lr = 1e-3 whatever its gradient's size,
        # so a wrong gradient shows as differences near 2e-3. Where a gradient is near AdamW's
        # eps, though, rounding moves the step: DeepSpeed's gradients differ from torch's by
        # about 4e-6 of their norm, and the weights by up to 5.6e-6 under ZeRO-3 (measured).
        torch.testing.assert_close(one["weights"][name], value, rtol=0, atol=1e-5, msg=f"1 rank vs torch: {name}")
        torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=1e-5, msg=f"2 ranks vs torch: {name}")
    assert plain["metrics"]["actor/grad_norm"] == pytest.approx(two["metrics"]["actor/grad_norm"], rel=1e-5)
    assert len(moved) == len(plain["weights"]), "the step must move every weight, or the comparison proves little"


def test_token_budget_micro_batches_stay_in_step_across_zero3_ranks(tmp_path):
    """A padded-token budget of 20 splits rank 0's four rows into 2 micro-batches and rank 1's
    into 3. Under ZeRO-3 every forward and backward gathers weights from all ranks, so unequal
    counts would hang or mix up collectives: rank 0 must split once more, and the update must
    still be the torch engine's on the whole mini-batch."""
    plain = run_ranks("torch", 3, 1, tmp_path / "torch.pt", "tokens=20")
    two = run_ranks("deepspeed", 3, 2, tmp_path / "two.pt", "tokens=20")
    for name, value in plain["weights"].items():
        # Every weight within 5e-5, against the ~1e-3 a wrong gradient moves it by. The
        # micro-batches group rows differently from the one-process run, so sums run in another
        # order, and where a gradient is near AdamW's eps that moves the step: measured 3.2e-6
        # at most on an AVX-512 host, 1.5e-5 (a v_proj weight) on an AVX2 one.
        torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=5e-5, msg=f"2 ZeRO-3 ranks vs torch: {name}")


def test_chord_with_expert_rows_on_one_rank_makes_the_same_update(tmp_path, torch_update):
    """CHORD's two parts are each normalised over their own rows across micro-batches and ranks:
    with rows 0-2 expert rows, rank 0 of 2 holds all of them (one micro-batch of experts only)
    and rank 1 none, and the ZeRO-2 update must still be the one-process update on all 8 rows."""
    plain = run_ranks("torch", 2, 1, tmp_path / "torch.pt", "chord")
    two = run_ranks("deepspeed", 2, 2, tmp_path / "two.pt", "chord")
    baseline = torch_update
    for name, value in plain["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-5, atol=1e-6, msg=f"2 ranks vs torch: {name}")
    assert plain["metrics"]["actor/grad_norm"] == pytest.approx(two["metrics"]["actor/grad_norm"], rel=1e-5)
    assert two["metrics"]["chord/sft_loss"] == pytest.approx(plain["metrics"]["chord/sft_loss"], rel=1e-6)
    assert plain["metrics"]["chord/mu"] == pytest.approx(0.3)
    assert plain["metrics"]["actor/grad_norm"] != pytest.approx(baseline["metrics"]["actor/grad_norm"], rel=1e-3)


def test_cpu_optimizer_offload_makes_the_same_update(tmp_path, torch_update):
    """train.offload_optimizer (ZeRO-Offload: optimizer state and step on the CPU) on 2 ZeRO-2
    ranks: the same weights after the step as the plain torch engine."""
    plain = torch_update
    offloaded = run_ranks("deepspeed", 2, 2, tmp_path / "offload.pt", "offload")
    for name, value in plain["weights"].items():
        torch.testing.assert_close(offloaded["weights"][name], value, rtol=1e-5, atol=1e-6, msg=f"offload vs torch: {name}")
    assert plain["metrics"]["actor/grad_norm"] == pytest.approx(offloaded["metrics"]["actor/grad_norm"], rel=1e-5)


def test_loop_on_deepspeed_with_a_critic_resumes_exactly(tmp_path):
    """`train.backend: deepspeed` in the one loop (one rank here), PPO so the critic runs on
    DeepSpeed too; a run stopped after step 2 and resumed matches an uninterrupted one."""
    import json

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "arith_ppo.yaml")
    common = [
        "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
        "logging.progress=false", "eval.benches=[]", "train.backend=deepspeed", "reward.functions=[toy_token_fraction]",
        "train.lr=1e-3", "algorithm.critic_lr=1e-3", "algorithm.critic_warmup_steps=0", "checkpoint.every=1",
        "logging.tensorboard=false",
    ]

    def run(steps, out, *extra):
        cmd = [sys.executable, "-m", "llmrl.cli", "train", recipe, *common, f"train.steps={steps}", f"output_dir={out}", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(3, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(3, tmp_path / "b", "resume=auto")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert (tmp_path / "b" / "checkpoints" / "step_3" / "critic" / "deepspeed").is_dir()
    for key in ("reward/mean", "actor/loss", "actor/grad_norm", "critic/vf_loss", "critic/grad_norm"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key
    assert straight[0]["actor/grad_norm"] > 0 and straight[0]["critic/grad_norm"] > 0


def run_python(*lines: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that joins a lone DeepSpeed group first, then runs `lines`."""
    script = "\n".join(("from llmrl.train.deepspeed_engine import init_process_group", "init_process_group()", *lines))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def test_a_lone_process_group_leaves_no_rank_for_child_processes_to_inherit():
    """A process that trained on DeepSpeed alone (a notebook, a test) and then starts `llmrl
    train` must not hand it RANK/MASTER_PORT: the child would try to host the group's store on
    the port this process still holds, and fail."""
    done = run_python(
        "import os, subprocess, sys",
        "import torch.distributed as dist",
        "assert dist.get_world_size() == 1 and 'RANK' not in os.environ and 'MASTER_PORT' not in os.environ, dict(os.environ)",
        "child = 'from llmrl.train.deepspeed_engine import init_process_group; init_process_group(); print(\"child joined\")'",
        "sys.exit(subprocess.run([sys.executable, '-c', child], timeout=300).returncode)",
    )
    assert done.returncode == 0 and "child joined" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_a_process_with_deepspeed_and_an_in_process_vllm_engine_exits_cleanly():
    """DeepSpeed's exit hook leaves the process group; with vLLM in the same process it must
    leave the teardown to vLLM, whose own exit cleanup raised when the groups were gone."""
    pytest.importorskip("vllm")
    done = run_python(
        "from llmrl.models import ModelConfig, load_tokenizer",
        "from llmrl.rollout.base import RolloutConfig, build_rollout_engine",
        "build_rollout_engine(RolloutConfig(engine='vllm', dtype='float32'), ModelConfig(name='tiny'), load_tokenizer('tiny'))",
        "print('built')",
    )
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_start_up_builds_no_shm_op_and_leaves_muon_eager():
    """Two start-up costs llmrl skips (llmrl/train/deepspeed_startup.py): DeepSpeed's shared-
    memory all-reduce extension (a JIT build of about a minute in each fresh environment) and
    the torch.compile wrapping of Muon's kernel (inductor's import). A ZeRO-2 engine still builds
    and steps, and DeepSpeed's Muon class is importable for its isinstance checks."""
    done = run_python(
        "import sys, inspect",
        "backend = sys.modules['deepspeed.comm.comm'].cdb  # the torch backend init_process_group made",
        "from llmrl.train.deepspeed_engine import DeepSpeedTrainEngine",
        "from llmrl.train.engine import TrainConfig",
        "from llmrl.models import ModelConfig, load_policy",
        "assert backend.shm_comm_op is None, backend.shm_comm_op",
        "engine = DeepSpeedTrainEngine(load_policy(ModelConfig(name='tiny')), TrainConfig(precision='fp32', zero_stage=2), total_updates=1)",
        "muon = sys.modules['deepspeed.runtime.zero.muon.original_muon']",
        "assert inspect.isfunction(muon.zeropower_via_newtonschulz5), type(muon.zeropower_via_newtonschulz5)",
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam",
        "assert not isinstance(engine.optimizer, MuonWithAuxAdam)",
        "print('ok')",
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert "deepspeed_shm_comm" not in done.stdout + done.stderr

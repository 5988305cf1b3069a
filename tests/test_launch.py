"""launch/: the scripts parse, and the KubeRay manifest is a RayJob with what KubeRay needs.
(The 2-node test in test_ray_two_nodes.py drives launch/ray_cluster.sh for real.)"""
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

SCRIPTS = ["local.sh", "ray_cluster.sh", "slurm.sbatch", "setup_env.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scripts_without_arguments_print_usage_and_exit_2():
    for script in ("local.sh", "ray_cluster.sh"):
        out = subprocess.run(["bash", str(REPO / "launch" / script)], capture_output=True, text=True)
        assert out.returncode == 2 and "launch/" in out.stderr, (script, out.stderr)


def test_kuberay_manifest_is_a_rayjob_with_head_and_workers():
    job = yaml.safe_load((REPO / "launch" / "kuberay.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m llmrl.cli train ") and "cluster.address=auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert "object-store-memory" in cluster["headGroupSpec"]["rayStartParams"]
    workers = cluster["workerGroupSpecs"][0]
    assert workers["replicas"] >= 1 and workers["rayStartParams"]["num-gpus"] == "8"
    for pod in (cluster["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]):
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]  # /dev/shm for vLLM and gloo
        assert any(m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])
    recipe = spec["entrypoint"].split()[4]
    assert (REPO / recipe).exists()


def test_parameter_count_from_the_config_matches_the_loaded_models():
    from llmrl.distributed.memory import local_config, model_shape

    assert model_shape(local_config("smollm2-135m")).params == 134_515_008  # counted on the loaded model
    assert model_shape(local_config("tiny")).params == 3_219_776
    assert local_config("Qwen/Qwen2.5-1.5B-Instruct") is None  # a hub id: no config here, no guess


def test_train_rank_memory_by_zero_stage_worked_example():
    """P = 1e6 parameters, 2 ranks, fp32: weights 4P plus the 4P/2 fp32 master partition,
    optimizer 8P/2; gradients 4P at stage 1 and 4P/2 at stages 2 and 3; bf16 keeps a 2P bf16
    copy plus the master partition; stage 3 keeps 4P/2 of the weights, the master partition,
    and what it gathers."""
    from llmrl.distributed.memory import ModelShape, train_rank_bytes

    shape = ModelShape(params=1_000_000, hidden=64, layers=2, vocab=100, kv_dim=64)
    base = ["train.backend=deepspeed", "cluster.backend=ray", "cluster.train_workers.count=2", "rollout.weight_sync=broadcast"]
    from llmrl.recipe import load_recipe

    stage1 = train_rank_bytes(shape, load_recipe(None, base + ["train.precision=fp32", "train.zero_stage=1"]))
    stage2 = train_rank_bytes(shape, load_recipe(None, base + ["train.precision=fp32", "train.zero_stage=2"]))
    bf16 = train_rank_bytes(shape, load_recipe(None, base + ["train.precision=bf16", "train.zero_stage=2"]))
    assert (stage1["weights"], stage1["gradients"], stage1["optimizer"]) == (4_000_000 + 2_000_000, 4_000_000, 4_000_000)
    assert (stage2["weights"], stage2["gradients"], stage2["optimizer"]) == (4_000_000 + 2_000_000, 2_000_000, 4_000_000)
    assert bf16["weights"] == 2_000_000 + 2_000_000 and stage2["reference"] == 0
    # Stage 3: the weights partitioned too, plus the embedding (100 x 64) and two layers gathered,
    # each layer (1e6 - 6400) / 2 = 496_800 parameters; rank 0's sync holds 2 buckets of
    # min(1 MiB, the 4 MB model) each.
    stage3 = train_rank_bytes(shape, load_recipe(None, base + ["train.precision=fp32", "train.zero_stage=3", "rollout.sync_bucket_mb=1"]))
    whole = 6_400 + 2 * 496_800
    assert (stage3["weights"], stage3["gradients"], stage3["optimizer"]) == (2_000_000 + 2_000_000 + 4 * whole, 2_000_000, 4_000_000)
    assert stage3["weight_sync"] == 2 * (1 << 20) and stage2["weight_sync"] == 0
    with_kl = train_rank_bytes(shape, load_recipe(None, base + ["train.precision=fp32", "algorithm.kl_coef=0.1"]))
    assert with_kl["reference"] == 4_000_000


def test_validate_prints_placement_and_memory_for_a_cluster_recipe():
    out = subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "validate", str(REPO / "recipes" / "distributed_cpu.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "#   2 x train rank: 1 CPU, 0 GPU each on nodes with 'train_node'" in out.stdout
    assert "#   1 x rollout engine: 1 CPU, 0 GPU each on nodes with 'rollout_node'" in out.stdout
    assert out.stdout.count("memory each:") == 2 and "134.5M params" in out.stdout

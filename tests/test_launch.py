"""launch/: the scripts parse, and the KubeRay manifest is a RayJob with what KubeRay needs.
(The 2-node test in test_ray_two_nodes.py drives launch/ray_cluster.sh for real.)"""
import subprocess

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

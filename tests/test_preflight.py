"""`llmrl validate`'s checks on this machine: the training data can be read, and the GPUs the
recipe asks for against the ones visible."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmrl.cli import main
from llmrl.preflight import gpus_needed, resource_warnings
from llmrl.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def test_a_missing_data_path_is_exit_2_at_validate(capsys):
    assert main(["validate", str(REPO / "recipes" / "gsm8k_grpo.yaml"), "data.path=no/such/dir/x.jsonl"]) == 2
    assert "data.path: 'no/such/dir/x.jsonl' is not an existing file or directory" in capsys.readouterr().err


def test_a_hub_dataset_offline_is_exit_2_at_validate_with_the_hint(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(REPO / "recipes" / "gsm8k_grpo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "the hub is unreachable (HF_HUB_OFFLINE=1)" in err and "point data.path at a local copy" in err


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs the benchmark data beside the project")
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_passes_validate(recipe, capsys):
    raw = yaml.safe_load((REPO / "recipes" / recipe).read_text())
    data_type = (raw.get("data") or {}).get("type", "arithmetic")
    local = [] if data_type in ("arithmetic", "multihop") else [f"data.path={SHARED_DATA}"]
    if data_type == "math":
        local.append("data.split=test")  # the local copy holds MATH-500 only
    # search_igpo starts from search_sft's checkpoint, which exists only after that run
    model = ["model.name=smollm2-135m"] if str((raw.get("model") or {}).get("name", "")).startswith("runs/") else []
    assert main(["validate", str(REPO / "recipes" / recipe), *local, *model]) == 0, capsys.readouterr().err


def test_gpus_asked_for_against_gpus_visible():
    assert gpus_needed(load_recipe(None, ["rollout.engine=vllm", "rollout.tensor_parallel_size=2"])) == 2
    assert gpus_needed(load_recipe(None, ["rollout.engine=hf"])) == 0
    ray = ["cluster.backend=ray", "train.backend=deepspeed", "rollout.weight_sync=broadcast", "cluster.train_workers.count=4",
           "cluster.train_workers.num_gpus=1", "cluster.rollout_engines.count=2", "cluster.rollout_engines.num_gpus=2"]
    recipe = load_recipe(None, ray)
    assert gpus_needed(recipe) == 4 * 1 + 2 * 2
    assert resource_warnings(recipe, visible_gpus=8) == []
    (warning,) = resource_warnings(recipe, visible_gpus=0)
    assert warning.startswith("warning: the recipe needs 8 GPU(s) on the Ray cluster; this machine sees 0.")


def test_a_gpu_recipe_validates_here_with_a_warning(capsys):
    recipe = str(REPO / "recipes" / "gsm8k_grpo_8gpu.yaml")
    assert main(["validate", recipe, f"data.path={SHARED_DATA}"]) == 0
    captured = capsys.readouterr()
    assert "# warning: the recipe needs 8 GPU(s) on the Ray cluster; this machine sees 0." in captured.out
    assert "llmrl: warning: the recipe needs 8 GPU(s)" in captured.err

"""The torch engine's trainer state: weights stored once per checkpoint, and exact resume from it."""
import pytest
import torch

from llmrl.algorithms.base import LossContext
from llmrl.models import LoraConfig, ModelConfig, load_policy
from llmrl.train.engine import TrainConfig
from llmrl.train.torch_engine import TRAINER_STATE, WEIGHTS_IN, TorchTrainEngine
from tests.test_train_engine import TokenMeanPG, random_batch


def trained_engine(tiny_path, lora=False, steps=2):
    torch.manual_seed(0)
    model_cfg = ModelConfig(name=tiny_path, lora=LoraConfig(enabled=True, rank=4, alpha=8) if lora else LoraConfig())
    engine = TorchTrainEngine(load_policy(model_cfg), TrainConfig(lr=1e-2, precision="fp32"), total_updates=10)
    for step in range(steps):
        engine.step(random_batch(seed=step), TokenMeanPG(), LossContext(step, None))
    return engine, model_cfg


def trainable(engine):
    return {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}


def save_checkpoint_like(engine, directory):
    """The checkpoint's order: the policy export, then the trainer state beside it."""
    directory.mkdir()
    engine.save_policy(directory / "policy")
    engine.save(directory)
    return torch.load(directory / TRAINER_STATE, weights_only=False)


def test_the_trainer_state_points_at_the_policy_export_and_resume_restores_every_weight(tiny_path, tmp_path):
    engine, model_cfg = trained_engine(tiny_path)
    saved = trainable(engine)
    state = save_checkpoint_like(engine, tmp_path / "step_2")
    assert state[WEIGHTS_IN] == "policy" and "model" not in state
    beside = tmp_path / "copy"
    beside.mkdir()
    engine.save(beside)  # no export inside this directory: the weights are stored in the state
    assert set(torch.load(beside / TRAINER_STATE, weights_only=False)["model"]) == set(saved)
    # The exported file is the one copy: the state alone is the optimizer's two moments and counters.
    weights_bytes = sum(t.numel() * 4 for t in saved.values())
    assert (beside / TRAINER_STATE).stat().st_size - (tmp_path / "step_2" / TRAINER_STATE).stat().st_size > 0.95 * weights_bytes

    # A fresh engine on the untrained model resumes onto the same weights and optimizer, so the
    # next step lands where the uninterrupted engine's does.
    resumed = TorchTrainEngine(load_policy(model_cfg), TrainConfig(lr=1e-2, precision="fp32"), total_updates=10)
    assert any(not torch.equal(p, saved[n]) for n, p in trainable(resumed).items())
    resumed.load(tmp_path / "step_2")
    for name, value in trainable(resumed).items():
        assert torch.equal(value, saved[name]), name
    assert resumed.updates == engine.updates == 2
    for e in (engine, resumed):
        e.step(random_batch(seed=7), TokenMeanPG(), LossContext(2, None))
    after, after_resumed = trainable(engine), trainable(resumed)
    for name in after:
        assert torch.equal(after[name], after_resumed[name]), name


def test_an_export_from_before_the_last_update_is_not_pointed_at(tiny_path, tmp_path):
    engine, model_cfg = trained_engine(tiny_path)
    (tmp_path / "ckpt").mkdir()
    engine.save_policy(tmp_path / "ckpt" / "policy")
    engine.step(random_batch(seed=3), TokenMeanPG(), LossContext(2, None))
    engine.save(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / TRAINER_STATE, weights_only=False)
    assert WEIGHTS_IN not in state
    current = trainable(engine)
    for name, value in current.items():
        assert torch.equal(state["model"][name], value), name
    # Resume takes the state's own copy, not the stale export beside it.
    resumed = TorchTrainEngine(load_policy(model_cfg), TrainConfig(lr=1e-2, precision="fp32"), total_updates=10)
    resumed.load(tmp_path / "ckpt")
    for name, value in trainable(resumed).items():
        assert torch.equal(value, current[name]), name


def test_a_lora_policy_keeps_its_adapter_weights_in_the_state(tiny_path, tmp_path):
    engine, _ = trained_engine(tiny_path, lora=True, steps=1)
    state = save_checkpoint_like(engine, tmp_path / "ckpt")
    assert WEIGHTS_IN not in state  # the export is merged: the adapter's own weights are not in it
    assert state["model"] and all("lora_" in name for name in state["model"])


def test_an_export_missing_a_weight_is_named_on_resume(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    engine, model_cfg = trained_engine(tiny_path, steps=1)
    save_checkpoint_like(engine, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "policy" / "model.safetensors"
    tensors = load_file(str(file))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(file), metadata={"format": "pt"})
    resumed = TorchTrainEngine(load_policy(model_cfg), TrainConfig(precision="fp32"), total_updates=10)
    with pytest.raises(ValueError, match=f"policy/ lacks the trainable weight {dropped}"):
        resumed.load(tmp_path / "ckpt")

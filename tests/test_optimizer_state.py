"""Adam's state made up front (llmrl/train/optimizer_state.py) trains bit for bit as the lazy state does."""
import copy

import pytest
import torch

from llmrl.algorithms.base import LossContext
from llmrl.models import ModelConfig, load_policy
from llmrl.train.engine import TrainConfig
from llmrl.train.optimizer_state import allocate_adam_state
from llmrl.train.torch_engine import TorchTrainEngine
from tests.test_train_engine import TokenMeanPG, random_batch


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 2, 4))]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def _state_bits(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.dtype, str, list]]:
    return [
        (key, value.dtype, value.device.type, value.flatten().tolist())
        for p in optimizer.param_groups[0]["params"]
        for key, value in sorted(optimizer.state[p].items())
    ]


OPTIMIZERS = {
    "adamw fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "adam amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
}  # capturable=True steps only on an accelerator


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_eager_state_trains_exactly_as_the_lazy_state(kind):
    lazy_params, eager_params = _params(), _params()
    lazy, eager = OPTIMIZERS[kind](lazy_params), OPTIMIZERS[kind](eager_params)
    assert allocate_adam_state(eager)
    # what the first step would have made: zeros of each parameter's shape, step 0
    first = eager.state[eager_params[0]]
    assert float(first["step"]) == 0.0 and torch.equal(first["exp_avg"], torch.zeros(7, 5))
    _train(lazy, lazy_params, steps=3)
    _train(eager, eager_params, steps=3)
    for a, b in zip(lazy_params, eager_params):
        assert torch.equal(a, b)
    # the same keys, dtypes, devices and values: a state_dict saved from either loads into the other
    assert _state_bits(lazy) == _state_bits(eager)


def test_a_second_call_and_a_loaded_state_are_left_alone():
    params = _params()
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    _train(optimizer, params, steps=2)
    before = _state_bits(optimizer)
    assert allocate_adam_state(optimizer)
    assert _state_bits(optimizer) == before  # the trained moments and step count are kept

    # a resume: the up-front zeros are replaced by the checkpoint's state, and training goes on as it would have
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = torch.optim.AdamW(resumed_params, lr=1e-2, fused=True)
    allocate_adam_state(resumed)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: no tensor shared
    _train(optimizer, params, steps=2, seed=5)
    _train(resumed, resumed_params, steps=2, seed=5)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


def test_other_optimizers_are_not_touched():
    params = _params()
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert not allocate_adam_state(sgd)
    assert len(sgd.state) == 0


def test_the_engine_has_its_moments_before_its_first_update(tiny_path):
    model = load_policy(ModelConfig(name=tiny_path))
    engine = TorchTrainEngine(model, TrainConfig(lr=1e-3, precision="fp32", micro_batch_size=4), total_updates=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(float(engine.optimizer.state[p]["step"]) == 0.0 for p in trainable)
    moments = [engine.optimizer.state[p]["exp_avg"] for p in trainable]
    engine.step(random_batch(), TokenMeanPG(), LossContext(step=0, cfg=None))
    # the first update wrote into the tensors made up front rather than making new ones
    assert all(engine.optimizer.state[p]["exp_avg"] is m for p, m in zip(trainable, moments))
    assert all(float(engine.optimizer.state[p]["step"]) == 1.0 for p in trainable)
    assert any(m.abs().sum() > 0 for m in moments)

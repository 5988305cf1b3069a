"""Train backends by `train.backend` name: what builds a TrainEngine around a model."""
from __future__ import annotations

from typing import Any, Callable


def _torch(*args: Any, **kwargs: Any) -> Any:
    from llmrl.train.torch_engine import TorchTrainEngine

    return TorchTrainEngine(*args, **kwargs)


def _deepspeed(*args: Any, **kwargs: Any) -> Any:
    from llmrl.train.deepspeed_engine import DeepSpeedTrainEngine

    return DeepSpeedTrainEngine(*args, **kwargs)


# Each takes (model, train_config, total_updates, temperature=..., reference=...).
TRAIN_BACKENDS: dict[str, Callable[..., Any]] = {"torch": _torch, "deepspeed": _deepspeed}


def deepspeed_missing() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        return f"DeepSpeed is not importable ({err}): pip install -e '.[deepspeed]'"
    return None


BACKEND_REQUIREMENTS: dict[str, Callable[[], str | None]] = {"deepspeed": deepspeed_missing}


def build_train_backend(name: str, *args: Any, **kwargs: Any) -> Any:
    return TRAIN_BACKENDS[name](*args, **kwargs)

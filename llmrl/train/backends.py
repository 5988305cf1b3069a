"""Train backends by `train.backend` name: what builds a TrainEngine around a model.

Each factory takes (model, train_config, total_updates, temperature=..., reference=...) and
returns an engine implementing llmrl.train.engine.TrainEngine. The heavy import happens when the
backend is built, so the registry itself costs nothing.
"""
from __future__ import annotations

from typing import Any, Callable

from llmrl.registry import Registry

TRAIN_BACKENDS: Registry[Callable[..., Any]] = Registry("train backend")


def deepspeed_missing() -> str | None:
    import importlib.util

    # Looked up, not imported: importing DeepSpeed takes seconds and logs, too much for `validate`.
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed: pip install -e '.[deepspeed]'"
    return None


@TRAIN_BACKENDS.register("torch")
def _torch(*args: Any, **kwargs: Any) -> Any:
    from llmrl.train.torch_engine import TorchTrainEngine

    return TorchTrainEngine(*args, **kwargs)


@TRAIN_BACKENDS.register("deepspeed", requirement=deepspeed_missing)
def _deepspeed(*args: Any, **kwargs: Any) -> Any:
    from llmrl.train.deepspeed_engine import DeepSpeedTrainEngine

    return DeepSpeedTrainEngine(*args, **kwargs)


def build_train_backend(name: str, *args: Any, **kwargs: Any) -> Any:
    return TRAIN_BACKENDS[name](*args, **kwargs)

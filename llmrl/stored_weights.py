"""Tensors in a directory's safetensors files (an HF model directory, a checkpoint's policy/):
their names, shapes and dtypes from the headers alone, or the tensors themselves."""
from __future__ import annotations

from pathlib import Path

import torch

# safetensors' dtype names for the dtypes weights are kept in.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def stored_tensor_specs(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) for every tensor stored in the directory's files,
    read from the headers alone (tied embeddings are stored, and listed, once)."""
    from safetensors import safe_open

    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                specs[key] = (tuple(view.get_shape()), view.get_dtype())
    return specs


def load_stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors

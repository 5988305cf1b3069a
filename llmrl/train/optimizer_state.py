"""Adam's per-parameter state made when the engine starts, not at its first step.

torch's Adam and AdamW create each parameter's moments (two zero tensors the parameter's size)
the first time `step()` sees its gradient. In a trainer that is the end of the first update,
after that update's activations were freed: the moments (1.08 GB for SmolLM2-135M in fp32) land
in the holes the activations left, and the next update, whose sequences are longer, finds no
hole big enough and grows the heap. Growing it means faulting in fresh pages, which is slow on
these machines: at `bench/vs_trl.py`'s fp32 shape the second update grew the heap by 1.32 GiB,
took 69,000 page faults and 2.9 s of kernel time, and ran 1.6-2 s longer than its size explains
(docs/benchmarks.md, fourteenth session). Made before the first forward, the moments sit below
every activation, and the second update grew the heap by 0.25 GiB (7,220 faults, 0.67 s).

The state is what `Adam._init_group` makes (torch 2.x): a zero `step`, zero `exp_avg` and
`exp_avg_sq`, and `max_exp_avg_sq` under amsgrad; tests/test_optimizer_state.py checks that
training from it is bit for bit training from the lazy state, so a torch that changes the
layout fails there rather than training differently.
"""
from __future__ import annotations

import torch


def _step_tensor(group: dict, device: torch.device) -> torch.Tensor:
    # Adam keeps `step` on the parameter's device for its fused and capturable forms (always
    # float32 when fused), and as a CPU scalar of the default float type otherwise.
    if group.get("fused") or group.get("capturable"):
        dtype = torch.float32 if group.get("fused") else _default_scalar_dtype()
        return torch.zeros((), dtype=dtype, device=device)
    return torch.tensor(0.0, dtype=_default_scalar_dtype(), device="cpu")


def _default_scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> bool:
    """Give every parameter of an Adam/AdamW `optimizer` that has no state yet the state its first
    step would make; True when the optimizer is one of those, False (nothing done) otherwise."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            state["step"] = _step_tensor(group, param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return True

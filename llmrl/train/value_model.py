"""A critic: a causal LM's decoder with a scalar value head in place of the lm_head."""
from __future__ import annotations

import torch


class ValueModel(torch.nn.Module):
    def __init__(self, causal_lm: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = causal_lm.get_decoder()
        self.config = causal_lm.config
        self.value_head = torch.nn.Linear(self.config.hidden_size, 1)
        # Start near zero so early value estimates do not swamp the returns they are fit to.
        torch.nn.init.normal_(self.value_head.weight, std=1e-3)
        torch.nn.init.zeros_(self.value_head.bias)

    def get_decoder(self) -> torch.nn.Module:
        return self.decoder

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from llmrl.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from llmrl.models import load_tokenizer

    return load_tokenizer("tiny")


def right_padded(rows: list[tuple[list[int], list[int]]]) -> dict:
    """(prompt, response) token rows in the layout llmrl.batch.collate makes: right-padded, with
    positions from 0 and the responses as the loss positions."""
    import torch

    width, B = max(len(p) + len(r) for p, r in rows), len(rows)
    batch = {k: torch.zeros(B, width, dtype=torch.long) for k in ("input_ids", "attention_mask", "position_ids")}
    batch["loss_mask"] = torch.zeros(B, width)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        batch["input_ids"][i, :n] = torch.tensor(p + r)
        batch["attention_mask"][i, :n] = 1
        batch["position_ids"][i, :n] = torch.arange(n)
        batch["loss_mask"][i, len(p) : n] = 1
    return batch

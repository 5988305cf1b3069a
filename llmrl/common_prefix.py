"""The start that several token sequences share (a system prompt, a chat template's header), so
that a forward pass can run it once for all of them."""
from __future__ import annotations

from typing import Sequence


def shared_start(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the start all `sequences` share, short of the shortest one: each keeps at least
    one token of its own after it, whose hidden state is its own."""
    shortest = min(len(s) for s in sequences)
    for column in range(shortest - 1):
        if len({s[column] for s in sequences}) > 1:
            return column
    return max(shortest - 1, 0)

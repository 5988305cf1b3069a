"""An example custom reward, written the way a user would write one in their own file.

Use it from a recipe by path (relative to where `llmrl train` runs):

    reward:
      functions:
        - gsm8k
        - {fn: rewards/example_plugin.py:brevity, weight: 0.2, kwargs: {target_chars: 300}}

`rewards/` is not an installed package, so the file is loaded by path only (an importable module
would be named as `package.module:fn`). The built-in rewards live in `llmrl/reward/builtin/`.
"""
from __future__ import annotations

from llmrl.types import Task


def brevity(
    completion: str, task: Task, finish_reason: str, target_chars: int = 400
) -> dict[str, float]:
    """Prefer short, finished answers.

    `completion` and `task` are always passed. `finish_reason` is passed because the signature
    names it ("stop" or "length"); `trajectory` and `response` could be asked for the same way.
    Extra settings (`target_chars`) come from the spec's `kwargs`.

    Score: 1.0 up to `target_chars` characters, then linearly down to 0.0 at twice that; 0.0 for a
    completion cut off by the length limit. `score` drives advantages; `chars` is only logged
    (as `brevity/chars`).
    """
    chars = len(completion)
    if finish_reason == "length":
        score = 0.0
    else:
        score = min(1.0, max(0.0, 2.0 - chars / target_chars))
    return {"score": score, "chars": float(chars)}

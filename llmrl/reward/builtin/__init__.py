"""Built-in rewards. Importing the package registers each one by name with `llmrl.reward`.

| name                | module                          | returns                                     |
|---------------------|---------------------------------|---------------------------------------------|
| gsm8k               | llmrl.reward.builtin.gsm8k      | {score, acc}: number after last `####`      |
| gsm8k_flexible      | llmrl.reward.builtin.gsm8k      | {score, acc}: last number                   |
| math                | llmrl.reward.builtin.math       | {score, acc}: last `\\boxed{}`, math-verify |
| format              | llmrl.reward.builtin.format     | 1/0: regex match                            |
| overlong            | llmrl.reward.builtin.length     | DAPO length penalty in [-factor, 0]         |
| arithmetic          | llmrl.reward.builtin.arithmetic | {score, acc}: synthetic arithmetic task     |
| toy_token_fraction  | llmrl.reward.builtin.toy        | share of policy tokens with id % 10 == 0    |

`rewards/example_plugin.py` (outside the package, loaded by path) is a documented example of a
user reward and is not registered.
"""
# Importing the modules registers their rewards.
from llmrl.reward.builtin import arithmetic, format, gsm8k, length, math, toy  # noqa: F401
from llmrl.reward.builtin.gsm8k import canonical_number, gsm8k_extract
from llmrl.reward.builtin.math import extract_last_boxed, math_equal

__all__ = ["canonical_number", "extract_last_boxed", "gsm8k_extract", "math_equal"]

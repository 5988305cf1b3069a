"""Built-in rewards. Importing the package registers each one by name with `llmrl.reward`.

| name                | module          | returns                                   |
|---------------------|-----------------|-------------------------------------------|
| gsm8k               | rewards.gsm8k   | {score, acc}: number after last `####`    |
| gsm8k_flexible      | rewards.gsm8k   | {score, acc}: last number                 |
| math                | rewards.math    | {score, acc}: last `\\boxed{}`, math-verify |
| format              | rewards.format  | 1/0: regex match                          |
| overlong            | rewards.length  | DAPO length penalty in [-factor, 0]       |
| arithmetic          | rewards.arithmetic | {score, acc}: synthetic arithmetic task |
| toy_token_fraction  | rewards.toy     | share of policy tokens with id % 10 == 0  |

`rewards.example_plugin` is a documented example of a user reward and is not registered.
"""
from rewards import arithmetic, format, gsm8k, length, math, toy  # noqa: F401 - registers them
from rewards.gsm8k import canonical_number, gsm8k_extract
from rewards.math import extract_last_boxed, math_equal

__all__ = ["canonical_number", "extract_last_boxed", "gsm8k_extract", "math_equal"]

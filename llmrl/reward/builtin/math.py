"""MATH-style rewards: the last `\\boxed{}` answer, checked for equivalence with math-verify.

Extraction is ours, not math-verify's: math-verify reads several boxes as one set (so
`\\boxed{2}, then \\boxed{3}` fails against 3; see docs/rewards.md, `math`), while a grader should
take the model's last word as its answer, as verl `math_reward.py` / lm-eval do (MATH: Hendrycks
et al. 2021, arXiv 2103.03874). An answer that is not boxed scores 0. Equivalence is
math-verify's (sympy): `\\frac{2}{4}`, `0.5` and `\\frac12` all equal 1/2.
"""
from __future__ import annotations

import re
import threading
from types import ModuleType

from llmrl.reward import register_reward
from llmrl.reward.builtin.gsm8k import gold_answer
from llmrl.types import Task

# Per-expression parse and per-comparison verify limits. math-verify enforces them with
# signal.alarm, which works only in the main thread (Python's `signal` docs); pool workers run
# rewards there. Kept below the reward computer's default 10 s so sympy blow-ups end here
# without costing a worker restart.
MATH_VERIFY_TIMEOUT_S = 5

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` or `\\fbox{...}` (braces matched), or None.

    Also reads lm-eval's `\\boxed 5$` form. A last box left unclosed (a completion cut off by
    the length limit) or empty gives None: it is not an answer, and an earlier box is not the
    model's final word.
    """
    commands = list(_BOX_COMMAND.finditer(text))
    if not commands:
        return None
    position = commands[-1].end()
    rest = text[position:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        content = _braced(stripped)
    elif rest[:1].isspace():  # `\boxed 5$`: up to the closing `$` or the end of the line
        content = re.split(r"[$\n]", stripped, maxsplit=1)[0]
    else:
        content = None
    if content is None or not content.strip():
        return None
    return content.strip()


def _braced(text: str) -> str | None:
    """The contents of the group opening at text[0]; None if it never closes."""
    depth = 0
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # `\{`, `\}` and `\\` are not group braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[1:index]
        index += 1
    return None


def _timeout_s() -> int | None:
    # Off the main thread math-verify's signal timeout raises ValueError; None turns it off there
    # (the in-process reward mode, where the caller gives up timeouts anyway).
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_verify() -> ModuleType:
    # Imported when first needed, not with llmrl: it loads sympy (about 0.9 s), and a run or a test
    # that grades no MATH answer should not wait for it. Reward workers inherit it: `math_reward`'s
    # warm_up imports it before they fork.
    import math_verify

    return math_verify


def _parse_answer(answer: str) -> list:
    # Wrapped in a box so a bare gold such as `5` or `\frac{1}{2}` parses as LaTeX, the way verl
    # math_verify.py wraps its ground truth.
    return _math_verify().parse("\\boxed{" + answer + "}", parsing_timeout=_timeout_s())


def math_equal(pred_text: str, gold: str) -> bool:
    """Whether the answer `pred_text` (already extracted, e.g. `0.5`) equals `gold` mathematically."""
    if not pred_text.strip() or not gold.strip():
        return False
    gold_parsed = _parse_answer(gold)
    pred_parsed = _parse_answer(pred_text)
    if not gold_parsed or not pred_parsed:
        return False
    # Gold first: math-verify's comparison is not symmetric (docs/rewards.md, `math`).
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=_timeout_s()))


@register_reward("math", needs_answer=True, warm_up=_math_verify)
def math_reward(completion: str, task: Task) -> dict[str, float]:
    """1 when the last boxed answer equals the gold answer (math-verify), else 0."""
    gold = gold_answer(task)
    answer = extract_last_boxed(completion)
    correct = answer is not None and math_equal(answer, gold)
    return {"score": float(correct), "acc": float(correct)}

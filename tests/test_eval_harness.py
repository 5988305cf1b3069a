"""The evaluation harness: scripted engines for exact metrics, Ctrl-C and resume; the tiny model
through `llmrl eval` end to end; and the command's usage errors."""
import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from llmrl.eval.benchmarks import load_bench_tasks, resolve_bench
from llmrl.eval.cli import add_eval_arguments, config_from_args, main_eval, resolve_eval_model
from llmrl.eval.config import EvalConfig
from llmrl.eval.harness import EvalGraders, evaluate_bench, evaluate_during_training, evaluates_during_training, run_evaluation, should_evaluate
from llmrl.types import Completion

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class ScriptedEngine:
    """A rollout engine that answers the k-th request for a prompt with script[prompt][k]."""

    def __init__(self, tokenizer, script, interrupt_on_call=None):
        self.tokenizer = tokenizer
        self.script = script
        self.seen = Counter()
        self.calls = []
        self.interrupt_on_call = interrupt_on_call

    def generate(self, prompt_ids, sampling):
        self.calls.append(len(prompt_ids))
        if len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        out = []
        for prompt in prompt_ids:
            key = tuple(prompt)
            text = self.script[key][self.seen[key]]
            self.seen[key] += 1
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            out.append(Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# Six arithmetic items, two samples each. "R" = the gold answer, "W" = gold + 1, "-" = no number.
ARITHMETIC_PLAN = [("R", "R"), ("R", "W"), ("W", "W"), ("-", "R"), ("R", "R"), ("W", "-")]


def arithmetic_setup(tokenizer, **overrides):
    cfg = EvalConfig(**{"benches": ["arithmetic"], "limit": 6, "n": 2, "batch_size": 4, "reward_workers": 0, "progress": False, **overrides})
    bench_tasks = load_bench_tasks(resolve_bench("arithmetic"), tokenizer, cfg)
    texts = {"R": "It is {g}.\n#### {g}", "W": "#### {w}", "-": "I do not know."}
    script = {
        tuple(task.prompt_ids): [texts[code].format(g=task.answer, w=int(task.answer) + 1) for code in plan]
        for task, plan in zip(bench_tasks.tasks, ARITHMETIC_PLAN)
    }
    return cfg, bench_tasks, script


def check_arithmetic_results(entry, out_dir):
    metrics = entry["metrics"]
    assert metrics["pass@1"] == pytest.approx(6 / 12)
    # pass@2 per item: c=2 -> 1, c=1 -> 1 - C(1,2)/C(2,2) = 1, c=0 -> 0; four items have c >= 1.
    assert metrics["pass@2"] == pytest.approx(4 / 6)
    # maj@2: R,R ok; R,W tie -> first (R) ok; W,W no; -,R -> R ok; R,R ok; W,- -> W no.
    assert metrics["maj@2"] == pytest.approx(4 / 6)
    assert metrics["extracted_frac"] == pytest.approx(10 / 12)
    assert (metrics["items"], metrics["samples"]) == (6, 12)
    per_item = read_jsonl(out_dir / "per_item.jsonl")
    assert [row["num_correct"] for row in per_item] == [2, 1, 0, 1, 2, 0]
    assert [row["task_id"] for row in per_item] == [f"arith-test-{i:05d}" for i in range(6)]
    assert all(row["n"] == 2 for row in per_item)


def test_scripted_engine_gives_hand_computed_metrics(tokenizer, tmp_path):
    cfg, bench_tasks, script = arithmetic_setup(tokenizer)
    engine = ScriptedEngine(tokenizer, script)
    entry = evaluate_bench(engine, tokenizer, bench_tasks, cfg, tmp_path)
    check_arithmetic_results(entry, tmp_path)
    assert engine.calls == [4, 4, 4]
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert rows[1]["completion"].endswith(f"#### {bench_tasks.tasks[0].answer}")
    assert rows[1]["answer"] == bench_tasks.tasks[0].answer and rows[1]["correct"] is True
    assert rows[6]["answer"] is None and rows[6]["correct"] is False  # item 3's "I do not know."
    assert {"prompt", "completion", "answer", "gold", "correct", "finish_reason", "response_tokens"} <= rows[0].keys()
    assert entry["run"]["samples_generated"] == 12


def test_started_graders_grade_every_evaluation_and_stay_open(tokenizer, tmp_path):
    cfg, bench_tasks, script = arithmetic_setup(tokenizer, reward_workers=1)
    graders = EvalGraders([bench_tasks], cfg.reward_workers)
    try:
        (worker,) = graders.get("arithmetic")._pool._workers  # noqa: SLF001 - forked at construction
        assert worker.process.is_alive() and graders.get("gsm8k") is None
        for run in ("a", "b"):
            entry = evaluate_bench(ScriptedEngine(tokenizer, script), tokenizer, bench_tasks, cfg, tmp_path / run, graders=graders)
            check_arithmetic_results(entry, tmp_path / run)
        assert graders.get("arithmetic")._pool._workers == [worker] and worker.process.is_alive()  # noqa: SLF001
    finally:
        graders.close()
    assert not worker.process.is_alive()
    assert [evaluates_during_training(cfg.model_copy(update=u)) for u in ({}, {"every": 0}, {"at_end": False}, {"benches": []})] == [
        True, False, False, False]


def test_stop_strings_reach_the_engine(tokenizer, tmp_path):
    cfg, bench_tasks, script = arithmetic_setup(tokenizer, stop=["\n"])
    engine = ScriptedEngine(tokenizer, script)
    seen = []
    generate = engine.generate
    engine.generate = lambda prompt_ids, sampling: seen.append(sampling.stop) or generate(prompt_ids, sampling)
    evaluate_bench(engine, tokenizer, bench_tasks, cfg, tmp_path)
    assert seen == [["\n"]] * 3


def test_the_stop_flag_reads_backslash_n_as_a_newline():
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--bench", "arithmetic", "--stop", "\\n", "--stop", "END"])
    assert config_from_args(args).stop == ["\n", "END"]
    assert config_from_args(parser.parse_args(["--model", "tiny", "--bench", "arithmetic"])).stop == []


def test_ctrl_c_keeps_finished_batches_and_resume_generates_the_rest(tokenizer, tmp_path):
    cfg, bench_tasks, script = arithmetic_setup(tokenizer)
    with pytest.raises(KeyboardInterrupt):
        evaluate_bench(ScriptedEngine(tokenizer, script, interrupt_on_call=2), tokenizer, bench_tasks, cfg, tmp_path)
    kept = read_jsonl(tmp_path / "samples.jsonl")
    assert [(r["task_id"], r["sample"]) for r in kept] == [("arith-test-00000", 0), ("arith-test-00000", 1), ("arith-test-00001", 0), ("arith-test-00001", 1)]

    engine = ScriptedEngine(tokenizer, script)
    entry = evaluate_bench(engine, tokenizer, bench_tasks, cfg, tmp_path, resume=True)
    assert engine.calls == [4, 4]  # only the 8 missing samples
    assert (entry["run"]["samples_generated"], entry["run"]["samples_resumed"]) == (8, 4)
    assert read_jsonl(tmp_path / "samples.jsonl")[:4] == kept
    check_arithmetic_results(entry, tmp_path)


def test_resume_refuses_samples_from_another_prompt_format(tokenizer, tmp_path):
    from llmrl.eval.benchmarks import EvalError

    cfg, bench_tasks, script = arithmetic_setup(tokenizer)
    evaluate_bench(ScriptedEngine(tokenizer, script), tokenizer, bench_tasks, cfg, tmp_path)
    other_cfg, other_tasks, other_script = arithmetic_setup(tokenizer, instruction="Answer with a number.")
    with pytest.raises(EvalError, match="prompt_format"):
        evaluate_bench(ScriptedEngine(tokenizer, other_script), tokenizer, other_tasks, other_cfg, tmp_path, resume=True)


def test_math500_breakdown_by_subject_and_level(tokenizer, tmp_path):
    cfg = EvalConfig(benches=["math500"], data_dir=str(SHARED_DATA), limit=4, reward_workers=0, progress=False)
    bench_tasks = load_bench_tasks(resolve_bench("math500"), tokenizer, cfg)
    # Items: Precalculus L2 right; Intermediate Algebra L5 wrong; Algebra L3 right in another
    # form (\dfrac{14}{3} for \frac{14}{3}: math-verify equal); Number Theory L3 wrong.
    answers = ["\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\boxed{p + q}", "So \\boxed{\\dfrac{14}{3}}.", "\\boxed{8}"]
    script = {tuple(t.prompt_ids): [a] for t, a in zip(bench_tasks.tasks, answers)}
    results = run_evaluation(ScriptedEngine(tokenizer, script), tokenizer, cfg, tmp_path, prepared=[bench_tasks])
    entry = results["benches"]["math500"]
    assert entry["metrics"]["pass@1"] == 0.5
    assert entry["breakdown"]["subject"] == {
        "Algebra": {"pass@1": 1.0, "items": 1.0},
        "Intermediate Algebra": {"pass@1": 0.0, "items": 1.0},
        "Number Theory": {"pass@1": 0.0, "items": 1.0},
        "Precalculus": {"pass@1": 1.0, "items": 1.0},
    }
    assert entry["breakdown"]["level"] == {
        "2": {"pass@1": 1.0, "items": 1.0},
        "3": {"pass@1": 0.5, "items": 2.0},
        "5": {"pass@1": 0.0, "items": 1.0},
    }
    rows = read_jsonl(tmp_path / "math500" / "samples.jsonl")
    assert rows[2]["answer"] == "\\dfrac{14}{3}" and rows[2]["gold"] == "\\frac{14}{3}"
    assert read_jsonl(tmp_path / "math500" / "per_item.jsonl")[0]["subject"] == "Precalculus"


def test_evaluate_during_training_reports_named_metrics(tokenizer, tmp_path):
    cfg, bench_tasks, script = arithmetic_setup(tokenizer)
    metrics = evaluate_during_training(ScriptedEngine(tokenizer, script), tokenizer, cfg, step=3, output_dir=tmp_path)
    assert metrics["eval/arithmetic/pass@1"] == pytest.approx(0.5)
    assert metrics["eval/arithmetic/pass@2"] == pytest.approx(4 / 6)
    results = json.loads((tmp_path / "eval" / "step_3" / "results.json").read_text())
    assert results["model"] == {"step": 3}
    assert results["benches"]["arithmetic"]["metrics"]["pass@1"] == pytest.approx(0.5)
    assert should_evaluate(cfg.model_copy(update={"every": 2}), 4, 10) and not should_evaluate(cfg.model_copy(update={"every": 2}), 3, 10)
    assert should_evaluate(cfg, 10, 10) and not should_evaluate(cfg.model_copy(update={"at_end": False}), 10, 10)
    assert not should_evaluate(EvalConfig(every=1), 1, 10)  # no benches: never


def test_eval_every_zero_never_evaluates_not_even_at_the_end():
    """Before: eval.every=0 still evaluated after the last step (at_end defaulted to true)."""
    cfg = EvalConfig(benches=["arithmetic"])
    assert cfg.every is None
    assert [s for s in range(1, 11) if should_evaluate(cfg, s, 10)] == [10]  # unset: the end only
    assert [s for s in range(1, 11) if should_evaluate(cfg.model_copy(update={"every": 4}), s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if should_evaluate(cfg.model_copy(update={"every": 4, "at_end": False}), s, 10)] == [4, 8]
    assert [s for s in range(1, 11) if should_evaluate(cfg.model_copy(update={"every": 0}), s, 10)] == []
    assert [s for s in range(1, 11) if should_evaluate(cfg.model_copy(update={"every": 0, "at_end": True}), s, 10)] == []


def test_run_and_checkpoint_directories_resolve_to_the_newest_policy(tmp_path):
    run = tmp_path / "myrun"
    for step in (2, 10, 5):
        ckpt = run / "checkpoints" / f"step_{step}"
        (ckpt / "policy").mkdir(parents=True)
        (ckpt / "policy" / "config.json").write_text("{}")
        (ckpt / "loop_state.json").write_text(json.dumps({"step": step}))
    model = resolve_eval_model(str(run))
    assert model["path"] == str(run / "checkpoints" / "step_10" / "policy")
    assert (model["step"], model["label"]) == (10, "myrun-step_10")
    assert resolve_eval_model(str(run / "checkpoints" / "step_5"))["step"] == 5


# ---------------------------------------------------------------- `llmrl eval` with the tiny model

TINY_GSM8K = ["--model", "tiny", "--bench", "gsm8k", "--data", str(SHARED_DATA), "--limit", "4", "--n", "2",
              "--temperature", "1.0", "--max-new-tokens", "8", "--reward-workers", "0", "--no-progress"]


def test_tiny_model_end_to_end_then_resume(tiny_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main_eval(TINY_GSM8K + ["--output", str(out)]) == 0
    assert "gsm8k" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    entry = results["benches"]["gsm8k"]
    samples = read_jsonl(out / "gsm8k" / "samples.jsonl")
    per_item = read_jsonl(out / "gsm8k" / "per_item.jsonl")
    assert sorted((r["task_id"], r["sample"]) for r in samples) == [(f"gsm8k-test-{i:05d}", s) for i in range(4) for s in (0, 1)]
    assert [r["gold"] for r in samples[::2]] == ["18", "3", "70000", "540"]
    assert all(r["response_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in samples)
    assert len(per_item) == 4 and all(r["n"] == 2 for r in per_item)
    for item in per_item:
        assert item["num_correct"] == sum(r["correct"] for r in samples if r["task_id"] == item["task_id"])
    assert entry["metrics"]["pass@1"] == sum(r["correct"] for r in samples) / 8
    assert {"pass@1", "pass@2", "maj@2", "extracted_frac", "truncated_frac", "response_tokens_mean"} <= entry["metrics"].keys()
    assert (entry["metrics"]["items"], entry["metrics"]["samples"]) == (4, 8)
    data_file = SHARED_DATA / "gsm8k" / "test.jsonl"
    assert entry["data"]["file_sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert entry["data"]["source"] == str(data_file.resolve())
    assert entry["prompt_format"]["chat_template"] is True and "####" in entry["prompt_format"]["instruction"]
    assert entry["sampling"]["temperature"] == 1.0 and entry["sampling"]["n"] == 2
    assert results["model"]["path"] == tiny_path and len(results["model"]["sha256"]) == 64
    assert results["recipe"]["limit"] == 4 and results["started"] <= results["finished"]

    # Drop the last three samples; --resume generates exactly those.
    lines = (out / "gsm8k" / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "gsm8k" / "samples.jsonl").write_text("".join(lines[:-3]))
    assert main_eval(TINY_GSM8K + ["--output", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())["benches"]["gsm8k"]
    assert (resumed["run"]["samples_generated"], resumed["run"]["samples_resumed"]) == (3, 5)
    after = read_jsonl(out / "gsm8k" / "samples.jsonl")
    assert after[:5] == samples[:5] and len(after) == 8
    assert sorted((r["task_id"], r["sample"]) for r in after) == sorted((r["task_id"], r["sample"]) for r in samples)


def test_resumed_evaluation_draws_the_samples_of_an_uninterrupted_one(tiny_path, tmp_path):
    """Before: each batch was seeded by its position in the run's to-do list, so the samples a
    --resume generated differed from the ones an uninterrupted run drew for the same items."""
    def completions(out):
        return {(r["task_id"], r["sample"]): r["completion"] for r in read_jsonl(out / "gsm8k" / "samples.jsonl")}

    common = TINY_GSM8K + ["--batch-size", "3"]  # 4 items x 2 samples; a later --limit wins
    assert main_eval(common + ["--output", str(tmp_path / "whole")]) == 0
    whole = completions(tmp_path / "whole")
    assert len(whole) == 8 and len(set(whole.values())) > 4  # sampled at temperature 1: the draws differ
    # Interrupted: the first two items only, and the last sample of the second one lost.
    part = tmp_path / "part"
    assert main_eval(common + ["--output", str(part), "--limit", "2"]) == 0
    lines = (part / "gsm8k" / "samples.jsonl").read_text().splitlines(keepends=True)
    (part / "gsm8k" / "samples.jsonl").write_text("".join(lines[:-1]))
    assert main_eval(common + ["--output", str(part), "--resume"]) == 0
    resumed = json.loads((part / "results.json").read_text())["benches"]["gsm8k"]
    assert (resumed["run"]["samples_generated"], resumed["run"]["samples_resumed"]) == (5, 3)
    assert completions(part) == whole


def test_a_bench_file_with_a_bad_byte_exits_2_naming_the_line(tmp_path, capsys):
    """Before: a UnicodeDecodeError traceback from deep in pyarrow (exit 1)."""
    bench = tmp_path / "items.jsonl"
    bench.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "3"}\n')
    assert main_eval(["--model", "tiny", "--bench", str(bench), "--reward", "gsm8k", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{bench} line 2: not UTF-8 text (byte 0xe9 at column 16)" in err


@pytest.mark.parametrize(
    "argv, flag, words",
    [
        (["--bench", "gsm8k", "--n", "4", "--temperature", "0"], "--temperature", "n=4"),
        (["--bench", "gsm8k,gsm9k"], "--bench", "'gsm9k'"),
        (["--bench", "gsm8k", "--engine", "nosuch"], "--engine nosuch", "known: hf, vllm"),
        (["--bench", "my_items.jsonl"], "--bench my_items.jsonl", "--reward"),
        (["--bench", "gsm8k", "--data-option", "gsm8k"], "--data-option", "BENCH.KEY=VALUE"),
        (["--bench", "arithmetic", "--data-option", "arithmetic.difficulty=9"], "--data-option arithmetic.difficulty", "8"),
        (["--bench", "math500", "--few-shot", "2", "--data", str(SHARED_DATA)], "--few-shot", "math500"),
    ],
)
def test_usage_errors_exit_2_naming_the_flag(argv, flag, words, capsys):
    assert main_eval(["--model", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and words in err, err


def test_data_options_reach_the_arithmetic_generator(tokenizer):
    cfg = EvalConfig(benches=["arithmetic"], data_options={"arithmetic": {"difficulty": 3, "num_test": 5}})
    bench_tasks = load_bench_tasks(resolve_bench("arithmetic"), tokenizer, cfg)
    assert len(bench_tasks.tasks) == 5
    assert all(len(t.meta["expression"].split()) == 7 for t in bench_tasks.tasks)  # difficulty 3: four operands


def test_file_benchmark_graded_by_a_named_reward(tokenizer, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    cfg = EvalConfig(benches=[str(path)], reward="arithmetic", reward_workers=0, progress=False)
    bench_tasks = load_bench_tasks(resolve_bench(str(path), cfg.reward), tokenizer, cfg)
    assert bench_tasks.bench.name == "mine" and [t.task_id for t in bench_tasks.tasks] == ["q0", "q1", "q2"]
    script = {tuple(t.prompt_ids): [f"#### {a}"] for t, a in zip(bench_tasks.tasks, ["0", "2", "5"])}
    results = run_evaluation(ScriptedEngine(tokenizer, script), tokenizer, cfg, tmp_path, prepared=[bench_tasks])
    assert results["benches"]["mine"]["metrics"]["pass@1"] == pytest.approx(2 / 3)
    assert results["benches"]["mine"]["data"]["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_few_shot_and_plain_prompts(tokenizer):
    cfg = EvalConfig(benches=["gsm8k"], data_dir=str(SHARED_DATA), limit=1, few_shot=2, chat_template=False)
    bench_tasks = load_bench_tasks(resolve_bench("gsm8k"), tokenizer, cfg)
    prompt = tokenizer.decode(bench_tasks.tasks[0].prompt_ids)
    train = read_jsonl(SHARED_DATA / "gsm8k" / "train.jsonl")[:2]
    assert "<|im_start|>" not in prompt  # no chat template
    assert prompt.index(train[0]["question"]) < prompt.index(train[1]["question"]) < prompt.index("Janet")
    assert "#### 72" in prompt and "<<" not in prompt  # first shot's answer, calculator notes removed
    assert bench_tasks.prompt_format["few_shot"] == 2 and bench_tasks.prompt_format["example"] == prompt


def test_training_with_eval_every_zero_runs_no_evaluation(tmp_path):
    """A real 2-step run on the tiny model with benchmarks listed: every=0 leaves no eval/ directory
    and no eval/ metric; every unset (the quickstart's shape) evaluates once, after the last step."""
    from llmrl.loop import train
    from llmrl.recipe import load_recipe

    quickstart = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    tiny = [
        "model.name=tiny", "rollout.n=2", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=4",
        "logging.progress=false", "logging.tensorboard=false", "train.steps=2", "eval.limit=2", "eval.max_new_tokens=4",
        "eval.reward_workers=0", "eval.progress=false", "reward.num_workers=0",
    ]
    off = train(load_recipe(quickstart, tiny + ["eval.every=0", f"output_dir={tmp_path / 'off'}"]))
    rows = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and not any(k.startswith("eval/") for r in rows for k in r)
    assert not (off / "eval").exists()
    end = train(load_recipe(quickstart, tiny + [f"output_dir={tmp_path / 'end'}"]))
    rows = [json.loads(line) for line in (end / "metrics.jsonl").read_text().splitlines()]
    assert ["eval/arithmetic/pass@1" in r for r in rows] == [False, True]
    assert sorted(p.name for p in (end / "eval").iterdir()) == ["step_2"]


def test_the_progress_bar_counts_samples_and_shows_accuracy_and_tokens_per_second(tokenizer, tmp_path, monkeypatch):
    import tqdm

    seen = []

    class Recording(tqdm.tqdm):  # the real bar, with what it was told kept for the test
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            seen.append((self.n, dict(ordered_dict or {}, **kwargs)))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    cfg, bench_tasks, script = arithmetic_setup(tokenizer, progress=True)
    evaluate_bench(ScriptedEngine(tokenizer, script), tokenizer, bench_tasks, cfg, tmp_path)
    assert [n for n, _ in seen] == [4, 8, 12]  # samples, batch by batch
    assert seen[-1][1]["acc"] == "0.500" and float(seen[-1][1]["tok/s"]) > 0


def test_a_benchmark_that_cannot_be_read_fails_training_before_it_starts(tmp_path):
    """Before: the run trained every step, then failed at its evaluation, before the final checkpoint."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    missing = tmp_path / "missing.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "llmrl.cli", "train", str(repo / "recipes" / "quickstart.yaml"), "model.name=tiny", "train.steps=2",
         f"eval.benches=[{missing}]", "eval.reward=arithmetic", "logging.progress=false", f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=repo,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("llmrl: error: eval.benches: ") and str(missing) in last
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text().strip()

"""Plain-text prompts for base models (data.chat_template: false): one builder for training and
evaluation, the format recorded in recipe.yaml and followed by evaluation by default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmrl.cli import main
from llmrl.data import DataConfig, build_tasks
from llmrl.data.prompts import render_prompt
from llmrl.models import load_tokenizer
from llmrl.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "Question: {problem}\nAnswer:"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_plain_prompts_are_the_template_text_and_chat_prompts_are_not(tokenizer):
    plain = build_tasks(DataConfig(type="arithmetic", num_train=3, chat_template=False, instruction=TEMPLATE), tokenizer).tasks
    chat = build_tasks(DataConfig(type="arithmetic", num_train=3, instruction=TEMPLATE), tokenizer).tasks
    for p, c in zip(plain, chat):
        problem = p.messages[-1]["content"].removeprefix("Question: ").removesuffix("\nAnswer:")
        assert tokenizer.decode(p.prompt_ids) == f"Question: {problem}\nAnswer:\n"
        assert p.prompt_ids == tokenizer(f"Question: {problem}\nAnswer:\n")["input_ids"]
        assert "<|im_start|>" in tokenizer.decode(c.prompt_ids) and "<|im_start|>" not in tokenizer.decode(p.prompt_ids)
    # a system prompt is the first paragraph
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert tokenizer.decode(render_prompt(tokenizer, messages, chat_template=False)) == "Be brief.\n\n2+2?\n"


def test_evaluation_follows_the_training_format_unless_set():
    assert load_recipe(None, ["data.chat_template=false"]).eval.chat_template is False
    assert load_recipe(None, []).eval.chat_template is True
    assert load_recipe(None, ["data.chat_template=false", "eval.chat_template=true"]).eval.chat_template is True


def test_workflows_that_need_the_chat_template_refuse_plain_prompts():
    with pytest.raises(RecipeError, match="data.chat_template: false .* rollout.workflow 'guided'"):
        load_recipe(str(REPO / "recipes" / "arith_pope.yaml"), ["data.chat_template=false"])


@pytest.mark.slow
def test_a_run_trained_on_plain_prompts_records_it_and_llmrl_eval_follows_it(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
            "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]", "train.steps=1"]
    assert main(["train", str(REPO / "recipes" / "quickstart.yaml"), *tiny, "data.chat_template=false", f"output_dir={run}"]) == 0
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recorded["data"]["chat_template"] is False and recorded["eval"]["chat_template"] is False
    out = tmp_path / "eval"
    args = ["eval", "--model", str(run), "--bench", "arithmetic", "--limit", "2", "--max-new-tokens", "4", "--reward-workers", "0",
            "--no-progress", "--output", str(out)]
    assert main(args) == 0
    assert "plain-text prompts, as the run trained with" in capsys.readouterr().err
    prompts = [json.loads(line)["prompt"] for line in (out / "arithmetic" / "samples.jsonl").read_text().splitlines()]
    assert prompts and all("<|im_start|>" not in p for p in prompts)
    assert main(args[:-1] + [str(tmp_path / "eval_chat"), "--chat-template"]) == 0
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "eval_chat" / "arithmetic" / "samples.jsonl").read_text().splitlines()]
    assert all("<|im_start|>" in p for p in prompts)

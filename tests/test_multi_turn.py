"""The multi_turn workflow: turn batching, token bookkeeping, spans, limits, tool failures, the
information-gain scoring, and the chat-template protocol; then a real tiny model through it."""
from __future__ import annotations

import time

import pytest

from llmrl.batch import collate
from llmrl.data import build_tasks
from llmrl.data.config import DataConfig
from llmrl.reward import RewardComputer
from llmrl.reward.config import RewardConfig
from llmrl.rollout.base import SamplingParams
from llmrl.rollout.multi_turn import INFO_GAIN, MultiTurn, MultiTurnOptions
from llmrl.rollout.workflows import WorkflowContext
from llmrl.tools.base import TOOLS, Tool, register_tool
from llmrl.tools.protocols import ChatTemplateProtocol, TagProtocol
from llmrl.types import Completion, GroupIds


class ScriptedAgent:
    """A rollout engine that plays each task's demonstration (its meta expert_turns), one policy
    turn per call, chosen by how many tool results the prompt already holds. It checks our
    bookkeeping, not sampling; the last tests use the real hf engine."""

    def __init__(self, tokenizer, tasks, override=None, finish="stop"):
        self.tok = tokenizer
        self.turns = {t.task_id: [x["text"] for x in t.meta["expert_turns"] if x["role"] == "policy"] for t in tasks}
        self.by_prompt = {tuple(t.prompt_ids): t.task_id for t in tasks}
        self.override = override  # turn index -> text, replaces the demonstration
        self.finish = finish
        self.prompts: list[list[int]] = []
        self.calls = 0
        self.score_calls: list[int] = []

    def _task(self, ids):
        return next((tid, len(prompt)) for prompt, tid in self.by_prompt.items() if tuple(ids[: len(prompt)]) == prompt)

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        out = []
        for ids in prompt_ids:
            self.prompts.append(list(ids))
            task_id, prompt_len = self._task(ids)
            history = self.tok.decode(ids[prompt_len:])
            turn = history.count("<information>") + history.count("<|im_start|>tool")
            text = (self.override or {}).get(turn, self.turns[task_id][min(turn, 2)])
            tokens = self.tok.encode(text, add_special_tokens=False)
            out.append(Completion(tokens, [-0.25] * len(tokens), self.finish))
        return out

    def score(self, prefix_ids, continuation_ids, temperature=1.0):
        """log p(gold) = -1 per token once the gold answer has appeared in the history, else -3."""
        self.score_calls.append(len(prefix_ids))
        out = []
        for prefix, cont in zip(prefix_ids, continuation_ids):
            seen = self.tok.decode(cont).strip() in self.tok.decode(prefix)
            out.append([-1.0 if seen else -3.0] * len(cont))
        return out


@pytest.fixture
def tasks(tokenizer):
    return build_tasks(DataConfig(type="multihop", limit=3), tokenizer, split="train").tasks


def context(engine, tokenizer, n=2):
    rewards = RewardComputer(RewardConfig(functions=["search_f1"], num_workers=0))
    return WorkflowContext(engine, rewards, SamplingParams(max_new_tokens=8, seed=1), tokenizer, GroupIds(), 1, n)


def options(**kw):
    return MultiTurnOptions(**{"tools": {"search": {"corpus": "multihop", "topk": 2}}, **kw})


def test_an_agent_that_follows_the_demonstration(tokenizer, tasks):
    engine = ScriptedAgent(tokenizer, tasks)
    workflow = MultiTurn(options())
    groups = workflow.run(tasks, context(engine, tokenizer))
    assert engine.calls == 3  # one generate call per turn serves all 6 episodes
    trajectories = [t for g in groups for t in g.trajectories]
    assert len(groups) == 3 and len(trajectories) == 6
    for traj in trajectories:
        roles = [s.role for s in traj.spans]
        assert roles == ["prompt", "policy", "observation", "policy", "observation", "policy"]
        assert traj.turn_ends == [s.end - 1 for s in traj.spans if s.role == "policy"]
        mask = traj.policy_mask
        for span in traj.spans:
            assert set(mask[span.start : span.end]) == ({1.0} if span.role == "policy" else {0.0})
        assert traj.reward == 1.0 and traj.reward_parts["acc"] == 1.0  # the demonstration answers right
        assert traj.task.answer in traj.completion_text
        assert [x for x in traj.rollout_logprobs if x] == [-0.25] * traj.num_policy_tokens
    # every prompt the engine saw is a prefix of its episode's final tokens: never re-tokenised
    finals = [t.token_ids for t in trajectories]
    for prompt in engine.prompts:
        assert any(final[: len(prompt)] == prompt for final in finals)
    metrics = workflow.metrics()
    assert metrics["agent/turns_mean"] == 3 and metrics["agent/turns_max"] == 3
    assert metrics["agent/tool_calls"] == 12 and metrics["agent/tool_errors"] == 0
    assert metrics["agent/answer_rate"] == 1.0 and metrics["agent/tool_use_rate"] == 1.0
    assert metrics["agent/f1"] == 1.0 and metrics["agent/outcome_nonzero_groups"] == 0.0
    batch = collate(trajectories, pad_id=0)
    assert batch["turn_ids"][0][trajectories[0].turn_ends[-1]] == 2


def test_information_gain_is_scored_once_per_turn_and_placed_at_turn_ends(tokenizer, tasks):
    engine = ScriptedAgent(tokenizer, tasks)
    workflow = MultiTurn(options(info_gain="log_prob_diff"))
    groups = workflow.run(tasks, context(engine, tokenizer))
    # before turn 1, after turn 1, after turn 2 (the episode ends at turn 3): all 6 episodes each time
    assert engine.score_calls == [6, 6, 6]
    for traj in (t for g in groups for t in g.trajectories):
        gains = {e.position: e.value for e in traj.rewards if e.channel == INFO_GAIN}
        assert sorted(gains) == traj.turn_ends[:2]  # the last turn gets the outcome instead
        # the answer first appears in the second search's result: l goes -3, -3, -1
        assert [gains[p] for p in traj.turn_ends[:2]] == [0.0, 2.0]
    assert workflow.metrics()["agent/ig_turn2"] == 2.0 and workflow.metrics()["agent/ig_turn1"] == 0.0


def test_prob_diff_and_no_scoring_without_info_gain(tokenizer, tasks):
    engine = ScriptedAgent(tokenizer, tasks[:1])
    groups = MultiTurn(options(info_gain="prob_diff")).run(tasks[:1], context(engine, tokenizer, n=1))
    gain = [e.value for e in groups[0].trajectories[0].rewards if e.channel == INFO_GAIN]
    assert gain == pytest.approx([0.0, pytest.approx(2.718281828 ** -1 - 2.718281828 ** -3)])
    engine = ScriptedAgent(tokenizer, tasks[:1])
    groups = MultiTurn(options()).run(tasks[:1], context(engine, tokenizer, n=1))
    assert engine.score_calls == [] and all(e.channel == "outcome" for e in groups[0].trajectories[0].rewards)


def test_max_turns_ends_the_episode_without_running_the_last_call(tokenizer, tasks):
    engine = ScriptedAgent(tokenizer, tasks[:1], override={0: "<search>a</search>", 1: "<search>b</search>"})
    workflow = MultiTurn(options(max_turns=2))
    (group,) = workflow.run(tasks[:1], context(engine, tokenizer))
    traj = group.trajectories[0]
    assert [s.role for s in traj.spans] == ["prompt", "policy", "observation", "policy"]
    assert workflow.metrics()["agent/end_max_turns"] == 1.0 and workflow.metrics()["agent/tool_calls"] == 2
    assert traj.reward == -2.0  # no answer: the format penalty


def test_turn_and_context_limits(tokenizer, tasks):
    engine = ScriptedAgent(tokenizer, tasks[:1], override={0: "I think the answer is"}, finish="length")
    workflow = MultiTurn(options())
    (group,) = workflow.run(tasks[:1], context(engine, tokenizer, n=1))
    assert group.trajectories[0].finish_reason == "length" and workflow.metrics()["agent/end_turn_tokens"] == 1.0

    limit = len(tasks[0].prompt_ids) + 30  # room for the first turn, not for its whole observation
    engine = ScriptedAgent(tokenizer, tasks[:1])
    workflow = MultiTurn(options(max_context_tokens=limit))
    (group,) = workflow.run(tasks[:1], context(engine, tokenizer, n=1))
    traj = group.trajectories[0]
    assert len(traj.token_ids) == limit and traj.finish_reason == "length"
    assert traj.spans[-1].role == "observation" and workflow.metrics()["agent/end_context"] == 1.0


@register_tool("test_broken")
class Broken(Tool):
    def __call__(self, **arguments):
        raise RuntimeError("index offline")


@register_tool("test_slow")
class Slow(Tool):
    def __call__(self, **arguments):
        time.sleep(2.0)
        return "too late"


def test_failing_and_slow_tools_become_error_observations(tokenizer, tasks):
    script = {0: "<test_broken>x</test_broken>", 1: "<test_slow>y</test_slow>", 2: "<answer>no idea</answer>"}
    engine = ScriptedAgent(tokenizer, tasks[:1], override=script)
    workflow = MultiTurn(options(tools={"test_broken": {}, "test_slow": {}}, tool_timeout_s=0.3))
    (group,) = workflow.run(tasks[:1], context(engine, tokenizer, n=1))
    text = group.trajectories[0].completion_text
    assert "error: test_broken failed: RuntimeError: index offline" in text
    assert "error: test_slow timed out after 0.3 s" in text
    metrics = workflow.metrics()
    assert metrics["agent/tool_errors"] == 2 and metrics["agent/tool_timeouts"] == 1 and metrics["agent/answer_rate"] == 1.0
    assert "test_broken" in TOOLS


def test_unknown_tool_options_are_named():
    with pytest.raises(ValueError, match="search.*corpus"):
        MultiTurn(MultiTurnOptions(tools={"search": {"backend": "bm25"}}))._setup(None)
    with pytest.raises(ValueError, match="unknown protocol 'xml'"):
        MultiTurnOptions(protocol="xml")


def test_chat_template_protocol(tokenizer, tasks):
    protocol = ChatTemplateProtocol(["search"], tokenizer)
    call = protocol.parse('<tool_call>{"name": "search", "arguments": {"query": "Quessa"}}</tool_call>')
    assert call.calls == [("search", {"query": "Quessa"})]
    assert protocol.parse("<tool_call>{not json</tool_call>").malformed
    assert protocol.parse("<answer>Taluria</answer>").answer == "Taluria"
    # the result is wrapped the way the chat template writes a tool message, then the next assistant header
    assert protocol.observation_text(["Doc 1: x"]) == "<|im_end|>\n<|im_start|>tool\nDoc 1: x<|im_end|>\n<|im_start|>assistant\n"
    name = tasks[0].meta["expert_turns"][0]["text"][len("<search>"):-len("</search>")]
    script = {0: '<tool_call>{"name": "search", "arguments": {"query": "%s"}}</tool_call>' % name, 1: "<tool_call>{oops</tool_call>", 2: "<answer>x</answer>"}
    engine = ScriptedAgent(tokenizer, tasks[:1], override=script)
    workflow = MultiTurn(options(protocol="chat_template"))
    (group,) = workflow.run(tasks[:1], context(engine, tokenizer, n=1))
    traj = group.trajectories[0]
    assert f"Person {name} was born" in traj.completion_text
    assert workflow.metrics()["agent/tool_errors"] == 1 and workflow.metrics()["agent/tool_calls"] == 1
    assert "<|im_start|>tool" in tokenizer.decode(traj.token_ids)


def test_tag_protocol_parsing(tokenizer):
    protocol = TagProtocol(["search"], tokenizer)
    assert protocol.stop == ["</search>", "</answer>"]
    assert protocol.parse("let me look <search> Arlo Venn </search>").calls == [("search", {"query": "Arlo Venn"})]
    assert protocol.parse("<answer>Brem</answer>").answer == "Brem"
    assert protocol.parse("I do not know").calls == [] and protocol.parse("I do not know").answer is None


def test_real_tiny_model_through_the_workflow(tiny_path, tokenizer, tasks):
    """The hf engine samples freely (the random tiny model follows no protocol); whatever it writes,
    the bookkeeping holds: spans tile the sequence, prompts are prefixes, the batch collates."""
    from llmrl.models import ModelConfig
    from llmrl.rollout.base import RolloutConfig, build_rollout_engine

    engine = build_rollout_engine(RolloutConfig(engine="hf"), ModelConfig(name="tiny"), tokenizer)
    workflow = MultiTurn(options(max_turn_tokens=12, info_gain="log_prob_diff"))
    groups = workflow.run(tasks, context(engine, tokenizer, n=2))
    for traj in (t for g in groups for t in g.trajectories):
        assert traj.spans[0].start == 0 and all(a.end == b.start for a, b in zip(traj.spans, traj.spans[1:]))
        assert traj.spans[-1].end == len(traj.token_ids) and traj.token_ids[: len(traj.task.prompt_ids)] == traj.task.prompt_ids
        assert len(traj.turn_ends) >= 1
    collate([t for g in groups for t in g.trajectories], tokenizer.pad_token_id)
    assert workflow.metrics()["agent/score_calls"] >= 1  # l_0 for every episode, then one call per turn any survive

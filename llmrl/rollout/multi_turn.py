"""The `multi_turn` workflow: agents that alternate assistant turns with tool results (docs/agents.md).

Each task's n episodes start from its prompt. Every turn, one `engine.generate` call serves every
live episode of the step (all groups together); the turn stops at a protocol stop string (a
closing tool tag or `</answer>`), at EOS, or at `max_turn_tokens`. The turn's text is parsed by
the protocol (llmrl/tools/protocols.py): a final answer ends the episode; tool calls run together
in threads under `tool_timeout_s`, and their results are appended as an `observation` span.

Token ids are extended turn by turn and never re-tokenised from text: the assistant's tokens are
exactly what the engine sampled, and the observation's tokens are appended after them. Spans:
the prompt, then per turn a `policy` span and an `observation` span (loss weight 0). The IGPO
reference code trains on the tool tokens too (its response mask is the attention mask); we mask
them, as verl's agent loop does, because the policy did not choose them. `turn_ends` holds each
assistant turn's last token.

Information gain (IGPO, Wang et al. 2025, arXiv 2510.14967), when `info_gain` is set: before the
first turn and after each turn that the episode survives, the gold answer is teacher-forced after
the history (`info_gain_lead_in` + "<answer>" + gold) through `engine.score`, one call per turn for
every live episode; l_t is the mean log-prob of the gold tokens. Turn t (every turn but the last)
gets IG_t = exp l_t - exp l_{t-1} (prob_diff) or l_t - l_{t-1} (log_prob_diff) at its last token,
in reward channel `info_gain`; the last turn gets the outcome reward (channel `outcome`).

Limits: `max_turns` (the episode ends after that many turns; a tool call in the last one is not
run), `max_turn_tokens` (a longer turn is cut and ends the episode unanswered: finish_reason
length), `max_context_tokens` (prompt plus everything appended; a turn or observation that does not
fit is cut there and the episode ends) and `tool_timeout_s` (the call's observation is an error).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from llmrl.config_base import Section
from llmrl.rollout.base import WORKFLOWS
from llmrl.rollout.workflows import Workflow, WorkflowContext
from llmrl.tools.base import ToolRunner, build_tools
from llmrl.tools.protocols import ANSWER_OPEN, PROTOCOLS, ToolProtocol
from llmrl.types import Completion, FinishReason, Group, RewardEntry, Span, Task, Trajectory

INFO_GAIN = "info_gain"  # the reward channel of IGPO's turn rewards
END_REASONS = ("answered", "no_action", "max_turns", "turn_tokens", "context")


class MultiTurnOptions(Section):
    protocol: str = Field("tags", description="Tool-call protocol: tags (Search-R1's <search>/<information>/<answer>) or chat_template (<tool_call> JSON, results as tool messages).")
    tools: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"search": {"backend": "bm25", "corpus": "multihop", "topk": 2}},
        description="Tools by registered name, each with its options (search: backend, corpus, url, topk, max_chars, request_timeout_s).",
    )
    max_turns: int = Field(4, ge=1, description="Assistant turns per episode at most; a tool call in the last turn is not run and the episode ends unanswered.")
    max_turn_tokens: int = Field(64, ge=1, description="Tokens one assistant turn may generate; a turn that reaches it ends the episode (finish_reason length).")
    max_context_tokens: int = Field(1024, ge=16, description="Prompt plus every turn and observation; what does not fit is cut and the episode ends.")
    tool_timeout_s: float = Field(10.0, gt=0, description="Seconds a turn's tool calls may take; a call still running is an error observation (counted, never fatal).")
    info_gain: Literal["prob_diff", "log_prob_diff"] | None = Field(
        None,
        description="IGPO turn rewards: score the gold answer after each turn and reward the gain, prob_diff (exp l_t - exp l_t-1) "
        "or log_prob_diff (l_t - l_t-1); None = off. The igpo preset sets log_prob_diff.",
    )
    info_gain_lead_in: str = Field(
        "", description="Text before <answer> in the teacher-forced pseudo-response (IGPO's code closes its think block there; our protocol has none)."
    )

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, name: str) -> str:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
        return name


@dataclass
class Episode:
    task: Task
    group_id: int
    ids: list[int]
    prompt_len: int
    spans: list[Span] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    ell: list[float] = field(default_factory=list)  # l_0, l_1, ...: mean gold log-prob after each scored state
    end: str = ""
    finish_reason: FinishReason = "stop"
    tool_calls: int = 0

    @property
    def live(self) -> bool:
        return not self.end

    def append(self, role: str, ids: list[int], logprobs: list[float] | None = None) -> None:
        start = len(self.ids)
        self.ids.extend(ids)
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.spans.append(Span(role, start, len(self.ids), weight=1.0 if role == "policy" else 0.0))  # type: ignore[arg-type]


@dataclass
class StepCounts:
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    tool_seconds: list[float] = field(default_factory=list)
    score_calls: int = 0


@WORKFLOWS.register("multi_turn")
class MultiTurn(Workflow):
    Options = MultiTurnOptions

    def __init__(self, options: Section | None = None) -> None:
        super().__init__(options)
        self.options: MultiTurnOptions
        self.runner: ToolRunner | None = None
        self.protocol: ToolProtocol | None = None
        self.last_metrics: dict[str, float] = {}

    def _setup(self, tokenizer: Any) -> None:
        if self.runner is None:
            tools = build_tools(self.options.tools)
            self.runner = ToolRunner(tools, self.options.tool_timeout_s)
            self.protocol = PROTOCOLS[self.options.protocol](list(tools), tokenizer)

    # ------------------------------------------------------------------ run
    def run(self, tasks: list[Task], ctx: WorkflowContext) -> list[Group]:
        groups, episodes = self.rollout(tasks, ctx)
        self.score(groups, ctx)
        self._add_info_gain(groups, episodes)
        self.last_metrics.update(self._outcome_metrics(groups))
        return groups

    def rollout(self, tasks: list[Task], ctx: WorkflowContext) -> tuple[list[Group], list[Episode]]:
        """The groups (unscored) and their episodes, n per task, every turn batched across all of them."""
        self._setup(ctx.tokenizer)
        assert self.protocol is not None and self.runner is not None
        opts, counts = self.options, StepCounts()
        episodes = []
        groups_of = []
        for task in tasks:
            prompt = self.protocol.prompt_ids(task, list(self.runner.tools.values()))
            gid = ctx.group_ids.take()
            groups_of.append(gid)
            for _ in range(ctx.n):
                episodes.append(Episode(task, gid, list(prompt), len(prompt), [Span("prompt", 0, len(prompt))], [0.0] * len(prompt)))
        if opts.info_gain:
            self._score_gold(episodes, ctx, counts)
        sampling = ctx.sampling
        stop = sorted(set(sampling.stop) | set(self.protocol.stop))
        for turn in range(opts.max_turns):
            live = [ep for ep in episodes if ep.live]
            if not live:
                break
            # a fresh, reproducible sampling stream per turn
            seed = None if sampling.seed is None else sampling.seed + 104_729 * turn
            turn_sampling = dataclasses.replace(sampling, max_new_tokens=opts.max_turn_tokens, stop=stop, seed=seed)
            with ctx.timer("generate"):
                completions = ctx.engine.generate([ep.ids for ep in live], turn_sampling)
            pending: list[tuple[Episode, list[tuple[str, dict[str, Any]]], str | None]] = []
            for ep, completion in zip(live, completions):
                action = self._take_turn(ep, completion, ctx.tokenizer, last_turn=turn == opts.max_turns - 1)
                if action is not None:
                    pending.append(action)
            self._observe(pending, counts, ctx)
            if opts.info_gain:
                self._score_gold([ep for ep in episodes if ep.live], ctx, counts)
        groups = [Group(gid, task, []) for gid, task in zip(groups_of, tasks)]
        for ep, group in zip(episodes, [g for g in groups for _ in range(ctx.n)]):
            group.trajectories.append(self._trajectory(ep, ctx.tokenizer))
        self.last_metrics = self._episode_metrics(episodes, counts)
        return groups, episodes

    def _take_turn(self, ep: Episode, completion: Completion, tokenizer: Any, last_turn: bool) -> tuple[Episode, list, str | None] | None:
        """Append the sampled turn; return the episode's pending tool calls (None when it ended)."""
        assert self.protocol is not None
        room = self.options.max_context_tokens - len(ep.ids)
        ids, logprobs = list(completion.token_ids)[:room], list(completion.logprobs)[:room]
        if ids:
            ep.append("policy", ids, logprobs)
            ep.turn_ends.append(len(ep.ids) - 1)
        if len(ids) < len(completion.token_ids) or len(ep.ids) >= self.options.max_context_tokens:
            ep.end, ep.finish_reason = "context", "length"
            return None
        action = self.protocol.parse(tokenizer.decode(ids, skip_special_tokens=False))
        if action.answer is not None:
            ep.end = "answered"
        elif completion.finish_reason == "length":
            ep.end, ep.finish_reason = "turn_tokens", "length"
        elif not action.calls and action.malformed is None:
            ep.end = "no_action"
        elif last_turn:
            ep.end = "max_turns"
        else:
            return ep, action.calls, action.malformed
        return None

    def _observe(self, pending: list[tuple[Episode, list, str | None]], counts: StepCounts, ctx: WorkflowContext) -> None:
        """Run every pending call of the turn at once and append each episode's observation."""
        assert self.protocol is not None and self.runner is not None
        calls = [call for _, episode_calls, _ in pending for call in episode_calls]
        with ctx.timer("tools"):
            results = iter(self.runner.run(calls))
        for ep, episode_calls, malformed in pending:
            texts = [] if malformed is None else [f"error: {malformed}"]
            ep.tool_calls += len(episode_calls)
            counts.tool_errors += malformed is not None
            for _ in episode_calls:
                result = next(results)
                texts.append(result.text)
                counts.tool_calls += 1
                counts.tool_errors += not result.ok
                counts.tool_timeouts += result.timed_out
                counts.tool_seconds.append(result.seconds)
            obs = self.protocol.observation_ids(texts)
            room = self.options.max_context_tokens - len(ep.ids)
            ep.append("observation", obs[:room])
            if len(obs) >= room:
                ep.end, ep.finish_reason = "context", "length"

    # ------------------------------------------------------------------ information gain
    def _score_gold(self, episodes: list[Episode], ctx: WorkflowContext, counts: StepCounts) -> None:
        """l for each episode's current history: one engine.score call for all of them."""
        tok = ctx.tokenizer
        lead = tok.encode(self.options.info_gain_lead_in + ANSWER_OPEN, add_special_tokens=False)
        golds = [tok.encode(str(ep.task.answer or ""), add_special_tokens=False) for ep in episodes]
        for ep, gold in zip(episodes, golds):
            if not gold:  # no gold answer: no gain to measure (its IG turns are skipped)
                ep.ell.append(math.nan)
        scored_eps = [(ep, gold) for ep, gold in zip(episodes, golds) if gold]
        if not scored_eps:
            return
        with ctx.timer("info_gain"):
            scored = ctx.engine.score([ep.ids + lead for ep, _ in scored_eps], [gold for _, gold in scored_eps], temperature=1.0)
        counts.score_calls += 1
        for (ep, _), logprobs in zip(scored_eps, scored):
            ep.ell.append(float(np.mean(logprobs)))

    def _add_info_gain(self, groups: list[Group], episodes: list[Episode]) -> None:
        if not self.options.info_gain:
            return
        trajectories = [t for g in groups for t in g.trajectories]  # in episode order
        per_turn: dict[int, list[float]] = {}
        for traj, ep in zip(trajectories, episodes):
            gains = information_gains(ep.ell, self.options.info_gain)
            # turns 1..T-1 get their gain; the last turn has the outcome instead
            for t, (gain, end) in enumerate(zip(gains, traj.turn_ends[:-1])):
                if math.isfinite(gain):
                    traj.rewards.append(RewardEntry(end, INFO_GAIN, gain))
                    per_turn.setdefault(t + 1, []).append(gain)
        for t, values in sorted(per_turn.items()):
            self.last_metrics[f"agent/ig_turn{t}"] = float(np.mean(values))

    # ------------------------------------------------------------------ trajectories and metrics
    def _trajectory(self, ep: Episode, tokenizer: Any) -> Trajectory:
        spans = [s for s in ep.spans if len(s) or s.role == "prompt"]
        return Trajectory(
            task=ep.task, token_ids=list(ep.ids), spans=spans, rollout_logprobs=list(ep.logprobs),
            finish_reason=ep.finish_reason, group_id=ep.group_id,
            completion_text=tokenizer.decode(ep.ids[ep.prompt_len :], skip_special_tokens=True),
            turn_ends=list(ep.turn_ends),
        )

    def _episode_metrics(self, episodes: list[Episode], counts: StepCounts) -> dict[str, float]:
        turns = [len(ep.turn_ends) for ep in episodes]
        out = {
            "agent/turns_mean": float(np.mean(turns)),
            "agent/turns_max": float(max(turns)),
            "agent/tool_calls": float(counts.tool_calls),
            "agent/tool_calls_per_episode": counts.tool_calls / len(episodes),
            "agent/tool_use_rate": float(np.mean([ep.tool_calls > 0 for ep in episodes])),
            "agent/tool_errors": float(counts.tool_errors),
            "agent/tool_timeouts": float(counts.tool_timeouts),
            "agent/tool_latency_s": float(np.mean(counts.tool_seconds)) if counts.tool_seconds else 0.0,
            "agent/answer_rate": float(np.mean([ep.end == "answered" for ep in episodes])),
        }
        if self.options.info_gain:
            out["agent/score_calls"] = float(counts.score_calls)
        for reason in END_REASONS:
            out[f"agent/end_{reason}"] = float(np.mean([ep.end == reason for ep in episodes]))
        return out

    @staticmethod
    def _outcome_metrics(groups: list[Group]) -> dict[str, float]:
        """F1, and the share of groups whose outcome rewards differ: the groups that give GRPO's
        outcome-only advantage any signal."""
        f1 = [v for g in groups for t in g.trajectories for k, v in t.reward_parts.items() if k.endswith("/f1")]
        differ = [len({t.reward for t in g.trajectories}) > 1 for g in groups if len(g.trajectories) > 1]
        out = {"agent/outcome_nonzero_groups": float(np.mean(differ)) if differ else 0.0}
        if f1:
            out["agent/f1"] = float(np.mean(f1))
        return out

    def metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)


def information_gains(ell: list[float], kind: str) -> list[float]:
    """IG_t for t = 1..len(ell)-1 from l_0, l_1, ...: prob_diff exp l_t - exp l_{t-1}, or
    log_prob_diff l_t - l_{t-1} (IGPO, arXiv 2510.14967; docs/formulas.md#igpo-turn-reward)."""
    values = [math.exp(x) for x in ell] if kind == "prob_diff" else list(ell)
    return [b - a for a, b in zip(values, values[1:])]

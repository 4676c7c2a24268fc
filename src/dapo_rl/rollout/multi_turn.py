"""Multi-turn rollouts: the model calls tools or acts in an environment over several turns,
through any engine, token in and token out.

A trajectory is the prompt, then model turns and environment messages, kept as token ids: the
next turn's input is the previous ids + the model's ids as sampled + the ids of the environment's
message (rendered by the chat template as a continuation, :func:`~dapo_rl.data.templates.observation_glue`),
so the model's tokens are never re-tokenized. The result is one :class:`~dapo_rl.rollout.base.Sample`
per trajectory whose ``model_mask`` marks the model's tokens (the trainer trains those alone) and
whose ``logprobs`` are the sampler's on them (0 on the environment's).

Choices:

- **One decode loop where the engine can** (:meth:`RolloutEngine.generate_turns`, the fast
  engine). A trajectory whose turn ends gets its message, and the message's tokens are fed to it
  while the other rows go on sampling. The prompts are prefilled once. No turn waits for another.
- **Otherwise turn by turn.** The first turn of a prompt's ``n`` trajectories is one
  ``generate(prompts, n)`` call, as in a single-turn rollout. Later turns send each running
  trajectory's whole context (ids) as a prompt. The engine is told with
  :meth:`RolloutEngine.continue_conversations`, so it can continue what it kept (the fast
  engine prefills only the new tokens; vLLM's prefix cache does the same).
- **One budget per trajectory.** ``rollout.max_response_length`` bounds the whole trajectory after
  the prompt, model and environment tokens together. A turn is sampled with what is left. A
  message that would leave no room for the model ends the trajectory as truncated, so overlong
  filtering and the soft punishment see its whole length.
- **How turns end.** A turn ends at the model's end-of-turn token. Without an environment, a turn
  that calls no tool ends the trajectory, and each call's result (or error) is the next message.
  An environment decides with ``step``. ``rollout.max_turns`` bounds the model's turns: the last
  turn's reply is computed (an environment sees the final answer), but never shown.
- **Failures.** A tool's failure (an unreadable call, an unknown tool, bad arguments, an exception,
  a timeout) is an observation the model sees, counted by kind. An environment that raises ends
  its trajectory with the incorrect reward; ``max_environment_failures`` consecutive ones stop
  the run.
- **Tool calls** run inside the turn that made them. Turn by turn, the calls of a turn run
  concurrently (a thread each). In one decode loop, a call holds the loop until it returns,
  unless ``wait_steps`` > 0: then the row waits that many decode steps (its reply computed in a
  thread while every other row samples) and the loop waits only for a slower reply. The step a
  reply is fed at never depends on how long it took, so runs stay bit-reproducible.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from dapo_rl.config import ConfigError
from dapo_rl.data.templates import observation_glue
from dapo_rl.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, Sample, SamplingParams, TrajectoryStats
from dapo_rl.rewards.functions import RewardResult
from dapo_rl.tools import TOOL_ERROR_KINDS, TOOL_PARSERS, EnvironmentFailures, Tool, ToolCall, ToolCallError, ToolResult, load_environment, load_tools

TRUNCATED_MARK = " …(truncated)"  # the model sees that a long tool response was cut


@dataclass
class _Trajectory:
    prompt: list[int]
    row: dict[str, Any]
    environment: Any = None
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = FINISH_STOP
    done: bool = False
    stats: TrajectoryStats = field(default_factory=TrajectoryStats)

    def sample(self) -> Sample:
        return Sample(list(self.prompt), self.response, self.finish, logprobs=self.logprobs, model_mask=self.mask,
                      trajectory=self.stats)


class MultiTurnSampler:
    """Samples multi-turn trajectories through ``engine``.

    Args:
        engine: any rollout engine (it sees each turn as a prompt of token ids).
        tokenizer: the policy's tokenizer (decodes the model's turns, encodes the messages).
        tools: the functions the model may call (their schemas are in the prompt).
        parser: ``fn(text) -> list[ToolCall]`` (``rollout.tool_parser``).
        environment: a class with ``reset(row)`` and ``step(text)`` (one instance per trajectory), or None.
        max_turns: the most model turns of a trajectory.
        max_tool_response_tokens: a longer message is cut to this many tokens, visibly.
        tool_timeout_s: the longest a tool call may run.
        max_environment_failures: consecutive environment failures that stop the run.
        encode_reset: ``fn(row, text) -> prompt ids`` for an environment's ``reset`` that returns
            a first message (None: keep the dataset's prompt).
        wait_steps: in one decode loop, a turn's reply (its tools, the environment's step) runs in
            a thread while the other rows sample, and is fed this many steps after the turn
            (``rollout.tool_wait_steps``; 0: the loop waits for each reply as its turn ends).
    """

    def __init__(self, engine: RolloutEngine, tokenizer: Any, *, tools: Sequence[Tool] = (),
                 parser: Callable[[str], list[ToolCall]] | None = None, environment: type | None = None,
                 max_turns: int = 4, max_tool_response_tokens: int = 256, tool_timeout_s: float = 10.0,
                 max_environment_failures: int = 20, encode_reset: Callable[[dict, str], list[int]] | None = None,
                 wait_steps: int = 0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.tools = {t.name: t for t in tools}
        self.parser = parser
        self.environment = environment
        self.max_turns = max_turns
        self.max_tool_response_tokens = max_tool_response_tokens
        self.tool_timeout_s = tool_timeout_s
        self.max_environment_failures = max_environment_failures
        self.encode_reset = encode_reset
        self.wait_steps = wait_steps
        self.consecutive_environment_failures = 0
        self._glue = observation_glue(tokenizer)
        # One pool answers the turns (a trajectory's tool calls in turn), another runs the tools'
        # functions, so that a turn waiting on its tool never holds the thread that would run it.
        self._turns = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dapo-turn")
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dapo-tool")

    @classmethod
    def from_config(cls, fields: Any, engine: RolloutEngine, tokenizer: Any) -> "MultiTurnSampler | None":
        """The sampler ``fields`` (:class:`~dapo_rl.config.MultiTurnFields`: ``dapo train``'s
        ``rollout`` section, ``dapo eval``'s options) describe; None when neither tools nor an
        environment is set.

        Raises:
            ValueError: a tool, parser or environment that cannot be used (the message names it).
        """
        r = fields
        if not (r.tools or r.environment):
            return None
        return cls(engine, tokenizer, tools=load_tools(list(r.tools)), parser=TOOL_PARSERS.get(r.tool_parser),
                   environment=load_environment(r.environment) if r.environment else None, max_turns=r.max_turns,
                   max_tool_response_tokens=r.max_tool_response_tokens, tool_timeout_s=r.tool_timeout_s,
                   max_environment_failures=r.max_environment_failures, wait_steps=r.tool_wait_steps)

    def generate_for(self, prompts: Sequence[Any], n: int, params: SamplingParams) -> list[list[Sample]]:
        """:meth:`generate` for encoded prompts (:class:`~dapo_rl.data.encoding.EncodedPrompt`): their
        ids, and their dataset rows (the example's fields, ``prompt`` and ``answer``) for environments."""
        rows = [{**p.example.metadata, "prompt": p.example.prompt, "answer": p.example.answer} for p in prompts]
        return self.generate([list(p.ids) for p in prompts], n, params, rows=rows)

    def generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams,
                 rows: Sequence[dict[str, Any]] | None = None) -> list[list[Sample]]:
        """``n`` trajectories for each prompt (``rows[i]``: prompt i's dataset row, for environments)."""
        self.engine.continue_conversations(True)
        try:
            return self._generate(prompts, n, params, rows)
        finally:
            self.engine.continue_conversations(False)

    def _generate(self, prompts: Sequence[list[int]], n: int, params: SamplingParams,
                  rows: Sequence[dict[str, Any]] | None) -> list[list[Sample]]:
        rows = list(rows) if rows is not None else [{} for _ in prompts]
        groups = [[self._start(list(p), rows[i]) for _ in range(n)] for i, p in enumerate(prompts)]
        if self._in_one_call(groups, prompts, n, params):
            return [[t.sample() for t in g] for g in groups]
        budget = params.max_new_tokens
        firsts: dict[tuple[int, ...], list[_Trajectory]] = {}
        for group in groups:  # the first turn: one call per distinct prompt, as a single-turn rollout
            for t in group:
                if not t.done:
                    firsts.setdefault(tuple(t.prompt), []).append(t)
        if firsts:
            keys = list(firsts)
            counts = {len(v) for v in firsts.values()}
            if len(counts) == 1:  # the usual case: every prompt's n trajectories, in one call
                outs = self.engine.generate([list(k) for k in keys], counts.pop(), params)
                self._take_turn([t for k in keys for t in firsts[k]], [s for out in outs for s in out], budget)
            else:
                running = [t for k in keys for t in firsts[k]]
                outs = self.engine.generate([t.prompt for t in running], 1, params)
                self._take_turn(running, [out[0] for out in outs], budget)
        while True:
            running = [t for g in groups for t in g if not t.done]
            if not running:
                break
            left = [budget - len(t.response) for t in running]
            outs = self.engine.generate([t.prompt + t.response for t in running], 1, replace(params, max_new_tokens=max(left)))
            self._take_turn(running, [out[0] for out in outs], budget)
        for g in groups:
            for t in g:
                self._finish(t)
        return [[t.sample() for t in g] for g in groups]

    def _in_one_call(self, groups: list[list[_Trajectory]], prompts: Sequence[list[int]], n: int, params: SamplingParams) -> bool:
        """Sample every trajectory in one engine call where the engine can (:meth:`RolloutEngine.generate_turns`):
        a trajectory whose turn ends takes its message and goes on while the others sample."""
        trajectories = [t for g in groups for t in g]
        if any(t.done or t.prompt != list(prompts[i // n]) for i, t in enumerate(trajectories)):
            return False  # an environment failed or replaced its prompt at reset: turn by turn
        reported = [0] * len(trajectories)  # model tokens of the turns respond() has seen

        def respond(row: int, ids: list[int]) -> list[int] | None:
            t = trajectories[row]
            t.stats.turns += 1
            reported[row] += len(ids)
            message = self._reply(t, ids)  # the last turn too: an environment sees the final answer
            if message is None or t.stats.turns >= self.max_turns:
                return None
            return self._message_ids(message)

        samples = self.engine.generate_turns(prompts, n, params, respond, wait_steps=self.wait_steps, max_turns=self.max_turns)
        if samples is None:
            return False
        for i, (t, s) in enumerate(zip(trajectories, (s for group in samples for s in group))):
            t.response, t.mask, t.logprobs, t.finish = s.response_ids, s.model_mask, s.logprobs, s.finish_reason
            if s.model_tokens > reported[i]:  # a last turn cut by the budget, never reported
                t.stats.turns += 1
            t.done = True
            self._finish(t)
        return True

    # ------------------------------------------------------------------ one turn

    def _start(self, prompt: list[int], row: dict[str, Any]) -> _Trajectory:
        t = _Trajectory(prompt=prompt, row=row)
        if self.environment is None:
            return t
        try:
            t.environment = self.environment()
            first = t.environment.reset(dict(row))
            if first is not None:
                if self.encode_reset is None:
                    raise ValueError("reset() returned a first message, but no way to encode it was given")
                t.prompt = list(self.encode_reset(row, first))
        except Exception:  # noqa: BLE001 - an environment's failure ends its trajectory
            self._environment_failed(t)
        return t

    def _take_turn(self, running: list[_Trajectory], samples: list[Sample], budget: int) -> None:
        """Append each trajectory's model turn, then (concurrently) its tools' or environment's message."""
        replies: list[tuple[_Trajectory, list[int]]] = []
        for t, s in zip(running, samples):
            room = budget - len(t.response)
            ids, logps = list(s.response_ids[:room]), list((s.logprobs or [0.0] * len(s.response_ids))[:room])
            cut = len(s.response_ids) > room  # this trajectory's budget ends inside the turn
            t.response += ids
            t.mask += [1] * len(ids)
            t.logprobs += logps
            t.stats.turns += 1
            if cut or s.finish_reason == FINISH_LENGTH:
                t.finish, t.done = FINISH_LENGTH, True
                continue
            replies.append((t, ids))
        messages = list(self._turns.map(lambda item: self._reply(*item), replies))
        for (t, _), message in zip(replies, messages):
            if message is None or t.stats.turns >= self.max_turns:  # the last turn's message is never shown
                t.done = True
                continue
            ids = self._message_ids(message)
            if len(t.response) + len(ids) >= budget:  # no room left for the model to answer
                t.finish, t.done = FINISH_LENGTH, True
                continue
            t.response += ids
            t.mask += [0] * len(ids)
            t.logprobs += [0.0] * len(ids)

    def _reply(self, t: _Trajectory, ids: list[int]) -> str | None:
        """The message that answers the model's turn (None: the trajectory ends)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if t.environment is not None:
            try:
                observation, done = t.environment.step(text)
            except Exception:  # noqa: BLE001 - an environment's failure ends its trajectory
                self._environment_failed(t)
                return None
            self.consecutive_environment_failures = 0
            return None if done or observation is None else str(observation)
        try:
            calls = self.parser(text) if self.parser is not None else []
        except ToolCallError as exc:
            t.stats.tool_errors["parse_error"] += 1
            return str(exc)
        if not calls:
            return None
        results = [self._call(t, call) for call in calls]
        return "\n".join(r.text for r in results)

    def _call(self, t: _Trajectory, call: ToolCall) -> ToolResult:
        t.stats.tool_calls += 1
        tool = self.tools.get(call.name)
        result = (ToolResult(f"error: there is no tool {call.name!r}; the tools are {', '.join(sorted(self.tools))}", "unknown_tool")
                  if tool is None else tool.call(call.arguments, self.tool_timeout_s, self._pool))
        if result.error is not None:
            t.stats.tool_errors[result.error] += 1
        return result

    def _message_ids(self, message: str) -> list[int]:
        """The tokens of an environment's message, cut to ``max_tool_response_tokens``, as the
        chat template continues the conversation after the model's turn."""
        body = self.tokenizer(message, add_special_tokens=False)["input_ids"]
        if len(body) > self.max_tool_response_tokens:
            message = self.tokenizer.decode(body[: self.max_tool_response_tokens]) + TRUNCATED_MARK
        before, after = self._glue
        return list(self.tokenizer(before + message + after, add_special_tokens=False)["input_ids"])

    def _environment_failed(self, t: _Trajectory) -> None:
        t.stats.environment_failed = True
        t.done = True
        self.consecutive_environment_failures += 1
        if self.consecutive_environment_failures >= self.max_environment_failures:
            raise EnvironmentFailures(f"rollout.max_environment_failures: {self.consecutive_environment_failures} environments "
                                      f"in a row raised; fix rollout.environment (a failing one ends its trajectory with the "
                                      f"incorrect reward until this limit)")

    def _finish(self, t: _Trajectory) -> None:
        if t.environment is None or t.stats.environment_failed:
            return
        reward = getattr(t.environment, "reward", None)
        if callable(reward):
            try:
                t.stats.environment_reward = float(reward())
            except Exception:  # noqa: BLE001
                self._environment_failed(t)

    def close(self) -> None:
        self._turns.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


def last_model_turn(sample: Sample) -> list[int]:
    """The ids of the model's last turn (all of a one-turn sample): what its reward judges."""
    if sample.model_mask is None:
        return sample.response_ids
    end = len(sample.model_mask)
    while end > 0 and not sample.model_mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and sample.model_mask[start - 1]:
        start -= 1
    return sample.response_ids[start:end]


def environment_result(stats: TrajectoryStats | None, result: RewardResult, correct: float, incorrect: float) -> RewardResult:
    """``result`` of the reward function, unless an environment decided: its ``reward()`` (correct
    above the midpoint of the correct and incorrect rewards), or the incorrect reward if it failed."""
    if stats is None:
        return result
    if stats.environment_failed:
        return RewardResult(score=incorrect, correct=False)
    if stats.environment_reward is not None:
        return RewardResult(score=stats.environment_reward, correct=stats.environment_reward > (correct + incorrect) / 2)
    return result


def trajectory_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Turns, tool calls and errors by kind, the environment's share of the tokens and the model's
    tokens per turn, over a step's multi-turn samples (none: no metrics)."""
    stats = [s.trajectory for s in samples if s.trajectory is not None]
    if not stats:
        return {}
    tokens = sum(len(s.response_ids) for s in samples if s.trajectory is not None)
    model = sum(s.model_tokens for s in samples if s.trajectory is not None)
    turns = [t.turns for t in stats]
    out = {
        "rollout/turns_mean": sum(turns) / len(stats),
        "rollout/turns_max": float(max(turns)),
        "rollout/tool_calls_mean": sum(t.tool_calls for t in stats) / len(stats),
        "rollout/environment_token_frac": (tokens - model) / tokens if tokens else 0.0,
        "rollout/model_tokens_per_turn": model / max(1, sum(turns)),
        "rollout/environment_failures": float(sum(t.environment_failed for t in stats)),
    }
    for kind in TOOL_ERROR_KINDS:
        out[f"rollout/tool_errors/{kind}"] = float(sum(t.tool_errors[kind] for t in stats))
    return out


def check_multi_turn_fields(fields: Any, prefix: str = "") -> None:
    """The tools import and are typed and documented, the parser is known, the environment has
    ``reset`` and ``step``; raises :class:`~dapo_rl.config.ConfigError` naming ``prefix`` + the key
    (``"rollout."`` for ``dapo train``, none for ``dapo eval``)."""
    if not (fields.tools or fields.environment):
        return
    try:
        load_tools(list(fields.tools))
    except ValueError as exc:
        raise ConfigError(f"{prefix}tools: {exc}") from None
    try:
        TOOL_PARSERS.get(fields.tool_parser)
    except ValueError as exc:
        raise ConfigError(f"{prefix}tool_parser: {exc}") from None
    if fields.environment:
        try:
            load_environment(fields.environment)
        except ValueError as exc:
            raise ConfigError(f"{prefix}environment: {exc}") from None


def tool_schemas(fields: Any) -> tuple[dict[str, Any], ...]:
    """The JSON schemas of ``fields.tools`` (what the chat template shows the model)."""
    return tuple(t.schema for t in load_tools(list(fields.tools)))

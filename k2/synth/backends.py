"""The one interface every agent policy of the synthesis pipeline speaks, and its implementations.

A `Backend` makes the agent of one episode: `backend.agent(task, tools, seed)` returns a k2.gym Agent, a callable
history (list of k2.chat.Message) -> the next assistant Message, or the model's raw output text (k2.gym.ToolEnv
parses its tool calls with k2.chat). Whatever an agent does, the run goes on: an agent that raises (a timeout, an
HTTP 5xx) ends its episode, scored as it stands with the error in info['agent_error'] (k2.gym.run_episode), and the
judge rejects it with that reason; malformed output is counted by the environment and rejected by the judge.
A model-backed backend also has `complete(messages, tools=None) -> Message`, one chat completion: what the LLM
judge (k2.synth.judging.LLMJudge) and the LLM user (k2.gym.BackendUser) talk through.

Implementations:
  ExpertBackend  the scripted expert (k2.gym.ExpertAgent's plan: gold actions, the question for a withheld fact,
                 the closing line or the refusal), with its own wording varied per (task, seed): a short line before
                 some tool calls, an opening and a closing around the final message, and K2-style call ids. A call
                 answered k2.gym.TRANSIENT_ERROR (ToolEnv.failure_rate) is retried once, so trajectories teach
                 recovery.
  OpenAIBackend  any OpenAI-compatible endpoint (our experiments/serve.py, vLLM, a hosted API) through the official
                 `openai` client: the agent sends the history and the tool declarations, and nothing of the task
                 (it sees only what a deployed model sees). Timeouts, 5xx and unreadable answers raise: the episode
                 is rejected, the run continues.
Extension point (not implemented here; a class with `name` and `agent(task, tools, seed)`):
  our own model through the sampler (k2.sample): the agent renders the history with
    `k2.chat.render(history, tokenizer, tools=tools, add_generation_prompt=True)`, samples up to <|im_end|> and
    returns `k2.chat.decode(ids, tokenizer)` as raw text, seeded by `seed` for reproducible shards.
The backend's `name` goes into the run's config, so shards of two backends never mix in one output directory.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import openai

from k2.chat import Message, ToolCall
from k2.gym import TRANSIENT_ERROR, Agent, Task, expert_messages
from k2.synth.judging import message_dict

# The expert's own wording, varied per (task, seed); none of these reads as a refusal (k2.gym.is_refusal), asks to
# confirm (the scripted user would answer yes) or holds a number (k2.gym.fact_told would count it).
BEFORE_CALL = ('', '', '', 'Let me check that.', 'One moment.', 'Looking that up now.', 'Let me take care of that.',
               'Checking.', 'I will handle that now.')
OPENING = {'act': ('', '', 'Okay.', 'All right.', 'Sure thing.', 'Thanks for waiting.', 'Here you go.'),
           'refuse': ('', '', 'I looked into it.', 'Thanks for your patience.', 'I checked the details.')}
CLOSING = ('', '', 'Anything else I can help with?', 'Let me know if there is anything else.',
           'Is there anything else you need?', 'Have a good day!')
RETRY = ('', 'That did not go through, trying again.', 'The service hiccuped; retrying.', 'Let me try that again.')


class Backend(Protocol):
  """Makes the agent of one episode (see the module docstring)."""
  name: str

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent: ...


def _join(*parts: str) -> str:
  return ' '.join(part for part in parts if part)


def varied_expert_messages(task: Task, seed: int) -> list[Message]:
  """k2.gym.expert_messages(task) with the wording varied by (task, seed) and call ids `functions.<name>:<k>`
  (K2's format: k counts the calls in the conversation). Tool calls, arguments and the facts told are unchanged."""
  rng = random.Random(f'{task.task_id}/expert/{seed}')  # str seeds hash the same in every process
  plan, calls = [], 0
  for message in expert_messages(task):
    if message.tool_calls:
      ids = []
      for call in message.tool_calls:
        ids.append(dataclasses.replace(call, id=f'functions.{call.name}:{calls}'))
        calls += 1
      plan.append(Message('assistant', rng.choice(BEFORE_CALL), tool_calls=tuple(ids)))
    else:
      plan.append(message)
  final = plan[-1]
  opening = rng.choice(OPENING['refuse' if task.kind == 'refuse' else 'act'])
  plan[-1] = Message('assistant', _join(opening, final.content, rng.choice(CLOSING)))
  return plan


def _failed_calls(messages: Sequence[Message]) -> tuple[int, list[ToolCall], bool]:
  """(plan messages sent, the calls of the last assistant message answered TRANSIENT_ERROR, whether that message
  was itself a retry). A message right after a failure is a retry, unless it follows a retry: one retry per call."""
  sent, failed, retry, calls, answered = 0, [], False, (), 0
  for message in messages:
    if message.role == 'assistant':
      retry = bool(failed) and not retry
      sent += not retry
      failed, calls, answered = [], message.tool_calls, 0
    elif message.role == 'tool':  # tool results answer the calls in order
      if message.content == TRANSIENT_ERROR and answered < len(calls):
        failed.append(calls[answered])
      answered += 1
  return sent, failed, retry


class VariedExpertAgent:
  """An Agent replaying `varied_expert_messages(task, seed)`, a pure function of the history (it counts its own
  past messages); a call that failed transiently is sent again once, in a message of its own; past its plan it asks
  what else. Call ids count the calls in the conversation, retries included."""

  def __init__(self, task: Task, seed: int = 0):
    self.plan = varied_expert_messages(task, seed)
    self.key = f'{task.task_id}/retry/{seed}'

  def __call__(self, messages: Sequence[Message]) -> Message:
    sent, failed, retry = _failed_calls(messages)
    if failed and not retry:
      rng = random.Random(f'{self.key}/{len(messages)}')
      message = Message('assistant', rng.choice(RETRY), tool_calls=tuple(failed))
    elif sent < len(self.plan):
      message = self.plan[sent]
    else:
      return Message('assistant', 'Is there anything else I can do?')
    first = sum(len(m.tool_calls) for m in messages)
    calls = tuple(dataclasses.replace(call, id=f'functions.{call.name}:{first + k}')
                  for k, call in enumerate(message.tool_calls))
    return dataclasses.replace(message, tool_calls=calls)


class ExpertBackend:
  """The embedded default: the scripted expert, offline, deterministic per (task, seed)."""
  name = 'expert'

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    del tools  # the expert knows the task's gold actions
    return VariedExpertAgent(task, seed)


class OpenAIBackend:
  """An OpenAI-compatible chat endpoint at `base_url` (e.g. http://localhost:8000/v1) serving `model`, through the
  official client with `timeout_s` per request and `max_retries` retries of timeouts and 5xx (the client's own
  backoff); after those the error raises out of the agent. Sampling: `temperature`, `max_tokens` (None: the
  server's default) and the episode's seed, so a server that honours `seed` gives reproducible shards."""

  def __init__(self, base_url: str, model: str, api_key: str = 'none', temperature: float = 0.0,
               timeout_s: float = 60.0, max_retries: int = 2, max_tokens: int | None = None):
    if timeout_s <= 0 or max_retries < 0:
      raise ValueError(f'timeout_s must be > 0 and max_retries >= 0, got {timeout_s}, {max_retries}')
    self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
    self.model = model
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.name = f'openai:{model}@T={temperature}'

  def complete(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
               seed: int | None = None) -> Message:
    """One chat completion: the first choice's message (its tool calls with their arguments as the model wrote
    them: the environment checks them). Raises on a transport error, an error status or an answer without one."""
    optional = {'tools': list(tools) if tools else None, 'seed': seed, 'max_tokens': self.max_tokens}
    response = self.client.chat.completions.create(
        model=self.model, messages=[message_dict(m) for m in messages], temperature=self.temperature,
        **{key: value for key, value in optional.items() if value is not None})
    if not getattr(response, 'choices', None):
      raise ValueError(f'{self.model} answered without a choice: {str(response)[:200]}')
    return Message.from_dict(response.choices[0].message.model_dump())

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    del task  # the agent sees only what a deployed model sees: the history and the tool declarations
    return functools.partial(self.complete, tools=tools, seed=seed)

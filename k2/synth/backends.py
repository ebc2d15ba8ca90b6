"""The one interface every agent policy of the synthesis pipeline speaks, and its embedded implementation.

A `Backend` makes the agent of one episode: `backend.agent(task, tools, seed)` returns a k2.gym Agent, a callable
history (list of k2.chat.Message) -> the next assistant Message, or the model's raw output text (k2.gym.ToolEnv
parses its tool calls with k2.chat). Whatever an agent does, the run goes on: an agent that raises (a timeout, an
HTTP 5xx) ends its episode, scored as it stands with the error in info['agent_error'] (k2.gym.run_episode), and the
judge rejects it with that reason; malformed output is counted by the environment and rejected by the judge.

Implementations:
  ExpertBackend  the scripted expert (k2.gym.ExpertAgent's plan: gold actions, the question for a withheld fact,
                 the closing line or the refusal), with its own wording varied per (task, seed): a short line before
                 some tool calls, an opening and a closing around the final message, and K2-style call ids.
Extension points (not implemented here; each is a class with `name` and `agent(task, tools, seed)`):
  an OpenAI-compatible HTTP client (the `openai` package): the agent converts the history to OpenAI message dicts
    (k2.synth.judging.message_dict), calls `client.chat.completions.create(model=..., messages=..., tools=tools,
    temperature=..., timeout=...)` and returns `Message.from_dict(choice.message.model_dump())`; `task` is unused
    (the agent sees only what a deployed model sees). Let timeouts and 5xx raise: the episode is rejected, the
    run continues.
  our own model through the sampler (k2.sample): the agent renders the history with
    `k2.chat.render(history, tokenizer, tools=tools, add_generation_prompt=True)`, samples up to <|im_end|> and
    returns `k2.chat.decode(ids, tokenizer)` as raw text, seeded by `seed` for reproducible shards.
The backend's `name` goes into the run's config, so shards of two backends never mix in one output directory.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from k2.chat import Message
from k2.gym import Agent, Task, expert_messages

# The expert's own wording, varied per (task, seed); none of these reads as a refusal (k2.gym.is_refusal), asks to
# confirm (the scripted user would answer yes) or holds a number (k2.gym.fact_told would count it).
BEFORE_CALL = ('', '', '', 'Let me check that.', 'One moment.', 'Looking that up now.', 'Let me take care of that.',
               'Checking.', 'I will handle that now.')
OPENING = {'act': ('', '', 'Okay.', 'All right.', 'Sure thing.', 'Thanks for waiting.', 'Here you go.'),
           'refuse': ('', '', 'I looked into it.', 'Thanks for your patience.', 'I checked the details.')}
CLOSING = ('', '', 'Anything else I can help with?', 'Let me know if there is anything else.',
           'Is there anything else you need?', 'Have a good day!')


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


class VariedExpertAgent:
  """An Agent replaying `varied_expert_messages(task, seed)`, a pure function of the history (it counts its own
  past messages); past its plan it asks what else."""

  def __init__(self, task: Task, seed: int = 0):
    self.plan = varied_expert_messages(task, seed)

  def __call__(self, messages: Sequence[Message]) -> Message:
    turn = sum(message.role == 'assistant' for message in messages)
    return self.plan[turn] if turn < len(self.plan) else Message('assistant', 'Is there anything else I can do?')


class ExpertBackend:
  """The embedded default: the scripted expert, offline, deterministic per (task, seed)."""
  name = 'expert'

  def agent(self, task: Task, tools: Sequence[Mapping[str, Any]], seed: int) -> Agent:
    del tools  # the expert knows the task's gold actions
    return VariedExpertAgent(task, seed)

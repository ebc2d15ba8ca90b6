"""The judge: keeps only trajectories that pass, and says why the others fail.

`judge(task, episode)` is programmatic: the environment's verdict on the final state (k2.gym: the database equals
the gold one, required facts told, withheld facts asked for before acting, refusals refused) plus rubric checks on
how the agent got there (no backend error, no malformed output, no tool errors, the user ended the conversation
within the turn limit, the expected tool-use pattern: every gold call made with exactly its arguments and no call
beyond them). An LLM judge goes behind the same signature (task, episode) -> Verdict: it would ask a Backend's
model to grade the conversation against the task's rubric and AND its verdict with this one.

`conversation(messages, tools)` is what an accepted trajectory becomes: the SFT record k2.data.conversations reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from k2.chat import Message
from k2.gym import Episode, Task


@dataclasses.dataclass(frozen=True)
class Verdict:
  """accepted: the trajectory passes; reasons: why not (empty when accepted), one short line each."""
  accepted: bool
  reasons: tuple[str, ...] = ()


def judge(task: Task, episode: Episode) -> Verdict:
  info = episode.info
  reasons = []
  if info.get('agent_error'):
    reasons.append(f'backend error: {info["agent_error"]}')
  if info['malformed_outputs']:
    reasons.append(f'malformed output in {info["malformed_outputs"]} assistant turn(s)')
  if info['tool_errors']:
    reasons.append(f'{info["tool_errors"]} tool error(s) ({info["unknown_tools"]} unknown tool, '
                   f'{info["invalid_arguments"]} invalid arguments)')
  if info['truncated'] and not info.get('agent_error'):
    reasons.append('the user never ended the conversation within the turn limit')
  if not info['state_match']:
    reasons.append('final database differs from the gold state')
  missing = sorted(set(task.required_facts) - set(info['facts_told']))
  if missing:
    reasons.append(f'required facts not told: {missing}')
  if info['acted_before_asking']:
    reasons.append('changed the database before asking for what the request left out')
  if task.kind == 'ask' and not set(task.withheld) <= set(info['revealed']):
    reasons.append(f'never asked for {sorted(set(task.withheld) - set(info["revealed"]))}')
  if task.kind == 'refuse' and not info['refused']:
    reasons.append('did not refuse a request the policy forbids')
  if info['gold_calls_matched'] < info['gold_calls']:
    reasons.append(f'tool-use pattern: {info["gold_calls_matched"]} of {info["gold_calls"]} gold calls made with '
                   'their exact arguments')
  if info['tool_calls'] > info['gold_calls_matched']:
    reasons.append(f'tool-use pattern: {info["tool_calls"] - info["gold_calls_matched"]} call(s) beyond the gold ones')
  if episode.reward != 1.0 and not reasons:
    reasons.append('the environment scored the episode a failure')
  return Verdict(not reasons, tuple(reasons))


def message_dict(message: Message) -> dict[str, Any]:
  """A Message in the OpenAI chat shape (what k2.chat.Message.from_dict reads back)."""
  out: dict[str, Any] = {'role': message.role, 'content': message.content}
  if message.tool_calls:
    out['tool_calls'] = [{'id': call.id, 'type': 'function',
                          'function': {'name': call.name, 'arguments': call.arguments_text()}}
                         for call in message.tool_calls]
  if message.tool_call_id is not None:
    out['tool_call_id'] = message.tool_call_id
  if message.name is not None:
    out['name'] = message.name
  return out


def conversation(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The SFT record {'messages': [...], 'tools': [...]} of a trajectory, ending on its last assistant message (the
  user's closing thanks would only cost tokens: no loss is taken on it)."""
  last = max(i for i, message in enumerate(messages) if message.role == 'assistant')
  return {'messages': [message_dict(m) for m in messages[:last + 1]], 'tools': [dict(tool) for tool in tools]}

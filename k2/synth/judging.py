"""The judges: keep only trajectories that pass, and say why the others fail.

Every judge is a callable (task, episode) -> Verdict with a `name` (it goes into a run's config, so shards judged
by two judges never mix in one output directory).
  judge        programmatic: the environment's verdict on the final state (k2.gym: the database equals the gold
               one, required facts told, withheld facts asked for before acting, refusals refused) plus rubric
               checks on how the agent got there (no backend or user-simulator error, no malformed output, no tool
               errors, the user ended the conversation within the turn limit, the expected tool-use pattern: every
               gold call made with exactly its arguments and no call beyond them; retrying a call that failed
               transiently, k2.gym.TRANSIENT_ERROR, is not a call beyond them, nor is a planted slip: a weight-0
               call that the environment refused, unknown tool or invalid arguments, before the right one).
  LLMJudge     asks a backend's model (its `complete`) to grade the transcript against the task's rubric
               (`task_rubric`: success criteria, expected tool-use pattern, checkpoints) and to answer in a strict
               JSON format; anything else it answers, or a failing backend, is a rejection with the reason.
  all_of       ANDs judges: all_of(judge, LLMJudge(backend)) keeps what both accept.

`conversation(messages, tools)` is what an accepted trajectory becomes: the SFT record k2.data.conversations reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from k2.chat import Message
from k2.gym import TRANSIENT_ERROR, Completer, Episode, Task


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
  if info.get('user_error'):
    reasons.append(f'user simulator error: {info["user_error"]}')
  if info['malformed_outputs']:
    reasons.append(f'malformed output in {info["malformed_outputs"]} assistant turn(s)')
  # Planted slips (weight-0 calls, out of the SFT loss) must each be refused as an unknown tool or invalid
  # arguments, which run nothing; any other tool error is the agent's. A slip that failed transiently never reached
  # the tools: its retry is the one counted.
  transient = {m.tool_call_id for m in episode.messages if m.role == 'tool' and m.content == TRANSIENT_ERROR}
  slips = len({c.id for m in episode.messages if m.role == 'assistant' and m.weight == 0 for c in m.tool_calls}
              - transient)
  if info['tool_errors'] != slips or info['unknown_tools'] + info['invalid_arguments'] != slips:
    reasons.append(f'{info["tool_errors"]} tool error(s) ({info["unknown_tools"]} unknown tool, '
                   f'{info["invalid_arguments"]} invalid arguments) for {slips} planted slip(s)')
  if info['truncated'] and not info.get('agent_error') and not info.get('user_error'):
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
  beyond = info['tool_calls'] - info['transient_errors'] - info['gold_calls_matched'] - slips
  if beyond > 0:
    reasons.append(f'tool-use pattern: {beyond} call(s) beyond the gold ones')
  if episode.reward != 1.0 and not reasons:
    reasons.append('the environment scored the episode a failure')
  return Verdict(not reasons, tuple(reasons))


judge.name = 'programmatic'  # what runs record (every Judge has a name)


class Judge(Protocol):
  """(task, episode) -> Verdict, named for the run's config."""
  name: str

  def __call__(self, task: Task, episode: Episode) -> Verdict: ...


@dataclasses.dataclass(frozen=True)
class AllOf:
  """The judge all_of(*judges) makes."""
  judges: tuple[Judge, ...]

  @property
  def name(self) -> str:
    return '+'.join(one.name for one in self.judges)

  def __call__(self, task: Task, episode: Episode) -> Verdict:
    for one in self.judges:
      verdict = one(task, episode)
      if not verdict.accepted:
        return verdict
    return Verdict(True)


def all_of(*judges: Judge) -> AllOf:
  """A judge accepting what every one of `judges` accepts, asked in order; the first rejection is the verdict (a
  trajectory the programmatic judge rejects costs no LLM call when it comes first)."""
  if not judges:
    raise ValueError('all_of needs at least one judge')
  return AllOf(judges)


RUBRIC = """You grade one conversation between a customer-service agent (the assistant) and a user, in which the
agent can call tools. You get the task's rubric (the user's goal, the success criteria, the expected tool-use
pattern and checkpoints) and the transcript. The agent passes only if it met every success criterion and every
checkpoint, used the tools as expected (the right tools with the right arguments, nothing harmful or unrequested;
retrying a call that failed with a transient error is fine) and told the user only what the tools returned.
Answer with one JSON object and nothing else: {"pass": true or false, "reasons": ["short reason", ...]}; the
reasons say what failed (an empty list when it passes)."""


def task_rubric(task: Task) -> str:
  """The rubric of `task` as text for an LLM judge: goal, success criteria, expected tool calls, checkpoints."""
  calls = [f'{call.name}({call.arguments_text()})' for call in task.gold_actions]
  criteria = {'act': 'carry out the request', 'ask': 'ask the user for what the request leaves out, then carry it out',
              'refuse': 'refuse the request, which the policy forbids, and change nothing'}[task.kind]
  checkpoints = [f'asks the user for {", ".join(task.withheld)} before changing anything'] if task.withheld else []
  checkpoints += [f'tells the user {fact}' for fact in task.required_facts]
  if task.forbidden_actions:
    checkpoints.append('never calls ' + ', '.join(f'{c.name}({c.arguments_text()})' for c in task.forbidden_actions))
  lines = [f'User goal: {task.instruction}',
           *(f'User fact (to tell when asked): {fact.name} = {fact.value}' for fact in task.facts),
           f'Success criterion: the agent should {criteria}.',
           'Expected tool calls, in order: ' + ('; '.join(calls) or 'none'),
           *(f'Checkpoint: the agent {checkpoint}.' for checkpoint in checkpoints)]
  return '\n'.join(lines)


def transcript(messages: Sequence[Message]) -> str:
  """The conversation as plain lines `[role] text`, tool calls as `[assistant calls] name(arguments)`."""
  lines = []
  for message in messages:
    if message.content:
      lines.append(f'[{message.role}] {message.content}')
    lines += [f'[assistant calls] {call.name}({call.arguments_text()})' for call in message.tool_calls]
  return '\n'.join(lines)


_JSON_OBJECT = re.compile(r'\{.*\}', re.DOTALL)


def parse_verdict(text: str) -> Verdict:
  """The LLM judge's answer as a Verdict; never raises. Accepted only for a JSON object (fenced or not) whose
  "pass" is the boolean true; "pass": false rejects with its reasons; anything else rejects as unparsable."""
  found = _JSON_OBJECT.search(text)
  try:
    answer = json.loads(found.group(0)) if found else None
  except ValueError:
    answer = None
  if not isinstance(answer, dict) or not isinstance(answer.get('pass'), bool):
    return Verdict(False, (f'llm judge: unparsable verdict {text[:80]!r}',))
  if answer['pass']:
    return Verdict(True)
  reasons = answer.get('reasons')
  reasons = [str(r) for r in reasons] if isinstance(reasons, list) and reasons else ['failed, no reason given']
  return Verdict(False, tuple(f'llm judge: {reason}' for reason in reasons))


class LLMJudge:
  """A judge asking `backend`'s model to grade the transcript against the task's rubric (see the module
  docstring). `rubric` is its system prompt: the grading instructions and the answer format parse_verdict reads."""

  def __init__(self, backend: Completer, rubric: str = RUBRIC):
    self.backend = backend
    self.rubric = rubric
    self.name = f'llm:{backend.name}'

  def __call__(self, task: Task, episode: Episode) -> Verdict:
    prompt = [Message('system', self.rubric),
              Message('user', f'# Rubric\n{task_rubric(task)}\n\n# Transcript\n{transcript(episode.messages)}')]
    try:
      answer = self.backend.complete(prompt)
    except Exception as e:  # noqa: BLE001 (a failing judge backend rejects one trajectory, it does not stop a run)
      return Verdict(False, (f'llm judge: backend error: {type(e).__name__}: {e}',))
    return parse_verdict(answer.content)


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
  if message.weight != 1:
    out['weight'] = message.weight
  return out


def conversation(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The SFT record {'messages': [...], 'tools': [...]} of a trajectory, ending on its last assistant message (the
  user's closing thanks would only cost tokens: no loss is taken on it)."""
  last = max(i for i, message in enumerate(messages) if message.role == 'assistant')
  return {'messages': [message_dict(m) for m in messages[:last + 1]], 'tools': [dict(tool) for tool in tools]}

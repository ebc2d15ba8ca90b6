"""Simulated users: the interface every user simulator speaks, and a scripted one driven by the task.

A user opens with the task's request, then answers each assistant message that carries no tool calls. The
scripted user (K2 report 3.1.1: personas, facts revealed only when asked, an end to the conversation) tells a fact
only when the assistant's message mentions one of that fact's keywords, ends the conversation when the goal is met
or the assistant clearly refuses, says yes when asked to confirm, nudges otherwise, and gives up after `max_turns`
replies. The LLM-backed user (`BackendUser`) implements the same two methods through a backend's
`complete(messages) -> Message` (k2.synth.backends.OpenAIBackend): its system prompt holds the persona, the hidden
goal and the facts to tell only when asked; it judges from the text (ignoring `goal_met`) and ends with STOP.
Whatever a user simulator does, ToolEnv caps its turns.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from k2.chat import Message
from k2.gym.env import Task, fact_told, is_refusal

STOP = '###STOP###'  # tau-bench's end-of-conversation marker, kept in the user's last message

PERSONAS = {
    # persona -> (how it opens a reveal, how it nudges, how it thanks, how it accepts a refusal, how it confirms)
    'polite': ('Of course.', 'Could you help me with that, please?', 'Thank you so much, that is all I needed.',
               'I see, thank you for explaining.', 'Yes, please go ahead.'),
    'terse': ('', 'Well?', 'Thanks. Bye.', 'Fine.', 'Yes.'),
    'chatty': ('Oh sure, let me think...', 'Sorry, I am not sure we are there yet. Can you sort it out for me?',
               'Wonderful, you have been really helpful today, thanks!', 'Oh, that is a shame, but I understand.',
               'Yes, yes, absolutely, please do that!'),
    'impatient': ('Quickly then:', 'Can we get on with it?', 'Finally. Thanks.', 'Ugh, okay.', 'Yes, just do it.'),
}
# An agent asking for the go-ahead (as tau-bench's policies require before writes) gets a yes.
CONFIRMATION_CUES = ('shall i', 'should i proceed', 'do you want me to', 'would you like me to', 'can you confirm',
                     'please confirm', 'do you confirm', 'is that correct', 'is that right', 'go ahead?')


@dataclasses.dataclass(frozen=True)
class UserTurn:
  """content: the user's message; done: the user ends the conversation; revealed: names of facts told in it."""
  content: str
  done: bool = False
  revealed: tuple[str, ...] = ()


class UserSimulator(Protocol):
  def first_message(self) -> str: ...

  def respond(self, assistant_text: str, goal_met: bool) -> UserTurn:
    """The reply to an assistant message without tool calls. goal_met: whether the user could see their goal met
    (their order cancelled, the meeting in their calendar, the answer told)."""
    ...


class ScriptedUser:
  """The programmatic user (see the module docstring); deterministic given (task, seed)."""

  def __init__(self, task: Task, seed: int = 0, max_turns: int = 6):
    self.task = task
    self.rng = random.Random(f'{task.task_id}/user/{seed}')
    self.max_turns = max_turns
    self.turns = 0
    self.revealed: set[str] = set()
    self.opener, self.nudge, self.thanks, self.accept, self.confirm = PERSONAS.get(task.persona, PERSONAS['polite'])

  def first_message(self) -> str:
    return self.task.instruction

  def respond(self, assistant_text: str, goal_met: bool) -> UserTurn:
    self.turns += 1
    if goal_met:
      return UserTurn(f'{self.thanks} {STOP}', done=True)
    if is_refusal(assistant_text):
      return UserTurn(f'{self.accept} {STOP}', done=True)
    text = assistant_text.lower()
    asked = [fact for fact in self.task.facts
             if fact.name not in self.revealed and any(word in text for word in fact.keywords)]
    if self.turns >= self.max_turns:
      return UserTurn(f'I have to go now. {STOP}', done=True)
    if asked:
      self.revealed.update(fact.name for fact in asked)
      reply = ' '.join(fact.reply for fact in asked)
      return UserTurn(f'{self.opener} {reply}'.strip(), revealed=tuple(fact.name for fact in asked))
    if any(cue in text for cue in CONFIRMATION_CUES):
      return UserTurn(self.confirm)
    return UserTurn(self.nudge)


STYLES = {'polite': 'polite and patient', 'terse': 'terse: as few words as possible',
          'chatty': 'chatty and friendly, a little rambling', 'impatient': 'impatient and a bit curt'}
USER_PROMPT = """You play a customer writing to a support assistant that can use tools. Stay in character: {style}.
Your goal, which the assistant only knows from what you write: {goal}
Facts you know. Tell one only when the assistant asks for it, never before, and never make up others:
{facts}
Write only your next message, one or two sentences. When your goal is met, or the assistant refuses or cannot
help, say goodbye and end that message with {stop}."""


class Completer(Protocol):
  """A backend that answers one chat completion: what model-played roles (BackendUser, k2.synth's LLM judge) need
  of it (k2.synth.backends.OpenAIBackend has it)."""
  name: str

  def complete(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> Message: ...


class BackendUser:
  """A user simulator played by `backend`'s model (see the module docstring). The model writes the user's side, so
  roles swap in its conversation: the assistant's messages are its 'user' turns. A fact counts as revealed when
  the assistant asked for it (one of its keywords, as for ScriptedUser) or the reply states its value; the
  conversation ends when a reply holds STOP. A failing backend raises (ToolEnv ends the episode with
  info['user_error'])."""

  def __init__(self, backend: Completer, task: Task, seed: int = 0):
    del seed  # the backend samples; its own seed, if any, is its business
    self.backend = backend
    self.task = task
    facts = '\n'.join(f'- {fact.name}: {fact.value}' for fact in task.facts) or '- (none)'
    prompt = USER_PROMPT.format(style=STYLES.get(task.persona, task.persona), goal=task.instruction, facts=facts,
                                stop=STOP)
    self.history = [Message('system', prompt), Message('user', 'Hello, how can I help you today?'),
                    Message('assistant', task.instruction)]
    self.revealed: set[str] = set()

  def first_message(self) -> str:
    return self.task.instruction

  def respond(self, assistant_text: str, goal_met: bool) -> UserTurn:
    del goal_met  # judged from the text, as a real user would
    self.history.append(Message('user', assistant_text))
    reply = self.backend.complete(self.history).content.strip()
    self.history.append(Message('assistant', reply))
    asked = assistant_text.lower()
    told = tuple(fact.name for fact in self.task.facts if fact.name not in self.revealed and (
        any(word in asked for word in fact.keywords) or fact_told(fact.value, reply)))
    self.revealed.update(told)
    return UserTurn(reply, done=STOP in reply, revealed=told)


def backend_user_factory(backend: Completer) -> Callable[[Task, int], BackendUser]:
  """ToolEnv's user_factory (task, seed) -> BackendUser over `backend`, named after it for a run's config."""
  def factory(task: Task, seed: int = 0) -> BackendUser:
    return BackendUser(backend, task, seed)
  factory.__name__ = f'llm_user:{backend.name}'
  return factory

"""Simulated users: the interface every user simulator speaks, and a scripted one driven by the task.

A user opens with the task's request, then answers each assistant message that carries no tool calls. The
scripted user (K2 report 3.1.1: personas, facts revealed only when asked, an end to the conversation) tells a fact
only when the assistant's message mentions one of that fact's keywords, ends the conversation when the goal is met
or the assistant clearly refuses, says yes when asked to confirm, nudges otherwise, and gives up after `max_turns`
replies. An LLM-backed user
implements the same two methods (it may ignore `goal_met` and judge from the text).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Protocol

from k2.gym.env import Task, is_refusal

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

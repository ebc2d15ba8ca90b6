"""The scripted expert: solves a task by its gold actions, asking first or refusing where the task requires.

Used by data synthesis to produce trajectories (K2 report 3.1.1). Its messages, in order: one assistant message
per gold action, with the question for what the request left out inserted where the task says ('ask' tasks),
then the task's closing line (the facts the user asked for, or the refusal). The agent replays that plan by
counting its own past messages, so it is a pure function of the history.
"""

from __future__ import annotations

from collections.abc import Sequence

from k2.chat import Message
from k2.gym.env import Task


def expert_messages(task: Task) -> list[Message]:
  """The expert's assistant messages for `task`, in the order it sends them."""
  plan = [Message('assistant', tool_calls=(call,)) for call in task.gold_actions]
  if task.kind == 'ask':
    plan.insert(task.ask_after, Message('assistant', task.expert_ask))
  return plan + [Message('assistant', task.expert_final)]


class ExpertAgent:
  """An Agent (history -> next message) following `expert_messages(task)`; past its plan it asks what else."""

  def __init__(self, task: Task):
    self.plan = expert_messages(task)

  def __call__(self, messages: Sequence[Message]) -> Message:
    turn = sum(message.role == 'assistant' for message in messages)
    return self.plan[turn] if turn < len(self.plan) else Message('assistant', 'Is there anything else I can do?')

"""The verifiable-reward gym for RL (K2 report 3.2.1): single-turn tasks whose reward code checks the answer.

    from k2.gym import verifiable
    tasks = verifiable.sample_tasks('arithmetic', 64, seed=0, split='heldout', level=2)
    reward = verifiable.score(tasks[0], response_text)       # Reward(value in [0, 1], reason)
    gold = verifiable.demonstration(tasks[0])                  # a response that scores 1 (SFT before RL)

Domains (one module each, with LEVELS of difficulty): 'arithmetic' (word problems, exact answers), 'game24' and
'sudoku' (logic), 'instructions' (constraints checked by code, false compliance claims caught), 'code' (hidden tests
in k2.gym.sandbox). Math and logic responses end with an 'Answer: ...' line. Train and held-out tasks never share a
problem (the split is a hash of the problem's content). `score` never raises: a malformed response scores 0 with the
reason, which RL logs per domain.
"""

from __future__ import annotations

import random

from k2.gym.verifiable import arithmetic, code, game24, instructions, sudoku
from k2.gym.verifiable.common import Reward, Task

DOMAINS = {m.NAME: m for m in (arithmetic, game24, sudoku, instructions, code)}


def _domain(name: str):
  if name not in DOMAINS:
    raise ValueError(f'unknown verifiable domain {name!r}; known: {sorted(DOMAINS)}')
  return DOMAINS[name]


def sample_tasks(domain: str, n: int, seed: int, split: str = 'train', level: int | None = None) -> list[Task]:
  """n tasks of `domain` from `split` ('train' or 'heldout'); level None mixes the domain's levels evenly. The same
  arguments give the same tasks in every process."""
  module = _domain(domain)
  if level is not None and level not in module.LEVELS:
    raise ValueError(f'{domain} has levels {module.LEVELS}, not {level}')
  rng = random.Random(f'{domain}/{split}/{seed}/{level}')
  return [module.generate(rng, split, level if level is not None else module.LEVELS[i % len(module.LEVELS)])
          for i in range(n)]


def score(task: Task, response: str) -> Reward:
  """The task's reward for `response` (the assistant's text). Never raises: a response the checker cannot handle
  scores 0 with the failure as reason."""
  if not isinstance(response, str):
    return Reward(0.0, f'response is {type(response).__name__}, not text')
  try:
    return _domain(task.domain).score(task, response)
  except Exception as error:  # noqa: BLE001  (rewards never raise: K2's RL runs on whatever the policy writes)
    return Reward(0.0, f'checker failed: {type(error).__name__}')


def demonstration(task: Task) -> str:
  """A gold response in the format the reward expects (short reasoning, then the answer), for SFT before RL."""
  return _domain(task.domain).demonstration(task)


__all__ = ['DOMAINS', 'Reward', 'Task', 'demonstration', 'sample_tasks', 'score']

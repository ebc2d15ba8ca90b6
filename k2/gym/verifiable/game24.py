"""The 24 game: combine four numbers, each used once, with + - * / and parentheses to make 24.

The expression on the 'Answer:' line is parsed with `ast` and only numbers, the four operators and parentheses are
accepted (never eval'd); it is evaluated in exact fractions (8 / (3 - 8 / 3) = 24 counts). Level 1 draws numbers from
1-9, level 2 from 1-13; only solvable sets are drawn, and the gold response is a solution the solver found.
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
from fractions import Fraction

from k2.gym.verifiable.common import Reward, Task, draw, final_answer, task_id

NAME = 'game24'
LEVELS = (1, 2)
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOL = {ast.Add: '+', ast.Sub: '-', ast.Mult: '*', ast.Div: '/'}


def solve(numbers: list[int]) -> str | None:
  """An expression over `numbers` equal to 24, or None: combine any two values until one is left."""
  return _solve(tuple(sorted(numbers)))


@functools.cache  # 715 multisets of 1-9, 1820 of 1-13: generation redraws the same ones
def _solve(numbers: tuple[int, ...]) -> str | None:
  def search(items):
    if len(items) == 1:
      return items[0][1] if items[0][0] == 24 else None
    for i, j in itertools.permutations(range(len(items)), 2):
      (a, ea), (b, eb) = items[i], items[j]
      rest = [items[k] for k in range(len(items)) if k not in (i, j)]
      for op, fn in _OPS.items():
        if op is ast.Div and b == 0:
          continue
        expr = f'{ea}{_SYMBOL[op]}{eb}' if len(rest) == 0 else f'({ea}{_SYMBOL[op]}{eb})'
        found = search(rest + [(fn(a, b), expr)])
        if found:
          return found
    return None
  return search([(Fraction(n), str(n)) for n in numbers])


def generate(rng: random.Random, split: str, level: int) -> Task:
  high = 9 if level == 1 else 13

  def sample(r):
    while True:
      numbers = sorted(r.randint(1, high) for _ in range(4))
      solution = solve(numbers)
      if solution:
        return f'{level}:{numbers}', (numbers, solution)

  key, (numbers, solution) = draw(rng, split, sample)
  shown = ' '.join(map(str, rng.sample(numbers, 4)))
  prompt = (f'Make 24 from {shown} using + - * / and parentheses, each number once. '
            "End with 'Answer: <expression>'.")
  return Task(domain=NAME, split=split, level=level, prompt=prompt, answer=solution, meta={'numbers': numbers},
              task_id=task_id(NAME, key))


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
  """The value of an expression tree of integers and + - * /; anything else raises ValueError."""
  if isinstance(node, ast.Constant) and type(node.value) is int:
    used.append(node.value)
    return Fraction(node.value)
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
  raise ValueError(type(node).__name__)


def score(task: Task, response: str) -> Reward:
  text, why = final_answer(response)
  if text is None:
    return Reward(0.0, why)
  text = text.replace('×', '*').replace('÷', '/').split('=')[0].strip().rstrip('.')
  if len(text) > 80:
    return Reward(0.0, 'expression too long')
  try:
    used = []
    value = _evaluate(ast.parse(text, mode='eval').body, used)
  except SyntaxError:
    return Reward(0.0, 'expression does not parse')
  except ValueError:
    return Reward(0.0, 'expression uses more than numbers and + - * /')
  except ZeroDivisionError:
    return Reward(0.0, 'division by zero')
  if sorted(used) != sorted(task.meta['numbers']):
    return Reward(0.0, 'numbers differ from the given four')
  return Reward(1.0, 'correct') if value == 24 else Reward(0.0, 'does not make 24')


def demonstration(task: Task) -> str:
  return f'Answer: {task.answer}'

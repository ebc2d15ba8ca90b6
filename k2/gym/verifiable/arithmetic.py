"""Arithmetic word problems with exact answers, in graded levels, so a small model can be given tasks it solves
sometimes (k1.5: moderate difficulty by the SFT model's pass rate).

  level 1: one addition or subtraction of single digits     "Ana has 7 pens. She buys 5 more. How many ...?"
  level 2: the same with two-digit numbers
  level 3: two additions/subtractions of numbers up to 20
  level 4: boxes times items per box, then an addition or subtraction
  level 5: level 4, then an equal split of the result

The gold response states one equation per step, then 'Answer: N'. Any response whose single 'Answer:' line holds
the same rational number ('12', '12.0', '24/2', '12 pens') scores 1. Equivalence is exact rational arithmetic
(fractions): every answer here is a rational number, which needs no symbolic algebra.
"""

from __future__ import annotations

import random
from fractions import Fraction

from k2.gym.verifiable.common import Reward, Task, draw, final_answer, parse_number, task_id

NAME = 'arithmetic'
LEVELS = (1, 2, 3, 4, 5)
_PEOPLE = (('Ana', 'She'), ('Ben', 'He'), ('Mia', 'She'), ('Leo', 'He'), ('Zoe', 'She'), ('Sam', 'He'))
_ITEMS = ('pens', 'apples', 'stamps', 'cards', 'shells', 'coins', 'books', 'marbles')
_MORE = ('{p} buys {n} more.', '{p} finds {n} more.', '{p} gets {n} more.')
_LESS = ('{p} gives away {n}.', '{p} sells {n}.', '{p} loses {n}.')


def _steps(rng: random.Random, level: int) -> tuple[int, list[tuple[str, int]]]:
  """(start, [(op, operand), ...]) with every intermediate value non-negative and every split exact."""
  if level in (1, 2):
    low, high = (1, 9) if level == 1 else (10, 99)
    start, n = rng.randint(max(low, 2), high), rng.randint(low, high)  # 'has 2 pens' or more: plurals read right
    return start, [('+', n) if rng.random() < 0.5 or n > start else ('-', n)]
  if level == 3:
    value = start = rng.randint(2, 20)
    steps = []
    for _ in range(2):
      n = rng.randint(2, 20)
      op = '+' if rng.random() < 0.5 or n > value else '-'
      value += n if op == '+' else -n
      steps.append((op, n))
    return start, steps
  while True:
    boxes, per_box, n = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 30)
    op = '+' if rng.random() < 0.5 or n > boxes * per_box else '-'
    total = boxes * per_box + (n if op == '+' else -n)
    divisors = [d for d in range(2, 10) if total % d == 0 and total > d]
    if level == 4 or divisors:
      return boxes, [('*', per_box), (op, n)] + ([('/', rng.choice(divisors))] if level == 5 else [])


def _apply(value: int, op: str, n: int) -> int:
  return {'+': value + n, '-': value - n, '*': value * n, '/': value // n}[op]


def generate(rng: random.Random, split: str, level: int) -> Task:
  key, (start, steps) = draw(rng, split, lambda r: _keyed(r, level))
  (name, pronoun), item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
  if steps[0][0] == '*':
    sentences = [f'{name} has {start} boxes with {steps[0][1]} {item} in each.']
  else:
    sentences = [f'{name} has {start} {item}.']
  for op, n in steps[1:] if steps[0][0] == '*' else steps:
    if op == '/':
      sentences.append(f'{pronoun} splits them into {n} equal piles and keeps one.')
    else:
      sentences.append(rng.choice(_MORE if op == '+' else _LESS).format(p=pronoun, n=n))
  sentences.append(f"How many {item} does {name} have now? End with 'Answer: <number>'.")
  value = start
  for op, n in steps:
    value = _apply(value, op, n)
  return Task(domain=NAME, split=split, level=level, prompt=' '.join(sentences), answer=str(value),
              meta={'start': start, 'steps': [list(s) for s in steps]}, task_id=task_id(NAME, key))


def _keyed(rng: random.Random, level: int):
  start, steps = _steps(rng, level)
  return f'{level}:{start}' + ''.join(f'{op}{n}' for op, n in steps), (start, steps)


def score(task: Task, response: str) -> Reward:
  text, why = final_answer(response)
  if text is None:
    return Reward(0.0, why)
  value = parse_number(text)
  if value is None:
    return Reward(0.0, 'answer is not a number')
  return Reward(1.0, 'correct') if value == Fraction(task.answer) else Reward(0.0, 'wrong answer')


def demonstration(task: Task) -> str:
  """One equation per step, then the answer line."""
  value, lines = task.meta['start'], []
  for op, n in task.meta['steps']:
    result = _apply(value, op, n)
    lines.append(f'{value} {op} {n} = {result}')
    value = result
  return '\n'.join(lines + [f'Answer: {task.answer}'])


def column_demonstration(task: Task) -> str:
  """`demonstration` with every addition or subtraction of a two-digit number worked column by column, units first
  ('34 + 58: 4 + 8 = 12, 3 + 5 + 1 = 9, so 34 + 58 = 92'): every step is then a single-digit fact (with a carry or
  a borrow), so a held-out problem, whose numbers never occur together in training, is made of steps that do."""
  value, lines = task.meta['start'], []
  for op, n in task.meta['steps']:
    result = _apply(value, op, n)
    columns = _columns(value, op, n) if op in '+-' and max(value, n) >= 10 else []
    lines.append(f'{value} {op} {n}: ' + ', '.join(columns) + f', so {value} {op} {n} = {result}' if columns
                 else f'{value} {op} {n} = {result}')
    value = result
  return '\n'.join(lines + [f'Answer: {task.answer}'])


def _columns(a: int, op: str, b: int) -> list[str]:
  """The column steps of a + b or a - b (a >= b), units first: 'top op digit [+ carry] = result'. A borrow shows as
  the column's top digit plus 10 ('13 - 7 = 6') and the next column's top digit minus 1 ('8 - 1 - 4 = 3')."""
  columns, carry, place = [], 0, 1
  while place <= max(a, b) or carry:
    da, db = a // place % 10, b // place % 10
    if op == '+':
      total = da + db + carry
      columns.append(f'{da} + {db}' + (' + 1' if carry else '') + f' = {total}')
      carry = total // 10
    else:
      top = da - carry
      carry = int(top < db)
      shown = f'{da} - 1' if top != da else f'{da}'
      columns.append((f'{top + 10}' if carry else shown) + f' - {db} = {top + 10 * carry - db}')
    place *= 10
  return columns

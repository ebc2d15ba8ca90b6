"""Code tasks scored by hidden tests in the sandbox (k2.gym.sandbox): write `solve(...)` that does a small,
parameterized job ('the sum of the numbers in xs divisible by 3').

The response's last ```python block is run by `sandbox.run_tests` against six hidden cases; the expected outputs are
computed here, in the parent, from the family's reference solution (also the gold response) and never enter the
sandbox. The reward is 1.0 when every case passes, else 0.0 with the reason (failed count, timeout, syntax error).
"""

from __future__ import annotations

import random
import re
import string

from k2.gym import sandbox
from k2.gym.verifiable.common import Reward, Task, draw, task_id

NAME = 'code'
LEVELS = (1, 2)
NUM_CASES = 6


def _ints(rng, k):
  return [[rng.randint(-20, 40) for _ in range(rng.randint(0, 8))] for _ in range(k)]


def _text(rng, k):
  return [''.join(rng.choice(string.ascii_lowercase[:8] + ' ') for _ in range(rng.randint(0, 14))) for _ in range(k)]


# (level, task text with {p}, parameter values, reference source with {p}, argument generator -> [args, ...])
_FAMILIES = {
    'sum_divisible': (1, 'returns the sum of the numbers in list xs divisible by {p}', range(2, 10),
                      'def solve(xs):\n  return sum(x for x in xs if x % {p} == 0)\n',
                      lambda r: [[x] for x in _ints(r, NUM_CASES)]),
    'scale': (1, 'returns list xs with every number multiplied by {p}', range(2, 10),
              'def solve(xs):\n  return [x * {p} for x in xs]\n', lambda r: [[x] for x in _ints(r, NUM_CASES)]),
    'count_char': (1, "returns how many times '{p}' appears in string s", 'abcdefgh',
                   "def solve(s):\n  return s.count('{p}')\n", lambda r: [[s] for s in _text(r, NUM_CASES)]),
    'prefix_upper': (1, 'returns the first {p} characters of string s in capital letters', range(1, 8),
                     'def solve(s):\n  return s[:{p}].upper()\n', lambda r: [[s] for s in _text(r, NUM_CASES)]),
    'above': (1, 'returns how many numbers in list xs are greater than {p}', range(0, 20),
              'def solve(xs):\n  return sum(1 for x in xs if x > {p})\n', lambda r: [[x] for x in _ints(r, NUM_CASES)]),
    'fib_mod': (2, 'returns the n-th Fibonacci number modulo {p} (fib(0) = 0, fib(1) = 1)', range(5, 40),
                'def solve(n):\n  a, b = 0, 1\n  for _ in range(n):\n    a, b = b, a + b\n  return a % {p}\n',
                lambda r: [[r.randint(0, 60)] for _ in range(NUM_CASES)]),
    'fizz': (2, "returns the list of numbers 1..n as strings, with multiples of {p} replaced by 'Fizz'", range(2, 8),
             "def solve(n):\n  return ['Fizz' if i % {p} == 0 else str(i) for i in range(1, n + 1)]\n",
             lambda r: [[r.randint(0, 15)] for _ in range(NUM_CASES)]),
    'digit_sum_times': (2, 'returns {p} times the sum of the decimal digits of the non-negative integer n', range(1, 6),
                        'def solve(n):\n  return {p} * sum(int(d) for d in str(n))\n',
                        lambda r: [[r.randint(0, 10 ** 6)] for _ in range(NUM_CASES)]),
    'dedupe_keep': (2, 'returns list xs without repeats, in first-seen order, keeping only numbers under {p}',
                    range(0, 30), 'def solve(xs):\n  seen = []\n  for x in xs:\n    if x < {p} and x not in seen:\n'
                    '      seen.append(x)\n  return seen\n', lambda r: [[x] for x in _ints(r, NUM_CASES)]),
}


def generate(rng: random.Random, split: str, level: int) -> Task:
  names = sorted(n for n, family in _FAMILIES.items() if family[0] == level)

  def sample(r):
    name = r.choice(names)
    param = r.choice(list(_FAMILIES[name][2]))
    return f'{name}:{param}', (name, param)

  key, (name, param) = draw(rng, split, sample)
  _, text, _, source, make_args = _FAMILIES[name]
  solution = source.format(p=param)
  reference = {}
  exec(solution, reference)  # our own reference code, run in the parent to compute the hidden expected outputs
  cases = [[args, reference['solve'](*args)] for args in make_args(rng)]
  prompt = f'Write a Python function solve that {text.format(p=param)}. Reply with a ```python block.'
  return Task(domain=NAME, split=split, level=level, prompt=prompt, answer='',
              meta={'solution': solution, 'cases': cases}, task_id=task_id(NAME, key))


_BLOCK = re.compile(r'```(?:python|py)?\s*\n(.*?)```', re.DOTALL)


def score(task: Task, response: str, timeout_s: float = 2.0) -> Reward:
  blocks = _BLOCK.findall(response)
  if not blocks:
    return Reward(0.0, 'no ```python block')
  result = sandbox.run_tests(blocks[-1], 'solve', [(args, expected) for args, expected in task.meta['cases']],
                             timeout_s=timeout_s)
  if result.passed == result.total:
    return Reward(1.0, 'correct')
  return Reward(0.0, f'sandbox {result.status}: {result.reason}' if result.status != 'ok' else result.reason)


def demonstration(task: Task) -> str:
  return f"```python\n{task.meta['solution']}```"

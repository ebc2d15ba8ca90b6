"""What every verifiable domain shares: the task and reward records, the held-out split by content, and the final
answer line the math and logic rewards read."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from k2.gym.env import SPLITS

HELDOUT_SHARE = 5  # one problem in 5 (by content hash) is held out


@dataclasses.dataclass(frozen=True)
class Task:
  """One prompt with what its reward needs. `prompt` is the user message (short: the CPU demo's model has 1024
  positions); `answer` is the gold final answer ('' where many answers are right: instructions, code); `meta` holds
  the domain's checking data (JSON values), never shown to the policy (code tasks' hidden tests live here)."""
  domain: str
  split: str
  level: int
  prompt: str
  answer: str
  meta: Mapping[str, Any]
  task_id: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Reward:
  value: float  # in [0, 1]
  reason: str   # 'correct' at 1.0, else what was wrong (a metrics key: short, no response text in it)


def split_of(key: str) -> str:
  """The split a problem belongs to, by a hash of its content, so train and held-out never share a problem."""
  return 'heldout' if int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELDOUT_SHARE == 0 else 'train'


def draw(rng: random.Random, split: str, sample: Callable[[random.Random], tuple[str, Any]]) -> tuple[str, Any]:
  """sample(rng) -> (content key, problem), redrawn until the problem falls in `split`; (key, problem)."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; known: {SPLITS}')
  for _ in range(10_000):
    key, problem = sample(rng)
    if split_of(key) == split:
      return key, problem
  raise ValueError(f'no problem of split {split!r} in 10000 draws: the pool is too small')


def task_id(domain: str, key: str) -> str:
  return f'{domain}/{hashlib.sha256(key.encode()).hexdigest()[:12]}'


_ANSWER = re.compile(r'^\s*answer\s*:\s*(.*?)\s*$', re.IGNORECASE | re.MULTILINE)


def final_answer(response: str) -> tuple[str | None, str]:
  """The text of the response's 'Answer: ...' line, or (None, why not). Several lines that disagree are rejected, so
  listing guesses earns nothing."""
  found = [a for a in _ANSWER.findall(response) if a]
  if not found:
    return None, 'no "Answer:" line'
  if len(set(found)) > 1:
    return None, 'several different answers'
  return found[-1], ''


_NUMBER = re.compile(r'^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?(/\d+)?$')


def parse_number(text: str) -> Fraction | None:
  """An exact rational from '42', '-3', '1,250', '2.5', '7/4' (a trailing period or unit word dropped); None if
  it is not one number."""
  words = text.strip().rstrip('.').split()
  if not words or not _NUMBER.match(words[0]) or len(words) > 2:
    return None
  try:
    return Fraction(words[0].replace(',', ''))
  except (ValueError, ZeroDivisionError):
    return None


def format_number(value: Fraction) -> str:
  return str(value.numerator) if value.denominator == 1 else f'{value.numerator}/{value.denominator}'

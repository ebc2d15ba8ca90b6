"""The verifiable gym (k2.gym.verifiable) as RL prompts and rewards, and its gold demonstrations as SFT data.

    prompts = tasks.prompts(verifiable.sample_tasks('arithmetic', 256, seed=0, level=2), tokenizer, budgets)
    reward_fn = tasks.reward_fn(tokenizer)          # for k2.rl.trainer: (prompt, token ids) -> (value, reason)
    tasks.write_demonstrations('/tmp/rl_demo/train.jsonl', train_tasks, long_share=0.3)   # SFT before RL

A prompt is the task's user message rendered in K2's chat format with the generation prompt; the reward reads the
response's text (its token ids decoded, the closing <|im_end|> left out) with `verifiable.score`, which never raises.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence

from k2 import chat
from k2.gym import verifiable
from k2.gym.verifiable import arithmetic
from k2.rl.trainer import Prompt, RewardFn

IM_END = '<|im_end|>'


def prompts(tasks: Sequence[verifiable.Task], tokenizer: chat.Tokenizer,
            budgets: Mapping[str, int]) -> list[Prompt]:
  """One Prompt per task, its budget (max generated tokens, the closing <|im_end|> included) by domain."""
  missing = sorted({t.domain for t in tasks} - set(budgets))
  if missing:
    raise ValueError(f'no token budget for the domains {missing}; set one per domain')
  return [Prompt(domain=t.domain, tokens=tuple(chat.render([chat.Message('user', t.prompt)], tokenizer,
                                                           add_generation_prompt=True).tokens),
                 max_new_tokens=budgets[t.domain], task=t, question=t.prompt,
                 rubric=_TASK_RUBRICS.get(t.domain, '')) for t in tasks]


# The task-specific rubric the self-critique reads (k2.rl.critic), per domain.
_TASK_RUBRICS = {
    'arithmetic': 'Each step is one correct equation and the last line is "Answer: N" with the right number.',
    'game24': 'The expression uses each given number once and evaluates to 24.',
    'sudoku': 'The grid is complete and every row, column and box holds each digit once.',
    'instructions': 'Every stated constraint is met, and compliance is shown, not claimed.',
    'code': 'The function is correct on all inputs, including edge cases.',
}


def response_text(tokens: Sequence[int], tokenizer: chat.Tokenizer) -> str:
  """The assistant's text of sampled ids: the closing <|im_end|> dropped, other special tokens by name."""
  end = tokenizer.special_tokens[IM_END]
  return chat.decode([t for t in tokens if t != end], tokenizer)


def reward_fn(tokenizer: chat.Tokenizer) -> RewardFn:
  """(prompt, response ids) -> (value, reason) by the task's verifiable reward."""
  def score(prompt: Prompt, tokens: list[int]) -> tuple[float, str]:
    reward = verifiable.score(prompt.task, response_text(tokens, tokenizer))
    return reward.value, reward.reason
  return score


def padded_demonstration(task: verifiable.Task, repeats: int,
                         demonstrate: Callable[[verifiable.Task], str] = verifiable.demonstration) -> str:
  """The gold response with its working restated `repeats` times before the answer: an over-long demonstration
  (for budget control: SFT on a share of these makes the model overrun its token budget)."""
  lines = demonstrate(task).splitlines()
  working, answer = lines[:-1], lines[-1]
  return '\n'.join(working + ['Let me check that again.', *working] * repeats + [answer])


def column_arithmetic(task: verifiable.Task) -> str:
  """The gold response, with arithmetic worked column by column (`arithmetic.column_demonstration`)."""
  if task.domain == arithmetic.NAME:
    return arithmetic.column_demonstration(task)
  return verifiable.demonstration(task)


def write_demonstrations(path: str, tasks: Sequence[verifiable.Task], *, long_share: float = 0.0,
                         long_repeats: int = 3, seed: int = 0,
                         demonstrate: Callable[[verifiable.Task], str] = verifiable.demonstration) -> int:
  """JSONL conversations (k2.data.conversations) of the tasks' gold responses (`demonstrate`); a `long_share` of
  them padded (`padded_demonstration`). Returns how many were written."""
  rng = random.Random(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    for task in tasks:
      answer = (padded_demonstration(task, long_repeats, demonstrate) if rng.random() < long_share
                else demonstrate(task))
      f.write(json.dumps({'messages': [{'role': 'user', 'content': task.prompt},
                                       {'role': 'assistant', 'content': answer}]}) + '\n')
  return len(tasks)

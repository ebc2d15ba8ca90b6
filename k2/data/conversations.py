"""Chat data for SFT: JSONL conversations -> K2 chat tokens with an assistant-only loss mask -> packed batches.

One conversation per line, in the OpenAI chat shape (what the synthesis pipeline writes):
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "", "tool_calls": [...]},
                  {"role": "tool", "tool_call_id": "...", "content": "..."}, ...],
     "tools": [{"type": "function", "function": {"name": ..., "parameters": {...}}}]}      # tools optional

Each conversation is rendered with `k2.chat.render` (Kimi-K2-Instruct's format) and shifted into next-token rows:
inputs = tokens[:-1], targets = tokens[1:], and a target counts in the loss only if the assistant wrote it (its text,
its tool-call section and its closing <|im_end|>). Conversations are packed whole into rows (first-fit, no
conversation split across rows; one longer than a row is dropped and counted), with segment ids and positions so
attention stays inside each conversation. Batches carry the pretraining keys, so the step's next-token loss serves
SFT unchanged: its mask is the assistant mask.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import grain
import numpy as np

from k2 import chat
from k2.config import ConfigError
from k2.data.pipeline import Batches


def read(pattern: str) -> list[dict]:
  """The conversations of the JSONL files matching `pattern` (globs, comma-separated for several sources);
  ConfigError naming the file and line of a bad one."""
  paths = set()
  for part in pattern.split(','):
    matched = glob.glob(os.path.expanduser(part.strip()))
    if not matched:
      raise ConfigError(f'conversations {part.strip()!r}: no such file')
    paths.update(matched)
  paths = sorted(paths)
  conversations = []
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          messages = [chat.Message.from_dict(m) for m in record['messages']]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
          raise ConfigError(f'{path}:{number} is not a conversation ({type(e).__name__}: {e})') from None
        if not any(m.role == 'assistant' for m in messages):
          raise ConfigError(f'{path}:{number} has no assistant message to train on')
        conversations.append({'messages': messages, 'tools': record.get('tools')})
  if not conversations:
    raise ConfigError(f'conversations {pattern!r}: no conversations in {len(paths)} file(s)')
  return conversations


LOSS_ON = ('assistant', 'all')


class _Render(grain.transforms.Map):

  def __init__(self, tokenizer: chat.Tokenizer, loss_on: str = 'assistant'):
    self._tokenizer = tokenizer
    self._loss_on = loss_on

  def map(self, conversation: dict) -> dict[str, np.ndarray]:
    rendered = chat.render(conversation['messages'], self._tokenizer, tools=conversation['tools'])
    tokens = np.asarray(rendered.tokens, np.int32)
    weights = np.asarray(rendered.loss_mask, np.float32)
    if self._loss_on == 'all':  # every token a target: system prompt, user, tool results too
      weights = np.ones_like(weights)
    return {'inputs': tokens[:-1], 'targets': tokens[1:], 'weights': weights[1:]}


def _finish_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {'inputs': row['inputs'], 'targets': row['targets'],
          'positions': row['inputs_positions'].astype(np.int32),
          'segment_ids': row['inputs_segment_ids'].astype(np.int32),
          'mask': row['weights'] * (row['targets_segment_ids'] > 0)}


def rendered_lengths(conversations: Sequence[dict], tokenizer: chat.Tokenizer) -> np.ndarray:
  """Tokens per conversation as rendered (what packing compares with a row's length)."""
  return np.asarray([len(chat.render(c['messages'], tokenizer, tools=c['tools']).tokens) for c in conversations])


def sft_batches(conversations: Sequence[dict], tokenizer: chat.Tokenizer, *, batch_size: int, seq_len: int,
                seed: int, shuffle: bool = True, repeat: bool = True, process_index: int = 0,
                process_count: int = 1, packing_bins: int = 16, loss_on: str = 'assistant') -> Batches:
  """A checkpointable iterator of packed [batch_size, seq_len] SFT batches (see the module docstring).
  Conversations longer than seq_len + 1 tokens are left out (the caller counts them with `rendered_lengths`).
  loss_on: 'assistant' (the SFT mask) or 'all' (every token, as pretraining on the conversations' text)."""
  if loss_on not in LOSS_ON:
    raise ConfigError(f'loss_on must be one of {LOSS_ON}, got {loss_on!r}')
  chat.check_tokenizer(tokenizer)
  dataset = grain.MapDataset.source(list(conversations))[process_index::process_count]
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  if repeat:
    dataset = dataset.repeat()
  dataset = dataset.map(_Render(tokenizer, loss_on)).filter(lambda row: len(row['inputs']) <= seq_len)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  dataset = grain.experimental.FirstFitPackIterDataset(
      dataset, length_struct={'inputs': seq_len, 'targets': seq_len, 'weights': seq_len},
      num_packing_bins=packing_bins, seed=seed, shuffle_bins=shuffle)
  return Batches(iter(dataset.map(_finish_row).batch(batch_size, drop_remainder=True)))
